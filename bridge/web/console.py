"""The console's routes: sign-in, the pages and their static files, live events, hang-up.

Routes (all answer 404 while ``CONSOLE_TOKEN`` is unset: transcripts are personal data):

- ``GET /console``, ``/console/past``, ``/console/calls/<CallSid>``: the page shell (no data in
  it; its script reads ``/api/``) with the session's CSRF token in a ``<meta>`` tag; without a
  valid session cookie, the sign-in page (401) instead.
- ``POST /console/sign-in`` (form field ``token``): a right token sets the session cookie and
  redirects (303) to the page asked for; a wrong one is 401 and the sign-in page again.
- ``POST /console/sign-out`` (form field ``csrf``): clears the cookie.
- ``GET /console/static/<name>``: the CSS and JavaScript (no data; a fixed list of files).
- ``GET /console/calls/<CallSid>/recording``: the call's WAV when the record has one.
- ``GET /api/events``: Server-Sent Events of the live calls (see :class:`EventStream`).
- ``POST /api/calls/<CallSid>/hangup``: end a live call through Twilio's REST API, on whichever
  instance it lives (the shared state finds it and asks that instance: 202 either way; 404 when
  no instance holds it, 503 when the shared state cannot say).

Authentication: ``Authorization: Bearer <CONSOLE_TOKEN>`` or the session cookie
(:mod:`bridge.console.session`); a state change with the cookie also needs the session's
``X-CSRF-Token``. Every response under ``/console`` and ``/api/`` carries a strict
Content-Security-Policy (scripts only from our own files, no inline script, no eval), ``nosniff``
and ``Referrer-Policy: no-referrer``.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import orjson
import trio
from quart import Response, abort, current_app, request
from quart_trio import QuartTrio

from bridge.console import STATIC_DIR
from bridge.console.session import SESSION_S, Session, SessionSigner
from bridge.errors import TwilioRestError
from bridge.fleet.shared import HangupRoute, SharedStateUnavailable

if TYPE_CHECKING:
    from bridge.web.app import BridgeApp

log = logging.getLogger("bridge.console")

COOKIE = "console_session"
CSRF_HEADER = "X-CSRF-Token"
EXTENSION = "bridge.console"
HEARTBEAT_S = 10.0  # a comment line this often: under nginx's 15 s proxy_read_timeout on `location /`
DRAIN_POLL_S = 0.5  # how soon a stream notices the server has drained (it then ends)
HANGUP_DEADLINE_S = 10.0  # Twilio's REST API answers in well under a second; past this we say so
SNAPSHOT_TURNS = 50  # turns per live call in a stream's first event (the call page reads the rest)
RETRY_MS = 3000  # EventSource reconnect delay the stream asks for

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Where a sign-in may send the browser back to: our own pages only (never a URL from the form).
_NEXT = re.compile(r"^/console(?:/past|/calls/[A-Za-z0-9_-]{1,64})?$")


class LiveEvents(Protocol):
    """The live-event hub (``bridge.records.live.LiveHub``)."""

    def subscribe(self) -> AbstractContextManager[trio.MemoryReceiveChannel[dict[str, Any]]]: ...


class LiveCalls(Protocol):
    """What the console reads of the records service (``bridge.records.recorder.Records``)."""

    @property
    def hub(self) -> LiveEvents: ...

    def live(self, call_sid: str) -> dict[str, Any] | None: ...

    def live_summaries(self) -> list[dict[str, Any]]: ...


class RecordReader(Protocol):
    """Reads one stored record (the record store)."""

    async def get(self, call_sid: str) -> dict[str, Any] | None: ...


@dataclass
class ConsoleDeps:
    """What the routes need from the app, looked up per request (the app wires them at start-up)."""

    live_calls: Callable[[], LiveCalls | None]
    record_reader: Callable[[], RecordReader | None]
    draining: Callable[[], bool]  # the server has stopped taking calls and has none left
    wall_clock: Callable[[], float]


class Console:
    """The console's state for one process: the session signer and its pages."""

    def __init__(self, token: str, session_secret: bytes | None, secure_cookie: bool, deps: ConsoleDeps) -> None:
        # A random secret per process: a restart signs everyone out (CONSOLE_SESSION_SECRET keeps them).
        self.signer = SessionSigner(session_secret or secrets.token_bytes(32), token)
        self.secure_cookie = secure_cookie
        self.deps = deps
        self.static = _load_static(STATIC_DIR)
        self._shell = (STATIC_DIR / "shell.html").read_text()
        self._sign_in = (STATIC_DIR / "sign-in.html").read_text()

    # --- authentication -----------------------------------------------------------------------

    def session(self) -> Session | None:
        return self.signer.check(request.cookies.get(COOKIE), self.deps.wall_clock())

    def bearer_ok(self) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and bool(value) and self.signer.token_matches(value.strip())

    def authenticated(self) -> Session | bool:
        """The session (cookie), True (a right Bearer token) or False."""
        if self.bearer_ok():
            return True
        return self.session() or False

    # --- pages --------------------------------------------------------------------------------

    def sign_in_page(self, *, status: int, next_path: str, error: str = "") -> Response:
        body = self._sign_in.replace("{{next}}", _attr(next_path)).replace("{{error}}", _text(error))
        body = body.replace("{{error_hidden}}", "" if error else " hidden")
        return _page(body, status)

    def shell(self, session: Session, page: str) -> Response:
        csrf = self.signer.csrf_token(session)
        return _page(self._shell.replace("{{csrf}}", csrf).replace("{{page}}", page), 200)


