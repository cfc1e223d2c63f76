"""The admission ledger: spent stream tokens, held call slots, the live stream of each CallSid.

Pure (no I/O, no trio); time enters as ``now`` (wall-clock seconds, the clock stream tokens
expire on). One ledger is the authority for one scope: a process (``InProcessState``) or all the
workers of one machine (the WORKERS parent, ``bridge/fleet/parent.py``). It is touched at
admission and teardown only, never per frame.

Invariants, after every method:
- A token is redeemed at most once while it can still verify: it is remembered until its own
  expiry, whoever redeemed it and whatever happened to them since (a holder that dies leaves its
  tokens spent).
- Live calls plus unexpired reservations never exceed ``max_calls``. A reservation (made by the
  webhook that minted a token) is held until the token expires (held at its expiry instant, free
  just after), or until that token's stream is admitted, on whichever holder it lands.
- Each CallSid has at most one live call: admitting a newer stream for a CallSid names the older
  one, which the caller ends; the CallSid then points at the newer one.
- Every slot has a holder (a worker, later an instance); dropping a holder frees all its slots.
- Refusing a stream changes nothing: a stream refused for capacity keeps its token unspent, so
  a retry (nginx, Twilio) elsewhere or later can still use it.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass


class Verdict(enum.Enum):
    ADMITTED = "admitted"
    REPLAYED = "replayed"  # the token was already redeemed: 403
    FULL = "full"  # no free slot: 503 (the token stays unspent)


@dataclass(frozen=True, slots=True)
class CallRef:
    """A live call: who holds its slot, and the holder's own id for it."""

    holder: str
    call_id: str


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    replaces: CallRef | None = None  # ADMITTED only: the CallSid's older live call, to be ended


@dataclass(frozen=True, slots=True)
class Freed:
    """What dropping a holder released."""

    calls: int
    reservations: int


@dataclass(frozen=True, slots=True)
class _Reservation:
    holder: str
    expires_at: float


