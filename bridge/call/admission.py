"""Admission of a Media Streams upgrade, before it is accepted: ``admit(...) -> Admitted | Refused``.

In order: the ``X-Twilio-Signature`` over the configured public ``wss://`` URL, the stream token
(its MAC, its expiry), the drain, then one step with the shared state (:mod:`bridge.fleet.shared`):
redeem the token, take a slot, register the stream as its CallSid's live one. Only an
``Admitted`` stream gets a CallSession; a ``Refused`` one is answered with its status before
accept and never reaches the Voice Agent.

Statuses: 403 for a request that will never be good (signature, token, replay); 503 for one that
may succeed elsewhere or later (capacity, drain, shared state unavailable: fail closed, and
nginx/Twilio may retry). ``reason`` is the ``bridge_rejected_streams_total`` label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bridge.fleet.shared import SharedState, SharedStateUnavailable, Verdict
from bridge.phone.security import SignatureChecker, StreamGrant, check_token


@dataclass(frozen=True, slots=True)
class Admitted:
    grant: StreamGrant
    call_id: str
    replaces: str | None = None  # this process's older live call for the CallSid: end it


@dataclass(frozen=True, slots=True)
class Refused:
    status: int  # 403 or 503
    reason: str  # the metric label, and what the log says
    detail: str = ""  # for the log only


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """What admission looks at: the token from the path, the signature header, the signed URL."""

    token: str
    signature: str | None
    signed_url: str


@dataclass(frozen=True, slots=True)
class Gate:
    """What admission checks against (one per app)."""

    secret: bytes
    signatures: SignatureChecker | None  # None: TWILIO_AUTH_TOKEN unset, signatures not checked
    shared: SharedState
    clock: Callable[[], float]  # wall clock: tokens expire on it


def check(gate: Gate, request: StreamRequest) -> StreamGrant | Refused:
    """The pure part: signature and token. Either the grant, or a 403."""
    if gate.signatures is not None and not gate.signatures.valid(request.signed_url, {}, request.signature):
        return Refused(403, "bad signature" if request.signature else "missing signature")
    grant = check_token(gate.secret, request.token, now=gate.clock())
    if isinstance(grant, str):
        return Refused(403, f"token {grant}")
    return grant


async def admit(gate: Gate, request: StreamRequest, *, call_id: str, draining: bool) -> Admitted | Refused:
    """Decide on one upgrade. A grant refused for capacity or drain keeps its token unspent.

    One await (the shared state's ``admit``), which is cancellation-safe: a slot granted to a
    cancelled request is given back by the state. An ``Admitted`` call's slot is the caller's
    to release (``SharedState.release(call_id)``) when the call ends."""
    grant = check(gate, request)
    if isinstance(grant, Refused):
        return grant
    if draining:
        return Refused(503, "capacity", "draining")
    try:
        admission = await gate.shared.admit(
            grant.token, call_id=call_id, call_sid=grant.call_sid, expires_at=float(grant.expires_at)
        )
    except SharedStateUnavailable as exc:
        return Refused(503, "shared state unavailable", str(exc))
    if admission.verdict is Verdict.REPLAYED:
        return Refused(403, "token replayed")
    if admission.verdict is Verdict.FULL:
        return Refused(503, "capacity", "at capacity")
    return Admitted(grant, call_id, admission.replaces)
