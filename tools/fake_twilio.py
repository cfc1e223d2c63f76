"""A faithful fake of Twilio's side of a phone call, for end-to-end tests and `simulate_call`.

It does what Twilio does for a call to (or from) a number whose Voice URL is the bridge
(reference: ``shared/reference/twilio.md`` §1-§4, §7):

1. POSTs the signed, form-encoded voice webhook and requires 200 + XML TwiML;
2. parses ``<Connect><Stream url>`` and its ``<Parameter>``s, then opens the WebSocket with
   ``x-twilio-signature`` computed over the exact ``wss://`` URL from the TwiML with ``{}``
   (connecting to ``connect_base`` instead of the public host);
3. sends ``connected`` (no sequenceNumber), ``start`` (sequenceNumber "1"), then a media frame
   every 20 ms of call time without pause, with ``dtmf``/``mark``/``stop`` sharing one counter;
4. plays what the bridge sends through a `Playback` model (a FIFO of audio and marks drained at
   8 bytes per ms of call time), echoing marks when played and every pending mark on ``clear``;
5. checks every bridge frame against the documented outbound schema (31950/31951);
6. ends the call: caller hang-up (``stop`` then close, or an abrupt close), server close (then
   the TwiML after ``</Connect>`` "runs"), REST hang-up or redirect, or the call deadline.

"Call time" is seconds since ``start`` was sent, times ``CallPlan.speed``: at speed 20 both the
media clock and the playback clock run 20x faster than the wall clock.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import logging
import math
import secrets
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket,
)
from twilio.request_validator import RequestValidator

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
WS_USER_AGENT = "Twilio.TmeWs/1.0"
WEBHOOK_USER_AGENT = "TwilioProxy/1.1"
BYTES_PER_S = 8000  # G.711 μ-law 8 kHz mono: 8 bytes per ms
SILENCE = 0xFF

# Twilio error codes the fake records (reference §1.7).
ERR_CONNECT_TIMEOUT = 31901
ERR_CONNECT_REFUSED = 31902
ERR_HANDSHAKE = 31920
ERR_SERVER_CLOSED = 31921
ERR_NOT_WSS = 31922
ERR_MALFORMED_URL = 31923
ERR_BINARY_FRAME = 31950
ERR_INVALID_MESSAGE = 31951
ERR_FAKE_LIMIT = 0  # a documented limit with no documented error code (e.g. <Parameter> length)

# Twilio's default voice-URL timeout; also bounds status and stream callbacks.
WEBHOOK_TIMEOUT_S = 15.0
# Twilio's WS handshake timeout is undocumented; a local bridge answers in milliseconds.
HANDSHAKE_TIMEOUT_S = 10.0
# Close handshake after our close frame; a bridge that never answers it must not hang a test.
CLOSE_TIMEOUT_S = 2.0
# Wall-clock slack on top of the call-time deadline (webhook, handshake, close, callbacks).
DEADLINE_SLACK_S = 10.0
# Frames queued for the one writer task: about 5 s of caller media at 20 ms per frame, so a
# bridge that stops reading stalls the media clock (as TCP backpressure would) without
# unbounded memory.
_OUT_QUEUE_FRAMES = 256
# Per-message limit of the WS client. Twilio documents no maximum chunk size (reference §1.3).
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

EndedBy = Literal["caller", "server", "redirect", "api", "timeout", "failed"]


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two-letter prefix + 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


class FakeTwilioError(Exception):
    """Base class for errors raised by the fake itself."""


class StreamRejected(FakeTwilioError):
    """`FakeTwilio.open_stream`: the server did not answer the upgrade with 101."""

    def __init__(self, status_code: int | None, detail: str) -> None:
        super().__init__(f"stream handshake failed ({status_code}): {detail}")
        self.status_code = status_code
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Plans and results


@dataclass
class CallPlan:
    """What the caller does on one simulated call."""

    direction: Literal["inbound", "outbound-api"] = "inbound"
    from_: str = "+14155550123"
    to: str = "+14155550100"
    call_sid: str | None = None  # default "CA" + 32 hex
    caller_audio: bytes = b""  # raw μ-law 8 kHz, streamed from call time 0, then silence
    speed: float = 1.0  # time scale of the media clock and the playback clock
    hangup_after_s: float | None = None  # caller hangs up at this call time
    hangup_when: Callable[[CallResult], bool] | None = None  # checked after each event
    abrupt_close: bool = False  # hang up by closing without `stop`
    dtmf: list[tuple[float, str]] = field(default_factory=list)  # (call time s, digit)
    extra_param: bool = True  # add a webhook param the bridge doesn't know
    frame_bytes: int = 160
    max_call_s: float = 120.0  # call-time deadline: the caller hangs up, ended_by "timeout"
    drop_frames: list[int] = field(default_factory=list)  # media ticks (1-based) never sent
    status_callback: str | None = None  # call status callback URL (public URL or path)
    status_callback_events: list[str] = field(default_factory=lambda: ["completed"])


@dataclass
class CallResult:
    """Everything observed on one call. Updated live during the call (for `hangup_when`);
    ``heard`` is filled in when the stream ends."""

    twiml: str = ""
    stream_url: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    handshake_status: int | None = None  # 101, or the HTTP status of a rejected upgrade
    stream_sid: str = ""
    call_sid: str = ""
    heard: bytes = b""  # μ-law actually played to the caller
    received_media_payloads: list[str] = field(default_factory=list)
    marks_echoed: list[tuple[str, str]] = field(default_factory=list)  # (name, played|cleared)
    clears: list[float] = field(default_factory=list)  # call time of each clear
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    first_audio_s: float | None = None
    violations: list[tuple[int, str]] = field(default_factory=list)
    ended_by: EndedBy = "timeout"
    close_code: int | None = None
    post_connect_verbs: list[str] = field(default_factory=list)
    # Extras beyond the core contract:
    webhook_url: str = ""  # public URL that was signed
    webhook_params: dict[str, str] = field(default_factory=dict)
    webhook_status: int | None = None
    error: str | None = None  # why the call failed before or at the stream (webhook, TwiML)
    redirect_twiml: str | None = None
    heard_bytes: int = 0  # len(heard), kept current during the call
    dropped_at_close_bytes: int = 0  # queued audio never played because the socket closed
    unechoed_marks: list[str] = field(default_factory=list)  # marks pending at socket close
    frames_sent: int = 0  # messages sent after `connected`

    def add(self, at_s: float, kind: str, detail: str = "") -> None:
        self.timeline.append((at_s, kind, detail))

    @property
    def heard_s(self) -> float:
        return self.heard_bytes / BYTES_PER_S


# --------------------------------------------------------------------------------------------
# Playback (pure: no I/O, time enters as `now_s`)


@dataclass(frozen=True, slots=True)
class PlaybackEvent:
    at_s: float
    kind: Literal["play_start", "play_end", "mark_played", "mark_cleared"]
    name: str = ""


@dataclass(frozen=True, slots=True)
class _Mark:
    name: str


class Playback:
    """Twilio's outbound buffer: a FIFO of audio and marks drained at 8 bytes per ms.

    Invariants: the cursor only moves forward; a mark is reported exactly once, as played when
    every byte queued before it has played (at once if nothing is queued) or as cleared by
    `clear`; ``heard`` is exactly the bytes the cursor passed. Audio plays from the moment it is
    queued while idle; a gap in the bridge's sending is a gap (silence) in playback. Event times
    are exact virtual times, so an event can be reported slightly after it happened.
    """

    # Float slack when turning call time into whole bytes (1e-3 byte = 125 ns).
    _EPS_BYTES = 1e-3

    def __init__(self) -> None:
        self._queue: deque[bytes | _Mark] = deque()
        self._head_offset = 0  # bytes of the head audio already played
        self._seg_start_s: float | None = None  # start of the current busy period; None: idle
        self._seg_played_bytes = 0
        self.queued_audio_bytes = 0
        self.heard = bytearray()

    @property
    def idle(self) -> bool:
        return self._seg_start_s is None

    def _cursor_s(self) -> float:
        assert self._seg_start_s is not None
        return self._seg_start_s + self._seg_played_bytes / BYTES_PER_S

    def advance(self, now_s: float) -> list[PlaybackEvent]:
        """Play everything due by `now_s`."""
        events: list[PlaybackEvent] = []
        if self._seg_start_s is None:
            return events
        due = math.floor((now_s - self._seg_start_s) * BYTES_PER_S + self._EPS_BYTES)
        budget = max(0, due - self._seg_played_bytes)
        while self._queue:
            head = self._queue[0]
            if isinstance(head, _Mark):
                self._queue.popleft()
                events.append(PlaybackEvent(self._cursor_s(), "mark_played", head.name))
                continue
            take = min(len(head) - self._head_offset, budget)
            if take > 0:
                self.heard += head[self._head_offset : self._head_offset + take]
                self._head_offset += take
                self._seg_played_bytes += take
                self.queued_audio_bytes -= take
                budget -= take
            if self._head_offset < len(head):
                break
            self._queue.popleft()
            self._head_offset = 0
        if not self._queue:
            events.append(PlaybackEvent(self._cursor_s(), "play_end"))
            self._seg_start_s = None
            self._seg_played_bytes = 0
        return events

    def add_audio(self, now_s: float, audio: bytes) -> list[PlaybackEvent]:
        events = self.advance(now_s)
        if not audio:
            return events
        if self._seg_start_s is None:
            self._seg_start_s = now_s
            self._seg_played_bytes = 0
            events.append(PlaybackEvent(now_s, "play_start"))
        self._queue.append(bytes(audio))
        self.queued_audio_bytes += len(audio)
        return events

    def add_mark(self, now_s: float, name: str) -> list[PlaybackEvent]:
        events = self.advance(now_s)
        if self._queue:
            self._queue.append(_Mark(name))
        else:
            events.append(PlaybackEvent(now_s, "mark_played", name))
        return events

    def clear(self, now_s: float) -> tuple[list[PlaybackEvent], int]:
        """Drop queued audio, report pending marks as cleared. Returns (events, dropped bytes)."""
        events = self.advance(now_s)
        dropped = self.queued_audio_bytes
        events += [
            PlaybackEvent(now_s, "mark_cleared", e.name)
            for e in self._queue
            if isinstance(e, _Mark)
        ]
        self._queue.clear()
        self._head_offset = 0
        self.queued_audio_bytes = 0
        if self._seg_start_s is not None:
            events.append(PlaybackEvent(now_s, "play_end"))
            self._seg_start_s = None
            self._seg_played_bytes = 0
        return events, dropped

    def close(self, now_s: float) -> tuple[list[PlaybackEvent], int, list[str]]:
        """The socket is gone: play what was due, drop the rest without echoes.

        Returns (events up to now, dropped bytes, names of marks never echoed)."""
        events = self.advance(now_s)
        dropped = self.queued_audio_bytes
        unechoed = [e.name for e in self._queue if isinstance(e, _Mark)]
        self._queue.clear()
        self._head_offset = 0
        self.queued_audio_bytes = 0
        self._seg_start_s = None
        return events, dropped, unechoed

    def next_due_s(self) -> float | None:
        """Call time of the next mark echo or end of playback; None when idle."""
        if self._seg_start_s is None:
            return None
        pending = 0
        for entry in self._queue:
            if isinstance(entry, _Mark):
                break
            pending += len(entry)
        pending -= self._head_offset
        return self._seg_start_s + (self._seg_played_bytes + pending) / BYTES_PER_S


# --------------------------------------------------------------------------------------------
# TwiML (pure)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    url: str
    name: str | None
    status_callback: str | None
    status_callback_method: str
    parameters: dict[str, str]


@dataclass(frozen=True, slots=True)
class Twiml:
    stream: StreamSpec | None
    connect_action: str | None
    verbs_before: list[str]  # verbs before <Connect> (or all verbs without one)
    verbs_after: list[str]  # verbs after </Connect>


class TwimlError(FakeTwilioError):
    """The webhook answered something that isn't usable TwiML."""


