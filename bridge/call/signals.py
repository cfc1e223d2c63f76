"""Call signals: news about a live call that arrives on another request, keyed by CallSid.

Twilio tells us some things about a call out of band, e.g. the answering-machine result
(``POST /amd-status``), while the call itself runs in its own nursery on the Media Stream. The
webhook :meth:`CallSignals.publish`-es; the call's session :meth:`CallSignals.subscribe`-s for
its CallSid and reads the signals from a memory channel in its own nursery.

Ownership and bounds:
- The registry owns each subscription's send end and closes it when the subscription ends;
  the session owns the receive end (``with subscription:`` closes both). One subscriber per
  CallSid: a second one replaces the first (a duplicated stream for the same call), whose
  channel is then closed so its reader ends.
- Each channel holds :data:`CHANNEL_SIZE` signals; a full one drops the newest (counted in
  ``dropped``): a call gets one AMD result, a few duplicates at most.
- A signal for a call with no subscriber yet (the AMD callback can beat the stream) is kept
  for ``pending_ttl_s`` and handed to the first subscriber; at most ``max_pending`` CallSids
  are kept that way (the oldest go first) and :data:`PENDING_PER_CALL` signals for each.
- The latest ``AnsweredBy`` of each call is kept for :meth:`CallSignals.answered_by` (the call
  record's ``answered_by``), for at most ``max_pending`` CallSids (the oldest go first).
- Process-local: with ``WORKERS`` > 1 (or several instances) the webhook may reach another
  process than the stream; the shared state (``SharedState.deliver_amd``, bridge/fleet) routes
  the result to the process that holds (or will hold) the stream, which publishes it here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import trio

CHANNEL_SIZE = 8
PENDING_PER_CALL = 4
DEFAULT_MAX_PENDING = 10_000  # CallSids; each entry is a few hundred bytes
DEFAULT_PENDING_TTL_S = 120.0  # the stream opens within seconds of the answer


@dataclass(frozen=True, slots=True)
class AmdResult:
    """Twilio's answering-machine detection result for a call (the ``/amd-status`` form)."""

    call_sid: str
    answered_by: str  # as Twilio sent it, capped; bridge.call.amd.parse_answered_by reads it
    detection_ms: int | None  # MachineDetectionDuration


CallSignal = AmdResult


class Subscription:
    """One call's signals: iterate :attr:`receive` (``async for signal in sub.receive``).

    Use it as a context manager; leaving it unsubscribes and closes the channel.
    """

    def __init__(self, registry: CallSignals, call_sid: str) -> None:
        self._registry = registry
        self.call_sid = call_sid
        self._send, self.receive = trio.open_memory_channel[CallSignal](CHANNEL_SIZE)
        self.dropped = 0

    def _offer(self, signal: CallSignal) -> bool:
        try:
            self._send.send_nowait(signal)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def close(self) -> None:
        """Unsubscribe and close both ends (the session's side). Idempotent."""
        self._end()
        self.receive.close()

    def _end(self) -> None:
        """The registry's side: no more signals; a reader blocked in ``receive`` sees
        ``EndOfChannel`` (``async for`` ends)."""
        self._registry._forget(self)
        self._send.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CallSignals:
    """The process's registry of call signals.

    Args:
        max_pending: how many CallSids may have signals waiting for a subscriber.
        pending_ttl_s: how long such signals wait.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        pending_ttl_s: float = DEFAULT_PENDING_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pending = max_pending
        self.pending_ttl_s = pending_ttl_s
        self._clock = clock
        self._subscribers: dict[str, Subscription] = {}
        self._pending: OrderedDict[str, tuple[float, list[CallSignal]]] = OrderedDict()
        self._answered_by: OrderedDict[str, str] = OrderedDict()
        self.dropped = 0

    def answered_by(self, call_sid: str) -> str | None:
        """The latest ``AnsweredBy`` Twilio reported for ``call_sid``, if any."""
        return self._answered_by.get(call_sid)

    def subscribe(self, call_sid: str) -> Subscription:
        """Start receiving ``call_sid``'s signals, first those that arrived before."""
        old = self._subscribers.get(call_sid)
        if old is not None:
            old._end()
        subscription = Subscription(self, call_sid)
        self._subscribers[call_sid] = subscription
        self._expire()
        entry = self._pending.pop(call_sid, None)
        for signal in entry[1] if entry else ():
            subscription._offer(signal)
        return subscription

    def publish(self, signal: CallSignal) -> bool:
        """Hand ``signal`` to its call. True when a live subscriber got it; False when it was
        kept for a later subscriber or dropped (bounds in the module docstring)."""
        self._answered_by.pop(signal.call_sid, None)
        self._answered_by[signal.call_sid] = signal.answered_by
        while len(self._answered_by) > self.max_pending:
            self._answered_by.popitem(last=False)
        subscription = self._subscribers.get(signal.call_sid)
        if subscription is not None:
            delivered = subscription._offer(signal)
            if not delivered:
                self.dropped += 1
            return delivered
        self._expire()
        now = self._clock()
        entry = self._pending.get(signal.call_sid)
        if entry is None:
            while len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self.dropped += 1
            self._pending[signal.call_sid] = (now, [signal])
        elif len(entry[1]) < PENDING_PER_CALL:
            entry[1].append(signal)
        else:
            self.dropped += 1
        return False

    def pending(self, call_sid: str) -> list[CallSignal]:
        """Signals waiting for ``call_sid``'s subscriber (for tests and the console)."""
        self._expire()
        entry = self._pending.get(call_sid)
        return list(entry[1]) if entry else []

    def _expire(self) -> None:
        cutoff = self._clock() - self.pending_ttl_s
        while self._pending:
            call_sid, (since, _) = next(iter(self._pending.items()))
            if since > cutoff:
                break
            del self._pending[call_sid]

    def _forget(self, subscription: Subscription) -> None:
        if self._subscribers.get(subscription.call_sid) is subscription:
            del self._subscribers[subscription.call_sid]
