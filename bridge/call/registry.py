"""The live calls of one process: who is on the line here, when none is, the drain (pure).

The one place that knows which calls run in this process: the app adds a call once its socket is
accepted and removes it when its nursery has closed; the idle event, the drain and ending calls
(one, on a newer stream for its CallSid; all, when a drain runs out) are decided here. Freed
memory is handed back by the front door (``bridge/net/front.py``), which also waits for the
calls' connections to close.

Capacity is not counted here: ``MAX_CONCURRENT_CALLS`` and webhook reservations are held by the
shared state (``bridge/fleet/shared.py``), so they hold across the WORKERS of one machine.

The idle event comes from a factory (the app passes ``trio.Event``) so this module imports no
async library; a set event is never cleared, so a new one replaces it when a call arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar


class EndableCall(Protocol):
    def request_end(self, reason: str) -> None: ...


class IdleEvent(Protocol):
    def set(self) -> None: ...

    def is_set(self) -> bool: ...


C = TypeVar("C", bound=EndableCall)
E = TypeVar("E", bound=IdleEvent)


class CallRegistry(Generic[C, E]):
    """The calls running in this process, by call id; whether there are none; the drain."""

    def __init__(self, new_event: Callable[[], E]) -> None:
        self.draining = False
        self._live: dict[str, C] = {}
        self._new_event = new_event
        self._idle = new_event()
        self._idle.set()

    @property
    def idle(self) -> E:
        """Set while no call is live; a call's arrival replaces it with a new, unset one, so
        wait on the event read at the time (the drain does)."""
        return self._idle

    def __len__(self) -> int:
        return len(self._live)

    @property
    def by_id(self) -> Mapping[str, C]:
        """A read-only view of the live calls by call id (copy it to iterate across awaits)."""
        return MappingProxyType(self._live)

    def add(self, call_id: str, call: C) -> None:
        if self._idle.is_set():
            self._idle = self._new_event()
        self._live[call_id] = call

    def remove(self, call_id: str) -> None:
        """Forget a call that has ended (unknown ids are ignored); the last one sets ``idle``."""
        self._live.pop(call_id, None)
        if not self._live:
            self._idle.set()

    def end(self, call_id: str, reason: str) -> bool:
        """Ask one call to end (e.g. a newer stream for its CallSid was admitted). False if it
        is not live here (ended meanwhile)."""
        call = self._live.get(call_id)
        if call is None:
            return False
        call.request_end(reason)
        return True

    def end_all(self, reason: str) -> None:
        """Ask every live call to end; each is removed when it has."""
        for call in list(self._live.values()):
            call.request_end(reason)

    def start_drain(self) -> None:
        """Take no new calls; live ones go on (ending them is the server's decision)."""
        self.draining = True
