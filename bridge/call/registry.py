"""The live calls of one process: capacity, reservations made by webhooks, drain (pure)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class EndableCall(Protocol):
    def request_end(self, reason: str) -> None: ...


class CallRegistry:
    """Counts calls against ``MAX_CONCURRENT_CALLS``.

    A webhook that mints a stream token reserves a slot until the token expires, so a burst of
    webhooks cannot over-commit before their streams connect. A stream whose token was minted by
    another instance (behind a load balancer) takes a slot directly if one is free.
    """

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.draining = False
        self._live: dict[str, EndableCall] = {}
        self._reserved: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._live)

    def live(self) -> Iterator[EndableCall]:
        return iter(list(self._live.values()))

    def reserve(self, token: str, *, expires_at: float, now: float) -> bool:
        """Hold a slot for a stream about to connect. False when full or draining."""
        if self.draining:
            return False
        self._expire(now)
        if len(self._live) + len(self._reserved) >= self.max_calls:
            return False
        self._reserved[token] = expires_at
        return True

    def admit(self, token: str, call_id: str, call: EndableCall, *, now: float) -> bool:
        """Turn a reservation (or a free slot) into a live call. False when full or draining."""
        if self.draining:
            self._reserved.pop(token, None)
            return False
        self._expire(now)
        if self._reserved.pop(token, None) is None and len(self._live) + len(self._reserved) >= self.max_calls:
            return False
        self._live[call_id] = call
        return True

    def release(self, call_id: str) -> None:
        self._live.pop(call_id, None)

    def start_drain(self) -> None:
        self.draining = True
        self._reserved.clear()

    def _expire(self, now: float) -> None:
        if self._reserved:
            self._reserved = {t: exp for t, exp in self._reserved.items() if exp >= now}
