"""Live call events for the console: an in-process broadcast hub.

Publishers (each call's recorder) call :meth:`LiveHub.publish` from sync code: it never blocks and
never fails. Each subscriber (e.g. one ``GET /api/events`` Server-Sent Events stream) gets its own
bounded receive channel from :meth:`LiveHub.subscribe`; when a subscriber is slow and its channel
is full, its OLDEST event is dropped to make room (a console wants the present, and one slow
browser must not hold memory or slow a call) and the drop is counted (``dropped`` on the hub and
per subscriber). Nothing is replayed: a new subscriber asks the API for the current state first
(``GET /api/calls`` lists live calls with ``"live": true``), then follows the events.

Event shapes (dicts of JSON types; every event has ``type``, ``call_sid``, ``call_id`` and
``at``, ISO 8601 UTC of when it was published)::

    {"type": "call.started", ..., "direction", "from", "to", "started_at", "activity"}
    {"type": "call.updated", ..., "activity", "agent_session_ids", "duration_s"}
        # activity: connecting | greeting | listening | agent speaking | tool running | ending
    {"type": "turn", ..., "index": int, "turn": {...}}
        # ``turn`` exactly as in the record's ``turns[index]``; the same index may come again
        # (an agent turn is sent when it starts, when its text arrives and when it is done,
        # with heard_text / interrupted as known then): replace, do not append.
    {"type": "tool", ..., "index": int, "tool": {...}}   # as in the record's ``tools[index]``
    {"type": "call.ended", ..., "outcome", "reason", "ended_at", "duration_s"}

Cancellation: ``subscribe`` is a sync context manager; leaving it (normally or by cancellation)
unregisters the subscriber and closes its channel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger("bridge.records")

# Events a subscriber may fall behind by: a busy call publishes a few per turn, so 256 is tens of
# seconds of 10 busy calls for a browser that stalls; past that, the oldest go first.
SUBSCRIBER_EVENTS = 256
MAX_SUBSCRIBERS = 64  # consoles open at once; more are refused (each holds a buffer)


class TooManySubscribers(Exception):
    """More than ``MAX_SUBSCRIBERS`` live streams are open."""


@dataclass(eq=False, slots=True)
class Subscriber:
    send: trio.MemorySendChannel[dict[str, Any]]
    oldest: trio.MemoryReceiveChannel[dict[str, Any]]  # a clone of the subscriber's, to drop from
    dropped: int = 0


class LiveHub:
    """Broadcast of live call events to bounded per-subscriber channels (drop-oldest)."""

    def __init__(self, subscriber_events: int = SUBSCRIBER_EVENTS, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self._size = subscriber_events
        self._max = max_subscribers
        self._subscribers: list[Subscriber] = []
        self.published = 0
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: dict[str, Any]) -> None:
        """Hand ``event`` to every subscriber; never blocks, never raises."""
        self.published += 1
        for sub in self._subscribers:
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                with suppress(trio.WouldBlock):  # emptied meanwhile by the subscriber itself
                    sub.oldest.receive_nowait()
                sub.dropped += 1
                self.dropped += 1
                with suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    sub.send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # unsubscribing: its context manager removes it

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """A bounded channel of the events published from now on, for the ``with`` block.

        Raises:
            TooManySubscribers: ``max_subscribers`` are open already.
        """
        if len(self._subscribers) >= self._max:
            raise TooManySubscribers(f"{self._max} live event streams are open")
        send, receive = trio.open_memory_channel[dict[str, Any]](self._size)
        sub = Subscriber(send, receive.clone())
        self._subscribers.append(sub)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.remove(sub)
            sub.send.close()
            sub.oldest.close()
            if sub.dropped:
                log.info("a live event subscriber fell behind: %d event(s) dropped", sub.dropped)


__all__ = ["MAX_SUBSCRIBERS", "SUBSCRIBER_EVENTS", "LiveHub", "Subscriber", "TooManySubscribers"]
