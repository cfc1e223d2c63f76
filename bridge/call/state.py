"""CallState: every decision of one phone call, as pure code.

The I/O shell (``call/session.py``) feeds it what happened — a Twilio event, an agent event, a tool
finishing, a clock tick — and performs the actions it returns, in order. It never imports trio and
never awaits; time enters only as the ``now`` argument (seconds, any monotonic origin).

Invariants:
- Caller audio goes upstream only while the upstream session is ready (phase LIVE), in order,
  byte-identical, and at most ~real time (``CallerAudioBudget``, ``call/budget.py``: a token
  bucket drops a flood; drops are counted).
- Playback (epoch, marks, the goodbye) is the ``Playback`` sub-machine (``call/playback.py``):
  audio queued before a ``clear`` is never played, audio of an interrupted reply is dropped, and
  a mark's echo is told apart as heard or flushed.
- ``EndCall`` is returned at most once; after it, only the upstream goodbye is still tracked.
- Tool results follow reference §7 (the ``ToolGate`` sub-machine, ``call/toolgate.py``): sent
  when ``reply.done`` is the latest turn event, held otherwise (flushed after
  ``tool_hold_max_s`` as a safety net), discarded when the reply that asked for them was
  interrupted. ``collect_digits`` results too (the keypad answers it); a collection whose
  reply was interrupted is cancelled then, so later keys are keys outside a collection.
- The conversation sub-machine (``call/conversation.py``: keypad, idle timers, answering
  machines) is composed here: the core feeds it and turns its outputs into the same actions.
  With AMD holding the greeting, caller audio is dropped (counted as pre-ready) until a person
  is known. A last reply (idle goodbye, voicemail) ends the call once heard, like ``end_call``,
  or at ``end_call_deadline_s`` if it never plays.
- The upstream session's phase (connecting, live, resuming, recovering, ending) and its ready,
  resume and recovery deadlines are the ``UpstreamLifecycle`` sub-machine
  (``call/lifecycle.py``); the agent leg's retry pacing is ``call/upstream.py``.
- Recovery (``recovery_s`` > 0): a resume refused with a resume-failed code opens a fresh
  session (phase RECOVERING) whose prompt carries the conversation; caller audio in the gap is
  dropped and counted; once ready, ``reply.create`` asks for the apology. If no agent audio went
  to Twilio within ``recovery_s`` of the refusal, or the fresh session fails, the call ends
  (the fallback plays). Tool calls of the old session are discarded (the new one never made them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from enum import Enum
from typing import Any

import orjson

from bridge.agent import events as ag
from bridge.call import conversation as cv
from bridge.call import recovery
from bridge.call.actions import (
    Action,
    CallStats,
    ConnectAgent,
    EndCall,
    Fact,
    HangUp,
    Log,
    Outcome,
    RunTool,
    SayAndHangUp,
    SendAgent,
    SendPhone,
    Transfer,
)
from bridge.call.budget import CallerAudioBudget
from bridge.call.lifecycle import MAX_RECOVERIES, ConnectFailure, Expired, Phase, Ready, UpstreamLifecycle, Verdict
from bridge.call.playback import GoodbyePhase, Playback, PlaybackState
from bridge.call.policy import CallPolicy
from bridge.call.toolgate import Release, ToolCallState, ToolGate, cap_result
from bridge.phone import media as tw
from bridge.records.facts import AnsweredBy, DtmfPressed, SessionRecovered, ToolFinished, ToolStarted

_MAX_LOGGED_INVALID = 5  # per call and side; the rest are only counted


__all__ = [
    "MAX_RECOVERIES",
    "Action",
    "CallPolicy",
    "CallState",
    "CallStats",
    "ConnectAgent",
    "EndCall",
    "Fact",
    "HangUp",
    "Log",
    "Outcome",
    "Phase",
    "RunTool",
    "SayAndHangUp",
    "SendAgent",
    "SendPhone",
    "Transfer",
    "TransferOutcome",
]


class TransferOutcome(Enum):
    UNAVAILABLE = "unavailable"  # no Twilio REST credentials: nothing was tried
    FAILED = "failed"  # the redirect was refused or timed out: the call goes on
    STARTED = "started"  # Twilio is redirecting the call: its stop is the transfer


_TRANSFER_RESULTS = {
    TransferOutcome.UNAVAILABLE: (ag.tool_error("transfers need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"), True),
    TransferOutcome.FAILED: (ag.tool_error("the transfer failed; apologise and offer to help"), True),
    TransferOutcome.STARTED: (ag.tool_ok("transferring"), False),
}


class CallState:
    """All decisions of one call. See the module docstring for the invariants."""

    __slots__ = (
        "_amd_gate",
        "_budget",
        "_budget_take",
        "_current_reply",
        "_final_deadline",
        "_final_pending",
        "_gate",
        "_greeting_sent",
        "_history",
        "_last_phone_at",
        "_recovery_instructions",
        "call_sid",
        "conversation",
        "custom_parameters",
        "end_reason",
        "expected_call_sid",
        "outcome",
        "playback",
        "policy",
        "record",
        "stats",
        "stream_sid",
        "transferring",
        "upstream",
    )

    def __init__(self, policy: CallPolicy, *, expected_call_sid: str | None = None, record: bool = False) -> None:
        """``record``: hand the call recorder its facts (``Fact`` actions); off, none are made."""
        self.policy = policy
        self.record = record
        self.expected_call_sid = expected_call_sid
        self.stream_sid = ""
        self.call_sid = ""
        self.custom_parameters: dict[str, str] = {}
        self.stats = CallStats()
        self.playback = Playback(self.stats, end_call_deadline_s=policy.end_call_deadline_s, record=record)
        self.outcome: Outcome | None = None
        self.end_reason = ""
        self.transferring = False
        # Connecting, ready, resuming, recovering: the upstream session's phase and deadlines.
        self.upstream = UpstreamLifecycle(
            self.stats,
            ready_timeout_s=policy.ready_timeout_s,
            resume_window_s=policy.resume_window_s,
            recovery_s=policy.recovery_s,
        )
        self._current_reply: str | None = None
        self._gate = ToolGate(policy.tool_hold_max_s)  # reference §7: when each tool result may go
        self._budget = CallerAudioBudget(policy.caller_burst_ms)  # caller audio at most ~real time
        self._budget_take = self._budget.take  # bound once: it runs for every caller frame
        self._last_phone_at: float | None = None
        # Keypad, idle timers, AMD: made at ``start`` (the AMD clock runs from the answer).
        self.conversation: cv.Conversation | None = None
        self._amd_gate = False  # caller audio held back: AMD has not found a person yet
        self._greeting_sent = True
        self._final_pending = False  # a last reply was asked for and has not started yet
        self._final_deadline: float | None = None  # ...and the call ends by then if it never plays
        self._recovery_instructions = ""  # the apology's reply.create, once a recovery is planned
        self._history = recovery.History(policy.recovery_context_chars) if policy.recovery_s > 0 else None

    @property
    def phase(self) -> Phase:
        return self.upstream.phase

    @property
    def ending(self) -> bool:
        return self.upstream.phase is Phase.ENDING

    @property
    def session_id(self) -> str | None:
        """The upstream session's id, from its last ``session.ready``."""
        return self.upstream.session_id

    @property
    def recovered(self) -> bool:
        """A fresh session replaced a refused resume during this call."""
        return self.upstream.recovered

    @property
    def upstream_ended(self) -> bool:
        """The upstream session is over (``session.ended``, or its socket is gone)."""
        return self.upstream.upstream_ended

    @property
    def drop_upstream(self) -> bool:
        """The resume was refused: the session stops reading that socket (and retires it)."""
        return self.upstream.drop_upstream

    @drop_upstream.setter
    def drop_upstream(self, value: bool) -> None:
        self.upstream.drop_upstream = value

    @property
    def epoch(self) -> int:
        """The playback epoch: agent audio tagged with an older one is never played."""
        return self.playback.epoch

    @property
    def hanging_up(self) -> bool:
        """The goodbye has been played: the ``stop`` that follows is the agent's hang-up."""
        return self.playback.goodbye is GoodbyePhase.HANGING_UP

    # --- Twilio side ----------------------------------------------------------------------------

    def on_phone_opened(self, now: float) -> None:
        """The stream was accepted: Twilio's silence is timed from here."""
        self._last_phone_at = now

    def on_phone(self, event: tw.TwilioEvent | tw.InvalidFrame, now: float) -> list[Action]:
        """Decide what a Twilio message means for the call."""
        self._last_phone_at = now
        if type(event) is tw.Media:
            return self._on_media(event, now)
        if self.phase is Phase.ENDING:
            return []
        if isinstance(event, tw.Start):
            return self._on_start(event, now)
        if isinstance(event, tw.Mark):
            playback = self.playback
            was = playback.state
            actions = playback.on_echo(event.name, now)
            if was is PlaybackState.PLAYING and playback.state is PlaybackState.IDLE and self.conversation:
                self.conversation.reply_heard(now)  # the reply's last mark: everything was heard
            return actions
        if isinstance(event, tw.Stop):
            if self.stream_sid and event.stream_sid != self.stream_sid:
                return self._invalid_twilio("stop for another streamSid")
            if self.transferring:
                return self._end("Twilio stopped the stream for the transfer", Outcome.TRANSFERRED)
            if self.hanging_up:
                return self._end("call hung up after the goodbye", Outcome.AGENT_ENDED)
            return self._end("caller hung up (stop)", Outcome.CALLER_HUNG_UP)
        if isinstance(event, tw.Dtmf):
            return self._on_dtmf(event, now)
        if isinstance(event, tw.InvalidFrame):
            return self._invalid_twilio(event.reason)
        if isinstance(event, tw.Connected):
            return [Log(logging.DEBUG, f"Twilio connected (protocol {event.protocol} {event.version})")]
        if isinstance(event, tw.UnknownEvent):
            return [Log(logging.DEBUG, f"ignored unknown Twilio event {event.event!r}")]
        return []

    def on_phone_closed(self, now: float) -> list[Action]:
        """The Twilio socket closed (with or without ``stop``)."""
        if self.phase is Phase.ENDING:
            return []
        if self.transferring:
            return self._end("Twilio closed the stream for the transfer", Outcome.TRANSFERRED)
        if self.hanging_up:
            return self._end("call hung up after the goodbye", Outcome.AGENT_ENDED)
        return self._end("Twilio closed the stream", Outcome.CALLER_HUNG_UP)

    def _on_start(self, event: tw.Start, now: float) -> list[Action]:
        if self.phase is not Phase.AWAITING_START:
            return self._invalid_twilio("second start message")
        if self.expected_call_sid is not None and event.call_sid != self.expected_call_sid:
            return self._end(f"start callSid {event.call_sid} does not match the stream token", Outcome.REJECTED)
        self.stream_sid = self.playback.stream_sid = event.stream_sid
        self.call_sid = event.call_sid
        self.custom_parameters = event.custom_parameters
        self.upstream.start(now)
        self.stats.started_at = now
        self._budget.refill(now)
        p = self.policy
        self.conversation = cv.Conversation.for_call(
            outbound=p.outbound,
            greeting="",  # known once the session config is resolved (session_config)
            now=now,
            keypad_tool=p.keypad_tool,
            dtmf_to_agent=p.dtmf_to_agent,
            idle_reprompt_s=p.idle_reprompt_s,
            idle_hangup_s=p.idle_hangup_s,
            amd=p.amd,
            amd_wait_s=p.amd_wait_s,
            voicemail_message=p.voicemail_message,
        )
        self._amd_gate = self.conversation.amd is not None
        actions: list[Action] = [
            ConnectAgent(),
            Log(logging.INFO, f"stream {event.stream_sid} started ({event.encoding}, {event.sample_rate} Hz)"),
        ]
        if self.policy.outbound:
            if self.policy.greeting_pad_ms > 0:
                # Queued before any agent audio: the callee's audio path opens during this silence.
                pad = tw.silence_payload(self.policy.greeting_pad_ms)
                actions.append(SendPhone(tw.media_frame(self.stream_sid, pad), self.playback.epoch))
            # Then silence keeps the path open until the agent speaks (ticks: fill_silence).
            self.playback.silence_to = self.playback.silence_from = now + self.policy.greeting_pad_ms / 1000
        return actions

    def _on_media(self, event: tw.Media, now: float) -> list[Action]:
        stats = self.stats
        stats.frames_from_twilio += 1
        phase = self.upstream.phase
        if phase is not Phase.LIVE:
            if phase is Phase.AWAITING_START:
                return self._invalid_twilio("media before start")
            if phase is Phase.ENDING:
                return []  # the call is over: neither forwarded nor counted as a drop
            if phase is Phase.RECONNECTING or phase is Phase.RECOVERING:
                stats.frames_dropped_gap += 1  # never burst upstream after the resume
            else:
                stats.frames_dropped_pre_ready += 1
            return []
        if event.stream_sid != self.stream_sid:
            return self._invalid_twilio("media for another streamSid")
        if event.track not in ("inbound", ""):  # bidirectional streams carry the caller only
            return self._invalid_twilio(f"media for track {event.track[:16]!r}")
        if self._amd_gate:  # a machine's greeting would start a reply: held until a person is known
            stats.frames_dropped_pre_ready += 1
            return []
        if not self._budget_take(event.payload, now):
            stats.frames_dropped_flood += 1
            return []
        stats.frames_to_agent += 1
        return [SendAgent(ag.input_audio(event.payload), True)]

    # --- agent side -----------------------------------------------------------------------------

    def on_agent(self, event: ag.AgentEvent | ag.InvalidEvent, now: float) -> list[Action]:
        """Decide what a Voice Agent event means for the call."""
        if type(event) is ag.ReplyAudio:
            return self.playback.on_audio(event, now)
        if self.upstream.phase is Phase.ENDING:
            if isinstance(event, ag.SessionEnded):
                self.upstream.ended()
            return []
        handler = _AGENT_HANDLERS.get(type(event))
        if handler is None:
            if isinstance(event, ag.UnknownEvent):
                return [Log(logging.DEBUG, f"ignored unknown agent event {event.type!r}")]
            return []
        result: list[Action] = handler(self, event, now)
        return result

    def on_agent_closed(self, now: float, detail: str) -> list[Action]:
        """The upstream socket closed. Without ``session.ended`` first, that is a drop: resume the
        session while the window allows (the Twilio leg stays up), else end the call."""
        upstream = self.upstream
        if upstream.phase is Phase.ENDING:
            upstream.closed(now)
            return []
        resume = upstream.closed(now)
        if resume is not None:
            self._current_reply = None
            return [
                Log(logging.WARNING, f"Voice Agent connection lost ({detail}): resuming session {resume.session_id}"),
                ConnectAgent(resume_session_id=resume.session_id, attempt=resume.attempt),
            ]
        return self._end(f"Voice Agent connection lost ({detail})", Outcome.UPSTREAM_FAILED, upstream=False)

    def on_agent_connect_failed(self, now: float, detail: str) -> list[Action]:
        if self.upstream.phase is Phase.ENDING:
            return []
        failure = self.upstream.connect_failed()
        if failure is ConnectFailure.RESUME:
            reason = f"could not resume the Voice Agent session: {detail}"
        elif failure is ConnectFailure.RECOVERY:
            reason = f"recovery failed: could not open a fresh Voice Agent session: {detail}"
        else:
            reason = f"could not open the Voice Agent session: {detail}"
        return self._end(reason, Outcome.UPSTREAM_FAILED, upstream=False)

    def _on_ready(self, event: ag.SessionReady, now: float) -> list[Action]:
        ready = self.upstream.ready(event.session_id, now)
        self._budget.refill(now)
        what = _READY_WORDS[ready]
        actions: list[Action] = [Log(logging.INFO, f"agent session {event.session_id} {what}")]
        conv = self.conversation
        if ready is Ready.RECOVERED:
            actions.extend(self._recovered(event, now))
        elif ready is Ready.FIRST and conv is not None:
            actions.extend(self._conv(conv.session_ready(now, greeting=self._greeting_sent), now))
        return actions

    def _recovered(self, event: ag.SessionReady, now: float) -> list[Action]:
        """The fresh session is up: forget the old session's turn state and ask for the apology."""
        self._gate.forget_pending()  # the fresh session never made those calls
        self._current_reply = None
        actions: list[Action] = []
        if self.record:
            actions.append(Fact(SessionRecovered(event.session_id, now)))
        conv = self.conversation
        if conv is not None:
            conv.upstream_replaced(now)
            if conv.amd is not None and not conv.amd.listening:
                return actions  # nobody greeted yet: the AMD result (or its timer) still decides
        actions.append(SendAgent(ag.reply_create(self._recovery_instructions)))
        return actions

    def _on_error(self, event: ag.SessionError, now: float) -> list[Action]:
        self.stats.upstream_errors += 1
        if event.param == "output.voice":
            msg = f"VOICE {self.policy.voice!r} was rejected by the Voice Agent API: {event.message}"
        else:
            msg = f"Voice Agent error {event.code}: {event.message}"
        verdict = self.upstream.error(event.code, event.fatal, now)
        if verdict is Verdict.RECOVER:
            # The resume was refused: a fresh session instead (same persona and tools, the
            # conversation in its prompt). The refused socket is not read any more.
            self._current_reply = None
            return [
                Log(logging.WARNING, msg),
                Log(logging.WARNING, f"resume of session {self.session_id} refused: opening a fresh session"),
                ConnectAgent(fresh=True),
            ]
        if verdict is Verdict.FATAL:
            return [Log(logging.ERROR, msg), *self._end(msg, Outcome.UPSTREAM_FAILED, upstream=False)]
        return [Log(logging.WARNING, msg + " (the call goes on)")]

    def session_config(self, config: ag.SessionConfig, record: Mapping[str, Any] | None = None) -> ag.SessionConfig:
        """The ``session.update`` to open the upstream with, from the persona's ``config``.

        AMD holding the greeting: without it (requested once a person is known). Recovering: the
        conversation so far in the prompt (from ``record``, the call record when one is kept,
        else the core's own history), no greeting."""
        if self.upstream.phase is Phase.RECOVERING:
            entries = recovery.entries_from_record(record) if record else []
            if not entries and self._history is not None:
                entries = self._history.entries()
            plan = recovery.build_recovery(config.system_prompt, entries, max_chars=self.policy.recovery_context_chars)
            self._recovery_instructions = plan.instructions
            return replace(config, system_prompt=plan.system_prompt, greeting="")
        conv = self.conversation
        if conv is not None and conv.amd is not None:
            conv.amd.greeting = config.greeting
            self._greeting_sent = False
            return replace(config, greeting="")
        self._greeting_sent = bool(config.greeting)
        return config

    def on_amd_result(self, answered_by: str, now: float) -> list[Action]:
        """Twilio's ``AnsweredBy`` for this call (``/amd-status``, via ``call/signals.py``)."""
        conv = self.conversation
        if self.phase is Phase.ENDING or conv is None:
            return []
        amd = conv.amd
        before = amd.answered_by if amd is not None else None
        actions = self._conv(conv.amd_result(answered_by, now), now)
        if amd is not None and amd.answered_by is not None and amd.answered_by is not before and self.record:
            actions.insert(0, Fact(AnsweredBy(amd.answered_by.value, now)))
        return actions

    def _on_ended(self, event: ag.SessionEnded, now: float) -> list[Action]:
        self.upstream.ended()
        return self._end("the Voice Agent ended the session", Outcome.UPSTREAM_FAILED, upstream=False)

    def _on_speech_started(self, event: ag.SpeechStarted, now: float) -> list[Action]:
        self._gate.turn_started()
        self.stats.turns += 1
        if not self.stream_sid:
            return []
        self._tell_conversation(event, now)
        playback = self.playback
        if self._current_reply is not None:
            playback.interrupt(self._current_reply)
        barged_in = playback.state is PlaybackState.PLAYING
        actions = playback.clear(now)
        if barged_in:
            self.stats.barge_ins += 1
            actions.append(Log(logging.INFO, "caller barged in: playback cleared"))
        return actions

    def _on_speech_stopped(self, event: ag.SpeechStopped | ag.TranscriptUser, now: float) -> list[Action]:
        self._tell_conversation(event, now)
        return []

    def _on_reply_started(self, event: ag.ReplyStarted, now: float) -> list[Action]:
        self._gate.turn_started()
        self._current_reply = event.reply_id
        self._tell_conversation(event, now)
        if self._final_pending:  # this is the last reply asked for: the call ends once it was heard
            self._final_pending = False
            return self.playback.end_call(event.reply_id, now)
        return []

    def _on_reply_done(self, event: ag.ReplyDone, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._current_reply == event.reply_id:
            self._current_reply = None
        if event.interrupted:
            for tool_call_id in self._gate.reply_interrupted(event.reply_id):
                actions.append(Log(logging.INFO, f"tool result for {tool_call_id} discarded: reply interrupted"))
                if self.conversation:
                    actions.extend(self._conv(self.conversation.tool_discarded(tool_call_id, now), now))
            actions.extend(self.playback.reply_interrupted(event.reply_id))
            if self.stream_sid:
                actions.extend(self.playback.clear(now))
            if self.conversation:
                self.conversation.reply_heard(now)  # flushed: the agent is quiet from here
            return actions
        actions.extend(_sent(self._gate.reply_completed()))
        actions.extend(self.playback.reply_completed(event.reply_id, now))
        if self.conversation and self.playback.state is PlaybackState.IDLE:
            self.conversation.reply_heard(now)  # nothing left playing (a silent reply)
        return actions

    def _on_tool_call(self, event: ag.ToolCall, now: float) -> list[Action]:
        tool_call_id = event.tool_call_id
        tool = self._gate.called(tool_call_id, self._current_reply)
        if tool is None:
            return [Log(logging.WARNING, f"duplicate tool.call {tool_call_id} ignored")]
        self.stats.tool_calls += 1
        if self._history is not None:
            self._history.tool_started(tool_call_id, event.name, event.arguments)
        conv = self.conversation
        if conv is not None and conv.claims(event.name):
            return [
                Log(logging.INFO, f"tool call {event.name} {_short(event.arguments or {})}"),
                *self._conv(conv.agent_event(event, now), now),
            ]
        started: list[Action] = []
        if self.record:
            started.append(Fact(ToolStarted(tool_call_id, event.name, event.arguments or {}, now)))
        if event.arguments is None:
            return [
                *started,
                Log(logging.WARNING, f"tool.call {event.name!r} unreadable: {event.arguments_error}"),
                *self.on_tool_done(tool_call_id, ag.tool_error(event.arguments_error or "bad tool call"), True, now),
            ]
        if event.name == ag.END_CALL_TOOL and self.policy.end_call_enabled:
            return [
                *started,
                Log(logging.INFO, "agent asked to end the call: hanging up after the goodbye plays"),
                *self.playback.end_call(self._current_reply, now),
                *self.on_tool_done(tool_call_id, ag.tool_ok("the call ends after your goodbye"), False, now),
            ]
        if event.name == ag.TRANSFER_CALL_TOOL and self.policy.transfer_numbers:
            number = event.arguments.get("number") or self.policy.transfer_numbers[0]
            if number not in self.policy.transfer_numbers:
                return [
                    *started,
                    *self.on_tool_done(
                        tool_call_id, ag.tool_error(f"number {number!r} is not an allowed transfer target"), True, now
                    ),
                ]
            self._tool_running(tool, now)
            return [
                *started,
                Log(logging.INFO, f"agent asked to transfer the call to {number}"),
                Transfer(tool_call_id, number),
            ]
        self._tool_running(tool, now)
        return [
            *started,
            Log(logging.INFO, f"tool call {event.name} {_short(event.arguments)}"),
            RunTool(tool_call_id, event.name, event.arguments),
        ]

    def _tool_running(self, tool: ToolCallState, now: float) -> None:
        tool.running = True
        if self.conversation:
            self.conversation.tool_started(now)

    def _on_transcript_user(self, event: ag.TranscriptUser, now: float) -> list[Action]:
        if self._history is not None:
            self._history.said("caller", event.text)
        self._tell_conversation(event, now)
        return [Log(logging.INFO, f"caller: {event.text}")]

    def _on_transcript_agent(self, event: ag.TranscriptAgent, now: float) -> list[Action]:
        if self._history is not None:
            self._history.said("agent", event.text)  # cut to what was spoken when interrupted
        suffix = " [interrupted]" if event.interrupted else ""
        return [Log(logging.INFO, f"agent: {event.text}{suffix}")]

    def _on_invalid_agent(self, event: ag.InvalidEvent, now: float) -> list[Action]:
        self.stats.invalid_agent += 1
        if self.stats.invalid_agent <= _MAX_LOGGED_INVALID:
            return [Log(logging.WARNING, f"skipped invalid agent frame: {event.reason}")]
        return []

    # --- tools, transfer, ticks -------------------------------------------------------------

    def on_tool_done(self, tool_call_id: str, result: str, is_error: bool, now: float) -> list[Action]:
        """A tool finished (or failed). Send, hold or discard its result per reference §7."""
        tool = self._gate.get(tool_call_id)
        if tool is None or tool.done or self.phase is Phase.ENDING:
            return []
        if tool.running:
            tool.running = False
            if self.conversation:
                self.conversation.tool_finished(now)
        if self._history is not None:
            self._history.tool_finished(tool_call_id, result, is_error)
        finished: list[Action] = [Fact(ToolFinished(tool_call_id, result, is_error, now))] if self.record else []
        return [*finished, *self._deliver_result(tool_call_id, result, is_error, now)]

    def _deliver_result(self, tool_call_id: str, result: str, is_error: bool, now: float) -> list[Action]:
        if self.phase is Phase.ENDING:
            return []
        call = self._gate.get(tool_call_id)
        if call is None or call.done or call.discarded:
            return _sent(self._gate.finished(tool_call_id, result, is_error, now))  # marks it done, sends nothing
        result, is_error, size = cap_result(result, is_error)
        sent = _sent(self._gate.finished(tool_call_id, result, is_error, now))
        if size is None:
            return sent
        # The size only, never the content (it may be sensitive); the record keeps its own cap.
        too_large = f"tool result for {tool_call_id} too large ({size} bytes): an error result goes instead"
        return [Log(logging.WARNING, too_large), *sent]

    def on_transfer_started(self) -> None:
        """A REST redirect is under way: the ``stop`` it causes is the transfer, not a hang-up."""
        self.transferring = True

    def on_transfer_result(self, tool_call_id: str, outcome: TransferOutcome, now: float) -> list[Action]:
        """How the REST redirect went, and what the model is told about it."""
        if outcome is not TransferOutcome.STARTED:
            self.transferring = False
        result, is_error = _TRANSFER_RESULTS[outcome]
        return self.on_tool_done(tool_call_id, result, is_error, now)

    def connect_refused_for_now(self, event: ag.SessionError) -> bool:
        """A refusal before the first ``session.ready`` that another connect may pass
        (``at_capacity``, ``concurrency_exceeded``; reference §8): the leg retries with backoff."""
        return self.upstream.refused_for_now(event.code)

    def on_tick(self, now: float) -> list[Action]:
        """Deadlines: upstream ready, call length, goodbye mark, held tool results."""
        if self.phase is Phase.ENDING:
            return []
        expired = self.upstream.expired(now)
        if expired is Expired.READY:
            return self._end(f"no session.ready within {self.policy.ready_timeout_s:g} s", Outcome.UPSTREAM_FAILED)
        if expired is Expired.RESUME:
            return self._end(
                f"could not resume the Voice Agent session within {self.policy.resume_window_s:g} s",
                Outcome.UPSTREAM_FAILED,
                upstream=False,
            )
        if expired is Expired.RECOVERY:
            return self._end(
                f"recovery failed: the caller did not hear the agent within {self.policy.recovery_s:g} s",
                Outcome.UPSTREAM_FAILED,
            )
        last = self._last_phone_at
        if last is not None and now - last >= self.policy.twilio_silence_s:
            return self._end(f"Twilio sent nothing for {self.policy.twilio_silence_s:g} s", Outcome.STUCK)
        started = self.stats.started_at
        if started is not None and now - started >= self.policy.max_call_s:
            return self._end(f"call reached MAX_CALL_SECONDS={self.policy.max_call_s:g}", Outcome.TIME_LIMIT)
        actions = self.playback.on_tick(now)
        if self.playback.silence_to is not None:
            actions.extend(self.playback.fill_silence(now))
        actions.extend(_sent(self._gate.due(now)))
        if self._final_deadline is not None:
            goodbye = self.playback.goodbye
            if goodbye is GoodbyePhase.MARK_SENT or goodbye is GoodbyePhase.HANGING_UP:
                self._final_deadline = None  # heard (or the mark's own deadline runs)
            elif now >= self._final_deadline:
                self._final_deadline = None
                self._final_pending = False
                self.playback.goodbye = GoodbyePhase.HANGING_UP
                actions.append(HangUp("the last reply did not play in time"))
        conv = self.conversation
        if conv is not None:
            due = conv.next_deadline()
            if due is not None and now >= due:
                actions.extend(self._conv(conv.tick(now), now))
        return actions

    def end_now(self, reason: str, outcome: Outcome, *, end_upstream: bool = True) -> list[Action]:
        """End the call from outside (shutdown, stuck peer, hang-up done)."""
        if self.phase is Phase.ENDING:
            return []
        return self._end(reason, outcome, upstream=end_upstream)

    # --- helpers ------------------------------------------------------------------------------

    def _invalid_twilio(self, reason: str) -> list[Action]:
        self.stats.invalid_twilio += 1
        if self.stats.invalid_twilio <= _MAX_LOGGED_INVALID:
            return [Log(logging.WARNING, f"skipped invalid Twilio frame: {reason}")]
        return []

    # --- the conversation sub-machine ---------------------------------------------------------

    def _on_dtmf(self, event: tw.Dtmf, now: float) -> list[Action]:
        conv = self.conversation
        if conv is None:  # before start: only noted
            pressed: list[Action] = [Log(logging.INFO, f"caller pressed {event.digit[:8]!r}")]
            if self.record:
                pressed.append(Fact(DtmfPressed(event.digit[:8], now)))
            return pressed
        shown = "a key (sensitive entry: masked)" if conv.keypad.sensitive else repr(event.digit[:8])
        actions: list[Action] = [Log(logging.INFO, f"caller pressed {shown}")]
        actions.extend(self._conv(conv.phone_event(event, now), now))
        self._revived()
        return actions

    def _tell_conversation(self, event: ag.AgentEvent, now: float) -> None:
        """Turn events the conversation only observes (its timers); nothing comes back."""
        conv = self.conversation
        if conv is not None:
            conv.agent_event(event, now)
            self._revived()

    def _revived(self) -> None:
        """The caller spoke or pressed a key during the idle goodbye: the call goes on."""
        conv = self.conversation
        if self._final_deadline is not None and conv is not None and conv.ending is None:
            self._final_pending = False
            self._final_deadline = None
            self.playback.cancel_goodbye()

    def _conv(self, outs: list[cv.Out], now: float) -> list[Action]:
        """The conversation's outputs as the core's actions, in order."""
        actions: list[Action] = []
        history = self._history
        for out in outs:
            if isinstance(out, cv.AgentSend):
                actions.append(SendAgent(out.text))
            elif isinstance(out, cv.ToolReply):
                actions.extend(self._deliver_result(out.tool_call_id, out.result, out.is_error, now))
            elif isinstance(out, cv.Record):
                fact = out.fact
                if history is not None and isinstance(fact, ToolFinished):
                    history.tool_finished(fact.tool_call_id, fact.result, fact.is_error)  # masked
                if self.record:
                    actions.append(Fact(fact))
            elif isinstance(out, cv.Note):
                actions.append(Log(out.level, out.message))
            elif isinstance(out, cv.FinalReply):
                actions.extend(self._final_reply(out, now))
            elif isinstance(out, cv.SayAndHangUp):
                actions.append(SayAndHangUp(out.message, out.reason))
            elif isinstance(out, cv.HangUpNow):
                self.playback.goodbye = GoodbyePhase.HANGING_UP  # Twilio's stop is our hang-up
                actions.append(HangUp(out.reason))
        conv = self.conversation
        if conv is not None and conv.amd is not None:
            self._amd_gate = not conv.amd.listening
        return actions

    def _final_reply(self, out: cv.FinalReply, now: float) -> list[Action]:
        actions: list[Action] = [Log(logging.INFO, f"a last reply, then the call ends ({out.reason})")]
        if out.clear_first and self.stream_sid:
            if self._current_reply is not None:
                self.playback.interrupt(self._current_reply)
            actions.extend(self.playback.clear(now))
        actions.append(SendAgent(ag.reply_create(out.instructions)))
        self._final_pending = True
        self._final_deadline = now + self.policy.end_call_deadline_s
        return actions

    def _end(self, reason: str, outcome: Outcome, *, upstream: bool = True) -> list[Action]:
        if self.conversation is not None:
            self.conversation.keypad.cancel()
        end_upstream = self.upstream.end(upstream=upstream)
        self.playback.stopped = True
        self.outcome = outcome
        self.end_reason = reason
        return [EndCall(reason, outcome, end_upstream)]


def _sent(releases: list[Release]) -> list[Action]:
    return [SendAgent(ag.tool_result(r.tool_call_id, r.result, is_error=r.is_error)) for r in releases]


_READY_WORDS = {
    Ready.FIRST: "ready",
    Ready.AGAIN: "ready",
    Ready.RESUMED: "resumed",
    Ready.RECOVERED: "ready (recovered: a fresh session)",
}


def _short(arguments: dict[str, Any]) -> str:
    text = orjson.dumps(arguments).decode()
    return text if len(text) <= 200 else text[:197] + "..."


_AGENT_HANDLERS: dict[type, Any] = {
    ag.SessionReady: CallState._on_ready,
    ag.SessionError: CallState._on_error,
    ag.SessionEnded: CallState._on_ended,
    ag.SpeechStarted: CallState._on_speech_started,
    ag.ReplyStarted: CallState._on_reply_started,
    ag.ReplyDone: CallState._on_reply_done,
    ag.ToolCall: CallState._on_tool_call,
    ag.TranscriptUser: CallState._on_transcript_user,
    ag.TranscriptAgent: CallState._on_transcript_agent,
    ag.InvalidEvent: CallState._on_invalid_agent,
    ag.SessionUpdated: lambda self, e, now: [Log(logging.DEBUG, "agent session updated")],
    ag.SpeechStopped: CallState._on_speech_stopped,
    ag.TranscriptUserDelta: lambda self, e, now: [],
}
