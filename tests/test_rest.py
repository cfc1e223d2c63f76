"""bridge.phone.rest against the fake Twilio REST API, through the real SDK, over loopback."""

from __future__ import annotations

import logging
import re
import socket
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from bridge.config import TwilioApi
from bridge.errors import TwilioRestError
from bridge.phone.rest import TrioHttpClient, TwilioRest
from tools.fake_twilio_rest import CallRecord, FakeTwilioRest

TO = "+14155550123"
FROM = "+14155550100"
TWIML_URL = "https://bridge.example.com/outbound-twiml"
STATUS_URL = "https://bridge.example.com/call-status"
EVENTS = ("initiated", "ringing", "answered", "completed")
TRANSFER = "<Response><Dial>+14155550199</Dial></Response>"


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeTwilioRest:
    fake = FakeTwilioRest()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def rest(fake: FakeTwilioRest) -> AsyncIterator[TwilioRest]:
    client = TwilioRest(
        fake.account_sid, fake.auth_token, http_client=TrioHttpClient(api_base=fake.base_url)
    )
    async with client:
        yield client


async def place(rest: TwilioRest, **overrides: object) -> str:
    kwargs: dict[str, object] = {
        "to": TO,
        "from_": FROM,
        "url": TWIML_URL,
        "status_callback": STATUS_URL,
    }
    kwargs.update(overrides)
    return await rest.place_call(**kwargs)  # type: ignore[arg-type]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the wire format --------------------------------------------------------------------------


async def test_place_call_sends_the_documented_form(fake: FakeTwilioRest, rest: TwilioRest) -> None:
    sid = await place(rest)

    assert re.fullmatch(r"CA[0-9a-f]{32}", sid)
    assert list(fake.calls) == [sid]
    [request] = fake.requests
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{fake.account_sid}/Calls.json"
    assert request.auth_ok and request.auth_user == fake.account_sid
    assert request.content_type == "application/x-www-form-urlencoded"
    assert request.get("To") == TO
    assert request.get("From") == FROM
    assert request.get("Url") == TWIML_URL
    assert request.get("Method") == "POST"
    assert request.get("StatusCallback") == STATUS_URL
    assert request.get_all("StatusCallbackEvent") == list(EVENTS)
    assert request.get("StatusCallbackMethod") == "POST"
    assert request.get("Timeout") == "30"
    assert request.get("TimeLimit") is None
    assert request.get("Twiml") is None
    call = fake.calls[sid]
    assert (call.to, call.from_, call.url) == (TO, FROM, TWIML_URL)
    assert call.status_callback_events == list(EVENTS)


async def test_place_call_sends_chosen_events_ring_timeout_and_time_limit(
    fake: FakeTwilioRest, rest: TwilioRest
) -> None:
    await place(rest, status_callback_events=["completed"], timeout_s=15, time_limit_s=600)

    [request] = fake.requests
    assert request.get_all("StatusCallbackEvent") == ["completed"]
    assert request.get("Timeout") == "15"
    assert request.get("TimeLimit") == "600"


async def test_hang_up_posts_status_completed(fake: FakeTwilioRest, rest: TwilioRest) -> None:
    sid = await place(rest)

    await rest.hang_up(sid)

    request = fake.requests[-1]
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{fake.account_sid}/Calls/{sid}.json"
    assert request.auth_ok
    assert request.form == [("Status", "completed")]
    assert fake.calls[sid].status == "completed"


async def test_update_twiml_posts_twiml_and_call_stays_live(
    fake: FakeTwilioRest, rest: TwilioRest
) -> None:
    sid = await place(rest)

    await rest.update_twiml(sid, TRANSFER)

    request = fake.requests[-1]
    assert request.path == f"/2010-04-01/Accounts/{fake.account_sid}/Calls/{sid}.json"
    assert request.form == [("Twiml", TRANSFER)]
    call = fake.calls[sid]
    assert call.live
    assert [r.twiml for r in call.redirects] == [TRANSFER]


# -- Twilio's error answers -------------------------------------------------------------------


async def test_invalid_number_is_twilio_error_21211(fake: FakeTwilioRest, rest: TwilioRest) -> None:
    with pytest.raises(TwilioRestError) as caught:
        await place(rest, to="+1")

    assert (caught.value.status, caught.value.code) == (400, 21211)
    assert str(caught.value) == (
        "Twilio error 21211: The 'To' number +1 is not a valid phone number."
    )
    assert fake.calls == {}