def _describe_verb(el: ET.Element) -> str:
    text = " ".join((el.text or "").split())
    if text:
        return f"{el.tag}: {text}"
    if el.attrib:
        return f"{el.tag}: " + " ".join(f"{k}={v}" for k, v in el.attrib.items())
    return el.tag


def parse_twiml(text: str) -> Twiml:
    """Parse a voice TwiML document.

    Raises:
        TwimlError: not XML, no <Response> root, or <Stream> without url.
    """
    try:
        root = ET.fromstring(text.encode() if isinstance(text, str) else text)
    except ET.ParseError as exc:
        raise TwimlError(f"TwiML is not XML: {exc}") from exc
    if root.tag != "Response":
        raise TwimlError(f"TwiML root is <{root.tag}>, not <Response>")
    before: list[str] = []
    after: list[str] = []
    stream: StreamSpec | None = None
    action: str | None = None
    seen_connect = False
    for el in root:
        if el.tag == "Connect" and not seen_connect:
            seen_connect = True
            action = el.get("action")
            st = el.find("Stream")
            if st is not None:
                url = st.get("url")
                if not url:
                    raise TwimlError("<Stream> has no url")
                params = {
                    p.get("name", ""): p.get("value", "") for p in st.findall("Parameter")
                }
                stream = StreamSpec(
                    url=url,
                    name=st.get("name"),
                    status_callback=st.get("statusCallback"),
                    status_callback_method=(st.get("statusCallbackMethod") or "POST").upper(),
                    parameters=params,
                )
            continue
        (after if seen_connect else before).append(_describe_verb(el))
    return Twiml(stream=stream, connect_action=action, verbs_before=before, verbs_after=after)


