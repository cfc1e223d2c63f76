"""The post-call webhook: each finished record is POSTed as JSON to ``RECORD_WEBHOOK_URL``.

The body is the record's JSON, signed with ``X-Bridge-Signature: sha256=<hex HMAC-SHA256 of the
body>`` keyed by ``RECORD_WEBHOOK_SECRET`` (a receiver recomputes it over the raw body and
compares in constant time; README "Call records" has an example).

Delivery never touches a call: records wait in a bounded queue (drop-oldest, counted) for ONE
sender task. Each POST has a deadline (``ATTEMPT_S``); a network error, a 5xx, 408 or 429 is
retried with backoff (``RETRY_MIN_S`` doubling to ``RETRY_MAX_S``) until the record is
``give_up_s`` old, then dropped; any other 4xx is dropped at once (retrying cannot help). Giving
up logs ONE warning until a delivery works again; ``bridge_record_webhooks_total{result}``
counts ``delivered``, ``retried``, ``given_up`` and ``dropped``.

Cancellation of :meth:`RecordWebhook.run`: the POST in flight is abandoned; queued records are
not sent (the store keeps them).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import deque
from typing import Any

import httpx
import orjson
import trio

from bridge.observe import Metrics

log = logging.getLogger("bridge.records")

MAX_PENDING = 200  # records waiting for the receiver; the store holds the rest
ATTEMPT_S = 10.0  # one POST, connect to last byte
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
GIVE_UP_S = 600.0  # a record not delivered within this of the call's end is dropped
_RETRY_STATUS = frozenset({408, 425, 429})
SIGNATURE_HEADER = "X-Bridge-Signature"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Bridge-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """A receiver's check, in constant time (used by the tests and the README example)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


class RecordWebhook:
    """Bounded queue + one sender task POSTing signed records.

    Args:
        url: the receiver (``RECORD_WEBHOOK_URL``).
        secret: the HMAC key (``RECORD_WEBHOOK_SECRET``); without one the header is left out.
        transport: an httpx transport instead of the network (tests).
    """

    def __init__(
        self,
        url: str,
        secret: str | None,
        *,
        metrics: Metrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        give_up_s: float = GIVE_UP_S,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.url = url
        self._secret = secret
        self.metrics = metrics
        self._transport = transport
        self.give_up_s = give_up_s
        self._max_pending = max_pending
        self._pending: deque[tuple[float, dict[str, Any]]] = deque()
        self._wake = trio.Event()
        self._warned = False
        self.delivered = 0
        self.given_up = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a finished record; never blocks (drop-oldest when full)."""
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.dropped += 1
            self._count("dropped")
        self._pending.append((trio.current_time(), record))
        self._wake.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sender; runs until cancelled (see the module docstring)."""
        # httpx's own timeouts stay off: the Trio deadline around each POST is the one deadline.
        async with httpx.AsyncClient(transport=self._transport, timeout=None, follow_redirects=False) as client:
            task_status.started()
            while True:
                while not self._pending:
                    self._wake = trio.Event()
                    await self._wake.wait()
                queued_at, record = self._pending.popleft()
                await self._deliver(client, queued_at, record)

    async def _deliver(self, client: httpx.AsyncClient, queued_at: float, record: dict[str, Any]) -> None:
        # A record can be megabytes (10 000 turns): encode it off the event loop.
        body = await trio.to_thread.run_sync(orjson.dumps, record)
        headers = {"Content-Type": "application/json", "User-Agent": "voice-agent-bridge"}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        delay = RETRY_MIN_S
        attempts = 0
        while True:
            attempts += 1
            problem = await self._post(client, body, headers)
            if problem is None:
                self.delivered += 1
                self._count("delivered")
                if self._warned:
                    log.info("records webhook: delivering again")
                    self._warned = False
                return
            retry, reason = problem
            late = trio.current_time() + delay - queued_at > self.give_up_s
            if not retry or late:
                self.given_up += 1
                self._count("given_up")
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "records webhook: gave up on the record of %s after %d attempt(s) (%s); "
                        "further give-ups are only counted until a delivery works",
                        record.get("call_sid"),
                        attempts,
                        reason,
                    )
                return
            self._count("retried")
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _post(
        self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str]
    ) -> tuple[bool, str] | None:
        """None when delivered, else (worth retrying, why not)."""
        with trio.move_on_after(ATTEMPT_S):
            try:
                response = await client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                return True, f"{type(exc).__name__}: {exc}"[:200]
            if 200 <= response.status_code < 300:
                return None
            status = response.status_code
            return status >= 500 or status in _RETRY_STATUS, f"HTTP {status}"
        return True, f"no answer within {ATTEMPT_S:g} s"

    def _count(self, result: str) -> None:
        if self.metrics:
            self.metrics.record_webhooks.labels(result).inc()


__all__ = ["SIGNATURE_HEADER", "RecordWebhook", "sign", "verify"]
