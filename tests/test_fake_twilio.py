"""Tests of the fake Twilio (tools/fake_twilio.py) and the simulate_call CLI.

They run against a tiny bridge-like raw ASGI app served by Hypercorn on 127.0.0.1:0, which
checks signatures with twilio's RequestValidator and records every frame it receives, so the
assertions are about what actually went over the wire.
"""

from __future__ import annotations

import base64
import json
import math
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import hypercorn.config
import hypercorn.trio
import pytest
import trio
from twilio.request_validator import RequestValidator

from tools import mulaw, simulate_call
from tools.fake_twilio import (
    ERR_BINARY_FRAME,
    ERR_HANDSHAKE,
    ERR_INVALID_MESSAGE,
    ERR_MALFORMED_URL,
    ERR_NOT_WSS,
    CallPlan,
    ClearOut,
    FakeTwilio,
    FakeTwilioError,
    MarkOut,
    MediaOut,
    Playback,
    StreamRejected,
    Violation,
    parse_bridge_message,
    parse_twiml,
)

TOKEN = "test-auth-token-0123456789abcdef"
PUBLIC = "https://bridge.example.com"
STREAM_PATH = "/media-stream/tok123"
SPEED = 20.0
# Playback-timing tests run slower so a loaded machine's scheduling delays (tens of ms of wall
# time) don't turn into gaps or late clears of more than a second of call time.
TIMING_SPEED = 5.0
# Wall-clock cap per socket test; every call here lasts well under a second.
TEST_DEADLINE_S = 5.0

DEFAULT_TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
    f'<Stream url="wss://bridge.example.com{STREAM_PATH}" name="agent" '
    'statusCallback="https://bridge.example.com/stream-status">'
    '<Parameter name="session" value="s-1"/></Stream></Connect>'
    "<Say>Sorry, goodbye.</Say><Hangup/></Response>"
)
BUSY_TWIML = "<Response><Say>All agents are busy.</Say><Hangup/></Response>"


def tone(seconds: float, hz: float = 440.0) -> bytes:
    """μ-law sine tone, so payload checks can't pass on silence."""
    n = int(seconds * 8000)
    pcm = b"".join(
        int(8000 * math.sin(2 * math.pi * hz * i / 8000)).to_bytes(2, "little", signed=True)
        for i in range(n)
    )
    return mulaw.encode(pcm)


# ----------------------------------------------------------------------------------------------
# The mini bridge


