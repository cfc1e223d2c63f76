"""A fake of Twilio's REST Calls API on loopback, speaking the real wire format.

What it does (reference twilio.md §5 and §7):

- ``POST /2010-04-01/Accounts/{AC}/Calls.json`` checks HTTP Basic auth (401, code 20003), parses
  the form as a multidict (``StatusCallbackEvent`` repeats), validates ``To`` / ``From`` as E.164
  (400, 21211 / 21212), requires ``Url`` or ``Twiml`` (400, 21205) and answers 201 with a Call
  resource (``status: "queued"``, ``direction: "outbound-api"``).
- ``POST …/Calls/{CA}.json``: ``Status=completed`` ends a live call; ``Twiml`` or ``Url`` redirects
  it (the call stays live); a call that is not in progress gets 400, code 21220. An unknown Call
  SID gets 404, code 20404, as on the real API.
- ``GET …/Calls/{CA}.json`` fetches a call.
- Asynchronous AMD (reference twilio.md 6b): a call created with ``AsyncAmd=true`` and an
  ``AsyncAmdStatusCallback`` gets, ``amd_delay_s`` after it went live, a POST of the callback
  signed like every Twilio webhook (``X-Twilio-Signature`` over the callback URL and the form)
  with ``CallSid``, ``AccountSid``, ``AnsweredBy`` (``amd_answered_by``; None sends nothing, as
  when detection never finishes) and ``MachineDetectionDuration``. ``MachineDetection`` without
  a callback URL is accepted, as Twilio does (it only warns, 21262). :meth:`FakeTwilioRest.send_amd`
  sends one by hand (duplicates, late or unsigned results).

Every request is recorded in :attr:`FakeTwilioRest.requests`. A created call is "queued"; it is
live ("in-progress") once answered: at once when ``answer_on_create`` is true (the default), else
when a test calls :meth:`FakeTwilioRest.mark_live` (e.g. once its fake phone opened the stream).
Hooks (``on_create``, ``on_hangup``, ``on_redirect``) run in the server's nursery after the answer
was sent, so an end-to-end test can connect the fake API to a fake phone; an exception in a hook
fails the server (and the test).

Run ``python -m tools.fake_twilio_rest`` to serve one on a free port for manual tests.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from twilio.request_validator import RequestValidator

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_AUTH_TOKEN = "fake-auth-token-0123456789abcdef"
API_VERSION = "2010-04-01"

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_CALLS = re.compile(rf"^/{API_VERSION}/Accounts/(?P<account>[^/]+)/Calls\.json$")
_CALL = re.compile(rf"^/{API_VERSION}/Accounts/(?P<account>[^/]+)/Calls/(?P<call>[^/]+)\.json$")
_MAX_BODY_BYTES = 1024 * 1024
_CALLBACK_TIMEOUT_S = 10.0  # Twilio gives a webhook about 15 s; tests should fail faster
_LIVE = "in-progress"
_ENDED = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})

Form = list[tuple[str, str]]
Hook = Callable[["CallRecord"], Awaitable[None]]
Failure = tuple[int, int | None, str]  # (http status, twilio code or None for a text body, message)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake saw it. ``form`` keeps repeated keys, in order."""

    method: str
    path: str
    auth_ok: bool
    auth_user: str | None
    form: Form
    content_type: str
    query: Form = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """The first value of form field ``name``."""
        return next((v for k, v in self.form if k == name), None)

    def get_all(self, name: str) -> list[str]:
        """Every value of form field ``name``, in order."""
        return [v for k, v in self.form if k == name]


@dataclass(frozen=True, slots=True)
class SentCallback:
    """A callback the fake POSTed: where, what, and the HTTP status it got (0: no answer)."""

    url: str
    form: Form
    status: int


@dataclass(frozen=True, slots=True)
class Redirect:
    """A TwiML update of a live call (``Twiml`` or ``Url`` + ``Method``)."""

    twiml: str | None
    url: str | None
    method: str | None


