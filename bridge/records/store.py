"""The record store: finished records go through a bounded queue to ONE writer task; the database
work runs in worker threads (``trio.to_thread``), so a call never waits for the database.

Database down or slow: records are held in the queue (at most ``max_pending``; when full the
OLDEST is dropped and counted — a newer record is worth more to an operator than an old one),
the writer retries with backoff (``RETRY_MIN_S`` doubling to ``RETRY_MAX_S``), logs ONE warning
per outage and one line when it is back, and keeps ``bridge_records_pending``,
``bridge_records_dropped_total`` and ``bridge_records_store_up`` current. Records older than
``retention_days`` are pruned at start-up and then daily.

Reads (the API) run in worker threads too, each under a deadline; a database error there is a
:class:`StoreError` for the caller to answer (503), never a crash.

Held records are readable: a finished record is in the queue from the moment the call ends
(``Records`` hands it over in the same step as it leaves the live calls) until its row is
committed, so :meth:`RecordStore.get` answers from the queue first and :meth:`RecordStore.list`
adds the held records that match to the page where they belong; a record is never missing (no
404 between "live" and "stored") and never listed twice (a held record whose row is already
committed is listed once). While the database is down, ``get`` still answers for a held record
without asking it, and :meth:`RecordStore.held_summaries` gives what this instance holds (the API
adds it to its 503). Held records live in this process: another instance of a fleet sees a record
once it is written; a record dropped from a full queue (or refused as unwritable) is gone.

Cancellation of :meth:`RecordStore.run` (server shutdown): what is still queued gets one last,
shielded attempt of at most ``FLUSH_S``; then the pool is closed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import trio

from bridge.observe import Metrics
from bridge.records.backends import Backend, Query, StoreError, open_backend, parse_cursor, started_epoch
from bridge.records.record import search_text, summary

log = logging.getLogger("bridge.records")

# Records held while the database is away: a record is ~5-50 KB, so 1000 is at most tens of MB,
# and at a few calls a minute per instance it covers an outage of hours.
MAX_PENDING = 1000
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
READ_DEADLINE_S = 10.0  # an API read the database cannot answer in this is a 503
FLUSH_S = 3.0  # at shutdown: what is queued gets this long to be written
PRUNE_EVERY_S = 24 * 3600.0
# Worker threads for database work (writer + API reads): a slow database must not take Trio's
# whole default thread budget.
THREADS = 4


class RecordStore:
    """Bounded write queue + one writer task over a :class:`~bridge.records.backends.Backend`.

    Args:
        backend: where records go (SQLite or PostgreSQL).
        retention_days: records older than this are pruned (0 keeps them for ever).
        metrics: the process's metrics, or None.
        wall_clock: epoch seconds (retention cut-off).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        retention_days: int = 30,
        max_pending: int = MAX_PENDING,
        metrics: Metrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.retention_days = retention_days
        self.metrics = metrics
        self._wall = wall_clock
        self._pending: deque[dict[str, Any]] = deque()
        self._max_pending = max_pending
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(THREADS)
        self.dropped = 0
        self.written = 0
        self.up = True
        self.ready = trio.Event()  # set once the schema is in place
        self._warned = False

    # --- writing ------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a finished record; never blocks (drop-oldest when ``max_pending`` are held)."""
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.dropped += 1
            if self.metrics:
                self.metrics.records_dropped.inc()
        self._pending.append(record)
        self._gauge()
        self._wake.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: migrate (retrying while the database is down), then write, retry, prune.

        Reports started at once (the schema may still be on its way: ``ready`` tells). Runs
        until cancelled; see the module docstring for what cancellation does.
        """
        task_status.started()
        try:
            await self._retrying(self.backend.migrate, "create or migrate the schema")
            self.ready.set()
            next_prune = trio.current_time()
            while True:
                if self.retention_days and trio.current_time() >= next_prune:
                    await self._prune()
                    next_prune = trio.current_time() + PRUNE_EVERY_S
                if not self._pending:
                    self._wake = trio.Event()
                    with trio.move_on_at(next_prune if self.retention_days else float("inf")):
                        await self._wake.wait()
                    continue
                await self._write_pending()
        finally:
            with trio.move_on_after(FLUSH_S, shield=True):
                if self.ready.is_set():
                    with suppress(StoreError):  # still down: counted in the warning below
                        await self._write_pending(retry=False)
            if self._pending:
                log.warning("records: %d record(s) not stored at shutdown", len(self._pending))
            with trio.move_on_after(1.0, shield=True):
                await trio.to_thread.run_sync(self.backend.close, abandon_on_cancel=True)

    async def _write_pending(self, *, retry: bool = True) -> None:
        delay = RETRY_MIN_S
        while self._pending:
            record = self._pending[0]
            try:
                await self._thread(self.backend.write, record)
            except ValueError as exc:  # this record can never be written: skip it
                log.error("records: the record of %s was not stored: %s", record.get("call_sid"), exc)
                self._remove(record)
                self.dropped += 1
                if self.metrics:
                    self.metrics.records_dropped.inc()
                continue
            except StoreError as exc:
                if not retry:
                    raise
                self._down(exc, "store a record")
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue  # the head again (submit may have dropped it meanwhile: then the next)
            delay = RETRY_MIN_S
            self._remove(record)
            self.written += 1
            self._back_up()

    def _remove(self, record: dict[str, Any]) -> None:
        if self._pending and self._pending[0] is record:
            self._pending.popleft()
        self._gauge()

    async def _retrying(self, fn: Any, what: str) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                await self._thread(fn)
            except StoreError as exc:
                self._down(exc, what)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                self._back_up()
                return

    async def _prune(self) -> None:
        cutoff = self._wall() - self.retention_days * 86400.0
        try:
            removed = await self._thread(self.backend.prune, cutoff)
        except StoreError as exc:
            self._down(exc, "prune old records")
            return
        if removed:
            log.info("records: pruned %d record(s) older than %d days", removed, self.retention_days)

    # --- reading ------------------------------------------------------------------------------

    def held(self, call_sid: str) -> dict[str, Any] | None:
        """The newest finished record of ``call_sid`` not yet written (queued or being written)."""
        found: dict[str, Any] | None = None
        for record in self._pending:  # oldest first: the last match is the newest
            if record.get("call_sid") == call_sid:
                found = record
        return found

    def held_summaries(self, query: Query) -> list[dict[str, Any]]:
        """Summaries of the held records that match ``query`` (its cursor included), newest first."""
        found = [summary(r) for r in self._pending if held_matches(r, query)]
        return sorted(found, key=_started_s, reverse=True)

    async def list(self, query: Query) -> tuple[list[dict[str, Any]], str | None]:
        """Summaries, newest first, and the cursor of the next page (None at the end): the stored
        rows of the page plus the held records that belong on it (so a page may have more than
        ``query.limit`` entries; see :func:`merge_held`).

        Raises:
            StoreError: the database failed or did not answer within ``READ_DEADLINE_S``.
        """
        held = self.held_summaries(query)  # before the read: a row committed meanwhile is deduplicated
        stored, next_before = await self._read(self.backend.list, query)
        return merge_held(stored, next_before, held), next_before

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        """The newest record of ``call_sid``: a held one (without asking the database), else the
        newest stored one, or None. Raises StoreError as :meth:`list`."""
        held = self.held(call_sid)
        if held is not None:
            return held
        result: dict[str, Any] | None = await self._read(self.backend.get, call_sid)
        return result

    async def _read(self, fn: Any, arg: Any) -> Any:
        with trio.move_on_after(READ_DEADLINE_S):
            return await self._thread(fn, arg)
        raise StoreError("the records database did not answer in time")

    # --- helpers ------------------------------------------------------------------------------

    async def _thread(self, fn: Any, *args: Any) -> Any:
        # abandon_on_cancel: a database that hangs must not hold up a shutdown; the thread ends
        # on its own deadline (connect / statement timeout).
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)

    def _down(self, exc: StoreError, what: str) -> None:
        self.up = False
        if self.metrics:
            self.metrics.records_store_up.set(0)
        if not self._warned:
            self._warned = True
            log.warning(
                "records: cannot %s (%s); holding up to %d record(s) and retrying", what, exc, self._max_pending
            )

    def _back_up(self) -> None:
        if self._warned:
            log.info("records: the database is back (%d record(s) waiting)", len(self._pending))
        self._warned = False
        self.up = True
        if self.metrics:
            self.metrics.records_store_up.set(1)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.records_pending.set(len(self._pending))


def _started_s(record: dict[str, Any]) -> float:
    try:
        return started_epoch(record)
    except (KeyError, TypeError, ValueError):
        return 0.0


def held_matches(record: dict[str, Any], query: Query) -> bool:
    """Whether a record (not in the database) answers ``query`` as its row would: outcome, the
    ``since``/``until`` bounds and the cursor on ``started_at``, the text in the transcripts
    (case-insensitive) or the exact CallSid."""
    if query.outcome is not None and record.get("outcome") != query.outcome:
        return False
    started = _started_s(record)
    if query.before is not None and started >= query.before[0]:
        return False  # ties go to the earlier page: see merge_held
    if query.since_s is not None and started < query.since_s:
        return False
    if query.until_s is not None and started >= query.until_s:
        return False
    if query.text:
        text = query.text.replace("\x00", " ")  # as search_text (and the store) keep it
        return query.text == record.get("call_sid") or text.casefold() in search_text(record).casefold()
    return True


def merge_held(
    stored: list[dict[str, Any]], next_before: str | None, held: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One page: the stored summaries plus the held ones (already matched to the query, cursor
    included) that belong on it, newest first.

    A held record belongs on the page whose last row started no later than it did, or on the
    last page: so walking the pages shows it exactly once, and once it is written it is on the
    same page as a row. A held record whose row is already on the page (same CallSid and call
    id: committed while we read) is listed once.
    """
    if next_before is not None:
        last_started = parse_cursor(next_before)[0]
        held = [h for h in held if _started_s(h) >= last_started]
    if not held:
        return stored
    rows = {(s.get("call_sid"), s.get("call_id")) for s in stored}
    extra = [h for h in held if (h.get("call_sid"), h.get("call_id")) not in rows]
    return sorted(stored + extra, key=_started_s, reverse=True)  # stable: the rows keep their order


def open_store(url: str, *, retention_days: int = 30, metrics: Metrics | None = None) -> RecordStore:
    """A store for ``RECORDS_URL`` (nothing is opened until :meth:`RecordStore.run`).

    Raises:
        ValueError: the URL is neither ``sqlite:///…`` nor ``postgresql://…``.
    """
    return RecordStore(open_backend(url), retention_days=retention_days, metrics=metrics)


__all__ = ["MAX_PENDING", "Query", "RecordStore", "StoreError", "held_matches", "merge_held", "open_store"]