async def test_invalid_from_is_twilio_error_21212(rest: TwilioRest) -> None:
    with pytest.raises(TwilioRestError) as caught:
        await place(rest, from_="5550100")
    assert (caught.value.status, caught.value.code) == (400, 21212)


async def test_wrong_token_is_20003_and_the_token_never_leaks(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "wrong-token-d41d8cd98f00b204e980"
    client = TwilioRest(
        fake.account_sid, secret, http_client=TrioHttpClient(api_base=fake.base_url)
    )
    async with client:
        with pytest.raises(TwilioRestError) as caught:
            await place(client)

    assert (caught.value.status, caught.value.code) == (401, 20003)
    assert str(caught.value) == "Twilio error 20003: Authenticate"
    assert not fake.requests[-1].auth_ok
    assert secret not in repr(caught.value) and secret not in caught.value.message
    assert secret not in caplog.text
    assert "Twilio REST POST" in caplog.text  # requests are logged, credentials are not


async def test_hang_up_of_an_ended_call_is_21220(fake: FakeTwilioRest, rest: TwilioRest) -> None:
    sid = await place(rest)
    await rest.hang_up(sid)

    with pytest.raises(TwilioRestError) as caught:
        await rest.hang_up(sid)
    assert (caught.value.status, caught.value.code) == (400, 21220)
    assert caught.value.message == "Call is not in-progress. Cannot redirect."

    with pytest.raises(TwilioRestError) as caught:
        await rest.update_twiml(sid, TRANSFER)
    assert caught.value.code == 21220
    assert fake.calls[sid].redirects == []


async def test_update_of_an_unanswered_call_is_21220_until_it_is_live(
    fake: FakeTwilioRest, rest: TwilioRest
) -> None:
    fake.answer_on_create = False
    sid = await place(rest)
    assert fake.calls[sid].status == "queued"

    with pytest.raises(TwilioRestError) as caught:
        await rest.update_twiml(sid, TRANSFER)
    assert caught.value.code == 21220

    fake.mark_live(sid)
    await rest.update_twiml(sid, TRANSFER)
    assert len(fake.calls[sid].redirects) == 1


async def test_unknown_call_is_20404(rest: TwilioRest) -> None:
    with pytest.raises(TwilioRestError) as caught:
        await rest.hang_up("CA" + "0" * 32)
    assert (caught.value.status, caught.value.code) == (404, 20404)


async def test_server_error_with_a_twilio_code(fake: FakeTwilioRest, rest: TwilioRest) -> None:
    fake.fail_next_create_with = (500, 20500, "Internal Server Error")
    with pytest.raises(TwilioRestError) as caught:
        await place(rest)
    assert (caught.value.status, caught.value.code) == (500, 20500)
    assert str(caught.value) == "Twilio error 20500: Internal Server Error"


async def test_server_error_without_a_body_has_no_code(
    fake: FakeTwilioRest, rest: TwilioRest
) -> None:
    fake.fail_next_create_with = (502, None, "<html>Bad Gateway</html>")
    with pytest.raises(TwilioRestError) as caught:
        await place(rest)
    assert (caught.value.status, caught.value.code) == (502, None)
    assert caught.value.message == "Unable to create record (no error details in Twilio's answer)"

    sid = await place(rest)  # the failure was for one request only
    fake.fail_next_update_with = (503, None, "busy")
    with pytest.raises(TwilioRestError) as caught:
        await rest.hang_up(sid)
    assert (caught.value.status, caught.value.code) == (503, None)
    assert fake.calls[sid].live


# -- transport failures, deadlines, cancellation ----------------------------------------------


async def test_unreachable_api_is_a_clear_error() -> None:
    port = closed_port()
    client = TwilioRest(
        "AC" + "1" * 32, "token", http_client=TrioHttpClient(api_base=f"http://127.0.0.1:{port}")
    )
    async with client:
        with pytest.raises(TwilioRestError) as caught:
            await place(client)

    assert (caught.value.status, caught.value.code) == (0, None)
    assert caught.value.message.startswith(
        f"cannot connect to the Twilio API at http://127.0.0.1:{port} ("
    )
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_each_request_has_a_deadline(
    fake: FakeTwilioRest, autojump_clock: trio.testing.MockClock
) -> None:
    fake.stall_requests = True
    client = TwilioRest(
        fake.account_sid,
        fake.auth_token,
        http_client=TrioHttpClient(api_base=fake.base_url, timeout_s=2.5),
    )
    start = trio.current_time()
    async with client:
        with pytest.raises(TwilioRestError) as caught:
            await place(client)

    assert trio.current_time() - start == 2.5
    assert (caught.value.status, caught.value.code) == (0, None)
    assert caught.value.message == f"the Twilio API at {fake.base_url} did not answer within 2.5 s"


async def test_place_call_is_cancellable_without_a_thread(
    fake: FakeTwilioRest, rest: TwilioRest
) -> None:
    fake.stall_requests = True
    threads_before = threading.active_count()
    finished = trio.Event()

    async def call_then_note() -> None:
        try:
            await place(rest)
        finally:
            finished.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_then_note)
            await fake.request_stalled.wait()
            # The request is in flight on the server: a thread-based client would show one here.
            assert threading.active_count() == threads_before
            nursery.cancel_scope.cancel()
    assert finished.is_set()
    assert len(fake.requests) == 1 and fake.calls == {}