class Ledger:
    """See the module docstring for the invariants. Every method is O(log n) amortised except
    :meth:`drop_holder` (O(n), once per dead holder)."""

    def __init__(self, max_calls: int) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        self.max_calls = max_calls
        self._redeemed: dict[str, float] = {}  # token -> its expiry
        self._reserved: dict[str, _Reservation] = {}  # token -> the slot its webhook holds
        self._live: dict[CallRef, str] = {}  # call -> its CallSid
        self._by_sid: dict[str, CallRef] = {}  # CallSid -> its live call
        # Expiry queues, cleaned lazily: an entry whose token is gone (or was re-reserved with
        # another expiry) is skipped when popped. Each holds at most one entry per token per
        # reserve/redeem, and every entry is popped once its time has passed.
        self._redeemed_expiry: list[tuple[float, str]] = []
        self._reserved_expiry: list[tuple[float, str]] = []

    # --- queries ------------------------------------------------------------------------------

    @property
    def live_calls(self) -> int:
        return len(self._live)

    def reservations(self, now: float) -> int:
        self._expire(now)
        return len(self._reserved)

    def redeemed(self, token: str, now: float) -> bool:
        self._expire(now)
        return token in self._redeemed

    def held_by(self, holder: str, now: float) -> tuple[int, int]:
        """(live calls, reservations) that ``holder`` holds."""
        self._expire(now)
        calls = sum(1 for ref in self._live if ref.holder == holder)
        return calls, sum(1 for r in self._reserved.values() if r.holder == holder)

    def live_call(self, call_sid: str) -> CallRef | None:
        return self._by_sid.get(call_sid)

    def would_admit(self, token: str, now: float, *, pending: int = 0) -> Verdict:
        """What :meth:`admit` would say now, changing nothing, with ``pending`` more slots
        promised elsewhere meanwhile (admissions in flight to another authority)."""
        self._expire(now)
        if token in self._redeemed:
            return Verdict.REPLAYED
        if token not in self._reserved and self._used() + pending >= self.max_calls:
            return Verdict.FULL
        return Verdict.ADMITTED

    def has_room(self, now: float, *, pending: int = 0) -> bool:
        """A free slot for a new reservation or call, with ``pending`` more promised elsewhere."""
        self._expire(now)
        return self._used() + pending < self.max_calls

    # --- decisions ----------------------------------------------------------------------------

    def reserve(self, holder: str, token: str, *, expires_at: float, now: float) -> bool:
        """Hold a slot for the stream of a token just minted, until ``expires_at``. False when
        full. Reserving a token again moves its expiry and takes no second slot."""
        self._expire(now)
        if token in self._redeemed:
            return False  # spent already: no stream can use this slot
        if token not in self._reserved and self._used() >= self.max_calls:
            return False
        self._reserved[token] = _Reservation(holder, expires_at)
        heapq.heappush(self._reserved_expiry, (expires_at, token))
        return True

    def admit(
        self, holder: str, token: str, *, call_id: str, call_sid: str, expires_at: float, now: float
    ) -> Decision:
        """Redeem ``token`` and give its stream a slot (its reservation, made on any holder, or
        a free one), as one step. ``expires_at`` is the token's own expiry: it stays spent until
        then. Raises ValueError if ``holder`` already has a live call ``call_id`` (a caller bug)."""
        self._expire(now)
        if token in self._redeemed:
            return Decision(Verdict.REPLAYED)
        ref = CallRef(holder, call_id)
        if ref in self._live:
            raise ValueError(f"{holder} already holds a live call {call_id}")
        if self._reserved.pop(token, None) is None and self._used() >= self.max_calls:
            return Decision(Verdict.FULL)
        self._redeemed[token] = expires_at
        heapq.heappush(self._redeemed_expiry, (expires_at, token))
        self._live[ref] = call_sid
        older = self._by_sid.get(call_sid)
        self._by_sid[call_sid] = ref
        return Decision(Verdict.ADMITTED, replaces=older)

    def release(self, holder: str, call_id: str) -> bool:
        """The call has ended: free its slot. False if it was not live (released already, or
        its holder was dropped); harmless."""
        ref = CallRef(holder, call_id)
        call_sid = self._live.pop(ref, None)
        if call_sid is None:
            return False
        if self._by_sid.get(call_sid) == ref:
            del self._by_sid[call_sid]
        return True

    def drop_holder(self, holder: str) -> Freed:
        """The holder is gone (a worker's socket reached EOF, an instance's lease ran out): free
        every slot it held. Tokens it redeemed stay redeemed."""
        gone = [ref for ref in self._live if ref.holder == holder]
        for ref in gone:
            self.release(ref.holder, ref.call_id)
        tokens = [t for t, r in self._reserved.items() if r.holder == holder]
        for token in tokens:
            del self._reserved[token]
        return Freed(len(gone), len(tokens))

    # --- internals ----------------------------------------------------------------------------

    def _used(self) -> int:
        return len(self._live) + len(self._reserved)

    def _expire(self, now: float) -> None:
        queue = self._reserved_expiry
        while queue and queue[0][0] < now:
            expires_at, token = heapq.heappop(queue)
            held = self._reserved.get(token)
            if held is not None and held.expires_at == expires_at:
                del self._reserved[token]
        queue = self._redeemed_expiry
        while queue and queue[0][0] < now:
            expires_at, token = heapq.heappop(queue)
            if self._redeemed.get(token) == expires_at:
                del self._redeemed[token]


class KeptSignals:
    """Out-of-band results (the AMD callback) that beat their call's stream, per CallSid, until
    that stream's admission takes them (pure; ``now`` in wall-clock seconds).

    Bounds: at most ``max_calls`` CallSids (a new one evicts the oldest, counted in
    ``dropped``), :data:`KEPT_PER_CALL` items each (more are dropped, counted), each CallSid's
    items forgotten ``ttl_s`` after the first was kept (a stream token's life: a stream that has
    not opened by then never will).
    """

    def __init__(self, *, ttl_s: float = 60.0, max_calls: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_calls = max_calls
        self._kept: dict[str, tuple[float, list[dict[str, object]]]] = {}  # insertion-ordered: oldest first
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, call_sid: str, item: dict[str, object], now: float) -> None:
        self._expire(now)
        entry = self._kept.get(call_sid)
        if entry is None:
            while len(self._kept) >= self.max_calls:
                del self._kept[next(iter(self._kept))]
                self.dropped += 1
            self._kept[call_sid] = (now, [item])
        elif len(entry[1]) < KEPT_PER_CALL:
            entry[1].append(item)
        else:
            self.dropped += 1

    def take(self, call_sid: str, now: float) -> list[dict[str, object]]:
        """What was kept for ``call_sid`` (oldest first), and forget it."""
        self._expire(now)
        entry = self._kept.pop(call_sid, None)
        return entry[1] if entry else []

    def _expire(self, now: float) -> None:
        cutoff = now - self.ttl_s
        while self._kept:
            call_sid = next(iter(self._kept))
            if self._kept[call_sid][0] > cutoff:
                break
            del self._kept[call_sid]


KEPT_PER_CALL = 4  # a call gets one AMD result; a retry or two at most
