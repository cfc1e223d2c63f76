"""The upstream lifecycle's pure decisions (call/upstream.py) and the agent leg's error edge."""

from __future__ import annotations

import pytest
import trio
import trio_websocket

from bridge.agent.leg import translate
from bridge.call import upstream
from bridge.call.ports import SocketClosed
from bridge.errors import UpstreamError


@pytest.mark.parametrize(("attempt", "wait_s"), [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (9, 2.0)])
def test_backoff_doubles_up_to_its_cap(attempt: int, wait_s: float) -> None:
    assert upstream.backoff_s(attempt) == wait_s


def _rejected(status: int) -> trio_websocket.ConnectionRejected:
    return trio_websocket.ConnectionRejected(status, (), b"")


@pytest.mark.parametrize(
    ("exc", "code", "retryable"),
    [
        (OSError("connection refused"), "connect_failed", True),
        (_rejected(503), "rejected", True),
        (_rejected(429), "rejected", True),
        (_rejected(401), "rejected", False),
        (_rejected(404), "rejected", False),
        (trio_websocket.HandshakeError(), "handshake_failed", False),
        (trio.BrokenResourceError("gone"), "connection_lost", False),
        (SocketClosed("gone"), "connection_lost", False),
        (UpstreamError("tls_failed", "bad certificate", retryable=False), "tls_failed", False),
    ],
)
def test_library_errors_become_ours_at_the_legs_edge(exc: BaseException, code: str, retryable: bool) -> None:
    ours = translate(exc)
    assert (ours.code, ours.retryable) == (code, retryable)


@pytest.mark.parametrize(
    ("retryable", "retry"),
    [([True], True), ([True, True], True), ([True, False], False), ([False, True], False), ([], False)],
)
def test_a_connect_is_retried_only_if_every_error_is_retryable(retryable: list[bool], retry: bool) -> None:
    errors = [UpstreamError("x", "y", retryable=r) for r in retryable]
    assert upstream.retry_connect(errors) is retry