# -- the injected transport (no server) -------------------------------------------------------


async def test_mock_transport_sees_the_real_twilio_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"sid": "CA" + "a" * 32, "status": "queued", "direction": "outbound-api"}
        return httpx.Response(201, content=orjson.dumps(body))

    sid_ac = "AC" + "2" * 32
    client = TwilioRest(
        sid_ac, "token", http_client=TrioHttpClient(transport=httpx.MockTransport(handler))
    )
    async with client:
        assert await place(client) == "CA" + "a" * 32

    [request] = seen
    assert str(request.url) == f"https://api.twilio.com/2010-04-01/Accounts/{sid_ac}/Calls.json"
    assert request.headers["authorization"].startswith("Basic ")


async def test_region_and_edge_variables_do_not_move_the_api(
    fake: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the SDK reads TWILIO_EDGE/TWILIO_REGION from os.environ and rewrites the host.
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_REGION", "au1")
    client = TwilioRest(
        fake.account_sid, fake.auth_token, http_client=TrioHttpClient(api_base=fake.base_url)
    )
    async with client:
        await place(client)
    assert len(fake.calls) == 1


@pytest.mark.parametrize(
    ("answer", "status", "code", "message"),
    [
        (httpx.Response(201, content=b"<html>"), 0, None, "Twilio's answer was not valid JSON"),
        (httpx.Response(201, json={"status": "queued"}), 201, None, "sent no Call SID"),
        (
            httpx.Response(
                429,
                json={
                    "type": "https://www.twilio.com/docs/errors/20429",
                    "title": "Too Many Requests",
                    "status": 429,
                    "code": 20429,
                    "detail": "Rate limit exceeded",
                },
            ),
            429,
            20429,
            "Rate limit exceeded",
        ),
    ],
)
async def test_odd_answers_become_twilio_rest_errors(
    answer: httpx.Response, status: int, code: int | None, message: str
) -> None:
    client = TwilioRest(
        "AC" + "3" * 32,
        "token",
        http_client=TrioHttpClient(transport=httpx.MockTransport(lambda _request: answer)),
    )
    async with client:
        with pytest.raises(TwilioRestError) as caught:
            await place(client)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert message in caught.value.message


# -- the fake's hooks -------------------------------------------------------------------------


async def test_fake_runs_hooks_after_answering(fake: FakeTwilioRest, rest: TwilioRest) -> None:
    seen: list[tuple[str, str, str]] = []
    ran = trio.Semaphore(0)

    def hook(name: str) -> Callable[[CallRecord], Awaitable[None]]:
        async def run(call: CallRecord) -> None:
            seen.append((name, call.sid, call.status))
            ran.release()

        return run

    fake.on_create = hook("create")
    fake.on_redirect = hook("redirect")
    fake.on_hangup = hook("hangup")
    fake.answer_on_create = False

    sid = await place(rest)
    await ran.acquire()
    fake.mark_live(sid)
    await rest.update_twiml(sid, TRANSFER)
    await ran.acquire()
    await rest.hang_up(sid)
    await ran.acquire()

    assert seen == [
        ("create", sid, "queued"),
        ("redirect", sid, "in-progress"),
        ("hangup", sid, "completed"),
    ]


# -- answering-machine detection and where the API is (issue 15) ------------------------------

AMD_URL = "https://bridge.example.com/amd-status"


async def test_place_call_asks_for_async_amd_with_its_callback(fake: FakeTwilioRest, rest: TwilioRest) -> None:
    await place(rest)  # without a callback: no AMD at all
    sid = await place(rest, amd_status_callback=AMD_URL)

    plain, amd = fake.requests
    assert [plain.get(k) for k in ("MachineDetection", "AsyncAmd", "AsyncAmdStatusCallback")] == [None] * 3
    assert amd.get("MachineDetection") == "DetectMessageEnd"
    assert amd.get("AsyncAmd") == "true"
    assert amd.get("AsyncAmdStatusCallback") == AMD_URL
    assert amd.get("AsyncAmdStatusCallbackMethod") == "POST"
    assert fake.calls[sid].amd_callback == AMD_URL


@pytest.mark.parametrize(
    ("api", "host"),
    [
        (TwilioApi(region="ie1", edge="dublin"), "api.dublin.ie1.twilio.com"),
        (TwilioApi(edge="sydney"), "api.sydney.us1.twilio.com"),
        (TwilioApi(), "api.twilio.com"),
    ],
)
async def test_region_and_edge_choose_the_regional_endpoint(api: TwilioApi, host: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"sid": "CA" + "b" * 32, "status": "queued"})

    account = "AC" + "3" * 32
    client = TwilioRest(
        account, "token", http_client=TrioHttpClient(transport=httpx.MockTransport(handler)), api=api
    )
    async with client:
        await place(client)
        await client.hang_up("CA" + "b" * 32)
    assert [r.url.host for r in seen] == [host, host] == [api.host, api.host]
    assert str(seen[0].url) == f"https://{host}/2010-04-01/Accounts/{account}/Calls.json"


