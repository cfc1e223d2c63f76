"""SharedState: the one interface admission talks to, whoever the authority is.

It is asked at admission and teardown only, never per frame:

- ``reserve`` — the webhook that mints a stream token holds a call slot until the token expires;
- ``admit`` — the stream upgrade, as one atomic step: redeem the token (single use, remembered
  until the token expires), take its reservation or a free slot, and register the stream as its
  CallSid's live one (a newer stream replaces an older one: issue 15 §5);
- ``release`` — teardown frees the slot;
- ``request_hangup`` — call control from any process: where is this CallSid's live call? If it
  is on another process, that process is asked to hang it up (through its Twilio REST client);
- ``deliver_amd`` — Twilio's AMD callback, received by any process: handed to the process that
  holds (or will hold) the CallSid's stream. Here: the caller publishes it itself; another
  process: sent there (its ``deliver``); no stream anywhere yet (the callback beat it): kept by
  the authority, bounded and expiring, and handed to ``deliver`` of the process whose
  admission of that CallSid's stream takes it, before ``admit`` returns;
- ``up`` — health, for metrics and readiness;
- ``run`` — background work for the life of the server (reading the authority's messages).

Implementations: :class:`InProcessState` (one process: the default),
:class:`bridge.fleet.parent.ParentState` (a WORKERS worker asks its parent, the one authority of
the machine) and :class:`bridge.fleet.redis_state.RedisState` (``REDIS_URL``: every instance of a
cluster shares one Redis). The decisions themselves live in the pure
:class:`bridge.fleet.ledger.Ledger` (and, for Redis, in its Lua scripts).

Failure policy: the WORKERS parent fails closed: ``reserve`` and ``admit`` raise
:class:`SharedStateUnavailable` when it cannot answer within its deadline (a stream is refused
with 503, which nginx may retry elsewhere and Twilio reports; a webhook answers the busy TwiML).
Redis fails over to local instead: while it is unreachable ``up`` is False and the instance
admits with the per-instance guarantees (its own ledger) until Redis is back. ``release`` never
raises: a slot the authority did not hear about is freed when this process's connection to it
ends (the parent) or when its lease runs out (Redis).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from bridge.call.signals import AmdResult
from bridge.errors import BridgeError
from bridge.fleet.ledger import Ledger, Verdict

EndCall = Callable[[str, str], None]
"""``end_call(call_id, reason)``: end this process's live call ``call_id`` (it was replaced by a
newer stream for its CallSid, possibly on another process). Must not block."""

HangUp = Callable[[str], None]
"""``hang_up(call_sid)``: another process asked for this process's live call ``call_sid`` to be
hung up (through Twilio's REST API). Must not block: start the request and return."""

Deliver = Callable[[AmdResult], None]
"""``deliver(result)``: an AMD result for a CallSid whose stream is (or is being admitted) on
this process, received by another one or kept by the authority. Must not block."""

KEPT_TTL_S = 60.0  # an AMD result that beat its stream waits this long (a stream token's default life)

__all__ = [
    "Admission",
    "AmdResult",
    "Deliver",
    "EndCall",
    "HangUp",
    "HangupRoute",
    "InProcessState",
    "SharedState",
    "SharedStateUnavailable",
    "SignalRoute",
    "Verdict",
]


class HangupRoute(enum.Enum):
    """Where :meth:`SharedState.request_hangup` found the call."""

    HERE = "here"  # this process holds it: the caller hangs it up itself
    SENT = "sent"  # another process holds it and was asked to hang it up
    UNKNOWN = "unknown"  # no live call for that CallSid anywhere the authority knows


class SignalRoute(enum.Enum):
    """Where :meth:`SharedState.deliver_amd` took the result."""

    HERE = "here"  # this process holds the stream (or is the whole scope): the caller publishes it
    SENT = "sent"  # another process holds it and was sent the result
    KEPT = "kept"  # no stream for the CallSid yet: the authority keeps it for its admission


def amd_to_wire(result: AmdResult) -> dict[str, object]:
    return {"call_sid": result.call_sid, "answered_by": result.answered_by, "detection_ms": result.detection_ms}


def amd_from_wire(item: object) -> AmdResult | None:
    """The result an authority sent, or None if it is not one (logged by the caller)."""
    if not isinstance(item, dict):
        return None
    call_sid, answered_by, ms = item.get("call_sid"), item.get("answered_by"), item.get("detection_ms")
    if not (isinstance(call_sid, str) and 0 < len(call_sid) <= 64 and isinstance(answered_by, str)
            and 0 < len(answered_by) <= 40):  # fmt: skip
        return None
    return AmdResult(call_sid, answered_by, ms if isinstance(ms, int) and not isinstance(ms, bool) else None)


class SharedStateUnavailable(BridgeError):
    """The authority did not answer in time (or is gone): admission fails closed."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to :meth:`SharedState.admit`.

    ``replaces`` is the call id of *this process's* older live call for the same CallSid, which
    the caller ends; an older call on another process is ended there, by the authority.
    """

    verdict: Verdict
    replaces: str | None = None


class SharedState(Protocol):
    """See the module docstring. Times are wall-clock seconds (``time.time()``), as tokens'."""

    @property
    def up(self) -> bool:
        """False while the authority is unreachable (admission is refusing)."""
        ...

    async def run(
        self,
        end_call: EndCall,
        hang_up: HangUp | None = None,
        deliver: Deliver | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Background work, started before the first admission and cancelled at shutdown.
        ``end_call``, ``hang_up`` and ``deliver`` are how other processes reach this one's calls."""
        ...

    async def reserve(self, token: str, *, expires_at: float) -> bool:
        """Hold a slot for ``token``'s stream until ``expires_at``. False when full.
        Raises SharedStateUnavailable."""
        ...

    async def admit(self, token: str, *, call_id: str, call_sid: str, expires_at: float) -> Admission:
        """Redeem ``token`` (valid until ``expires_at``) and take a slot for ``call_id``, or say
        why not (REPLAYED, FULL). Raises SharedStateUnavailable."""
        ...

    async def release(self, call_id: str) -> None:
        """The call has ended. Never raises; bounded in time."""
        ...

    async def request_hangup(self, call_sid: str) -> HangupRoute:
        """Find ``call_sid``'s live call; if another process holds it, ask that process to hang it
        up (its ``hang_up``). Raises SharedStateUnavailable when the authority cannot say."""
        ...

    async def deliver_amd(self, result: AmdResult) -> SignalRoute:
        """Route ``result`` to the process holding its CallSid's stream, or keep it for that
        stream's admission (module docstring). Raises SharedStateUnavailable when the
        authority cannot say (the caller then publishes it here: the best guess)."""
        ...


class InProcessState:
    """One process is the whole scope: the ledger in memory, always up."""

    HOLDER = "local"

    def __init__(self, max_calls: int, clock: Callable[[], float] = time.time) -> None:
        self.ledger = Ledger(max_calls)
        self._clock = clock

    @property
    def up(self) -> bool:
        return True

    async def run(
        self,
        end_call: EndCall,
        hang_up: HangUp | None = None,
        deliver: Deliver | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()  # nothing to do in the background: every call is ours

    async def reserve(self, token: str, *, expires_at: float) -> bool:
        await trio.lowlevel.checkpoint()
        return self.ledger.reserve(self.HOLDER, token, expires_at=expires_at, now=self._clock())

    async def admit(self, token: str, *, call_id: str, call_sid: str, expires_at: float) -> Admission:
        await trio.lowlevel.checkpoint()
        decision = self.ledger.admit(
            self.HOLDER, token, call_id=call_id, call_sid=call_sid, expires_at=expires_at, now=self._clock()
        )
        return Admission(decision.verdict, decision.replaces.call_id if decision.replaces else None)

    async def release(self, call_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.ledger.release(self.HOLDER, call_id)

    async def request_hangup(self, call_sid: str) -> HangupRoute:
        await trio.lowlevel.checkpoint()
        return HangupRoute.HERE if self.ledger.live_call(call_sid) is not None else HangupRoute.UNKNOWN

    async def deliver_amd(self, result: AmdResult) -> SignalRoute:
        # One process is the whole scope: the caller publishes it, and the process's CallSignals
        # keeps it for a stream that has not opened yet.
        await trio.lowlevel.checkpoint()
        return SignalRoute.HERE