@dataclass(slots=True)
class CallRecord:
    """A call the fake API knows, with what ``calls.create`` asked for."""

    sid: str
    account_sid: str
    to: str
    from_: str
    url: str | None
    method: str
    twiml: str | None
    status_callback: str | None
    status_callback_events: list[str]
    status_callback_method: str
    form: Form
    status: str = "queued"
    direction: str = "outbound-api"
    redirects: list[Redirect] = field(default_factory=list)
    answered_by: str | None = None  # the last AMD result sent (the resource's answered_by)
    date_created: str = field(default_factory=lambda: formatdate(usegmt=True))
    date_updated: str = field(default_factory=lambda: formatdate(usegmt=True))

    @property
    def live(self) -> bool:
        return self.status == _LIVE

    @property
    def amd_callback(self) -> str | None:
        """The ``AsyncAmdStatusCallback`` URL when async AMD was asked for, else None."""
        fields = _Fields(self.form)
        if (fields.get("AsyncAmd") or "").lower() != "true" or not fields.get("MachineDetection"):
            return None
        return fields.get("AsyncAmdStatusCallback") or None

    def resource(self) -> dict[str, Any]:
        """The Call resource JSON as the API returns it."""
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}.json"
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "parent_call_sid": None,
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "phone_number_sid": None,
            "status": self.status,
            "start_time": None,
            "end_time": self.date_updated if self.status in _ENDED else None,
            "duration": None,
            "price": None,
            "price_unit": "USD",
            "direction": self.direction,
            "answered_by": self.answered_by,
            "api_version": API_VERSION,
            "forwarded_from": None,
            "group_sid": None,
            "caller_name": None,
            "queue_time": "0",
            "trunk_sid": None,
            "date_created": self.date_created,
            "date_updated": self.date_updated,
            "uri": uri,
            "subresource_uris": {
                "notifications": uri.replace(".json", "/Notifications.json"),
                "recordings": uri.replace(".json", "/Recordings.json"),
            },
        }


