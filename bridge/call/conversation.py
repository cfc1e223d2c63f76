"""Keep the conversation going: the keypad, idle callers and answering machines as one pure
sub-machine of a call, speaking the parsed events the call core already has. Pure (no trio).

The call core feeds it what happened (agent and Twilio events, a reply heard, the AMD result,
a Python tool's start and end, the clock) and performs what it returns, in order. It composes
:class:`~bridge.call.keypad.Keypad`, :class:`~bridge.call.idle.IdleTimer` and
:class:`~bridge.call.amd.AnsweringMachineDetector` (each optional) and translates their
decisions into a few actions the core already knows how to do:

- :class:`AgentSend`: send this text upstream (``reply.create``; control, never dropped).
- :class:`ToolReply`: the ``collect_digits`` tool's result; the core sends it under the same
  rule as every tool result (reference §7: held until ``reply.done``, discarded when the reply
  that asked was interrupted).
- :class:`FinalReply`: ``reply.create`` these instructions, then end the call once that reply
  was heard, exactly as after ``end_call`` (the goodbye's last mark, or END_CALL_DEADLINE_S).
  ``clear_first``: send Twilio ``clear`` before (something else is playing).
- :class:`SayAndHangUp`: the agent is not up: replace the call's TwiML with
  ``<Say>message</Say><Hangup/>`` through the REST API and end the upstream session.
- :class:`HangUpNow`: end the call at once (``HangUp``).
- :class:`Record`: hand this fact to the call recorder (keys, and keypad tool results with
  sensitive digits masked).
- :class:`Note`: a log line (never holds sensitive digits).

Invariants: sensitive digits appear in a :class:`ToolReply` (the tool result the model needs)
and in a ``DtmfPressed(sensitive=True)`` fact (the record builder masks it, and must see the
digit to merge the fact with Twilio's own ``dtmf`` event), never in a :class:`Note` or a
``ToolFinished`` fact (masked); the idle timer counts only while nobody
speaks and no tool (the keypad collection included) runs; after the AMD detector finished the
call (voicemail, fax) the idle timer and the keypad are switched off; a key or caller speech
during the idle goodbye revives the conversation (the core cancels the pending end, as for an
interrupted ``end_call`` goodbye).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bridge.agent import events as ag
from bridge.call import amd as amd_mod
from bridge.call.amd import AnsweringMachineDetector
from bridge.call.idle import Goodbye, IdleTimer, Reprompt
from bridge.call.keypad import TOOL_NAME as KEYPAD_TOOL
from bridge.call.keypad import Keypad, KeyRecorded, TellAgent, ToolResult
from bridge.phone import media as tw
from bridge.records import facts as fx


@dataclass(frozen=True, slots=True)
class AgentSend:
    text: str


@dataclass(frozen=True, slots=True)
class ToolReply:
    tool_call_id: str
    result: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class FinalReply:
    instructions: str
    reason: str
    clear_first: bool = False


@dataclass(frozen=True, slots=True)
class SayAndHangUp:
    message: str
    reason: str


@dataclass(frozen=True, slots=True)
class HangUpNow:
    reason: str


@dataclass(frozen=True, slots=True)
class Record:
    fact: fx.Fact


@dataclass(frozen=True, slots=True)
class Note:
    level: int
    message: str


Out = AgentSend | ToolReply | FinalReply | SayAndHangUp | HangUpNow | Record | Note


class Conversation:
    """One call's keypad, idle timers and answering-machine handling.

    Args:
        keypad: the keypad (keys outside a collection, ``DTMF_TO_AGENT``); a default one when
            omitted.
        keypad_tool: ``KEYPAD_TOOL``: ``collect_digits`` is offered and answered here
            (:meth:`claims`).
        idle: the idle-caller timers (None, or both ``IDLE_*_S`` 0: off).
        amd: the answering-machine detector (None: inbound calls and ``AMD=off``).
    """

    def __init__(
        self,
        *,
        keypad: Keypad | None = None,
        keypad_tool: bool = True,
        idle: IdleTimer | None = None,
        amd: AnsweringMachineDetector | None = None,
    ) -> None:
        self.keypad = keypad if keypad is not None else Keypad()
        self.keypad_tool = keypad_tool
        self.idle = idle if idle is not None and idle.enabled else None
        self.amd = amd
        # Who is ending the call: "idle" (the goodbye; the caller may still interrupt it) or
        # "amd" (voicemail or fax: final). None while the conversation runs.
        self.ending: str | None = None

    @classmethod
    def for_call(
        cls,
        *,
        outbound: bool,
        greeting: str,
        now: float,
        keypad_tool: bool,
        dtmf_to_agent: bool,
        idle_reprompt_s: float,
        idle_hangup_s: float,
        amd: bool,
        amd_wait_s: float,
        voicemail_message: str,
    ) -> Conversation:
        """From the settings of the same names (``now``: when the stream started)."""
        return cls(
            keypad=Keypad(dtmf_to_agent=dtmf_to_agent),
            keypad_tool=keypad_tool,
            idle=IdleTimer(reprompt_s=idle_reprompt_s, hangup_s=idle_hangup_s),
            amd=AnsweringMachineDetector(
                greeting=greeting, voicemail_message=voicemail_message, wait_s=amd_wait_s, answered_at=now
            )
            if amd and outbound
            else None,
        )

    # --- what the core asks ---------------------------------------------------------------

    @property
    def hold_greeting(self) -> bool:
        """Open the upstream session with ``greeting: ""``: it is requested later (AMD)."""
        return self.amd is not None

    @property
    def forward_caller_audio(self) -> bool:
        """Whether caller audio goes upstream now (not while AMD is still deciding)."""
        return self.amd is None or self.amd.listening

    def claims(self, tool_name: str) -> bool:
        """True for a tool call this machine answers (the core must not run it as a Python tool)."""
        return self.keypad_tool and tool_name == KEYPAD_TOOL

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must run next (None: no timer pending)."""
        deadlines = [
            d
            for d in (
                self.keypad.next_deadline(),
                self.idle.next_deadline() if self.idle and self.ending is None else None,
                self.amd.next_deadline() if self.amd else None,
            )
            if d is not None
        ]
        return min(deadlines, default=None)

    # --- inputs ---------------------------------------------------------------------------

    def session_ready(self, now: float, *, greeting: bool) -> list[Out]:
        """The upstream session is ready. ``greeting``: whether it speaks a greeting now (if not,
        the idle timer starts counting from here)."""
        out: list[Out] = []
        if self.amd is not None:
            out += self._amd(self.amd.agent_ready(now))
        elif self.idle and not greeting:
            self.idle.arm(now)
        return out

    def agent_event(self, event: ag.AgentEvent, now: float) -> list[Out]:
        """An event from the agent, after the call state handled it."""
        idle = self.idle
        if isinstance(event, ag.SpeechStarted):
            if idle:
                idle.caller_started(now)
            if self.ending == "idle":
                self.ending = None  # the caller interrupted the goodbye: the core cancels the end
        elif isinstance(event, ag.SpeechStopped | ag.TranscriptUser):
            if idle:
                idle.caller_stopped(now)
        elif isinstance(event, ag.ReplyStarted):
            if idle:
                idle.agent_started(now)
        elif isinstance(event, ag.ToolCall) and self.claims(event.name):
            return self._collect(event, now)
        return []

    def reply_heard(self, now: float) -> None:
        """A reply's last mark echoed (heard, or flushed by a clear): the agent is quiet."""
        if self.idle:
            self.idle.agent_heard(now)

    def phone_event(self, event: tw.TwilioEvent, now: float) -> list[Out]:
        """An event from Twilio (only ``dtmf`` matters here)."""
        if not isinstance(event, tw.Dtmf) or self.ending == "amd":
            return []
        if self.idle:
            self.idle.key_pressed(now)
            if self.ending == "idle":
                self.ending = None  # a key during the goodbye: the caller is there after all
        return self._keypad_step(self.keypad.press(event.digit, now), now)

    def tool_started(self, now: float) -> None:
        """A Python tool started running (the agent is busy, not the caller idle)."""
        if self.idle:
            self.idle.tool_started(now)

    def tool_finished(self, now: float) -> None:
        if self.idle:
            self.idle.tool_finished(now)

    def amd_result(self, answered_by: str, now: float) -> list[Out]:
        """Twilio's ``AnsweredBy`` for this call (from :mod:`bridge.call.signals`)."""
        if self.amd is None:
            return [Note(logging.INFO, "AMD result for a call without AMD: ignored")]
        return self._amd(self.amd.result(answered_by, now))

    def upstream_replaced(self, now: float) -> None:
        """A fresh upstream session replaced the old one (recovery): a running keypad
        collection belongs to a tool call the new session never made, so it is dropped."""
        if self.keypad.next_deadline() is not None:
            self.keypad.cancel()
            if self.idle:
                self.idle.tool_finished(now)

    def tool_discarded(self, tool_call_id: str, now: float) -> list[Out]:
        """The reply that made this tool call was interrupted, so its result will never be sent
        (reference §7): a keypad collection running for it stops here, not at its timeout."""
        if not self.keypad.cancel_call(tool_call_id):
            return []
        if self.idle:
            self.idle.tool_finished(now)
        cancelled = ag.tool_error("the collection was cancelled: the caller interrupted the reply that asked for it")
        return [
            Note(logging.INFO, f"keypad collection for {tool_call_id} cancelled: its reply was interrupted"),
            Record(fx.ToolFinished(tool_call_id, cancelled, True, now)),  # the record shows how it ended
        ]

    def tick(self, now: float) -> list[Out]:
        """Run every timer due at ``now``."""
        out = self._keypad_step(self.keypad.tick(now), now)
        if self.amd is not None:
            out += self._amd(self.amd.tick(now))
        if self.idle and self.ending is None:
            for action in self.idle.tick(now):
                if isinstance(action, Reprompt):
                    out += [Note(logging.INFO, "idle caller: asking whether they are still there")]
                    out.append(AgentSend(ag.reply_create(action.instructions)))
                elif isinstance(action, Goodbye):
                    self.ending = "idle"
                    out += [Note(logging.INFO, "idle caller: saying goodbye")]
                    out.append(FinalReply(action.instructions, "the caller stayed silent"))
        return out

    # --- helpers --------------------------------------------------------------------------

    def _collect(self, event: ag.ToolCall, now: float) -> list[Out]:
        tool_call_id = event.tool_call_id
        out: list[Out] = [Record(fx.ToolStarted(tool_call_id, event.name, dict(event.arguments or {}), now))]
        if self.idle:
            self.idle.tool_started(now)
        if self.ending == "amd":
            results = self.keypad.refuse(tool_call_id, "the call is ending: no keypad input now")
        elif event.arguments is None:
            why = (event.arguments_error or "not a JSON object")[:200]
            results = self.keypad.refuse(tool_call_id, f"the arguments could not be read ({why}): send max_digits")
        else:
            results = self.keypad.start(tool_call_id, event.arguments, now)
        if results and self.idle:  # answered at once: no collection runs
            self.idle.tool_finished(now)
        return out + self._keypad(results, now)

    def _keypad_step(self, actions: list[Any], now: float) -> list[Out]:
        """Keypad actions after a key or a tick; a collection that ended frees the idle timer."""
        if self.idle and any(isinstance(a, ToolResult) for a in actions):
            self.idle.tool_finished(now)
        return self._keypad(actions, now)

    def _keypad(self, actions: list[Any], now: float) -> list[Out]:
        out: list[Out] = []
        for action in actions:
            if isinstance(action, KeyRecorded):
                out.append(Record(fx.DtmfPressed(action.digit, now, sensitive=action.sensitive)))
            elif isinstance(action, TellAgent):
                out.append(AgentSend(ag.reply_create(action.instructions)))
            elif isinstance(action, ToolResult):
                out.append(ToolReply(action.tool_call_id, action.result, action.is_error))
                out.append(Record(fx.ToolFinished(action.tool_call_id, action.logged, action.is_error, now)))
                out.append(Note(logging.INFO, f"collect_digits result {action.logged}"))
        return out

    def _amd(self, actions: list[amd_mod.AmdAction]) -> list[Out]:
        out: list[Out] = []
        for action in actions:
            if isinstance(action, amd_mod.AmdLog):
                out.append(Note(action.level, action.message))
            elif isinstance(action, amd_mod.Greet):
                out.append(AgentSend(ag.reply_create(action.instructions)))
            elif isinstance(action, amd_mod.LeaveVoicemail):
                self._finish()
                if action.via_agent:
                    out.append(FinalReply(action.instructions, "voicemail left", clear_first=action.interrupt))
                else:
                    out.append(SayAndHangUp(action.message, "voicemail left"))
            elif isinstance(action, amd_mod.HangUpNow):
                self._finish()
                out.append(HangUpNow(action.reason))
        return out

    def _finish(self) -> None:
        self.ending = "amd"
        self.keypad.cancel()
