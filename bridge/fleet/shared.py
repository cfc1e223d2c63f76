"""SharedState: the one interface admission talks to, whoever the authority is.

It is asked at admission and teardown only, never per frame:

- ``reserve`` — the webhook that mints a stream token holds a call slot until the token expires;
- ``admit`` — the stream upgrade, as one atomic step: redeem the token (single use, remembered
  until the token expires), take its reservation or a free slot, and register the stream as its
  CallSid's live one (a newer stream replaces an older one: issue 15 §5);
- ``release`` — teardown frees the slot;
- ``up`` — health, for metrics and readiness;
- ``run`` — background work for the life of the server (reading the authority's messages).

Implementations: :class:`InProcessState` (one process: the default) and
:class:`bridge.fleet.parent.ParentState` (a WORKERS worker asks its parent, the one authority of
the machine). The decisions themselves live in the pure :class:`bridge.fleet.ledger.Ledger`.

Failure policy: ``reserve`` and ``admit`` raise :class:`SharedStateUnavailable` when the
authority cannot answer within its deadline; admission then fails closed (a stream is refused
with 503, which nginx may retry elsewhere and Twilio reports; a webhook answers the busy TwiML).
``release`` never raises: a slot the authority did not hear about is freed when this process's
connection to it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from bridge.errors import BridgeError
from bridge.fleet.ledger import Ledger, Verdict

EndCall = Callable[[str, str], None]
"""``end_call(call_id, reason)``: end this process's live call ``call_id`` (it was replaced by a
newer stream for its CallSid, possibly on another process). Must not block."""

__all__ = ["Admission", "EndCall", "InProcessState", "SharedState", "SharedStateUnavailable", "Verdict"]


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

    async def run(self, end_call: EndCall, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work, started before the first admission and cancelled at shutdown."""
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


class InProcessState:
    """One process is the whole scope: the ledger in memory, always up."""

    HOLDER = "local"

    def __init__(self, max_calls: int, clock: Callable[[], float] = time.time) -> None:
        self.ledger = Ledger(max_calls)
        self._clock = clock

    @property
    def up(self) -> bool:
        return True

    async def run(self, end_call: EndCall, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
