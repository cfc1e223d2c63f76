"""Call records for one server process, from its settings: the :class:`Records` service (a
recorder per call, the live calls), the store and the webhook, and the task that runs their
writers in the server's nursery.

``RECORDS=off`` gives None: no recorder is made, so the calls' hot path does no extra work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from bridge.config import Settings
from bridge.observe import Metrics
from bridge.records.recorder import Records, RecordSink
from bridge.records.recording import Recordings
from bridge.records.store import RecordStore, open_store
from bridge.records.webhook import RecordWebhook

log = logging.getLogger("bridge.records")


@dataclass
class RecordsRuntime:
    records: Records
    store: RecordStore
    webhook: RecordWebhook | None
    recordings: Recordings | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's writer, the webhook's sender and the recordings' writer, until cancelled
        (the store then flushes what is queued and the recordings are closed, bounded; see
        ``bridge/records/store.py`` and ``recording.py``)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            if self.webhook is not None:
                await nursery.start(self.webhook.run)
            if self.recordings is not None:
                await nursery.start(self.recordings.run)
            task_status.started()


def open_records(
    settings: Settings, metrics: Metrics | None, wall_clock: Callable[[], float] = time.time
) -> RecordsRuntime | None:
    """The records of a process, or None with ``RECORDS=off``. Opens nothing yet (the database
    is reached by the writer task, so a database that is down never stops the server)."""
    if not settings.records:
        return None
    store = open_store(settings.records_url, retention_days=settings.records_retention_days, metrics=metrics)
    sinks: list[RecordSink] = [store]
    webhook = None
    if settings.record_webhook_url:
        webhook = RecordWebhook(settings.record_webhook_url, settings.record_webhook_secret, metrics=metrics)
        sinks.append(webhook)
    recordings = None
    if settings.record_audio:
        recordings = Recordings(
            recordings_dir(settings), retention_days=settings.records_retention_days, wall_clock=wall_clock
        )
    records = Records(
        redact=frozenset(settings.record_redact),
        sinks=tuple(sinks),
        metrics=metrics,
        recordings=recordings,
        wall_clock=wall_clock,
    )
    if metrics is not None:
        metrics.records_store_up.set(1)
    return RecordsRuntime(records, store, webhook, recordings)


def recordings_dir(settings: Settings) -> Path:
    """``RECORDINGS_DIR``, else ``recordings/`` next to the SQLite file, else ``data/recordings``."""
    if settings.recordings_dir:
        return Path(settings.recordings_dir)
    url = settings.records_url
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :]).parent / "recordings"
    return Path("data/recordings")


__all__ = ["RecordsRuntime", "open_records", "recordings_dir"]
