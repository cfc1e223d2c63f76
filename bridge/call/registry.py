"""The live calls of one process: who is on the line here, the drain, ending calls (pure).

Capacity is not counted here: ``MAX_CONCURRENT_CALLS`` and webhook reservations are held by the
shared state (``bridge/fleet/shared.py``), so they hold across the WORKERS of one machine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar


class EndableCall(Protocol):
    def request_end(self, reason: str) -> None: ...


C = TypeVar("C", bound=EndableCall)


class CallRegistry(Generic[C]):
    """The calls running in this process, by call id, and whether it is draining."""

    def __init__(self) -> None:
        self.draining = False
        self._live: dict[str, C] = {}

    def __len__(self) -> int:
        return len(self._live)

    @property
    def by_id(self) -> Mapping[str, C]:
        """A read-only view of the live calls by call id."""
        return MappingProxyType(self._live)

    def live(self) -> Iterator[C]:
        """A snapshot: calls may end while it is iterated."""
        return iter(list(self._live.values()))

    def add(self, call_id: str, call: C) -> None:
        self._live[call_id] = call

    def remove(self, call_id: str) -> None:
        self._live.pop(call_id, None)

    def end(self, call_id: str, reason: str) -> bool:
        """Ask one call to end (e.g. a newer stream for its CallSid was admitted). False if it
        is not live here (ended meanwhile)."""
        call = self._live.get(call_id)
        if call is None:
            return False
        call.request_end(reason)
        return True

    def end_all(self, reason: str) -> None:
        for call in self.live():
            call.request_end(reason)

    def start_drain(self) -> None:
        """Take no new calls; live ones go on (ending them is the server's decision)."""
        self.draining = True