async def test_api_base_url_points_the_made_client_at_the_fake(fake: FakeTwilioRest) -> None:
    assert fake.base_url is not None
    client = TwilioRest(fake.account_sid, fake.auth_token, api=TwilioApi(base_url=fake.base_url))
    async with client:
        sid = await place(client)
    assert list(fake.calls) == [sid] and client.http_client.api_base == fake.base_url


async def test_the_fake_sends_a_signed_amd_callback_after_the_answer(nursery: trio.Nursery) -> None:
    from twilio.request_validator import RequestValidator

    received: list[tuple[str, dict[str, str], str]] = []

    async def bridge(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        form = dict(urllib.parse.parse_qsl(body.decode()))
        received.append((str(scope["path"]), form, headers.get(b"x-twilio-signature", b"").decode()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.errorlog = config.accesslog = None
    [local] = await nursery.start(hypercorn_serve, bridge, config)
    fake = FakeTwilioRest()
    fake.amd_answered_by, fake.amd_delay_s = "machine_end_beep", 0.2
    fake.callback_url_map = lambda url: url.replace("https://bridge.example.com", str(local))
    await nursery.start(fake.serve)
    client = TwilioRest(fake.account_sid, fake.auth_token, api=TwilioApi(base_url=fake.base_url))
    async with client:
        with trio.fail_after(10):
            sid = await place(client, amd_status_callback=AMD_URL)
            await fake.callback_sent.wait()
    [(path, form, signature)] = received
    assert path == "/amd-status"
    assert form == {
        "AccountSid": fake.account_sid,
        "AnsweredBy": "machine_end_beep",
        "ApiVersion": "2010-04-01",
        "CallSid": sid,
        "MachineDetectionDuration": "2300",
    }
    assert RequestValidator(fake.auth_token).validate(AMD_URL, form, signature)  # over the public URL
    assert [c.status for c in fake.callbacks] == [204]
    assert fake.calls[sid].resource()["answered_by"] == "machine_end_beep"
    # By hand, e.g. a duplicate, unsigned:
    assert await fake.send_amd(sid, "human", signed=False) == 204
    assert received[-1][2] == "" and received[-1][1]["AnsweredBy"] == "human"


async def test_the_servers_rest_client_uses_the_configured_endpoint() -> None:
    from bridge.config import from_env
    from bridge.web.app import default_collaborators

    env = {
        "ASSEMBLYAI_API_KEY": "aai_0123456789abcdef",
        "HOSTNAME": "https://bridge.example.com",
        "TWILIO_ACCOUNT_SID": "AC" + "4" * 32,
        "TWILIO_AUTH_TOKEN": "0123456789abcdef0123456789abcdef",
        "TWILIO_REGION": "au1",
        "TWILIO_EDGE": "sydney",
    }
    control = default_collaborators(from_env(env)).control
    assert isinstance(control, TwilioRest)
    async with control:
        assert control.api == TwilioApi(region="au1", edge="sydney")