@dataclass
class WsConn:
    """One accepted Media Streams socket on the mini bridge."""

    send: Callable[[dict[str, Any]], Awaitable[None]]
    path: str
    frames: list[tuple[float, str | bytes]] = field(default_factory=list)  # (wall time, frame)
    disconnect_code: int | None = None
    closed_by_us: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(f) for _, f in self.frames if isinstance(f, str)]

    @property
    def stream_sid(self) -> str:
        return str(self.messages[1]["streamSid"])

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], count: int = 1) -> None:
        while sum(1 for m in self.messages if pred(m)) < count:
            if self.disconnect_code is not None:
                raise AssertionError("peer disconnected while waiting")
            await self.changed.wait()

    async def wait_disconnect(self) -> None:
        while self.disconnect_code is None:
            await self.changed.wait()

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.send({"type": "websocket.send", "text": json.dumps(obj)})

    async def send_text(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.send({"type": "websocket.send", "bytes": data})

    async def media(self, audio: bytes, chunk_bytes: int = 1600) -> None:
        for i in range(0, len(audio), chunk_bytes):
            payload = base64.b64encode(audio[i : i + chunk_bytes]).decode()
            await self.send_json(
                {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
            )

    async def mark(self, name: str) -> None:
        await self.send_json({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def clear(self) -> None:
        await self.send_json({"event": "clear", "streamSid": self.stream_sid})

    async def close(self, code: int = 1000) -> None:
        self.closed_by_us = True
        await self.send({"type": "websocket.close", "code": code})


Script = Callable[[WsConn], Awaitable[None]]


async def wait_start(conn: WsConn) -> None:
    await conn.wait_for(lambda m: m["event"] == "start")


async def until_caller_hangs_up(conn: WsConn) -> None:
    await conn.wait_disconnect()


class MiniBridge:
    """Bridge-shaped ASGI app: POST /twiml, /outbound-twiml, /call-status, /stream-status and
    a WebSocket at /media-stream/<token>, all checked with RequestValidator."""

    def __init__(self) -> None:
        self.http_base = ""
        self.twiml = DEFAULT_TWIML
        self.webhook_status = 200
        self.reject_ws = False
        self.script: Script = until_caller_hangs_up
        self.requests: list[dict[str, Any]] = []  # HTTP requests: path, params, headers, sig_ok
        self.upgrades: list[dict[str, Any]] = []
        self.conns: list[WsConn] = []
        self.connected = trio.Event()

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._ws(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        params = parse_qsl(body.decode(), keep_blank_values=True)
        url = PUBLIC + scope["path"] + (
            "?" + scope["query_string"].decode() if scope["query_string"] else ""
        )
        sig = headers.get("x-twilio-signature", "")
        multi: dict[str, list[str]] = {}
        for k, v in params:
            multi.setdefault(k, []).append(v)
        sig_ok = RequestValidator(TOKEN).validate(url, _Multi(multi), sig)
        self.requests.append(
            {"path": scope["path"], "params": params, "headers": headers, "sig_ok": sig_ok}
        )
        if not sig_ok:
            status, ctype, text = 403, "text/plain", "bad signature"
        elif scope["path"] in ("/twiml", "/outbound-twiml"):
            status, ctype, text = self.webhook_status, "text/xml", self.twiml
        else:
            status, ctype, text = 204, "text/plain", ""
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode())]})
        await send({"type": "http.response.body", "body": text.encode()})

    async def _ws(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        sig = dict(headers).get("x-twilio-signature", "")
        sig_ok = RequestValidator(TOKEN).validate(
            "wss://bridge.example.com" + scope["path"], {}, sig
        )
        self.upgrades.append({"path": scope["path"], "headers": headers, "sig_ok": sig_ok,
                              "subprotocols": scope.get("subprotocols", [])})
        if self.reject_ws or not sig_ok:
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        await send({"type": "websocket.accept"})
        conn = WsConn(send=send, path=scope["path"])
        self.conns.append(conn)
        self.connected.set()

        async def reader(cancel: trio.CancelScope) -> None:
            while True:
                msg = await receive()
                if msg["type"] == "websocket.receive":
                    frame = msg["bytes"] if msg.get("bytes") is not None else msg["text"]
                    conn.frames.append((trio.current_time(), frame))
                    conn._notify()
                elif msg["type"] == "websocket.disconnect":
                    conn.disconnect_code = msg.get("code", 1005)
                    conn._notify()
                    if conn.closed_by_us:
                        cancel.cancel()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, nursery.cancel_scope)
            await self.script(conn)
            if conn.closed_by_us:
                nursery.cancel_scope.cancel()


class _Multi(dict[str, list[str]]):
    def getlist(self, name: str) -> list[str]:
        return self[name]


@pytest.fixture
async def bridge(nursery: trio.Nursery) -> MiniBridge:
    mb = MiniBridge()
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    binds = await nursery.start(hypercorn.trio.serve, mb.app, config)
    mb.http_base = binds[0]
    return mb


@pytest.fixture
def fake(bridge: MiniBridge) -> FakeTwilio:
    return FakeTwilio(http_base=bridge.http_base, public_base=PUBLIC, auth_token=TOKEN)


async def run_call(fake: FakeTwilio, plan: CallPlan, path: str = "/twiml") -> Any:
    with trio.fail_after(TEST_DEADLINE_S):
        return await fake.call(plan, webhook_path=path)


def times(result: Any, kind: str, detail_prefix: str = "") -> list[float]:
    return [t for t, k, d in result.timeline if k == kind and d.startswith(detail_prefix)]


def assert_seq_contiguous(messages: list[dict[str, Any]]) -> None:
    seqs = [m["sequenceNumber"] for m in messages if m["event"] != "connected"]
    assert all(isinstance(s, str) for s in seqs)
    assert [int(s) for s in seqs] == list(range(1, len(seqs) + 1))


# ----------------------------------------------------------------------------------------------
# Wire frames, signatures, URL mapping, server close


async def test_exact_frames_signatures_mapping_and_server_close(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    audio = tone(0.1)  # 800 bytes: frames 1-5 carry it, later frames are silence

    async def script(conn: WsConn) -> None:
        await conn.wait_for(lambda m: m["event"] == "media", count=8)
        await conn.close(1000)

    bridge.script = script
    result = await run_call(fake, CallPlan(caller_audio=audio, speed=SPEED))

    # Voice webhook: form fields of reference §3, signed over the public URL, plus an extra.
    (hook,) = [r for r in bridge.requests if r["path"] == "/twiml"]
    params = dict(hook["params"])
    assert hook["sig_ok"]
    assert hook["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert set(params) == {"AccountSid", "ApiVersion", "CallSid", "CallStatus", "Called",
                           "Caller", "Direction", "From", "To", "StirVerstat"}
    assert params["ApiVersion"] == "2010-04-01"
    assert (params["CallStatus"], params["Direction"]) == ("ringing", "inbound")
    assert params["Caller"] == params["From"] == "+14155550123"
    assert params["Called"] == params["To"] == "+14155550100"
    assert params["CallSid"] == result.call_sid and params["AccountSid"] == fake.account_sid

    # Upgrade: public wss URL mapped to the real port, signed over the exact wss URL.
    (up,) = bridge.upgrades
    headers = dict(up["headers"])
    assert up["path"] == STREAM_PATH and up["sig_ok"]
    assert headers["user-agent"] == "Twilio.TmeWs/1.0"
    assert headers["host"] == bridge.http_base.removeprefix("http://")
    assert "origin" not in headers and "sec-websocket-protocol" not in headers
    assert up["subprotocols"] == []
    assert result.stream_url == f"wss://bridge.example.com{STREAM_PATH}"

    (conn,) = bridge.conns
    msgs = conn.messages
    assert all(isinstance(f, str) for _, f in conn.frames)
    assert msgs[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start = msgs[1]
    assert list(start) == ["event", "sequenceNumber", "streamSid", "start"]
    assert start["sequenceNumber"] == "1"
    sid = start["streamSid"]
    assert sid.startswith("MZ") and len(sid) == 34 and sid == result.stream_sid
    assert start["start"] == {
        "accountSid": fake.account_sid, "streamSid": sid, "callSid": result.call_sid,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"session": "s-1"},
    }
    media = [m for m in msgs if m["event"] == "media"]
    assert len(media) >= 8
    padded = audio + b"\xff" * (160 * len(media) - len(audio))
    for i, m in enumerate(media, start=1):
        assert list(m) == ["event", "sequenceNumber", "streamSid", "media"]
        assert m["streamSid"] == sid and m["sequenceNumber"] == str(i + 1)
        assert list(m["media"]) == ["track", "chunk", "timestamp", "payload"]
        assert m["media"]["track"] == "inbound"
        assert (m["media"]["chunk"], m["media"]["timestamp"]) == (str(i), str(20 * i))
        assert base64.b64decode(m["media"]["payload"]) == padded[160 * (i - 1) : 160 * i]
    assert_seq_contiguous(msgs)

    # The server closed: 31921, then the TwiML after </Connect> runs.
    assert result.ended_by == "server" and result.close_code == 1000
    assert times(result, "server_close", "code 1000 (31921)")
    assert result.post_connect_verbs == ["Say: Sorry, goodbye.", "Hangup"]
    assert result.handshake_status == 101 and result.violations == []
    assert result.custom_parameters == {"session": "s-1"}

    # Stream status callbacks went to the <Stream statusCallback>, signed.
    stream_cbs = [dict(r["params"]) for r in bridge.requests if r["path"] == "/stream-status"]
    assert [p["StreamEvent"] for p in stream_cbs] == ["stream-started", "stream-stopped"]
    assert all(r["sig_ok"] for r in bridge.requests)
    assert stream_cbs[0]["StreamSid"] == sid and stream_cbs[0]["StreamName"] == "agent"


async def test_http_public_base_maps_ws_stream_urls(bridge: MiniBridge) -> None:
    fake = FakeTwilio(http_base=bridge.http_base, public_base="http://localhost:8080",
                      auth_token=None)
    assert fake.map_stream_url("ws://localhost:8080/media-stream/x") == (
        "ws://localhost:8080/media-stream/x", bridge.http_base.replace("http", "ws") + "/media-stream/x"
    )
    https = FakeTwilio(http_base="http://127.0.0.1:1", public_base="https://b.example.com:443/app",
                       auth_token=None, connect_base="ws://127.0.0.1:2")
    assert https.map_stream_url("wss://b.example.com/app/ms") == (
        "wss://b.example.com/app/ms", "ws://127.0.0.1:2/ms"
    )
    assert https.map_stream_url("/app/ms")[0] == "wss://b.example.com/app/ms"
    for url, code in [
        ("ws://b.example.com/app/ms", ERR_NOT_WSS),
        ("https://b.example.com/app/ms", ERR_NOT_WSS),
        ("wss://evil.example.com/app/ms", ERR_MALFORMED_URL),
        ("wss://b.example.com/app/ms?token=1", ERR_HANDSHAKE),
    ]:
        with pytest.raises(FakeTwilioError) as info:
            https.map_stream_url(url)
        assert info.value.args[1] == code, url


async def test_stream_url_with_query_string_is_a_violation_and_falls_through(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    bridge.twiml = DEFAULT_TWIML.replace(STREAM_PATH, STREAM_PATH + "?token=abc")
    result = await run_call(fake, CallPlan(speed=SPEED))
    assert [code for code, _ in result.violations] == [ERR_HANDSHAKE]
    assert bridge.upgrades == []
    assert result.post_connect_verbs == ["Say: Sorry, goodbye.", "Hangup"]


# ----------------------------------------------------------------------------------------------
# Playback, marks, clear


async def test_marks_echo_only_after_the_audio_before_them_has_played(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    first, second = tone(1.0, 300), tone(0.5, 600)
    sent_at: list[float] = []

    async def script(conn: WsConn) -> None:
        await wait_start(conn)
        await conn.mark("m0")  # nothing queued: echoed at once
        await conn.wait_for(lambda m: m["event"] == "mark")
        sent_at.append(trio.current_time())
        await conn.media(first, chunk_bytes=len(first))
        await conn.mark("m1")
        await conn.media(second, chunk_bytes=len(second))
        await conn.mark("m2")
        await conn.wait_for(lambda m: m["event"] == "mark", count=3)
        await conn.close()

    bridge.script = script
    result = await run_call(fake, CallPlan(speed=TIMING_SPEED))

    assert result.marks_echoed == [("m0", "played"), ("m1", "played"), ("m2", "played")]
    assert result.heard == first + second
    assert result.violations == []
    (play_start,) = times(result, "play_start")
    assert times(result, "mark", "m1")[0] - play_start == pytest.approx(1.0, abs=1e-3)
    assert times(result, "mark", "m2")[0] - play_start == pytest.approx(1.5, abs=1e-3)
    assert times(result, "play_end")[0] - play_start == pytest.approx(1.5, abs=1e-3)

    # On the wire: echoes in order, exact shape, sharing the sequence counter, and m1 no
    # earlier than 1 s of call time (1/SPEED of wall time) after its audio was sent.
    (conn,) = bridge.conns
    marks = [(t, json.loads(f)) for t, f in conn.frames if '"mark"' in f]
    assert [m["mark"]["name"] for _, m in marks] == ["m0", "m1", "m2"]
    for _, m in marks:
        assert list(m) == ["event", "sequenceNumber", "streamSid", "mark"]
        assert m["mark"] == {"name": m["mark"]["name"]} and m["streamSid"] == conn.stream_sid
    assert marks[1][0] - sent_at[0] >= 1.0 / TIMING_SPEED - 0.002
    assert marks[2][0] - sent_at[0] >= 1.5 / TIMING_SPEED - 0.002
    assert_seq_contiguous(conn.messages)


async def test_clear_drops_queued_audio_and_echoes_pending_marks_as_cleared(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    audio = tone(3.0)

    async def script(conn: WsConn) -> None:
        await wait_start(conn)
        await conn.media(audio[:16000], chunk_bytes=16000)
        await conn.mark("a")
        await conn.media(audio[16000:], chunk_bytes=8000)
        await conn.mark("b")
        await trio.sleep(0.5 / TIMING_SPEED)  # let half a second of call time play
        await conn.clear()
        await conn.wait_for(lambda m: m["event"] == "mark", count=2)
        await conn.mark("after")  # nothing queued any more: echoed at once
        await conn.wait_for(lambda m: m["event"] == "mark", count=3)
        await conn.close()

    bridge.script = script
    result = await run_call(fake, CallPlan(speed=TIMING_SPEED))

    assert result.marks_echoed == [("a", "cleared"), ("b", "cleared"), ("after", "played")]
    assert len(result.clears) == 1
    (play_start,) = times(result, "play_start")
    played_s = result.clears[0] - play_start
    assert 0.4 < played_s < 2.0
    assert abs(len(result.heard) - played_s * 8000) <= 2
    assert result.heard == audio[: len(result.heard)]
    assert times(result, "play_end") == [result.clears[0]]
    (conn,) = bridge.conns
    names = [m["mark"]["name"] for m in conn.messages if m["event"] == "mark"]
    assert names == ["a", "b", "after"]


async def test_server_close_discards_unplayed_audio(bridge: MiniBridge, fake: FakeTwilio) -> None:
    async def script(conn: WsConn) -> None:
        await wait_start(conn)
        await conn.media(tone(2.0), chunk_bytes=16000)
        await conn.mark("goodbye-done")
        await conn.close()

    bridge.script = script
    result = await run_call(fake, CallPlan(speed=TIMING_SPEED))
    assert result.ended_by == "server"
    assert result.dropped_at_close_bytes > 0
    assert result.unechoed_marks == ["goodbye-done"]
    assert len(result.heard) + result.dropped_at_close_bytes == 16000


def test_playback_model_in_virtual_time() -> None:
    pb = Playback()
    assert [(e.kind, e.name) for e in pb.add_mark(0.0, "idle")] == [("mark_played", "idle")]
    assert [e.kind for e in pb.add_audio(1.0, b"a" * 800)] == ["play_start"]  # 100 ms
    assert pb.add_mark(1.01, "m1") == []
    pb.add_audio(1.02, b"b" * 400)  # 50 ms more, queued behind m1
    assert pb.next_due_s() == pytest.approx(1.1)
    events = pb.advance(1.12)
    assert [(e.kind, e.name, round(e.at_s, 6)) for e in events] == [("mark_played", "m1", 1.1)]
    assert bytes(pb.heard) == b"a" * 800 + b"b" * 160
    pb.add_mark(1.13, "m2")
    events, dropped = pb.clear(1.13)
    assert dropped == 400 - 240
    assert [(e.kind, e.name) for e in events] == [("mark_cleared", "m2"), ("play_end", "")]
    assert pb.idle and pb.next_due_s() is None
    # A gap in sending is a gap in playback: audio queued later starts later.
    pb.add_audio(5.0, b"c" * 80)
    events = pb.advance(6.0)
    assert [(e.kind, round(e.at_s, 6)) for e in events] == [("play_end", 5.01)]
    assert len(pb.heard) == 1040 + 80


# ----------------------------------------------------------------------------------------------
# Violations


async def test_invalid_bridge_frames_are_recorded_as_violations(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    async def script(conn: WsConn) -> None:
        await wait_start(conn)
        sid = conn.stream_sid
        payload = base64.b64encode(b"\xff" * 160).decode()
        await conn.send_bytes(b"\xff" * 160)
        await conn.send_text("{not json")
        await conn.send_json({"event": "media", "streamSid": sid,
                              "media": {"payload": payload, "track": "outbound"}})
        await conn.send_json({"event": "mark", "streamSid": "MZ" + "0" * 32, "mark": {"name": "x"}})
        await conn.send_json({"event": "clear", "streamSid": sid, "sequenceNumber": "5"})
        await conn.send_json({"event": "mark", "streamSid": sid, "mark": {}})
        await conn.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await conn.mark("ok")  # still served after all that
        await conn.wait_for(lambda m: m["event"] == "mark")
        await conn.close()

    bridge.script = script
    result = await run_call(fake, CallPlan(speed=SPEED))
    codes = [code for code, _ in result.violations]
    assert codes == [ERR_BINARY_FRAME] + [ERR_INVALID_MESSAGE] * 6
    details = [d for _, d in result.violations]
    assert "invalid JSON" in details[1]
    assert "extra fields" not in details[2] and "media.media" in details[2]  # nested `track`
    assert "wrong streamSid" in details[3]
    assert "extra fields ['sequenceNumber']" in details[4]
    assert "mark.mark" in details[5]
    assert "unsupported event 'connected'" in details[6]
    assert result.marks_echoed == [("ok", "played")]
    assert result.received_media_payloads == []


def test_parse_bridge_message_table() -> None:
    sid = "MZ" + "a" * 32
    ok_media = json.dumps({"event": "media", "streamSid": sid, "media": {"payload": "//8="}})
    assert parse_bridge_message(ok_media, sid) == MediaOut("//8=", b"\xff\xff")
    assert parse_bridge_message(json.dumps(
        {"event": "mark", "streamSid": sid, "mark": {"name": "n"}}), sid) == MarkOut("n")
    assert parse_bridge_message(json.dumps({"event": "clear", "streamSid": sid}), sid) == ClearOut()
    bad = [
        (b"x", ERR_BINARY_FRAME),
        ('["media"]', ERR_INVALID_MESSAGE),
        (json.dumps({"event": "media", "streamSid": sid, "media": {"payload": "@@"}}),
         ERR_INVALID_MESSAGE),
        (json.dumps({"event": "media", "streamSid": sid}), ERR_INVALID_MESSAGE),
        (json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": 3}}), ERR_INVALID_MESSAGE),
        (json.dumps({"event": "stop", "streamSid": sid}), ERR_INVALID_MESSAGE),
    ]
    for frame, code in bad:
        result = parse_bridge_message(frame, sid)
        assert isinstance(result, Violation) and result.code == code, frame
    before_start = parse_bridge_message(json.dumps({"event": "clear", "streamSid": sid}), None)
    assert isinstance(before_start, Violation) and "before start" in before_start.detail


def test_parse_twiml() -> None:
    t = parse_twiml(DEFAULT_TWIML)
    assert t.stream is not None and t.stream.url == f"wss://bridge.example.com{STREAM_PATH}"
    assert t.stream.parameters == {"session": "s-1"} and t.stream.name == "agent"
    assert t.verbs_after == ["Say: Sorry, goodbye.", "Hangup"] and t.verbs_before == []
    busy = parse_twiml(BUSY_TWIML)
    assert busy.stream is None and busy.verbs_before == ["Say: All agents are busy.", "Hangup"]


# ----------------------------------------------------------------------------------------------
# Caller actions: DTMF, hang-up, abrupt close, predicate


async def test_dtmf_frames_and_caller_hangup_sends_stop_then_close(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    plan = CallPlan(speed=SPEED, dtmf=[(0.1, "7"), (0.2, "#")], hangup_after_s=0.4)
    result = await run_call(fake, plan)
    (conn,) = bridge.conns
    msgs = conn.messages
    dtmf = [m for m in msgs if m["event"] == "dtmf"]
    assert dtmf == [
        {"event": "dtmf", "sequenceNumber": dtmf[0]["sequenceNumber"],
         "streamSid": conn.stream_sid, "dtmf": {"track": "inbound_track", "digit": "7"}},
        {"event": "dtmf", "sequenceNumber": dtmf[1]["sequenceNumber"],
         "streamSid": conn.stream_sid, "dtmf": {"track": "inbound_track", "digit": "#"}},
    ]
    # The digit goes out on the media clock, just before the frame stamped at its time.
    i = msgs.index(dtmf[0])
    assert msgs[i - 1]["media"]["timestamp"] == "80" and msgs[i + 1]["media"]["timestamp"] == "100"
    assert msgs[-1] == {
        "event": "stop", "sequenceNumber": str(len(msgs) - 1), "streamSid": conn.stream_sid,
        "stop": {"accountSid": fake.account_sid, "callSid": result.call_sid},
    }
    assert len([m for m in msgs if m["event"] == "media"]) == 19  # ticks 1-19; hang-up at 20
    assert_seq_contiguous(msgs)
    # Hypercorn 0.18 reports 1006 to the app even for a clean client close, so check our side.
    assert conn.disconnect_code is not None and result.close_code == 1000
    assert result.ended_by == "caller" and result.violations == []
    assert result.post_connect_verbs == []  # the call is over; nothing after </Connect> runs
    assert [d for _, k, d in result.timeline if k == "dtmf"] == ["7", "#"]


async def test_abrupt_close_sends_no_stop(bridge: MiniBridge, fake: FakeTwilio) -> None:
    result = await run_call(fake, CallPlan(speed=SPEED, hangup_after_s=0.2, abrupt_close=True))
    (conn,) = bridge.conns
    assert [m["event"] for m in conn.messages][-1] == "media"
    assert conn.disconnect_code is not None and result.close_code == 1000
    assert result.ended_by == "caller"
    assert any(k == "hangup" and "close without stop" in d for _, k, d in result.timeline)


async def test_call_deadline_and_dropped_frame(bridge: MiniBridge, fake: FakeTwilio) -> None:
    result = await run_call(fake, CallPlan(speed=SPEED, max_call_s=0.2, drop_frames=[3]))
    assert result.ended_by == "timeout"
    (conn,) = bridge.conns
    media = [m["media"] for m in conn.messages if m["event"] == "media"]
    # A lost frame: chunk stays contiguous, timestamp jumps by 40 ms.
    assert [(m["chunk"], m["timestamp"]) for m in media[:4]] == [
        ("1", "20"), ("2", "40"), ("3", "80"), ("4", "100")]
    assert len(media) == 8 and conn.messages[-1]["event"] == "stop"


async def test_hangup_when_predicate(bridge: MiniBridge, fake: FakeTwilio) -> None:
    async def script(conn: WsConn) -> None:
        await wait_start(conn)
        await conn.media(tone(0.2))
        await conn.mark("greeting")
        await conn.wait_disconnect()

    bridge.script = script
    plan = CallPlan(speed=SPEED, hangup_when=lambda r: ("greeting", "played") in r.marks_echoed)
    result = await run_call(fake, plan)
    assert result.ended_by == "caller"
    (conn,) = bridge.conns
    events = [m["event"] for m in conn.messages]
    assert events[-2:] == ["mark", "stop"] or events[-1] == "stop"
    assert len(result.heard) == 1600


# ----------------------------------------------------------------------------------------------
# Handshake failure, busy TwiML, webhook failure, hostile requests


async def test_handshake_403_is_recorded_and_post_connect_twiml_runs(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    bridge.reject_ws = True
    result = await run_call(fake, CallPlan(speed=SPEED))
    assert result.handshake_status == 403
    assert any(k == "handshake_failed" and "31920" in d for _, k, d in result.timeline)
    assert result.post_connect_verbs == ["Say: Sorry, goodbye.", "Hangup"]
    assert result.ended_by == "server" and result.violations == []
    stream_cbs = [dict(r["params"]) for r in bridge.requests if r["path"] == "/stream-status"]
    assert [p["StreamEvent"] for p in stream_cbs] == ["stream-error"]
    assert "403" in stream_cbs[0]["StreamError"]
    assert simulate_call.failure(result) is not None


async def test_busy_twiml_opens_no_stream(bridge: MiniBridge, fake: FakeTwilio) -> None:
    bridge.twiml = BUSY_TWIML
    result = await run_call(fake, CallPlan(speed=SPEED))
    assert result.stream_url is None and result.handshake_status is None
    assert result.post_connect_verbs == ["Say: All agents are busy.", "Hangup"]
    assert bridge.upgrades == [] and result.ended_by == "server"
    assert simulate_call.failure(result) is None


async def test_webhook_error_fails_the_call(bridge: MiniBridge, fake: FakeTwilio) -> None:
    bridge.webhook_status = 500
    result = await run_call(fake, CallPlan(speed=SPEED))
    assert result.ended_by == "failed" and result.webhook_status == 500
    assert result.error is not None and "500" in result.error
    assert bridge.upgrades == []


async def test_hostile_signatures_on_webhook_and_upgrade(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    params = [("CallSid", "CA" + "1" * 32), ("From", "+1"), ("StatusCallbackEvent", "a"),
              ("StatusCallbackEvent", "b")]
    with trio.fail_after(TEST_DEADLINE_S):
        assert (await fake.post_webhook("/twiml", params)).status_code == 200
        assert (await fake.post_webhook("/twiml", params, sign=False)).status_code == 403
        assert (await fake.post_webhook("/twiml", params, signature="bad=")).status_code == 403
        wrong = FakeTwilio(http_base=bridge.http_base, public_base=PUBLIC, auth_token="nope")
        assert (await wrong.post_webhook("/twiml", params)).status_code == 403
        # Signing over the https:// form instead of wss:// must fail (reference §4.2).
        https_sig = fake.sign("https://bridge.example.com" + STREAM_PATH, {})
        for kwargs in ({"sign": False}, {"signature": https_sig}):
            with pytest.raises(StreamRejected) as info:
                async with fake.open_stream(STREAM_PATH, **kwargs):
                    pass
            assert info.value.status_code == 403
        assert [u["sig_ok"] for u in bridge.upgrades] == [False, False]

        async def script(conn: WsConn) -> None:
            await wait_start(conn)
            await conn.mark("hello")
            await conn.wait_disconnect()

        bridge.script = script
        async with fake.open_stream(f"wss://bridge.example.com{STREAM_PATH}") as client:
            await client.send_connected()
            await client.send_start({"k": "v"})
            echo = json.loads(await client.receive())
            assert echo == {"event": "mark", "streamSid": client.stream_sid,
                            "mark": {"name": "hello"}}
        assert bridge.upgrades[-1]["sig_ok"]


async def test_status_callback_is_signed_with_terminal_fields(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    with trio.fail_after(TEST_DEADLINE_S):
        resp = await fake.post_status_callback(
            "CA" + "2" * 32, "completed", url="/call-status", sequence_number=3,
            call_duration_s=42, direction="outbound-api",
        )
    assert resp.status_code == 204
    (req,) = bridge.requests
    p = dict(req["params"])
    assert req["sig_ok"]
    assert (p["CallStatus"], p["CallbackSource"], p["SequenceNumber"]) == (
        "completed", "call-progress-events", "3")
    assert (p["CallDuration"], p["Duration"], p["SipResponseCode"]) == ("42", "1", "200")
    assert p["Timestamp"].endswith("+0000")


# ----------------------------------------------------------------------------------------------
# Outbound calls driven by a REST fake: redirect and hang-up


async def test_outbound_call_redirect_and_rest_hangup(
    bridge: MiniBridge, fake: FakeTwilio
) -> None:
    transfer = "<Response><Say>Transferring.</Say><Dial>+14155550199</Dial></Response>"
    assert not fake.request_hangup("CA" + "0" * 32)

    for action in ("redirect", "hangup"):
        bridge.conns.clear()
        bridge.connected = trio.Event()
        sid = "CA" + ("a" if action == "redirect" else "b") * 32
        with trio.fail_after(TEST_DEADLINE_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fake.outbound_answered, sid,
                                   f"{PUBLIC}/outbound-twiml", CallPlan(speed=SPEED))
                await bridge.connected.wait()
                await bridge.conns[0].wait_for(lambda m: m["event"] == "start")
                assert fake.is_live(sid)
                if action == "redirect":
                    assert fake.request_redirect(sid, transfer)
                else:
                    assert fake.request_hangup(sid)
                result = await fake.wait_for_call(sid)
        assert not fake.is_live(sid) and not fake.request_hangup(sid)
        params = dict(next(r for r in bridge.requests if dict(r["params"]).get("CallSid") == sid)
                      ["params"])
        assert (params["Direction"], params["CallStatus"]) == ("outbound-api", "in-progress")
        conn = bridge.conns[0]
        assert conn.messages[-1]["event"] == "stop" and result.close_code == 1000
        assert result.post_connect_verbs == []
        if action == "redirect":
            assert result.ended_by == "redirect" and result.redirect_twiml == transfer
            assert [d for _, k, d in result.timeline if k == "redirect"] == [
                "Say: Transferring.", "Dial: +14155550199"]
        else:
            assert result.ended_by == "api"


# ----------------------------------------------------------------------------------------------
# μ-law and the CLI


def test_mulaw_codec_and_wav(tmp_path: Any) -> None:
    assert mulaw.decode(b"\xff\x00\x80") == b"".join(
        v.to_bytes(2, "little", signed=True) for v in (0, -32124, 32124))
    assert mulaw.encode(b"\x00\x00") == b"\xff"
    every = bytes(b for b in range(256) if b != 0x7F)  # 0x7F is μ-law's negative zero
    assert mulaw.encode(mulaw.decode(every)) == every
    mulaw.write_wav_from_ulaw(tmp_path / "x.wav", every)
    assert mulaw.read_wav_ulaw(tmp_path / "x.wav") == every


async def test_cli_writes_heard_wav_and_reports(
    bridge: MiniBridge, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = tone(0.5, 500)

    async def script(conn: WsConn) -> None:
        await wait_start(conn)
        await conn.media(agent)
        await conn.mark("greeting")
        await conn.wait_for(lambda m: m["event"] == "mark")
        await conn.close()

    bridge.script = script
    src = tmp_path / "caller.wav"
    mulaw.write_wav_from_ulaw(src, tone(0.3))
    out = tmp_path / "heard.wav"
    args = simulate_call.parse_args([
        "--url", bridge.http_base, "--public-url", PUBLIC, "--auth-token", TOKEN,
        "--audio", str(src), "--speed", str(SPEED), "--duration", "5", "--dtmf", "0.1:5",
        "--out", str(out),
    ])
    with trio.fail_after(TEST_DEADLINE_S):
        assert await simulate_call.run(args) == 0
    with wave.open(str(out), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        assert mulaw.encode(wav.readframes(wav.getnframes())) == agent
    report = capsys.readouterr().out
    assert "time to first audio" in report and "greeting played" in report
    assert "ended by            : server (close code 1000)" in report

    # A refused handshake: one clear line on stderr, exit 1.
    bridge.reject_ws = True
    with trio.fail_after(TEST_DEADLINE_S):
        assert await simulate_call.run(simulate_call.parse_args([
            "--url", bridge.http_base, "--public-url", PUBLIC, "--auth-token", TOKEN,
            "--speed", str(SPEED), "--duration", "1", "--json"])) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["handshake_status"] == 403
    assert captured.err.strip().splitlines() == [
        f"FAIL: stream handshake to wss://bridge.example.com{STREAM_PATH} refused "
        "(HTTP 403, Twilio 31920)"]


async def test_cli_rejects_wrong_wav_format(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "cd.wav"
    with wave.open(str(src), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(b"\x00" * 400)
    args = simulate_call.parse_args(["--url", "http://127.0.0.1:9", "--audio", str(src)])
    assert await simulate_call.run(args) == 2
    assert "sox in.wav -r 8000 -c 1 -b 16 out.wav" in capsys.readouterr().err
