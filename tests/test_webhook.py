"""The post-call record webhook: signed JSON POSTs, retried with backoff, then given up."""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from bridge.observe import Metrics
from bridge.records import webhook as wh

SECRET = "whsec-test-0123456789"
RECORD = {"call_sid": "CA" + "c" * 32, "turns": [{"speaker": "caller", "text": 'hi "there"\n\x00🎉'}]}


def test_signature_is_hex_hmac_sha256_of_the_body() -> None:
    import hashlib
    import hmac

    body = orjson.dumps(RECORD)
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert wh.sign(SECRET, body) == expected
    assert wh.verify(SECRET, body, expected)
    assert not wh.verify(SECRET, body + b" ", expected)
    assert not wh.verify("other-secret", body, expected)
    assert not wh.verify(SECRET, body, None)


class Receiver:
    """An httpx MockTransport handler answering a scripted list of statuses (then 200)."""

    def __init__(self, statuses: list[int | Exception]) -> None:
        self.statuses = statuses
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        outcome = self.statuses.pop(0) if self.statuses else 200
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome)


async def run_until(hook: wh.RecordWebhook, predicate: Any) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(hook.run)
        with trio.fail_after(3600):
            while not predicate():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_the_record_arrives_as_signed_json(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver([])
    hook = wh.RecordWebhook("https://hooks.example/records", SECRET, transport=httpx.MockTransport(receiver))
    hook.submit(RECORD)
    await run_until(hook, lambda: hook.delivered == 1)
    (request,) = receiver.requests
    assert request.method == "POST" and str(request.url) == "https://hooks.example/records"
    assert request.headers["content-type"] == "application/json"
    assert wh.verify(SECRET, request.content, request.headers[wh.SIGNATURE_HEADER])
    assert orjson.loads(request.content) == RECORD


async def test_no_secret_no_signature_header(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver([])
    hook = wh.RecordWebhook("https://hooks.example/r", None, transport=httpx.MockTransport(receiver))
    hook.submit(RECORD)
    await run_until(hook, lambda: hook.delivered == 1)
    assert wh.SIGNATURE_HEADER.lower() not in receiver.requests[0].headers


async def test_5xx_429_and_network_errors_are_retried_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver([503, 429, httpx.ConnectError("refused"), 500])
    metrics = Metrics()
    hook = wh.RecordWebhook("https://h/r", SECRET, transport=httpx.MockTransport(receiver), metrics=metrics)
    hook.submit(RECORD)
    await run_until(hook, lambda: hook.delivered == 1)
    gaps = [round(b - a, 3) for a, b in zip(receiver.times, receiver.times[1:], strict=False)]
    assert gaps == [1.0, 2.0, 4.0, 8.0]
    assert metrics.registry.get_sample_value("bridge_record_webhooks_total", {"result": "retried"}) == 4
    assert metrics.registry.get_sample_value("bridge_record_webhooks_total", {"result": "delivered"}) == 1


async def test_a_4xx_is_given_up_at_once(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver([400])
    hook = wh.RecordWebhook("https://h/r", SECRET, transport=httpx.MockTransport(receiver))
    hook.submit(RECORD)
    await run_until(hook, lambda: hook.given_up == 1)
    assert len(receiver.requests) == 1


async def test_a_receiver_that_never_answers_is_given_up_after_the_bounded_time(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    hook = wh.RecordWebhook("https://h/r", SECRET, transport=httpx.MockTransport(hang), give_up_s=120)
    hook.submit(RECORD)
    hook.submit(RECORD)
    start = trio.current_time()
    await run_until(hook, lambda: hook.given_up == 2)
    # each attempt waits ATTEMPT_S; the first record gives up once 120 s would be passed
    assert 100 <= trio.current_time() - start <= 200
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1  # one warning, not one per record


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_real_receiver_down_then_given_up_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wh, "RETRY_MIN_S", 0.05)
    hook = wh.RecordWebhook(f"http://127.0.0.1:{_closed_port()}/hook", SECRET, give_up_s=0.5)
    hook.submit(RECORD)
    await run_until(hook, lambda: hook.given_up == 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gave up" in warnings[0] and "ConnectError" in warnings[0]


async def test_real_receiver_gets_the_signed_record() -> None:
    got: list[tuple[bytes, dict[str, str]]] = []

    async def serve_one(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        length = int(headers.get("content-length", headers.get("Content-Length", "0")))
        while len(body) < length:
            body += await stream.receive_some(65536)
        got.append((body, {k.lower(): v for k, v in headers.items()}))
        await stream.send_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        hook = wh.RecordWebhook(f"http://127.0.0.1:{port}/hook", SECRET)
        hook.submit(RECORD)
        await run_until(hook, lambda: hook.delivered == 1)
        nursery.cancel_scope.cancel()
    ((body, headers),) = got
    assert orjson.loads(body) == RECORD
    assert wh.verify(SECRET, body, headers["x-bridge-signature"])