def console_of(quart: QuartTrio) -> Console | None:
    """The console of an app, or None when ``CONSOLE_TOKEN`` is unset."""
    console = quart.extensions.get(EXTENSION)
    return console if isinstance(console, Console) else None


def api_authorized() -> bool:
    """For ``/api/`` routes (in a request context): a right Bearer token or a valid console
    session cookie. Reads need no CSRF token: the cookie is ``SameSite=Strict``."""
    console = current_app.extensions.get(EXTENSION)
    return isinstance(console, Console) and console.authenticated() is not False


def register_console(quart: QuartTrio, app: BridgeApp) -> None:
    """Add the console's routes to ``quart`` (the app's Quart, see ``webhooks.build_quart``)."""
    settings = app.settings
    if settings.console_token:
        deps = ConsoleDeps(
            # Wired by the records issue: the Records service and the store, when they are on.
            live_calls=lambda: getattr(app, "records", None),
            record_reader=lambda: getattr(app, "record_store", None),
            draining=lambda: app.calls.draining and app.active_calls == 0,
            wall_clock=app.deps.wall_clock,
        )
        quart.extensions[EXTENSION] = Console(
            settings.console_token, settings.console_session_secret, settings.public.secure, deps
        )

    def enabled() -> Console:
        console = console_of(quart)
        if console is None:
            abort(404)
        return console

    @quart.after_request
    async def console_security_headers(response: Response) -> Response:
        if request.path.startswith(("/console", "/api/")):
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def page(name: str) -> Response:
        console = enabled()
        session = console.session()
        if session is None:
            return console.sign_in_page(status=401, next_path=request.path)
        return console.shell(session, name)

    @quart.get("/console")
    async def console_live_page() -> Response:
        return await page("live")

    @quart.get("/console/past")
    async def console_past_page() -> Response:
        return await page("past")

    @quart.get("/console/calls/<call_sid>")
    async def console_call_page(call_sid: str) -> Response:
        return await page("call")

    @quart.post("/console/sign-in")
    async def console_sign_in() -> Response:
        console = enabled()
        form = await request.form
        next_path = form.get("next", "")
        if not _NEXT.fullmatch(next_path):
            next_path = "/console"
        if not console.signer.token_matches(form.get("token", "")):
            log.warning("console sign-in refused: wrong token")
            return console.sign_in_page(status=401, next_path=next_path, error="That token is not right.")
        response = Response("", status=303, headers={"Location": next_path})
        _set_cookie(response, console, console.signer.issue(console.deps.wall_clock()), SESSION_S)
        return response

    @quart.post("/console/sign-out")
    async def console_sign_out() -> Response:
        console = enabled()
        form = await request.form
        session = console.session()
        if session is not None and not console.signer.csrf_matches(session, form.get("csrf")):
            return _json({"error": "missing or wrong CSRF token"}, 403)
        response = Response("", status=303, headers={"Location": "/console"})
        _set_cookie(response, console, "", 0)
        return response

    @quart.get("/console/static/<name>")
    async def console_static(name: str) -> Response:
        console = enabled()
        asset = console.static.get(name)
        if asset is None:
            abort(404)
        body, content_type = asset
        return Response(body, status=200, content_type=content_type, headers={"Cache-Control": "no-cache"})

    @quart.get("/console/calls/<call_sid>/recording")
    async def console_recording(call_sid: str) -> Response:
        console = enabled()
        if console.authenticated() is False:
            return _json({"error": "sign in first"}, 401)
        record = await _record(console, call_sid)
        path = recording_path(record)
        # Only a WAV file is ever served: a record (e.g. in a shared database) cannot make this
        # route hand out some other file of the server's.
        if path is None or path.suffix.lower() != ".wav" or not path.is_file():
            return _json({"error": "no recording for this call"}, 404)
        data = await trio.Path(path).read_bytes()
        return Response(data, status=200, content_type="audio/wav", headers={"Content-Disposition": "inline"})

    @quart.get("/api/events")
    async def console_events() -> Response:
        console = enabled()
        if console.authenticated() is False:
            return _json({"error": "missing or wrong token"}, 401)
        response = Response(
            EventStream(console.deps.live_calls(), console.deps.draining),
            status=200,
            content_type="text/event-stream; charset=utf-8",
            # X-Accel-Buffering: nginx passes each event on at once instead of buffering it.
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        response.timeout = None  # the stream lasts until the browser leaves or the server drains
        return response

    @quart.post("/api/calls/<call_sid>/hangup")
    async def console_hang_up(call_sid: str) -> Response:
        console = enabled()
        auth = console.authenticated()
        if auth is False:
            return _json({"error": "missing or wrong token"}, 401)
        if isinstance(auth, Session) and not console.signer.csrf_matches(auth, request.headers.get(CSRF_HEADER)):
            return _json({"error": "missing or wrong CSRF token"}, 403)
        live = console.deps.live_calls()
        route = HangupRoute.HERE
        if live is None or live.live(call_sid) is None:
            # Not on this instance's records: the shared state knows which instance holds it
            # (with REDIS_URL or WORKERS), and asks that one to hang it up.
            try:
                route = await app.shared.request_hangup(call_sid)
            except SharedStateUnavailable as exc:
                log.warning("console hang-up of %s: cannot find its instance: %s", call_sid, exc)
                return _json({"error": "the shared state is unavailable: cannot find the call", "call_sid": call_sid},
                             503)  # fmt: skip
        if route is HangupRoute.UNKNOWN:
            return _json({"error": "no such live call", "call_sid": call_sid}, 404)
        if route is HangupRoute.SENT:
            log.info("call %s: hang-up asked from the console; the instance holding it hangs it up", call_sid)
            return _json({"call_sid": call_sid, "status": "hanging up", "instance": "another"}, 202)
        control = app.deps.control
        if control is None:
            return _json({"error": "Twilio REST is not configured (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN)"}, 503)
        try:
            with trio.fail_after(HANGUP_DEADLINE_S):
                await control.hang_up(call_sid)
        except TwilioRestError as exc:
            log.warning("console hang-up of %s failed: %s", call_sid, exc)
            return _json({"error": str(exc), "call_sid": call_sid}, 502)
        except trio.TooSlowError:
            log.warning("console hang-up of %s: Twilio did not answer within %g s", call_sid, HANGUP_DEADLINE_S)
            return _json({"error": "Twilio did not answer in time", "call_sid": call_sid}, 504)
        log.info("call %s hung up from the console", call_sid)
        return _json({"call_sid": call_sid, "status": "hanging up"}, 202)


class EventStream:
    """The body of one ``GET /api/events`` response: Server-Sent Events, one JSON object each.

    The first event is ``{"type": "snapshot", "calls": [live record, ...]}`` (each call's latest
    :data:`SNAPSHOT_TURNS` turns), then the hub's events as they are published (shapes in
    ``bridge/records/live.py``), then ``{"type": "server.draining"}`` and the end of the stream
    once the server has drained. A comment line every :data:`HEARTBEAT_S` keeps proxies and
    the browser from timing the stream out.

    The hub gives each stream its own bounded buffer and drops that stream's OLDEST events when
    it falls behind; nothing here buffers more. The subscription is taken at the first read and
    given back by :meth:`aclose`, which Quart calls when the response ends for any reason
    (the browser left: cancelled; the stream ended), so it is never held by a response that
    was never sent.
    """

    def __init__(self, live: LiveCalls | None, drained: Callable[[], bool]) -> None:
        self._live = live
        self._drained = drained
        self._stack = ExitStack()
        self._events: trio.MemoryReceiveChannel[dict[str, Any]] | None = None
        self._started = False
        self._ended = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            return self._open()
        next_heartbeat = trio.current_time() + HEARTBEAT_S
        while True:
            if self._drained():
                self._ended = True
                return _sse({"type": "server.draining"})
            event: dict[str, Any] | None = None
            with trio.move_on_after(min(DRAIN_POLL_S, max(0.0, next_heartbeat - trio.current_time()))):
                if self._events is not None:
                    event = await self._events.receive()
                else:
                    await trio.sleep_forever()  # records are off: heartbeats only
            if event is not None:
                return self._batch(event)
            if trio.current_time() >= next_heartbeat:
                return b": keep-alive\n\n"

    async def aclose(self) -> None:
        self._ended = True
        self._stack.close()

    def _open(self) -> bytes:
        head = f"retry: {RETRY_MS}\n\n".encode()
        calls: list[dict[str, Any]] = []
        if self._live is not None:
            try:
                self._events = self._stack.enter_context(self._live.hub.subscribe())
            except Exception as exc:  # TooManySubscribers: the browser retries after RETRY_MS
                self._ended = True
                return head + _sse({"type": "error", "error": str(exc)})
            for item in self._live.live_summaries():
                record = self._live.live(str(item.get("call_sid")))
                if record is not None:
                    record["turns_total"] = len(record.get("turns") or [])
                    record["turns"] = (record.get("turns") or [])[-SNAPSHOT_TURNS:]
                    record["turns_offset"] = record["turns_total"] - len(record["turns"])
                    calls.append(record)
        return head + _sse({"type": "snapshot", "calls": calls})

    def _batch(self, first: dict[str, Any]) -> bytes:
        # Everything already waiting goes out in one write: one send per burst, not per event.
        out = [_sse(first)]
        assert self._events is not None
        for _ in range(64):
            try:
                out.append(_sse(self._events.receive_nowait()))
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return b"".join(out)


def recording_path(record: dict[str, Any] | None) -> Path | None:
    """The WAV path a record names (``recording`` or ``audio_path``), or None."""
    if not record:
        return None
    for name in ("recording", "audio_path", "recording_path"):
        value = record.get(name)
        if isinstance(value, dict):
            value = value.get("path")
        if isinstance(value, str) and value:
            return Path(value)
    return None


async def _record(console: Console, call_sid: str) -> dict[str, Any] | None:
    live = console.deps.live_calls()
    record = live.live(call_sid) if live is not None else None
    if record is not None:
        return record
    reader = console.deps.record_reader()
    return await reader.get(call_sid) if reader is not None else None


def _sse(event: dict[str, Any]) -> bytes:
    # orjson never writes a raw newline (it escapes them in strings), so one data line is safe.
    return b"data: " + orjson.dumps(event, default=str) + b"\n\n"


def _json(payload: dict[str, Any], status: int) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def _page(body: str, status: int) -> Response:
    return Response(body, status=status, content_type="text/html; charset=utf-8")


def _set_cookie(response: Response, console: Console, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path="/",
        secure=console.secure_cookie,
        httponly=True,
        samesite="Strict",
    )


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attr(value: str) -> str:
    return quote(value, safe="/")


def _load_static(directory: Path) -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(directory.iterdir()):
        content_type = _STATIC_TYPES.get(path.suffix)
        if content_type is not None and path.is_file():
            files[path.name] = (path.read_bytes(), content_type)
    return files


__all__ = [
    "COOKIE",
    "CSP",
    "CSRF_HEADER",
    "Console",
    "ConsoleDeps",
    "EventStream",
    "LiveCalls",
    "RecordReader",
    "api_authorized",
    "console_of",
    "recording_path",
    "register_console",
]