class FakeTwilioRest:
    """The fake API. Configure it, then ``base_url = await nursery.start(fake.serve)``.

    Options (plain attributes, change them at any time):
        answer_on_create: a created call goes "in-progress" right after the 201.
        fail_next_create_with / fail_next_update_with: ``(http status, twilio code, message)``
            answers the next create / update (after auth); a code of None sends ``message`` as
            plain text, like a proxy error page.
        stall_requests: requests are recorded, then never answered (``request_stalled`` is set).
        on_create / on_hangup / on_redirect: hooks run in the server's nursery after the answer.
        amd_answered_by: the ``AnsweredBy`` the AMD callback reports (None: no callback).
        amd_delay_s: how long after the call went live the AMD callback is sent.
        amd_detection_ms: the ``MachineDetectionDuration`` it reports.
        callback_url_map: turns a callback URL (the bridge's public one) into where to really
            POST it (e.g. its loopback address); the signature stays over the original URL.
    """

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        *,
        answer_on_create: bool = True,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.answer_on_create = answer_on_create
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, CallRecord] = {}
        self.on_create: Hook | None = None
        self.on_hangup: Hook | None = None
        self.on_redirect: Hook | None = None
        self.fail_next_create_with: Failure | None = None
        self.fail_next_update_with: Failure | None = None
        self.stall_requests = False
        self.request_stalled = trio.Event()
        self.amd_answered_by: str | None = "human"
        self.amd_delay_s = 0.5
        self.amd_detection_ms = 2300
        self.callback_url_map: Callable[[str], str] = lambda url: url
        self.callbacks: list[SentCallback] = []
        self.callback_sent = trio.Event()  # set (and replaced) after every callback
        self.base_url: str | None = None
        self._nursery: trio.Nursery | None = None

    # -- test helpers ---------------------------------------------------------------------------

    def mark_live(self, call_sid: str) -> None:
        """The callee answered: the call is "in-progress" (updates are accepted). With async AMD
        asked for, the AMD callback follows ``amd_delay_s`` later (while serving)."""
        call = self.calls[call_sid]
        was_live = call.live
        call.status = _LIVE
        call.date_updated = formatdate(usegmt=True)
        if not was_live and call.amd_callback and self.amd_answered_by is not None and self._nursery:
            self._nursery.start_soon(self._amd_later, call, self.amd_answered_by, self.amd_delay_s)

    async def send_amd(
        self, call_sid: str, answered_by: str, *, signed: bool = True, detection_ms: int | None = None
    ) -> int:
        """POST an AMD result for ``call_sid`` to its ``AsyncAmdStatusCallback`` now and return
        the HTTP status (0 when the bridge could not be reached in time)."""
        call = self.calls[call_sid]
        url = call.amd_callback
        if url is None:
            raise ValueError(f"call {call_sid} did not ask for async AMD")
        ms = self.amd_detection_ms if detection_ms is None else detection_ms
        call.answered_by = answered_by
        form: Form = [
            ("AccountSid", call.account_sid),
            ("AnsweredBy", answered_by),
            ("ApiVersion", API_VERSION),
            ("CallSid", call.sid),
            ("MachineDetectionDuration", str(ms)),
        ]
        return await self.post_callback(url, form, signed=signed)

    async def post_callback(self, url: str, form: Form, *, signed: bool = True) -> int:
        """POST a form-encoded callback as Twilio does (signed with the auth token over ``url``)."""
        headers = {"content-type": "application/x-www-form-urlencoded", "user-agent": "TwilioProxy/1.1"}
        if signed:
            if len({key for key, _ in form}) != len(form):
                raise ValueError("a callback form with repeated keys needs a multidict to sign")
            signature = RequestValidator(self.auth_token).compute_signature(url, dict(form))
            headers["x-twilio-signature"] = signature
        status = 0
        try:
            with trio.move_on_after(_CALLBACK_TIMEOUT_S):
                async with httpx.AsyncClient(trust_env=False) as client:
                    answer = await client.post(self.callback_url_map(url), content=urlencode(form), headers=headers)
                    status = answer.status_code
        except httpx.HTTPError:
            status = 0
        self.callbacks.append(SentCallback(url, list(form), status))
        done, self.callback_sent = self.callback_sent, trio.Event()
        done.set()
        return status

    async def _amd_later(self, call: CallRecord, answered_by: str, delay_s: float) -> None:
        await trio.sleep(delay_s)
        if call.live:
            await self.send_amd(call.sid, answered_by)

    def end_call(self, call_sid: str, status: str = "completed") -> None:
        """The call ended on the phone side (e.g. the callee hung up)."""
        call = self.calls[call_sid]
        call.status = status
        call.date_updated = formatdate(usegmt=True)

    def add_live_call(self, call_sid: str, *, to: str, from_: str) -> CallRecord:
        """Register an inbound call so REST updates of it work as on the real API."""
        call = CallRecord(
            sid=call_sid,
            account_sid=self.account_sid,
            to=to,
            from_=from_,
            url=None,
            method="POST",
            twiml=None,
            status_callback=None,
            status_callback_events=[],
            status_callback_method="POST",
            form=[],
            status=_LIVE,
            direction="inbound",
        )
        self.calls[call_sid] = call
        return call

    # -- serving --------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on ``127.0.0.1`` on a free port until cancelled.

        Reports ``http://127.0.0.1:PORT`` through ``task_status``. Hooks run in a nursery owned
        by this task, so cancelling it cancels them too.
        """
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.errorlog = None
        config.accesslog = None
        config.graceful_timeout = 0.1
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            binds = await nursery.start(hypercorn_serve, self.app, config)
            self.base_url = str(binds[0])
            task_status.started(self.base_url)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The raw ASGI application."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > _MAX_BODY_BYTES:
                await _send_json(send, 413, _error_body(413, 20001, "Request body too large"))
                return
            if not message.get("more_body", False):
                break
        answer = self._handle(scope, body)
        if answer.status == 0:
            self.request_stalled.set()
            await trio.sleep_forever()
        if isinstance(answer.body, str):
            await _send(send, answer.status, answer.body.encode(), b"text/plain; charset=utf-8")
        else:
            await _send_json(send, answer.status, answer.body)
        if answer.hook is not None and answer.call is not None:
            assert self._nursery is not None
            self._nursery.start_soon(answer.hook, answer.call)

    # -- the API --------------------------------------------------------------------------------

    def _handle(self, scope: dict[str, Any], body: bytes) -> _Answer:
        """Record the request and decide the answer: (status, JSON or text, hook, call)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", "")
        form: Form = []
        if content_type.split(";")[0].strip() == "application/x-www-form-urlencoded":
            form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        user, password = _basic_auth(headers.get("authorization"))
        auth_ok = user == self.account_sid and password == self.auth_token
        method, path = scope["method"], scope["path"]
        self.requests.append(
            RecordedRequest(method, path, auth_ok, user, form, content_type, query)
        )
        if self.stall_requests:
            return _Answer(0, "")
        if not auth_ok:
            return _error(401, 20003, "Authenticate")

        if match := _CALLS.match(path):
            if match["account"] != self.account_sid:
                return _not_found(path)
            if method != "POST":
                return _error(405, 20004, "Method not allowed")
            return self._create(form)
        if match := _CALL.match(path):
            call = self.calls.get(match["call"])
            if match["account"] != self.account_sid or call is None:
                return _not_found(path)
            if method == "GET":
                return _Answer(200, call.resource())
            if method != "POST":
                return _error(405, 20004, "Method not allowed")
            return self._update(call, form)
        return _not_found(path)

    def _create(self, form: Form) -> _Answer:
        fields = _Fields(form)
        if self.fail_next_create_with is not None:
            status, code, message = self.fail_next_create_with
            self.fail_next_create_with = None
            return _error(status, code, message)
        to, from_ = fields.get("To"), fields.get("From")
        if not to:
            return _error(400, 21201, "No 'To' number is specified")
        if not _E164.match(to):
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not from_:
            return _error(400, 21603, "A 'From' phone number is required.")
        if not _E164.match(from_):
            return _error(
                400,
                21212,
                f"The 'From' number {from_} is not a valid phone number, shortcode, "
                "or alphanumeric sender ID.",
            )
        url, twiml = fields.get("Url"), fields.get("Twiml")
        if not url and not twiml and not fields.get("ApplicationSid"):
            return _error(400, 21205, "Url parameter is required.")
        if url and not url.startswith(("http://", "https://")):
            return _error(400, 21205, f"Url is not a valid URL: {url}")
        call = CallRecord(
            sid="CA" + secrets.token_hex(16),
            account_sid=self.account_sid,
            to=to,
            from_=from_,
            url=url,
            method=(fields.get("Method") or "POST").upper(),
            twiml=None if url else twiml,  # with both, Twilio ignores Twiml
            status_callback=fields.get("StatusCallback"),
            status_callback_events=fields.get_all("StatusCallbackEvent") or ["completed"],
            status_callback_method=(fields.get("StatusCallbackMethod") or "POST").upper(),
            form=list(form),
        )
        self.calls[call.sid] = call
        answer = call.resource()  # the 201 always says "queued"
        if self.answer_on_create:
            self.mark_live(call.sid)
        return _Answer(201, answer, self.on_create, call)

    def _update(self, call: CallRecord, form: Form) -> _Answer:
        fields = _Fields(form)
        if self.fail_next_update_with is not None:
            status, code, message = self.fail_next_update_with
            self.fail_next_update_with = None
            return _error(status, code, message)
        new_status = fields.get("Status")
        twiml, url = fields.get("Twiml"), fields.get("Url")
        if new_status is None and twiml is None and url is None:
            return _Answer(200, call.resource())
        if new_status == "canceled" and call.status in ("queued", "ringing"):
            self.end_call(call.sid, "canceled")
            return _Answer(200, call.resource(), self.on_hangup, call)
        if not call.live:
            return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
        if new_status == "completed":
            self.end_call(call.sid, "completed")
            return _Answer(200, call.resource(), self.on_hangup, call)
        if new_status is not None and new_status != "canceled":
            return _error(400, 20001, f"Invalid Status: {new_status}")
        if twiml is None and url is None:
            return _Answer(200, call.resource())  # canceled on a live call changes nothing
        redirect = Redirect(twiml=None if url else twiml, url=url, method=fields.get("Method"))
        call.redirects.append(redirect)
        call.date_updated = formatdate(usegmt=True)
        return _Answer(200, call.resource(), self.on_redirect, call)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What to send: ``status`` 0 means never answer (stall)."""

    status: int
    body: dict[str, Any] | str
    hook: Hook | None = None
    call: CallRecord | None = None


def _error(status: int, code: int | None, message: str) -> _Answer:
    return _Answer(status, message if code is None else _error_body(status, code, message))


class _Fields:
    def __init__(self, form: Form) -> None:
        self._form = form

    def get(self, name: str) -> str | None:
        return next((v for k, v in self._form if k == name), None)

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._form if k == name]


def _basic_auth(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else (None, None)


def _error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _not_found(path: str) -> _Answer:
    return _error(404, 20404, f"The requested resource {path} was not found")


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    await _send(send, status, json.dumps(payload).encode(), b"application/json; charset=utf-8")


async def _send(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Basic realm="Twilio API"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _main() -> None:
    fake = FakeTwilioRest()
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(fake.serve)
        print(f"Fake Twilio REST API on {base_url}")
        print(f"  TWILIO_ACCOUNT_SID={fake.account_sid}")
        print(f"  TWILIO_AUTH_TOKEN={fake.auth_token}")


if __name__ == "__main__":
    trio.run(_main)