# --------------------------------------------------------------------------------------------
# Messages from the bridge (pure validation against reference §1.3)


@dataclass(frozen=True, slots=True)
class MediaOut:
    payload: str
    audio: bytes


@dataclass(frozen=True, slots=True)
class MarkOut:
    name: str


@dataclass(frozen=True, slots=True)
class ClearOut:
    pass


@dataclass(frozen=True, slots=True)
class Violation:
    code: int
    detail: str


_OUT_SCHEMA: dict[str, tuple[frozenset[str], str | None, frozenset[str]]] = {
    "media": (frozenset({"event", "streamSid", "media"}), "media", frozenset({"payload"})),
    "mark": (frozenset({"event", "streamSid", "mark"}), "mark", frozenset({"name"})),
    "clear": (frozenset({"event", "streamSid"}), None, frozenset()),
}


def parse_bridge_message(
    frame: str | bytes, stream_sid: str | None
) -> MediaOut | MarkOut | ClearOut | Violation:
    """Validate one frame the bridge sent; `stream_sid` is None before ``start`` was sent."""
    if isinstance(frame, bytes):
        return Violation(ERR_BINARY_FRAME, f"binary frame ({len(frame)} bytes)")
    short = frame if len(frame) <= 120 else frame[:117] + "..."
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return Violation(ERR_INVALID_MESSAGE, f"invalid JSON: {short!r}")
    if not isinstance(msg, dict):
        return Violation(ERR_INVALID_MESSAGE, f"not a JSON object: {short!r}")
    event = msg.get("event")
    if event not in _OUT_SCHEMA:
        return Violation(ERR_INVALID_MESSAGE, f"unsupported event {event!r}: {short!r}")
    top, nested_key, nested_fields = _OUT_SCHEMA[event]
    if set(msg) != top:
        extra, missing = sorted(set(msg) - top), sorted(top - set(msg))
        return Violation(
            ERR_INVALID_MESSAGE, f"{event}: extra fields {extra}, missing {missing}: {short!r}"
        )
    if stream_sid is None:
        return Violation(ERR_INVALID_MESSAGE, f"{event} sent before start: {short!r}")
    if msg["streamSid"] != stream_sid:
        return Violation(ERR_INVALID_MESSAGE, f"{event}: wrong streamSid {msg['streamSid']!r}")
    if nested_key is not None:
        nested = msg[nested_key]
        if not isinstance(nested, dict) or set(nested) != nested_fields:
            return Violation(
                ERR_INVALID_MESSAGE,
                f"{event}.{nested_key} must have exactly {sorted(nested_fields)}: {short!r}",
            )
    if event == "media":
        payload = msg["media"]["payload"]
        if not isinstance(payload, str):
            return Violation(ERR_INVALID_MESSAGE, "media.payload is not a string")
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return Violation(ERR_INVALID_MESSAGE, f"media.payload is not base64: {short!r}")
        return MediaOut(payload, audio)
    if event == "mark":
        name = msg["mark"]["name"]
        if not isinstance(name, str):
            return Violation(ERR_INVALID_MESSAGE, "mark.name is not a string")
        return MarkOut(name)
    return ClearOut()


# --------------------------------------------------------------------------------------------
# URLs


def _origin_parts(url: str) -> tuple[str, str, str]:
    """(scheme, host[:port] without the default port, path prefix without trailing slash)."""
    parts = urlsplit(url)
    default = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(parts.scheme)
    host = parts.hostname or ""
    netloc = host if parts.port in (None, default) else f"{host}:{parts.port}"
    return parts.scheme, netloc, parts.path.rstrip("/")


class _MultiParams(dict[str, list[str]]):
    """Repeated form params in the shape RequestValidator understands (it calls getlist)."""

    def getlist(self, name: str) -> list[str]:
        return self[name]


def _as_pairs(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        return [(str(k), str(v)) for k, v in params.items()]
    return [(str(k), str(v)) for k, v in params]


def twilio_signature(
    auth_token: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]] = ()
) -> str:
    """The X-Twilio-Signature Twilio sends for `url` (exactly as given) and form `params`
    (repeated names allowed). The bridge only ever checks signatures; signing is Twilio's side."""
    multi = _MultiParams()
    for k, v in _as_pairs(params):
        multi.setdefault(k, []).append(v)
    return str(RequestValidator(auth_token).compute_signature(url, multi))


def _now_rfc2822() -> str:
    return email.utils.format_datetime(datetime.now(UTC)).replace("-0000", "+0000")


# --------------------------------------------------------------------------------------------
# Low-level stream client (hostile tests)


