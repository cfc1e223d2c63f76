"""The call recorder: the per-call ``CallRecorderPort`` implementation, and the process-wide
:class:`Records` service that makes one per call and knows the live ones.

A :class:`CallRecorder` wraps the pure :class:`~bridge.records.record.RecordBuilder`: each port
method only updates in-memory state (and publishes a small live event when something a console
shows changed); no serialisation, no I/O. ``finish`` builds the final record once and hands it to
the store's and the webhook's bounded queues (``submit`` never blocks). A recorder bug must never
touch the call: every port method logs its first failure and carries on.

With ``RECORD_AUDIO=on`` a recorder also carries the call's
:class:`~bridge.records.recording.CallAudio` as the port's ``audio``: the session hands it the
media frames and the agent audio it forwards; the recorder gives it the stream's start (the file's
name, in the record's ``recording``), each ``clear`` and the call's end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from bridge.agent import events as ag
from bridge.observe import Metrics
from bridge.phone import media as tw
from bridge.records import facts as fx
from bridge.records.live import LiveHub
from bridge.records.record import RecordBuilder, frames_summary, iso, summary
from bridge.records.recording import CallAudio, Recordings

log = logging.getLogger("bridge.records")


class RecordSink(Protocol):
    """Where finished records go (the store, the webhook): ``submit`` never blocks."""

    def submit(self, record: dict[str, Any]) -> None: ...


class Records:
    """One per process: makes each call's recorder, holds the live ones for the API and console.

    Args:
        redact: custom parameter names whose values are masked (``RECORD_REDACT``).
        sinks: where finished records go, in order (store, webhook, a test's list).
        metrics: the process's metrics, or None.
        recordings: ``RECORD_AUDIO=on``: each call's stereo WAV (None: no audio is kept).
        clock: the calls' monotonic clock (the session's ``now``); wall_clock: epoch seconds.
    """

    def __init__(
        self,
        *,
        redact: frozenset[str] = frozenset(),
        sinks: tuple[RecordSink, ...] = (),
        metrics: Metrics | None = None,
        hub: LiveHub | None = None,
        recordings: Recordings | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.redact = redact
        self.sinks = sinks
        self.metrics = metrics
        self.hub = hub or LiveHub()
        self.recordings = recordings
        self.clock = clock
        self.wall_clock = wall_clock
        self._live: dict[str, CallRecorder] = {}  # by CallSid, from the stream's start

    def new_call(self, call_id: str, direction: str) -> CallRecorder:
        """A recorder for one call (it joins the live calls once its ``start`` names the CallSid)."""
        builder = RecordBuilder(
            call_id, direction, origin_mono=self.clock(), origin_wall=self.wall_clock(), redact=self.redact
        )
        audio = self.recordings.new_call(call_id) if self.recordings is not None else None
        return CallRecorder(self, builder, audio)

    def live(self, call_sid: str) -> dict[str, Any] | None:
        """The record so far of a live call, or None."""
        recorder = self._live.get(call_sid)
        return recorder.snapshot() if recorder is not None else None

    def live_records(self) -> list[dict[str, Any]]:
        """The records so far of the live calls, newest first."""
        records = [r.snapshot() for r in self._live.values()]
        return sorted(records, key=lambda r: str(r["started_at"]), reverse=True)

    def live_summaries(self) -> list[dict[str, Any]]:
        """Summaries of the live calls, newest first."""
        return [summary(r) for r in self.live_records()]

    def live_count(self) -> int:
        return len(self._live)

    # --- called by recorders ------------------------------------------------------------------

    def _started(self, recorder: CallRecorder) -> None:
        self._live[recorder.builder.call_sid] = recorder

    def _finished(self, recorder: CallRecorder, record: dict[str, Any]) -> None:
        if self._live.get(recorder.builder.call_sid) is recorder:
            del self._live[recorder.builder.call_sid]
        for sink in self.sinks:
            try:
                sink.submit(record)
            except Exception:  # a sink's bug must not end the call's teardown
                log.exception("a record sink failed to take the record of %s", record.get("call_sid"))


class CallRecorder:
    """``CallRecorderPort`` for one call (see /work/notes/facts_contract.md)."""

    __slots__ = ("_activity", "_failed", "_records", "_stats", "audio", "builder")

    def __init__(self, records: Records, builder: RecordBuilder, audio: CallAudio | None = None) -> None:
        self._records = records
        self.builder = builder
        self.audio = audio  # the port's ``audio``: None unless RECORD_AUDIO=on
        self._stats: object | None = None
        self._activity = ""
        self._failed = False

    def attach_stats(self, stats: object) -> None:
        """The call's ``CallStats``, read for the record's ``frames`` when it is built."""
        self._stats = stats

    # --- the port -----------------------------------------------------------------------------

    def phone(self, event: tw.TwilioEvent, now: float) -> None:
        try:
            b = self.builder
            had_sid = bool(b.call_sid)
            b.phone(event, now)
            if isinstance(event, tw.Start) and b.call_sid and not had_sid:
                if self.audio is not None:
                    b.recording = self.audio.start(b.call_sid, now)
                self._records._started(self)
                self._publish(
                    "call.started",
                    direction=b.direction,
                    **{"from": b.party("From"), "to": b.party("To")},
                    started_at=iso(b.wall(now)),
                    activity=b.activity(),
                )
                self._activity = b.activity()
            self._activity_changed(now)
        except Exception:
            self._fail()

    def agent(self, event: ag.AgentEvent, now: float) -> None:
        try:
            b = self.builder
            before = len(b.turns)
            b.agent(event, now)
            if len(b.turns) != before or isinstance(event, (ag.TranscriptAgent, ag.ReplyDone)):
                self._publish_turn(event)
            if isinstance(event, ag.ToolCall):
                self._publish_tool(event.tool_call_id)
            self._activity_changed(now)
        except Exception:
            self._fail()

    def fact(self, fact: object) -> None:
        try:
            b = self.builder
            b.fact(fact)
            metrics = self._records.metrics
            if isinstance(fact, fx.AudioWritten) and metrics is not None:
                turn = b.replies.get(fact.reply_id)
                if turn is not None and turn.audio_at == fact.at:
                    if turn.response_ms is not None:
                        metrics.turn_response.observe(turn.response_ms / 1000)
                    if turn.first_audio_ms is not None:
                        metrics.record_first_audio.observe(turn.first_audio_ms / 1000)
            elif isinstance(fact, fx.ClearSent) and self.audio is not None:
                self.audio.clear(fact.at)
            elif isinstance(fact, fx.MarkPlayed) and not fact.heard:
                self._publish_reply(fact.reply_id)
            elif isinstance(fact, (fx.ToolStarted, fx.ToolFinished)):
                self._publish_tool(fact.tool_call_id)
            if isinstance(fact, (fx.ToolStarted, fx.ToolFinished, fx.CallEnded)):
                self._activity_changed(getattr(fact, "at", 0.0))
        except Exception:
            self._fail()

    def finish(self, now: float) -> None:
        """The call is over: the final record goes to the sinks (once)."""
        b = self.builder
        if b.finished:
            return
        if self.audio is not None:
            self.audio.finish()
        try:
            b.finish(now)
            record = self.snapshot(now)
            self._count_audio()
            if b.call_sid:
                self._publish(
                    "call.ended",
                    outcome=record["outcome"],
                    reason=record["reason"],
                    ended_at=record["ended_at"],
                    duration_s=record["duration_s"],
                )
                self._records._finished(self, record)
            else:
                log.debug("no record: the stream never started (no CallSid)")
        except Exception:
            self._fail()

    # --- reading ------------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The record so far (``"live": true`` until the call is finished)."""
        at = self._records.clock() if now is None else now
        frames = frames_summary(self._stats) if self._stats is not None else {}
        return self.builder.build(at, frames)

    # --- helpers ------------------------------------------------------------------------------

    def _fail(self) -> None:
        if not self._failed:
            self._failed = True
            log.exception("call recorder failed (the call goes on; its record may be incomplete)")

    def _publish(self, kind: str, **fields: Any) -> None:
        b = self.builder
        if not b.call_sid:
            return
        event = {"type": kind, "call_sid": b.call_sid, "call_id": b.call_id, "at": iso(self._records.wall_clock())}
        event.update(fields)
        self._records.hub.publish(event)

    def _activity_changed(self, now: float) -> None:
        activity = self.builder.activity()
        if activity != self._activity and self.builder.call_sid:
            self._activity = activity
            b = self.builder
            start = b.stream_started_at if b.stream_started_at is not None else b.created_at
            self._publish(
                "call.updated",
                activity=activity,
                agent_session_ids=list(b.session_ids),
                duration_s=round(now - start, 3),
            )

    def _publish_turn(self, event: ag.AgentEvent) -> None:
        reply_id = getattr(event, "reply_id", None)
        if isinstance(reply_id, str) and reply_id in self.builder.replies:
            self._publish_reply(reply_id)
            return
        turn = self.builder.last_turn()
        if turn is not None:
            self._publish("turn", index=len(self.builder.turns) - 1, turn=turn)

    def _publish_reply(self, reply_id: str) -> None:
        b = self.builder
        turn = b.replies.get(reply_id)
        if turn is None or not b.call_sid:
            return
        # Replies are near the end: search from there (a 10 000-turn call stays cheap).
        for index in range(len(b.turns) - 1, -1, -1):
            if b.turns[index] is turn:
                self._publish("turn", index=index, turn=b.turn_json(turn))
                return

    def _publish_tool(self, tool_call_id: str) -> None:
        b = self.builder
        if tool_call_id not in b.tools or not b.call_sid:
            return
        index = list(b.tools).index(tool_call_id)
        self._publish("tool", index=index, tool=b.tool_json(b.tools[tool_call_id]))

    def _count_audio(self) -> None:
        metrics = self._records.metrics
        if metrics is None:
            return
        said_s = heard_s = 0.0
        interrupted = 0
        for turn in self.builder.agent_turns():
            _, heard_ms = self.builder.heard(turn)
            said_s += max(turn.said_ms, heard_ms) / 1000
            heard_s += heard_ms / 1000
            interrupted += turn.interrupted
        metrics.agent_audio.labels("said").inc(said_s)
        metrics.agent_audio.labels("heard").inc(heard_s)
        if interrupted:
            metrics.replies_interrupted.inc(interrupted)


__all__ = ["CallRecorder", "RecordSink", "Records"]
