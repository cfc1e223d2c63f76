"""Issue 3, attacked end to end: who may open an upstream session, and which limits hold.

Everything runs against the real app under Hypercorn on loopback (``tests/harness.py``) with the
fake Voice Agent and the fake Twilio. The invariant behind most assertions: a refused request
never reaches the Voice Agent, so ``agent.connections_total`` proves no upstream session opened.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionClosed
from twilio.request_validator import RequestValidator

from bridge.phone.security import mint_token
from tests.harness import API_KEY, PUBLIC, Running, running_bridge
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan, CallResult, StreamRejected, new_sid, parse_twiml

REPO = Path(__file__).resolve().parent.parent
TOKEN_SECRET = "test-stream-token-secret-0123456789"  # the harness default
WEBHOOKS = ("/twiml", "/outbound-twiml", "/call-status", "/stream-status")
OK_STATUS = {"/twiml": 200, "/outbound-twiml": 200, "/call-status": 204, "/stream-status": 204}


# --- helpers -------------------------------------------------------------------------------------


def _agent(**kw: object) -> FakeAgentConfig:
    return FakeAgentConfig(api_key=API_KEY, vad=False, **kw)  # type: ignore[arg-type]


def _form(bridge: Running, path: str, call_sid: str) -> dict[str, str]:
    if path in ("/twiml", "/outbound-twiml"):
        direction = "inbound" if path == "/twiml" else "outbound-api"
        return bridge.twilio.voice_params(CallPlan(direction=direction), call_sid)
    if path == "/call-status":
        return {"AccountSid": bridge.twilio.account_sid, "CallSid": call_sid, "CallStatus": "completed"}
    return {"AccountSid": bridge.twilio.account_sid, "CallSid": call_sid, "StreamEvent": "stream-started"}


async def _stream_url(bridge: Running, call_sid: str | None = None, path: str = "/twiml") -> tuple[str, str]:
    """Answer a (signed) voice webhook like Twilio does; returns (CallSid, wss stream URL)."""
    call_sid = call_sid or new_sid("CA")
    resp = await bridge.twilio.post_webhook(path, _form(bridge, path, call_sid))
    assert resp.status_code == 200, resp.text
    spec = parse_twiml(resp.text).stream
    assert spec is not None, resp.text
    return call_sid, spec.url


async def _raw_post(bridge: Running, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(bridge.http_base + path, content=body, headers=headers)


async def _eventually(check: Callable[[], bool], limit_s: float = 3.0) -> None:
    with trio.fail_after(limit_s):
        while not check():
            await trio.sleep(0.01)


async def _idle(bridge: Running, limit_s: float = 3.0) -> None:
    """No live call and no upstream socket left."""
    await _eventually(lambda: not bridge.app.active_calls and not bridge.agent.connections_open, limit_s)


async def _refused(bridge: Running, url: str, **kwargs: object) -> int | None:
    with trio.fail_after(5), pytest.raises(StreamRejected) as info:
        async with bridge.twilio.open_stream(url, **kwargs):  # type: ignore[arg-type]
            pass
    return info.value.status_code


async def _closed_by_server(client_receive: Callable[[], object], limit_s: float = 3.0) -> int | None:
    """Read until the server closes; returns the close code."""
    with trio.fail_after(limit_s):
        try:
            while True:
                await client_receive()  # type: ignore[misc]
        except ConnectionClosed as exc:
            return exc.reason.code if exc.reason else None


async def _healthy_call(bridge: Running, *, hangup_after_s: float = 2.0) -> CallResult:
    with trio.fail_after(20):
        result = await bridge.twilio.call(CallPlan(speed=5.0, hangup_after_s=hangup_after_s))
    assert result.handshake_status == 101, result.timeline
    assert result.violations == []
    assert result.ended_by == "caller"
    assert result.heard_bytes > 0  # the greeting came through
    return result


def _metric(bridge: Running, name: str, **labels: str) -> float:
    return bridge.app.metrics.registry.get_sample_value(name, labels) or 0.0


async def _healthz(bridge: Running) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(bridge.http_base + "/healthz")).status_code


# --- webhook signatures ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", WEBHOOKS)
async def test_every_webhook_refuses_unsigned_and_badly_signed_requests(path: str) -> None:
    async with running_bridge(agent_config=_agent()) as bridge:
        tw = bridge.twilio
        sid = new_sid("CA")
        form = _form(bridge, path, sid)
        public = PUBLIC + path
        internal = bridge.http_base + path
        attempts = {
            "missing": {"sign": False},
            "garbage": {"signature": "not-a-signature"},
            "empty": {"signature": ""},
            "huge": {"signature": "A" * 10_000},
            "wrong token": {"signature": RequestValidator("f" * 32).compute_signature(public, form)},
            "internal http URL": {"signature": tw.sign(internal, form)},
            "http instead of https": {"signature": tw.sign(public.replace("https://", "http://"), form)},
            "wss instead of https": {"signature": tw.sign(public.replace("https://", "wss://"), form)},
            "other params": {"signature": tw.sign(public, {**form, "CallSid": new_sid("CA")})},
            "trailing slash": {"signature": tw.sign(public + "/", form)},
        }
        for name, kwargs in attempts.items():
            resp = await tw.post_webhook(path, form, **kwargs)  # type: ignore[arg-type]
            assert resp.status_code == 403, name
            assert "<Stream" not in resp.text and "media-stream" not in resp.text, name
        # The same request, properly signed, is accepted; the :443 form of the URL too.
        assert (await tw.post_webhook(path, form)).status_code == OK_STATUS[path]
        port_form = _form(bridge, path, new_sid("CA"))
        signature = tw.sign("https://bridge.example.com:443" + path, port_form)
        assert (await tw.post_webhook(path, port_form, signature=signature)).status_code == OK_STATUS[path]
        assert _metric(bridge, "bridge_webhooks_total", route=path, result="forbidden") == len(attempts)
        assert bridge.agent.connections_total == 0


async def test_signature_is_checked_against_the_public_url_never_the_host_header() -> None:
    async with running_bridge(agent_config=_agent()) as bridge:
        tw = bridge.twilio
        form = _form(bridge, "/twiml", new_sid("CA"))
        body = urlencode(form).encode()
        proxied = {
            "content-type": "application/x-www-form-urlencoded",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "bridge.example.com",
            "x-forwarded-for": "203.0.113.7",
            "host": "internal",
        }
        # Behind a TLS-terminating proxy: sent to http://127.0.0.1:PORT, signed over the public URL.
        resp = await _raw_post(
            bridge, "/twiml", body, {**proxied, "x-twilio-signature": tw.sign(PUBLIC + "/twiml", form)}
        )
        assert resp.status_code == 200
        assert parse_twiml(resp.text).stream is not None
        # The stream URL in the TwiML is on the public host, whatever the request said.
        assert parse_twiml(resp.text).stream.url.startswith("wss://bridge.example.com/media-stream/")  # type: ignore[union-attr]
        # A signature over what the Host / X-Forwarded-* headers claim is refused.
        for claimed in ("http://internal/twiml", "https://internal/twiml", bridge.http_base + "/twiml"):
            resp = await _raw_post(bridge, "/twiml", body, {**proxied, "x-twilio-signature": tw.sign(claimed, form)})
            assert resp.status_code == 403, claimed
        # An attacker's Host header plus a URL they could sign themselves: still refused.
        evil = {"content-type": "application/x-www-form-urlencoded", "host": "evil.example"}
        forged = RequestValidator("attacker-token").compute_signature("https://evil.example/twiml", form)
        resp = await _raw_post(bridge, "/twiml", body, {**evil, "x-twilio-signature": forged})
        assert resp.status_code == 403
        assert "media-stream" not in resp.text
        assert bridge.agent.connections_total == 0


async def test_no_auth_token_means_no_signature_checks_and_a_warning() -> None:
    async with running_bridge(agent_config=_agent(), env={"TWILIO_AUTH_TOKEN": ""}) as bridge:
        assert bridge.settings.verify_signatures is False
        assert any("TWILIO_AUTH_TOKEN is not set" in w for w in bridge.settings.warnings)
        resp = await bridge.twilio.post_webhook("/twiml", _form(bridge, "/twiml", new_sid("CA")), sign=False)
        assert resp.status_code == 200
        # Stream tokens still guard the upgrade (the secret is generated at start-up).
        assert await _refused(bridge, "/media-stream/garbage", sign=False) == 403
        await _healthy_call(bridge, hangup_after_s=1.0)


# --- the Media Streams upgrade ------------------------------------------------------------------


async def test_upgrade_signature_missing_wrong_or_over_the_wrong_url_is_refused_before_accept() -> None:
    async with running_bridge(agent_config=_agent()) as bridge:
        tw = bridge.twilio
        call_sid, url = await _stream_url(bridge)
        path = urlsplit(url).path
        wrong = {
            "missing": {"sign": False},
            "garbage": {"signature": "garbage"},
            "wrong token": {"signature": RequestValidator("f" * 32).compute_signature(url, {})},
            "https:// form": {"signature": tw.sign(url.replace("wss://", "https://"), {})},
            "internal ws:// URL": {"signature": tw.sign(f"ws://127.0.0.1:{bridge.port}{path}", {})},
            "another path": {"signature": tw.sign(url + "x", {})},
            "with params": {"signature": tw.sign(url, {"CallSid": call_sid})},
        }
        for name, kwargs in wrong.items():
            assert await _refused(bridge, url, call_sid=call_sid, **kwargs) == 403, name
        assert bridge.agent.connections_total == 0
        assert bridge.app.active_calls == 0
        # The refusals did not burn the token: Twilio's own, correctly signed upgrade still works.
        async with tw.open_stream(url, call_sid=call_sid) as client:
            await client.send_connected()
            await client.send_start()
            await bridge.agent.wait_for_session(1)
            await client.send_stop()
        await _idle(bridge)
        assert _metric(bridge, "bridge_rejected_streams_total", reason="missing signature") == 1
        assert _metric(bridge, "bridge_rejected_streams_total", reason="bad signature") == len(wrong) - 1


async def test_stream_tokens_forged_malformed_or_from_another_secret_are_refused() -> None:
    async with running_bridge(agent_config=_agent()) as bridge:
        call_sid, url = await _stream_url(bridge)
        token = url.rsplit("/", 1)[1]
        body, mac = token.rsplit(".", 1)
        kind, sid, expiry, nonce = body.split(".")
        other_sid = new_sid("CA")
        now = time.time()
        bad_tokens = [
            "",
            "garbage",
            "x" * 120,
            "y" * 5000,
            "..%2F..%2Fetc%2Fpasswd",
            "%00",
            "%E2%98%83",
            f"{body}.{'0' * 32}",  # forged MAC
            f"{body}.{mac[:-1]}",  # truncated MAC
            f"{body}.{mac.upper()}",
            f"{kind}.{other_sid}.{expiry}.{nonce}.{mac}",  # MAC of another call
            f"{'o' if kind == 'i' else 'i'}.{sid}.{expiry}.{nonce}.{mac}",  # flipped direction
            f"{kind}.{sid}.{int(expiry) + 3600}.{nonce}.{mac}",  # extended expiry
            mint_token(b"another-secret-0123456789abcdef", call_sid, "inbound", now=now, ttl_s=60),
            token + "/extra",
            token + "%2F",
        ]
        for bad in bad_tokens:
            target = f"wss://bridge.example.com/media-stream/{bad}"
            # Signed correctly over exactly that URL: only the token is wrong.
            assert await _refused(bridge, target, call_sid=call_sid) in (403, 400, 431), bad
        assert bridge.agent.connections_total == 0
        assert bridge.app.active_calls == 0
        assert await _healthz(bridge) == 200


async def test_expired_token_is_refused() -> None:
    async with running_bridge(agent_config=_agent(), env={"STREAM_TOKEN_TTL_S": "1"}) as bridge:
        call_sid, url = await _stream_url(bridge)
        await trio.sleep(2.05)  # expiry is a whole second: past it whatever the rounding
        assert await _refused(bridge, url, call_sid=call_sid) == 403
        assert _metric(bridge, "bridge_rejected_streams_total", reason="token expired") == 1
        assert bridge.agent.connections_total == 0


async def test_a_token_is_valid_for_its_whole_ttl() -> None:
    """A token minted with TTL 1 s must still open a stream ~0.9 s later (no truncation of the TTL)."""
    async with running_bridge(agent_config=_agent(), env={"STREAM_TOKEN_TTL_S": "1"}) as bridge:
        for _ in range(2):
            call_sid, url = await _stream_url(bridge)
            await trio.sleep(0.9)
            async with bridge.twilio.open_stream(url, call_sid=call_sid) as client:
                await client.send_stop()


async def test_replayed_token_is_refused_while_and_after_the_first_stream() -> None:
    async with running_bridge(agent_config=_agent()) as bridge:
        call_sid, url = await _stream_url(bridge)
        async with bridge.twilio.open_stream(url, call_sid=call_sid) as client:
            await client.send_connected()
            await client.send_start()
            await bridge.agent.wait_for_session(1)
            assert await _refused(bridge, url, call_sid=call_sid) == 403  # while live
            await client.send_stop()
        await _idle(bridge)
        assert await _refused(bridge, url, call_sid=call_sid) == 403  # after
        assert bridge.agent.connections_total == 1
        assert _metric(bridge, "bridge_rejected_streams_total", reason="token replayed") == 2


async def test_token_of_call_a_with_start_of_call_b_is_closed_before_any_upstream_session() -> None:
    async with running_bridge(agent_config=_agent()) as bridge:
        _call_a, url = await _stream_url(bridge)
        call_b = new_sid("CA")
        async with bridge.twilio.open_stream(url, call_sid=call_b) as client:
            await client.send_connected()
            await client.send_start()
            with contextlib.suppress(ConnectionClosed):
                await client.send_media(b"\xff" * 160)
            await _closed_by_server(client.receive)
        await _idle(bridge)
        assert bridge.agent.connections_total == 0
        assert _metric(bridge, "bridge_calls_total", outcome="rejected") == 1


async def test_token_minted_by_one_instance_is_accepted_by_another_with_the_same_secret() -> None:
    async with (
        running_bridge(agent_config=_agent()) as first,
        running_bridge(agent_config=_agent()) as second,
        running_bridge(agent_config=_agent(), env={"STREAM_TOKEN_SECRET": "a-different-secret-0123456789"}) as third,
    ):
        call_sid, url = await _stream_url(first)
        # Behind a load balancer the stream lands on the second instance.
        async with second.twilio.open_stream(url, call_sid=call_sid) as client:
            await client.send_connected()
            await client.send_start()
            session = await second.agent.wait_for_session(1)
            await client.send_stop()
        with trio.fail_after(3):
            await session.ended.wait()
        assert first.agent.connections_total == 0
        assert second.agent.connections_total == 1
        # An instance with another secret never accepts it.
        call_sid, url = await _stream_url(first)
        assert await _refused(third, url, call_sid=call_sid) == 403
        assert third.agent.connections_total == 0
        await _idle(second)
        await _idle(third)


# --- limits ------------------------------------------------------------------------------------------


@asynccontextmanager
async def _raw_stream(
    bridge: Running, url: str
) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, trio.SocketStream]]:
    """A Media Streams socket whose TCP stream the test owns (to drop it at will)."""
    path = urlsplit(url).path
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", bridge.port)
        headers = [(b"x-twilio-signature", bridge.twilio.sign(url, {}).encode())]
        ws = await trio_websocket.wrap_client_stream(
            nursery, stream, "bridge.example.com", path, extra_headers=headers, max_message_size=4 * 1024 * 1024
        )
        try:
            yield ws, stream
        finally:
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def _start_frames(ws: trio_websocket.WebSocketConnection, call_sid: str) -> None:
    import orjson

    stream_sid = new_sid("MZ")
    await ws.send_message('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream_sid,
        "start": {
            "accountSid": new_sid("AC"),
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {},
        },
    }
    await ws.send_message(orjson.dumps(start).decode())


@pytest.mark.parametrize("size", [70 * 1024, 1024 * 1024])
async def test_oversized_twilio_frame_closes_that_socket_with_1009_and_nothing_else(size: int) -> None:
    async with running_bridge(agent_config=_agent()) as bridge:
        healthy: list[CallResult] = []

        async def other_call() -> None:
            healthy.append(await _healthy_call(bridge, hangup_after_s=3.0))

        async with trio.open_nursery() as nursery:
            call_sid, url = await _stream_url(bridge)
            async with _raw_stream(bridge, url) as (ws, _stream):
                await _start_frames(ws, call_sid)
                session = await bridge.agent.wait_for_session(1)
                nursery.start_soon(other_call)
                await ws.send_message("x" * size)
                assert await _closed_by_server(ws.get_message) == 1009
                assert await _healthz(bridge) == 200
            # The call ends cleanly at the 1009, while the agent is still speaking: session.end
            # must reach the agent even though the Twilio writer has already finished (a2ff7f0).
            with trio.fail_after(10):
                await session.ended.wait()
        assert healthy and healthy[0].ended_by == "caller"
        await _idle(bridge)
        assert await _healthz(bridge) == 200


async def test_a_peer_that_keeps_tcp_open_after_1009_does_not_hold_the_call() -> None:
    # Hypercorn 0.18 never tells the app about its own 1009 close, and a peer that keeps its TCP
    # connection open would hold the call (and its upstream session): TWILIO_SILENCE_S ends it.
    async with running_bridge(agent_config=_agent(), env={"TWILIO_SILENCE_S": "1"}) as bridge:
        call_sid, url = await _stream_url(bridge)
        async with _raw_stream(bridge, url) as (ws, _stream):
            await _start_frames(ws, call_sid)
            session = await bridge.agent.wait_for_session(1)
            await ws.send_message("x" * 1024 * 1024)
            assert await _closed_by_server(ws.get_message) == 1009
            with trio.fail_after(3):  # the TCP connection stays open, Twilio-like, waiting for ours to close
                await session.ended.wait()


async def test_max_concurrent_calls_answers_busy_twiml_and_opens_nothing_upstream() -> None:
    async with running_bridge(agent_config=_agent(), env={"MAX_CONCURRENT_CALLS": "1"}) as bridge:
        async with trio.open_nursery() as nursery:
            first: list[CallResult] = []

            async def first_call() -> None:
                first.append(await _healthy_call(bridge, hangup_after_s=4.0))

            nursery.start_soon(first_call)
            await bridge.agent.wait_for_session(1)
            busy = await bridge.twilio.post_webhook("/twiml", _form(bridge, "/twiml", new_sid("CA")))
            assert busy.status_code == 200
            twiml = parse_twiml(busy.text)
            assert twiml.stream is None
            assert twiml.verbs_before[0].startswith("Say") and twiml.verbs_before[-1] == "Hangup"
            outbound = await bridge.twilio.post_webhook(
                "/outbound-twiml", _form(bridge, "/outbound-twiml", new_sid("CA"))
            )
            assert parse_twiml(outbound.text).stream is None
            # A stream whose token another instance minted is refused too while we are full (503: a
            # proxy may retry it on another instance).
            sid = new_sid("CA")
            token = mint_token(TOKEN_SECRET.encode(), sid, "inbound", now=time.time(), ttl_s=60)
            assert await _refused(bridge, f"wss://bridge.example.com/media-stream/{token}", call_sid=sid) == 503
            assert bridge.agent.connections_total == 1
        assert first and first[0].ended_by == "caller"
        await _idle(bridge)
        # The slot is free again.
        await _healthy_call(bridge, hangup_after_s=1.0)
        assert bridge.agent.connections_total == 2


async def test_max_call_seconds_ends_the_call_cleanly() -> None:
    async with running_bridge(agent_config=_agent(), env={"MAX_CALL_SECONDS": "1.5"}) as bridge:
        started = trio.current_time()
        with trio.fail_after(15):
            result = await bridge.twilio.call(CallPlan(speed=5.0, hangup_after_s=60.0))
        elapsed = trio.current_time() - started
        assert result.ended_by == "server"  # we closed the stream; Twilio then runs the fallback
        assert result.violations == []
        assert 1.4 <= elapsed < 5.0
        session = await bridge.agent.wait_for_session(1)
        assert session.ended.is_set()  # session.end went upstream before the close
        assert any(e.get("type") == "session.end" for e in session.received)
        assert _metric(bridge, "bridge_calls_total", outcome="time_limit") == 1
        await _idle(bridge)


async def test_oversized_agent_frame_is_handled() -> None:
    """A reply frame over MAX_AGENT_FRAME_BYTES: the upstream socket is closed (1009), the call
    resumes or ends cleanly, nothing leaks, other calls are fine."""
    config = _agent(chunk_bytes=6000)  # each greeting chunk is ~8 KB of base64
    async with running_bridge(agent_config=config, env={"MAX_AGENT_FRAME_BYTES": "4096"}) as bridge:
        with trio.fail_after(20):
            result = await bridge.twilio.call(CallPlan(speed=5.0, hangup_after_s=3.0))
        assert result.handshake_status == 101
        assert result.violations == []
        assert result.ended_by in ("caller", "server")
        assert result.heard_bytes == 0  # no oversized frame was passed on
        await _idle(bridge)
        assert await _healthz(bridge) == 200