class StreamClient:
    """A raw Media Streams connection as Twilio would open it, for hostile tests.

    Sends nothing by itself. ``send_*`` helpers build exact Twilio frames with a shared
    sequence counter; `send_raw` sends anything.
    """

    def __init__(self, ws: WebSocketConnection, *, account_sid: str, call_sid: str) -> None:
        self.ws = ws
        self.account_sid = account_sid
        self.call_sid = call_sid
        self.stream_sid = new_sid("MZ")
        self.handshake_status = 101
        self._seq = 0
        self._chunk = 0

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send_message(frame)

    async def send_event(self, event: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a Twilio message with the next sequenceNumber (``connected`` gets none)."""
        msg: dict[str, Any] = {"event": event}
        if event != "connected":
            self._seq += 1
            msg["sequenceNumber"] = str(self._seq)
            msg["streamSid"] = self.stream_sid
        msg.update(body or {})
        await self.ws.send_message(orjson.dumps(msg).decode())
        return msg

    async def send_connected(self) -> None:
        await self.send_event("connected", {"protocol": "Call", "version": "1.0.0"})

    async def send_start(self, custom_parameters: dict[str, str] | None = None) -> None:
        await self.send_event("start", {"start": _start_body(
            self.account_sid, self.stream_sid, self.call_sid, custom_parameters or {}
        )})

    async def send_media(self, audio: bytes, *, timestamp_ms: int | None = None) -> None:
        self._chunk += 1
        ts = self._chunk * 20 if timestamp_ms is None else timestamp_ms
        await self.send_event("media", {"media": {
            "track": "inbound", "chunk": str(self._chunk), "timestamp": str(ts),
            "payload": base64.b64encode(audio).decode(),
        }})

    async def send_dtmf(self, digit: str) -> None:
        await self.send_event("dtmf", {"dtmf": {"track": "inbound_track", "digit": digit}})

    async def send_mark(self, name: str) -> None:
        await self.send_event("mark", {"mark": {"name": name}})

    async def send_stop(self) -> None:
        await self.send_event(
            "stop", {"stop": {"accountSid": self.account_sid, "callSid": self.call_sid}}
        )

    async def receive(self) -> str | bytes:
        """Next frame from the server. Raises trio_websocket.ConnectionClosed when closed;
        the caller owns the deadline (wrap in `trio.fail_after`)."""
        return await self.ws.get_message()

    async def close(self, code: int = 1000) -> None:
        await self.ws.aclose(code)


def _start_body(
    account_sid: str, stream_sid: str, call_sid: str, custom: dict[str, str]
) -> dict[str, Any]:
    return {
        "accountSid": account_sid,
        "streamSid": stream_sid,
        "callSid": call_sid,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": dict(custom),
    }


# --------------------------------------------------------------------------------------------
# The fake


@dataclass(frozen=True, slots=True)
class _Hangup:
    reason: EndedBy
    send_stop: bool


class FakeTwilio:
    """Twilio's side of calls to one bridge.

    Args:
        http_base: where the bridge really listens for HTTP, e.g. ``http://127.0.0.1:3000``.
        public_base: the bridge's configured public origin, e.g. ``https://bridge.example.com``;
            webhooks are signed over it and stream URLs on it are mapped to `connect_base`.
        auth_token: signs webhooks and upgrades; None sends no signature headers.
        connect_base: WebSocket origin to really connect to; default `http_base` with
            http→ws / https→wss.
        account_sid: the AccountSid sent everywhere.
    """

    def __init__(
        self,
        *,
        http_base: str,
        public_base: str,
        auth_token: str | None,
        connect_base: str | None = None,
        account_sid: str | None = None,
    ) -> None:
        self.http_base = http_base.rstrip("/")
        self.public_base = public_base.rstrip("/")
        self.auth_token = auth_token
        if connect_base is None:
            scheme, rest = self.http_base.split("://", 1)
            connect_base = ("wss" if scheme == "https" else "ws") + "://" + rest
        self.connect_base = connect_base.rstrip("/")
        self.account_sid = account_sid or new_sid("AC")
        self.default_outbound_plan = CallPlan(direction="outbound-api")
        self.results: dict[str, CallResult] = {}
        self._live: dict[str, _CallRun] = {}
        self._done: dict[str, trio.Event] = {}

    # ---- signing and URL mapping

    def sign(self, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> str:
        """X-Twilio-Signature over `url` (exactly as given) and form `params`."""
        if self.auth_token is None:
            raise FakeTwilioError("no auth token to sign with")
        return twilio_signature(self.auth_token, url, params)

    def public_url(self, url_or_path: str) -> str:
        """The public URL Twilio would request (and sign) for a path or absolute URL."""
        if url_or_path.startswith("/"):
            return self.public_base + url_or_path
        return url_or_path

    def _http_url(self, public_url: str) -> str:
        _, pub_netloc, pub_path = _origin_parts(self.public_base)
        scheme, netloc, _ = _origin_parts(public_url)
        parts = urlsplit(public_url)
        if netloc != pub_netloc or scheme not in ("http", "https"):
            if public_url.startswith(self.http_base):
                return public_url
            raise FakeTwilioError(f"{public_url} is not on the public base {self.public_base}")
        rest = parts.path[len(pub_path) :] if parts.path.startswith(pub_path) else parts.path
        return self.http_base + rest + (f"?{parts.query}" if parts.query else "")

    def map_stream_url(self, stream_url: str) -> tuple[str, str]:
        """(signed URL, URL to connect to) for a stream URL from TwiML.

        Raises:
            FakeTwilioError: with a Twilio code in ``args[1]`` when Twilio would not connect.
        """
        pub_scheme, pub_netloc, pub_path = _origin_parts(self.public_base)
        want_scheme = "ws" if pub_scheme == "http" else "wss"
        if stream_url.startswith("/"):
            stream_url = f"{want_scheme}://{pub_netloc}{stream_url}"
        parts = urlsplit(stream_url)
        scheme, netloc, _ = _origin_parts(stream_url)
        if scheme not in ("ws", "wss"):
            raise FakeTwilioError(f"stream url scheme {scheme!r} is not wss", ERR_NOT_WSS)
        if scheme != want_scheme:
            raise FakeTwilioError(
                f"stream url is {scheme}:// but the public base is {pub_scheme}://", ERR_NOT_WSS
            )
        if netloc != pub_netloc:
            raise FakeTwilioError(
                f"stream url host {netloc!r} is not the public host {pub_netloc!r}",
                ERR_MALFORMED_URL,
            )
        if parts.query or stream_url.endswith("?"):
            raise FakeTwilioError(
                f"stream url has a query string ({stream_url}); use <Parameter>", ERR_HANDSHAKE
            )
        if parts.fragment:
            raise FakeTwilioError(f"stream url has a fragment ({stream_url})", ERR_MALFORMED_URL)
        path = parts.path or "/"
        rest = path[len(pub_path) :] if pub_path and path.startswith(pub_path) else path
        return stream_url, self.connect_base + rest

    # ---- HTTP

    async def post_webhook(
        self,
        path: str,
        params: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        sign: bool = True,
        signature: str | None = None,
        headers: Mapping[str, str] | None = None,
        method: Literal["POST", "GET"] = "POST",
    ) -> httpx.Response:
        """Request `path` (or an absolute public URL) as Twilio does, form-encoded and signed.

        `signature` overrides the computed one; ``sign=False`` omits the header. Bounded by
        WEBHOOK_TIMEOUT_S. Raises httpx.HTTPError on transport failure.
        """
        public = self.public_url(path)
        pairs = _as_pairs(params)
        hdrs = {
            "user-agent": WEBHOOK_USER_AGENT,
            "i-twilio-idempotency-token": secrets.token_hex(16),
        }
        if method == "GET":
            sep = "&" if "?" in public else "?"
            public = public + sep + urlencode(pairs) if pairs else public
            body = b""
            signed_pairs: list[tuple[str, str]] = []
        else:
            body = urlencode(pairs).encode()
            hdrs["content-type"] = "application/x-www-form-urlencoded"
            signed_pairs = pairs
        if signature is not None:
            hdrs["x-twilio-signature"] = signature
        elif sign and self.auth_token is not None:
            hdrs["x-twilio-signature"] = self.sign(public, signed_pairs)
        hdrs.update(headers or {})
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as client:
            return await client.request(method, self._http_url(public), content=body, headers=hdrs)

    def voice_params(self, plan: CallPlan, call_sid: str) -> dict[str, str]:
        """The voice webhook form of reference §3 for `plan`."""
        status = "ringing" if plan.direction == "inbound" else "in-progress"
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call_sid,
            "CallStatus": status,
            "Called": plan.to,
            "Caller": plan.from_,
            "Direction": plan.direction,
            "From": plan.from_,
            "To": plan.to,
        }
        if plan.extra_param:
            # Twilio adds params without notice; a bridge must sign over all of them.
            params["StirVerstat"] = "TN-Validation-Passed-A"
        return params

    async def post_status_callback(
        self,
        call_sid: str,
        status: str,
        *,
        url: str,
        sequence_number: int = 0,
        direction: str = "inbound",
        from_: str = "+14155550123",
        to: str = "+14155550100",
        call_duration_s: int | None = None,
        sip_response_code: int | None = None,
        sign: bool = True,
        signature: str | None = None,
    ) -> httpx.Response:
        """A signed call status callback (reference §3) for `status` to `url` (path or URL).

        Terminal statuses (completed, busy, failed, no-answer, canceled) carry CallDuration and
        SipResponseCode (defaults 0 and 200/486/500/487/487); completed also carries Duration.
        """
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call_sid,
            "CallStatus": status,
            "Called": to,
            "Caller": from_,
            "Direction": direction,
            "From": from_,
            "To": to,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": str(sequence_number),
            "Timestamp": _now_rfc2822(),
        }
        terminal_sip = {"completed": 200, "busy": 486, "failed": 500, "no-answer": 487,
                        "canceled": 487}
        if status in terminal_sip:
            duration = call_duration_s or 0
            params["CallDuration"] = str(duration)
            params["SipResponseCode"] = str(sip_response_code or terminal_sip[status])
            if status == "completed":
                params["Duration"] = str(max(1, math.ceil(duration / 60)))
        return await self.post_webhook(url, params, sign=sign, signature=signature)

    async def _post_stream_callback(
        self, run: _CallRun, event: str, error: str | None = None
    ) -> None:
        spec = run.twiml.stream if run.twiml else None
        if spec is None or not spec.status_callback:
            return
        params = {
            "AccountSid": self.account_sid,
            "CallSid": run.result.call_sid,
            "StreamSid": run.result.stream_sid,
            "StreamName": spec.name or run.result.stream_sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        if error is not None:
            params["StreamError"] = error
        method: Literal["POST", "GET"] = "GET" if spec.status_callback_method == "GET" else "POST"
        try:
            resp = await self.post_webhook(spec.status_callback, params, method=method)
            detail = f"{event} -> {resp.status_code}"
        except (httpx.HTTPError, FakeTwilioError) as exc:
            detail = f"{event} -> {exc!r}"
        run.result.add(run.now_s(), "stream_callback", detail)

    # ---- streams

    @asynccontextmanager
    async def open_stream(
        self,
        stream_url: str,
        *,
        sign: bool = True,
        signature: str | None = None,
        call_sid: str | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> AsyncIterator[StreamClient]:
        """Open a Media Streams WebSocket as Twilio would and yield a raw `StreamClient`.

        `stream_url` is the URL from the TwiML (public ``wss://`` or path); the connection goes
        to `connect_base`, the signature covers the exact public URL with ``{}``. The socket is
        closed (code 1000) on exit; cancellation closes it without waiting.

        Raises:
            StreamRejected: the upgrade wasn't answered with 101, or the URL is unusable.
        """
        try:
            signed_url, target = self.map_stream_url(stream_url)
        except FakeTwilioError as exc:
            raise StreamRejected(None, str(exc.args[0])) from exc
        headers = self._upgrade_headers(signed_url, sign=sign, signature=signature)
        headers += extra_headers or []
        t = urlsplit(target)
        try:
            async with open_websocket(
                t.hostname or "", t.port or (443 if t.scheme == "wss" else 80), t.path or "/",
                use_ssl=t.scheme == "wss", extra_headers=headers, message_queue_size=64,
                max_message_size=_MAX_MESSAGE_BYTES, connect_timeout=HANDSHAKE_TIMEOUT_S,
                disconnect_timeout=CLOSE_TIMEOUT_S,
            ) as ws:
                yield StreamClient(
                    ws, account_sid=self.account_sid, call_sid=call_sid or new_sid("CA")
                )
        except ConnectionRejected as exc:
            raise StreamRejected(exc.status_code, "upgrade rejected") from exc

    def _upgrade_headers(
        self, signed_url: str, *, sign: bool, signature: str | None
    ) -> list[tuple[bytes, bytes]]:
        headers = [(b"user-agent", WS_USER_AGENT.encode())]
        if signature is not None:
            headers.append((b"x-twilio-signature", signature.encode()))
        elif sign and self.auth_token is not None:
            headers.append((b"x-twilio-signature", self.sign(signed_url, {}).encode()))
        return headers

    # ---- calls

    async def call(self, plan: CallPlan, *, webhook_path: str = "/twiml") -> CallResult:
        """Run one whole call: webhook, TwiML, stream, media and playback, end.

        Never raises for the bridge's misbehaviour: failures land in ``result.error``,
        ``result.violations`` and ``result.timeline``. Bounded by ``plan.max_call_s / speed``
        plus DEADLINE_SLACK_S of wall time. Cancellation closes the socket without waiting.
        """
        if plan.speed <= 0:
            raise ValueError("speed must be > 0")
        call_sid = plan.call_sid or new_sid("CA")
        run = _CallRun(self, plan, call_sid)
        self._live[call_sid] = run
        done = self._done.get(call_sid)
        if done is None or done.is_set():  # keep an Event a `wait_for_call` already waits on
            self._done[call_sid] = trio.Event()
        self.results[call_sid] = run.result
        try:
            with trio.move_on_after(plan.max_call_s / plan.speed + DEADLINE_SLACK_S) as scope:
                await run.run(webhook_path)
            if scope.cancelled_caught:
                run.result.ended_by = "timeout"
                run.result.add(run.now_s(), "timeout", "wall-clock deadline")
        finally:
            self._live.pop(call_sid, None)
            run.result.heard = bytes(run.playback.heard)
            run.result.heard_bytes = len(run.result.heard)
            self._done[call_sid].set()
        return run.result

    async def outbound_answered(
        self, call_sid: str, url: str, plan: CallPlan | None = None, *,
        from_: str | None = None, to: str | None = None,
    ) -> CallResult:
        """An outbound call (REST ``calls.create``) was answered: fetch `url` (the public URL
        from the REST request) with Direction=outbound-api, CallStatus=in-progress, then run the
        stream like `call`. `plan` defaults to a copy of `default_outbound_plan`."""
        base = plan if plan is not None else self.default_outbound_plan
        fields = dict(base.__dict__)
        fields.update(direction="outbound-api", call_sid=call_sid)
        if from_ is not None:
            fields["from_"] = from_
        if to is not None:
            fields["to"] = to
        return await self.call(CallPlan(**fields), webhook_path=url)

    def is_live(self, call_sid: str) -> bool:
        """True while the call is up and can take a REST hang-up or redirect."""
        run = self._live.get(call_sid)
        return run is not None and run.hangup is None

    def request_hangup(self, call_sid: str) -> bool:
        """REST ``update(status="completed")``: ``stop``, close, call ends (ended_by "api").
        Returns False when the call isn't live (the REST fake answers 21220)."""
        run = self._live.get(call_sid)
        return run is not None and run.request_end(_Hangup("api", send_stop=True))

    def request_redirect(self, call_sid: str, twiml: str) -> bool:
        """REST ``update(twiml=…)``: ``stop``, close, the call continues with `twiml`
        (recorded in ``redirect_twiml``, its verbs in the timeline). False when not live."""
        run = self._live.get(call_sid)
        if run is None or run.hangup is not None:
            return False
        run.result.redirect_twiml = twiml
        return run.request_end(_Hangup("redirect", send_stop=True))

    async def wait_for_call(self, call_sid: str) -> CallResult:
        """Wait until the call with `call_sid` has ended; the caller owns the deadline."""
        await self._done.setdefault(call_sid, trio.Event()).wait()
        return self.results[call_sid]


class _CallRun:
    """State of one call; all tasks live in the call's nursery."""

    def __init__(self, fake: FakeTwilio, plan: CallPlan, call_sid: str) -> None:
        self.fake = fake
        self.plan = plan
        self.result = CallResult(call_sid=call_sid)
        self.playback = Playback()
        self.twiml: Twiml | None = None
        self.hangup: _Hangup | None = None
        self._t0: float | None = None  # wall time `start` was sent: call time 0
        self._stream_sid: str | None = None  # set when `start` is queued
        self._playback_changed = trio.Event()
        self._hangup_requested = trio.Event()
        self._status_seq = 0
        self._echoes: list[str] = []  # mark names to echo, in order; sent by _playback_task

    def now_s(self) -> float:
        if self._t0 is None:
            return 0.0
        return (trio.current_time() - self._t0) * self.plan.speed

    def _wall(self, call_s: float) -> float:
        assert self._t0 is not None
        return self._t0 + call_s / self.plan.speed

    def request_end(self, hangup: _Hangup) -> bool:
        if self.hangup is not None:
            return False
        self.hangup = hangup
        self.result.ended_by = hangup.reason
        self._hangup_requested.set()
        return True

    # ---- whole call

    async def run(self, webhook: str) -> None:
        r = self.result
        plan = self.plan
        async with trio.open_nursery() as callbacks:
            await self._status(callbacks, "initiated", "initiated")
            await self._status(callbacks, "ringing", "ringing")
            params = self.fake.voice_params(plan, r.call_sid)
            r.webhook_params = params
            r.webhook_url = self.fake.public_url(webhook)
            try:
                resp = await self.fake.post_webhook(webhook, params)
            except (httpx.HTTPError, FakeTwilioError) as exc:
                self._fail(f"webhook {r.webhook_url} failed: {exc!r}")
                return
            r.webhook_status = resp.status_code
            r.twiml = resp.text
            ctype = resp.headers.get("content-type", "")
            r.add(0.0, "webhook", f"{resp.status_code} {ctype}")
            if resp.status_code != 200 or "xml" not in ctype:
                self._fail(f"webhook {r.webhook_url} answered {resp.status_code} {ctype!r}")
                return
            try:
                self.twiml = parse_twiml(resp.text)
            except TwimlError as exc:
                self._fail(str(exc))
                return
            await self._status(callbacks, "in-progress", "answered")
            for verb in self.twiml.verbs_before:
                r.add(0.0, "verb", verb)
            if self.twiml.stream is None:
                # Without a stream every verb runs; record them all as the call's fallback path.
                r.post_connect_verbs = [*self.twiml.verbs_before, *self.twiml.verbs_after]
                r.ended_by = "server"
                r.add(0.0, "no_stream", "TwiML has no <Connect><Stream>")
            elif any(v.split(":")[0] in ("Hangup", "Reject") for v in self.twiml.verbs_before):
                r.ended_by = "server"
            else:
                await self._stream(self.twiml.stream, callbacks)
            await self._status(callbacks, "completed", "completed")

    def _fail(self, error: str) -> None:
        self.result.error = error
        self.result.ended_by = "failed"
        self.result.add(self.now_s(), "error", error)

    async def _status(self, nursery: trio.Nursery, status: str, event: str) -> None:
        """Send a call status callback, as a separate request like Twilio (may overlap)."""
        url = self.plan.status_callback
        if url is None or event not in self.plan.status_callback_events:
            return
        seq = self._status_seq
        self._status_seq += 1
        duration = math.ceil(self.now_s()) if status == "completed" else None

        async def post() -> None:
            try:
                resp = await self.fake.post_status_callback(
                    self.result.call_sid, status, url=url, sequence_number=seq,
                    direction=self.plan.direction, from_=self.plan.from_, to=self.plan.to,
                    call_duration_s=duration,
                )
                detail = f"{status} -> {resp.status_code}"
            except (httpx.HTTPError, FakeTwilioError) as exc:
                detail = f"{status} -> {exc!r}"
            self.result.add(self.now_s(), "status_callback", detail)

        nursery.start_soon(post)

    async def _after_stream(self, callbacks: trio.Nursery) -> None:
        """Twilio runs the TwiML after </Connect> (or requests <Connect action>)."""
        r = self.result
        twiml = self.twiml
        assert twiml is not None
        if r.ended_by == "redirect" and r.redirect_twiml is not None:
            try:
                new = parse_twiml(r.redirect_twiml)
                for verb in [*new.verbs_before, *(["Connect"] if new.stream else [])]:
                    r.add(self.now_s(), "redirect", verb)
            except TwimlError as exc:
                r.add(self.now_s(), "redirect", f"invalid TwiML: {exc}")
            return
        if r.ended_by not in ("server",):
            return  # the call is over: caller, REST hang-up or deadline
        if twiml.connect_action:
            params = self.fake.voice_params(self.plan, r.call_sid)
            params["CallStatus"] = "in-progress"
            if r.stream_sid:
                params["StreamSid"] = r.stream_sid
            try:
                resp = await self.fake.post_webhook(twiml.connect_action, params)
                verbs = parse_twiml(resp.text)
                r.post_connect_verbs = [*verbs.verbs_before, *verbs.verbs_after]
                r.add(
                    self.now_s(), "connect_action", f"{twiml.connect_action} -> {resp.status_code}"
                )
            except (httpx.HTTPError, FakeTwilioError) as exc:
                r.add(self.now_s(), "connect_action", f"{twiml.connect_action} -> {exc!r}")
            return
        r.post_connect_verbs = list(twiml.verbs_after)
        for verb in twiml.verbs_after:
            r.add(self.now_s(), "verb", verb)

    # ---- the stream

    async def _stream(self, spec: StreamSpec, callbacks: trio.Nursery) -> None:
        r = self.result
        r.stream_url = spec.url
        r.custom_parameters = dict(spec.parameters)
        r.stream_sid = new_sid("MZ")
        for name, value in spec.parameters.items():
            if len(name) + len(value) >= 500:
                self._violation(ERR_FAKE_LIMIT, f"<Parameter {name}>: name+value >= 500 chars")
                await self._no_stream(callbacks, "parameter too long")
                return
        try:
            signed_url, target = self.fake.map_stream_url(spec.url)
        except FakeTwilioError as exc:
            code = exc.args[1] if len(exc.args) > 1 else ERR_MALFORMED_URL
            self._violation(code, str(exc.args[0]))
            await self._no_stream(callbacks, str(exc.args[0]))
            return
        headers = self.fake._upgrade_headers(signed_url, sign=True, signature=None)
        t = urlsplit(target)
        opened = False
        try:
            async with open_websocket(
                t.hostname or "", t.port or (443 if t.scheme == "wss" else 80), t.path or "/",
                use_ssl=t.scheme == "wss", extra_headers=headers, message_queue_size=64,
                max_message_size=_MAX_MESSAGE_BYTES, connect_timeout=HANDSHAKE_TIMEOUT_S,
                disconnect_timeout=CLOSE_TIMEOUT_S,
            ) as ws:
                opened = True
                r.handshake_status = 101
                r.add(0.0, "handshake", f"101 {target}")
                await self._run_socket(ws, callbacks)
        except ConnectionRejected as exc:
            r.handshake_status = exc.status_code
            why = f"upgrade answered {exc.status_code} ({ERR_HANDSHAKE})"
            await self._no_stream(callbacks, why)
            return
        except HandshakeError as exc:
            if opened:  # DisconnectionTimeout on exit: the bridge ignored our close frame
                r.add(self.now_s(), "close_timeout", repr(exc))
            else:
                code = (
                    ERR_CONNECT_TIMEOUT
                    if isinstance(exc, ConnectionTimeout)
                    else ERR_CONNECT_REFUSED
                )
                await self._no_stream(callbacks, f"cannot connect to {target}: {exc!r} ({code})")
                return
        callbacks.start_soon(self.fake._post_stream_callback, self, "stream-stopped")
        await self._after_stream(callbacks)

    async def _no_stream(self, callbacks: trio.Nursery, why: str) -> None:
        self.result.add(self.now_s(), "handshake_failed", why)
        self.result.ended_by = "server"
        callbacks.start_soon(self.fake._post_stream_callback, self, "stream-error", why)
        await self._after_stream(callbacks)

    def _violation(self, code: int, detail: str) -> None:
        self.result.violations.append((code, detail))
        self.result.add(self.now_s(), "violation", f"{code} {detail}")
        log.warning("call %s: violation %s %s", self.result.call_sid, code, detail)

    async def _run_socket(self, ws: WebSocketConnection, callbacks: trio.Nursery) -> None:
        r = self.result
        send, recv = trio.open_memory_channel[dict[str, Any] | _Hangup](_OUT_QUEUE_FRAMES)
        reader_done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, ws, nursery.cancel_scope, reader_done)
            nursery.start_soon(self._writer, ws, recv, reader_done, nursery.cancel_scope)
            self._t0 = trio.current_time()
            await send.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            r.add(0.0, "connected")
            self._stream_sid = r.stream_sid
            await send.send({"event": "start", "streamSid": r.stream_sid, "start": _start_body(
                self.fake.account_sid, r.stream_sid, r.call_sid, r.custom_parameters
            )})
            params = ", ".join(f"{k}={v}" for k, v in r.custom_parameters.items())
            r.add(0.0, "start", params)
            callbacks.start_soon(self.fake._post_stream_callback, self, "stream-started")
            nursery.start_soon(self._playback_task, send.clone())
            nursery.start_soon(self._clock, send)
        # The socket is gone: whatever was still queued is never played.
        now = self.now_s()
        events, dropped, unechoed = self.playback.close(now)
        self._record_playback(events)
        r.dropped_at_close_bytes = dropped
        r.unechoed_marks = unechoed
        r.heard_bytes = len(self.playback.heard)
        if dropped or unechoed:
            r.add(now, "discarded", f"{dropped} bytes, marks {unechoed} never echoed")

    async def _emit(self, send: trio.MemorySendChannel[Any], msg: dict[str, Any] | _Hangup) -> None:
        # After a hang-up the writer is gone and nothing more goes on the wire.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await send.send(msg)

    async def _writer(
        self, ws: WebSocketConnection, recv: trio.MemoryReceiveChannel[Any],
        reader_done: trio.Event, scope: trio.CancelScope,
    ) -> None:
        """The one task that sends on the socket; assigns the shared sequenceNumber."""
        r = self.result
        seq = 0
        with recv:
            async for item in recv:
                if isinstance(item, _Hangup):
                    if item.send_stop:
                        seq += 1
                        stop = {"event": "stop", "sequenceNumber": str(seq),
                                "streamSid": r.stream_sid,
                                "stop": {"accountSid": self.fake.account_sid,
                                         "callSid": r.call_sid}}
                        r.add(self.now_s(), "stop", f"seq {seq}")
                        try:
                            await ws.send_message(orjson.dumps(stop).decode())
                            r.frames_sent += 1
                        except ConnectionClosed:
                            return
                    r.add(self.now_s(), "hangup", f"{item.reason}: " + (
                        "stop + close" if item.send_stop else "close without stop"))
                    break
                if item["event"] != "connected":
                    seq += 1
                    item = {"event": item["event"], "sequenceNumber": str(seq),
                            **{k: v for k, v in item.items() if k != "event"}}
                try:
                    await ws.send_message(orjson.dumps(item).decode())
                except ConnectionClosed:
                    return
                if item["event"] != "connected":
                    r.frames_sent += 1
        # Close handshake, bounded: the reader ends when the close completes.
        with trio.move_on_after(CLOSE_TIMEOUT_S / 2):
            await ws.aclose(1000)
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await reader_done.wait()
        scope.cancel()

    async def _reader(
        self, ws: WebSocketConnection, scope: trio.CancelScope, done: trio.Event
    ) -> None:
        """Always reading, so the bridge is never blocked by us; ends the stream on close."""
        r = self.result
        try:
            while True:
                try:
                    frame = await ws.get_message()
                except ConnectionClosed as exc:
                    now = self.now_s()
                    code = exc.reason.code if exc.reason is not None else None
                    r.close_code = code
                    if self.hangup is None:
                        r.ended_by = "server"
                        r.add(now, "server_close", f"code {code} ({ERR_SERVER_CLOSED})")
                    else:
                        r.add(now, "closed", f"code {code}")
                    return
                await self._on_frame(frame)
        finally:
            done.set()
            scope.cancel()

    async def _on_frame(self, frame: str | bytes) -> None:
        r = self.result
        now = self.now_s()
        msg = parse_bridge_message(frame, self._stream_sid)
        if isinstance(msg, Violation):
            self._violation(msg.code, msg.detail)
        elif isinstance(msg, MediaOut):
            r.received_media_payloads.append(msg.payload)
            if r.first_audio_s is None:
                r.first_audio_s = now
                r.add(now, "first_audio", f"{len(msg.audio)} bytes")
            if msg.audio[:4] == b"RIFF":
                r.add(now, "warning", "media payload starts with a WAV header (plays as noise)")
            self._record_playback(self.playback.add_audio(now, msg.audio))
        elif isinstance(msg, MarkOut):
            self._record_playback(self.playback.add_mark(now, msg.name))
        else:
            events, dropped = self.playback.clear(now)
            r.clears.append(now)
            pending = sum(1 for e in events if e.kind == "mark_cleared")
            r.add(now, "clear", f"dropped {dropped / 8:.0f} ms of audio, {pending} pending marks")
            self._record_playback(events)
        r.heard_bytes = len(self.playback.heard)
        self._playback_changed.set()
        self._check_hangup_when()

    def _record_playback(self, events: list[PlaybackEvent]) -> None:
        """Record playback events; mark echoes go to the playback task's queue via `_echoes`."""
        r = self.result
        for ev in events:
            if ev.kind in ("mark_played", "mark_cleared"):
                how = "played" if ev.kind == "mark_played" else "cleared"
                r.marks_echoed.append((ev.name, how))
                r.add(ev.at_s, "mark", f"{ev.name} {how}")
                self._echoes.append(ev.name)
            elif ev.kind == "play_start":
                r.add(ev.at_s, "play_start")
            else:
                r.add(ev.at_s, "play_end", f"{len(self.playback.heard) / 8:.0f} ms heard so far")
        if self._echoes:
            self._playback_changed.set()

    def _check_hangup_when(self) -> None:
        pred = self.plan.hangup_when
        if pred is not None and self.hangup is None and pred(self.result):
            self.request_end(_Hangup("caller", send_stop=not self.plan.abrupt_close))

    async def _playback_task(self, send: trio.MemorySendChannel[Any]) -> None:
        """Wakes when the next mark or the end of playback is due; sends mark echoes."""
        with send:
            while True:
                if self._echoes:
                    names, self._echoes = self._echoes, []
                    for name in names:
                        sid = self.result.stream_sid
                        echo = {"event": "mark", "streamSid": sid, "mark": {"name": name}}
                        await self._emit(send, echo)
                    self._check_hangup_when()
                    continue
                due = self.playback.next_due_s()
                deadline = math.inf if due is None else self._wall(due)
                self._playback_changed = trio.Event()
                with trio.move_on_at(deadline):
                    await self._playback_changed.wait()
                self._record_playback(self.playback.advance(self.now_s()))
                self.result.heard_bytes = len(self.playback.heard)

    async def _clock(self, send: trio.MemorySendChannel[Any]) -> None:
        """The caller's media clock: one frame per 20 ms of call time, never pausing; dtmf and
        hang-ups happen on its ticks so they interleave with media in time order."""
        plan = self.plan
        r = self.result
        period_s = plan.frame_bytes / BYTES_PER_S
        dtmf = sorted(plan.dtmf)
        dropped = set(plan.drop_frames)
        chunk = 0
        tick = 0
        with send:
            while True:
                tick += 1
                at_s = tick * period_s
                with trio.move_on_at(self._wall(at_s)):
                    await self._hangup_requested.wait()
                now = self.now_s()
                # Compared on the tick's own time, so frame counts don't depend on jitter.
                if self.hangup is None:
                    if plan.hangup_after_s is not None and at_s >= plan.hangup_after_s:
                        self.request_end(_Hangup("caller", send_stop=not plan.abrupt_close))
                    elif at_s >= plan.max_call_s:
                        r.add(now, "timeout", f"max_call_s {plan.max_call_s}")
                        self.request_end(_Hangup("timeout", send_stop=True))
                if self.hangup is not None:
                    await self._emit(send, self.hangup)
                    return
                while dtmf and dtmf[0][0] <= at_s:
                    _, digit = dtmf.pop(0)
                    r.add(at_s, "dtmf", digit)
                    await self._emit(send, {"event": "dtmf", "streamSid": r.stream_sid,
                                            "dtmf": {"track": "inbound_track", "digit": digit}})
                if tick in dropped:
                    continue  # a lost frame: the next timestamp jumps
                chunk += 1
                start = (tick - 1) * plan.frame_bytes
                audio = plan.caller_audio[start : start + plan.frame_bytes]
                audio += bytes([SILENCE]) * (plan.frame_bytes - len(audio))
                await self._emit(send, {"event": "media", "streamSid": r.stream_sid, "media": {
                    "track": "inbound", "chunk": str(chunk),
                    "timestamp": str(round(at_s * 1000)),
                    "payload": base64.b64encode(audio).decode(),
                }})


__all__ = [
    "CallPlan",
    "CallResult",
    "FakeTwilio",
    "Playback",
    "PlaybackEvent",
    "StreamClient",
    "StreamRejected",
    "parse_bridge_message",
    "parse_twiml",
]
