"""Admission of a Media Streams upgrade (bridge.call.admission): each refusal's status and reason,
and that only an admitted stream spends its token."""

from __future__ import annotations

import pytest

from bridge.call.admission import Admitted, Gate, Refused, StreamRequest, admit
from bridge.fleet.shared import Admission, EndCall, InProcessState, SharedStateUnavailable
from bridge.phone.security import SignatureChecker, mint_token
from tools.fake_twilio import twilio_signature

SECRET = b"admission-test-secret-0123456789"
AUTH = "0123456789abcdef0123456789abcdef"
SID = "CA" + "ab" * 16
URL = "wss://bridge.example.com/media-stream/"
NOW = 1000.0


def _gate(state: object, *, signatures: bool = True) -> Gate:
    return Gate(SECRET, SignatureChecker(AUTH) if signatures else None, state, lambda: NOW)  # type: ignore[arg-type]


def _request(token: str, *, signature: str | None = "sign") -> StreamRequest:
    url = URL + token
    if signature == "sign":
        signature = twilio_signature(AUTH, url)
    return StreamRequest(token, signature, url)


def _token(ttl_s: float = 60.0) -> str:
    return mint_token(SECRET, SID, "inbound", now=NOW, ttl_s=ttl_s)


class DownState:
    """An authority that does not answer."""

    up = False

    async def run(self, end_call: EndCall, *, task_status: object = None) -> None:  # pragma: no cover
        raise AssertionError

    async def reserve(self, token: str, *, expires_at: float) -> bool:
        raise SharedStateUnavailable("down")

    async def admit(self, token: str, *, call_id: str, call_sid: str, expires_at: float) -> Admission:
        raise SharedStateUnavailable("the WORKERS parent did not answer within 2 s")

    async def release(self, call_id: str) -> None:
        pass


async def test_a_good_stream_is_admitted_once_then_refused_as_a_replay() -> None:
    state = InProcessState(5, clock=lambda: NOW)
    token = _token()
    first = await admit(_gate(state), _request(token), call_id="c1", draining=False)
    assert isinstance(first, Admitted) and first.grant.call_sid == SID and first.call_id == "c1"
    assert first.replaces is None
    assert await admit(_gate(state), _request(token), call_id="c2", draining=False) == Refused(403, "token replayed")


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (lambda t: _request(t, signature=None), Refused(403, "missing signature")),
        (lambda t: _request(t, signature="bogus"), Refused(403, "bad signature")),
        (lambda t: StreamRequest(t, twilio_signature(AUTH, URL + t + "x"), URL + t), Refused(403, "bad signature")),
        (lambda t: _request("garbage"), Refused(403, "token malformed")),
        (lambda t: _request(t[:-1] + ("0" if t[-1] != "0" else "1")), Refused(403, "token bad signature")),
    ],
    ids=["missing signature", "bad signature", "signature over another URL", "malformed", "forged"],
)
async def test_refusals_before_the_shared_state_spend_nothing(request_: object, expected: Refused) -> None:
    state = InProcessState(5, clock=lambda: NOW)
    token = _token()
    assert await admit(_gate(state), request_(token), call_id="c1", draining=False) == expected  # type: ignore[operator]
    assert not state.ledger.redeemed(token, NOW)
    assert isinstance(await admit(_gate(state), _request(token), call_id="c1", draining=False), Admitted)


async def test_an_expired_token_is_refused() -> None:
    state = InProcessState(5, clock=lambda: NOW)
    token = mint_token(SECRET, SID, "inbound", now=NOW - 120, ttl_s=60)
    assert await admit(_gate(state), _request(token), call_id="c1", draining=False) == Refused(403, "token expired")


async def test_without_an_auth_token_signatures_are_not_checked_but_tokens_are() -> None:
    state = InProcessState(5, clock=lambda: NOW)
    gate = _gate(state, signatures=False)
    assert isinstance(await admit(gate, _request(_token(), signature=None), call_id="c1", draining=False), Admitted)
    assert await admit(gate, _request("nope", signature=None), call_id="c2", draining=False) == Refused(
        403, "token malformed"
    )


async def test_capacity_and_drain_are_503_and_keep_the_token() -> None:
    state = InProcessState(1, clock=lambda: NOW)
    assert isinstance(await admit(_gate(state), _request(_token()), call_id="c1", draining=False), Admitted)
    token = _token()
    assert await admit(_gate(state), _request(token), call_id="c2", draining=False) == Refused(
        503, "capacity", "at capacity"
    )
    drained = await admit(_gate(state), _request(token), call_id="c2", draining=True)
    assert drained == Refused(503, "capacity", "draining")
    await state.release("c1")
    assert isinstance(await admit(_gate(state), _request(token), call_id="c2", draining=False), Admitted)


async def test_an_unreachable_authority_fails_closed_with_503() -> None:
    decision = await admit(_gate(DownState()), _request(_token()), call_id="c1", draining=False)
    assert decision == Refused(503, "shared state unavailable", "the WORKERS parent did not answer within 2 s")


async def test_a_newer_stream_for_the_call_sid_names_the_older_call() -> None:
    state = InProcessState(5, clock=lambda: NOW)
    await admit(_gate(state), _request(_token()), call_id="c1", draining=False)
    second = await admit(_gate(state), _request(_token()), call_id="c2", draining=False)
    assert isinstance(second, Admitted) and second.replaces == "c1"
