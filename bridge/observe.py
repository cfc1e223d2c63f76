"""Structured logging (every line of a call carries its call id and CallSid) and metrics.

Per-frame counts live in each call's plain-int ``CallStats`` (no per-frame metric calls on the
hot path); the Prometheus collector reads live calls at scrape time and adds finished calls'
totals, which are folded in when a call ends.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


@dataclass(slots=True)
class CallTags:
    call_id: str
    call_sid: str = ""
    session_id: str = ""


call_tags: contextvars.ContextVar[CallTags | None] = contextvars.ContextVar("call_tags", default=None)


class _CallContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        tags = call_tags.get()
        record.call_id = tags.call_id if tags else ""
        record.call_sid = tags.call_sid if tags else ""
        record.session_id = tags.session_id if tags else ""
        if tags:
            sid = f" {tags.call_sid}" if tags.call_sid else ""
            record.callctx = f"[{tags.call_id}{sid}] "
        else:
            record.callctx = ""
        return True


class _SecretScrubber(logging.Filter):
    """Last line of defence: no secret value ever reaches a log sink whole."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if len(s) >= 6)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        if any(s in message for s in self._secrets):
            for s in self._secrets:
                message = message.replace(s, "[redacted]")
            record.msg, record.args = message, None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "call_id": getattr(record, "call_id", ""),
            "call_sid": getattr(record, "call_sid", ""),
            "session_id": getattr(record, "session_id", ""),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    """Configure the root logger once: call context on every line, secrets scrubbed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_CallContextFilter())
    handler.addFilter(_SecretScrubber(secrets))
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(callctx)s%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("hypercorn.access", "trio-websocket", "httpx", "httpcore", "twilio.http_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- metrics ----------------------------------------------------------------------------------

_FRAME_FIELDS = {
    ("phone_to_bridge", "received"): "frames_from_twilio",
    ("bridge_to_agent", "sent"): "frames_to_agent",
    ("agent_to_bridge", "received"): "frames_from_agent",
    ("bridge_to_phone", "sent"): "frames_to_twilio",
    ("phone_to_agent", "dropped_pre_ready"): "frames_dropped_pre_ready",
    ("phone_to_agent", "dropped_flood"): "frames_dropped_flood",
    ("phone_to_agent", "dropped_backpressure"): "frames_dropped_backpressure",
    ("phone_to_agent", "dropped_resume_gap"): "frames_dropped_gap",
    ("agent_to_phone", "dropped_interrupted"): "frames_dropped_interrupted",
    ("phone_to_bridge", "invalid"): "invalid_twilio",
    ("agent_to_bridge", "invalid"): "invalid_agent",
}


@dataclass
class Metrics:
    """Prometheus metrics of one server process (its own registry, so tests can make many)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    live_stats: Callable[[], Iterable[object]] = lambda: ()

    def __post_init__(self) -> None:
        r = self.registry
        self.active_calls = Gauge("bridge_active_calls", "Calls streaming right now", registry=r)
        self.calls = Counter("bridge_calls", "Finished calls by outcome", ["outcome"], registry=r)
        self.agent_connects = Counter(
            "bridge_agent_connects", "Voice Agent connect attempts by result", ["result"], registry=r
        )
        self.agent_resumes = Counter(
            "bridge_agent_resumes", "Session resume attempts by result", ["result"], registry=r
        )
        self.agent_errors = Counter("bridge_agent_errors", "session.error events by code", ["code"], registry=r)
        self.barge_ins = Counter("bridge_barge_ins", "Caller barge-ins (playback cleared)", registry=r)
        self.tool_calls = Counter(
            "bridge_tool_calls", "Tool calls by name and outcome", ["tool", "outcome"], registry=r
        )
        self.webhooks = Counter(
            "bridge_webhooks", "Webhook requests by route and result", ["route", "result"], registry=r
        )
        self.call_statuses = Counter(
            "bridge_call_statuses",
            "Twilio call status callbacks by CallStatus (busy, no-answer, failed: calls nobody answered)",
            ["status"],
            registry=r,
        )
        self.rejected_streams = Counter(
            "bridge_rejected_streams", "Media Streams refused before accept", ["reason"], registry=r
        )
        self.preauth_closed = Counter(
            "bridge_preauth_closed",
            "Connections closed before a complete request head: per_ip (MAX_PENDING_PER_IP, the new one) "
            "or total (MAX_PENDING_CONNECTIONS, the oldest)",
            ["reason"],
            registry=r,
        )
        self.preauth_pending = Gauge(
            "bridge_preauth_pending", "Connections that have not sent a complete request head yet", registry=r
        )
        self.first_audio = Histogram(
            "bridge_time_to_first_agent_audio_seconds",
            "From stream start to the first agent audio sent to Twilio",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=r,
        )
        self.reply_latency = Histogram(
            "bridge_reply_latency_seconds",
            "From input.speech.stopped to the first reply audio",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5),
            registry=r,
        )
        # Call records (bridge/records): observed once per reply / per call, never per frame.
        self.turn_response = Histogram(
            "bridge_turn_response_seconds",
            "From the caller's input.speech.stopped to the reply's first audio written to Twilio",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5),
            registry=r,
        )
        self.record_first_audio = Histogram(
            "bridge_first_audio_seconds",
            "From stream start to the call's first agent audio written to Twilio (the greeting)",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=r,
        )
        self.replies_interrupted = Counter(
            "bridge_replies_interrupted", "Agent replies the caller did not hear to the end", registry=r
        )
        self.agent_audio = Counter(
            "bridge_agent_audio_seconds",
            "Agent reply audio: said (forwarded to Twilio) vs heard (played, per echoed marks)",
            ["kind"],
            registry=r,
        )
        self.records_pending = Gauge("bridge_records_pending", "Finished call records not stored yet", registry=r)
        self.records_dropped = Counter(
            "bridge_records_dropped", "Call records dropped (the store was down or slow too long)", registry=r
        )
        self.records_store_up = Gauge("bridge_records_store_up", "1 when the last record write worked", registry=r)
        self.record_webhooks = Counter(
            "bridge_record_webhooks", "Post-call record webhook deliveries by result", ["result"], registry=r
        )
        self._finished_frames: dict[tuple[str, str], int] = dict.fromkeys(_FRAME_FIELDS, 0)
        r.register(_FrameCollector(self))

    def fold_finished(self, stats: object) -> None:
        """Add a finished call's frame counts to the process totals."""
        for key, attr in _FRAME_FIELDS.items():
            self._finished_frames[key] += getattr(stats, attr, 0)

    def frame_totals(self) -> dict[tuple[str, str], int]:
        totals = dict(self._finished_frames)
        for stats in self.live_stats():
            for key, attr in _FRAME_FIELDS.items():
                totals[key] += getattr(stats, attr, 0)
        return totals

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _FrameCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "bridge_frames", "Audio frames by direction and fate", labels=["direction", "fate"]
        )
        for (direction, fate), value in self._metrics.frame_totals().items():
            family.add_metric([direction, fate], value)
        yield family


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Collect the finished calls' reference cycles, then hand freed heap pages back to the OS
    (glibc), so RSS goes back towards its baseline when the process is idle.

    Called when the last call and its connection are gone; a few milliseconds (start-up objects
    are frozen out of the collector), never on a hot path. What pymalloc keeps in arenas that
    still hold a live object is not returned (BENCHMARKS.md, "Memory").
    """
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
