"""Answering-machine detection on outbound calls: when the agent may speak, and what it says.

Pure (sans-IO): Twilio's asynchronous AMD result (``AnsweredBy`` of the ``POST /amd-status``
callback), the agent session becoming ready and the call's clock go in; what to do comes out
as a list of actions. No trio, no sockets; time enters only as ``now`` (the call's monotonic
clock, the same one the session uses).

Invariants:
- Nothing is said to a callee before a person is known to be there: ``AnsweredBy`` ``human`` or
  ``unknown``, or ``wait_s`` (``AMD_WAIT_S``) passing since the call was answered without a
  result. The greeting is then requested once (:class:`Greet`), and only once the agent is up.
- ``machine_end_beep`` / ``machine_end_silence`` / ``machine_end_other``: the voicemail message
  is left once (:class:`LeaveVoicemail`), spoken by the agent when it is up, else as ``<Say>``
  TwiML; the call ends after it was heard. ``fax``: :class:`HangUpNow`. ``machine_start`` (a
  machine, its greeting still playing): wait for the end, at most ``machine_end_timeout_s``.
- A result that comes after a greeting given because ``wait_s`` passed (a late answer) still
  counts for machines and faxes (the voicemail interrupts what is playing); after a person was
  known, later results change nothing. Duplicated results are ignored.
- After :class:`LeaveVoicemail` or :class:`HangUpNow` the detector is finished: every later
  input returns no action.
- The agent hears the callee (:attr:`AnsweringMachineDetector.listening`) only once greeted:
  before, a machine's greeting would make it answer by itself (its voice activity detection
  starts a reply), so caller audio is held back (dropped and counted by the session).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum, StrEnum

# Twilio's MachineDetectionTimeout default: by then Twilio has sent its final answer anyway.
MACHINE_END_TIMEOUT_S = 30.0


class AnsweredBy(StrEnum):
    """Twilio's ``AnsweredBy`` values (reference twilio.md 6b); the record keeps them as they are."""

    HUMAN = "human"
    MACHINE_START = "machine_start"
    MACHINE_END_BEEP = "machine_end_beep"
    MACHINE_END_SILENCE = "machine_end_silence"
    MACHINE_END_OTHER = "machine_end_other"
    FAX = "fax"
    UNKNOWN = "unknown"


PERSON = frozenset({AnsweredBy.HUMAN, AnsweredBy.UNKNOWN})
MACHINE_END = frozenset(
    {AnsweredBy.MACHINE_END_BEEP, AnsweredBy.MACHINE_END_SILENCE, AnsweredBy.MACHINE_END_OTHER}
)


def parse_answered_by(value: str) -> AnsweredBy | None:
    """The ``AnsweredBy`` of a callback, or None for a value Twilio does not document."""
    try:
        return AnsweredBy(value.strip().lower())
    except ValueError:
        return None


class AmdPhase(Enum):
    WAITING = "waiting"  # no result yet, nothing said
    MACHINE = "machine"  # machine_start: its greeting is playing, waiting for the beep
    GREETED = "greeted"  # a person is (assumed) there: the conversation runs
    FINISHED = "finished"  # voicemail left or hung up: nothing more to decide


@dataclass(frozen=True, slots=True)
class Greet:
    """Send ``reply.create`` with these instructions (the session was opened without greeting)."""

    instructions: str


@dataclass(frozen=True, slots=True)
class LeaveVoicemail:
    """Leave ``message``, then end the call once it was heard.

    ``via_agent``: send ``reply.create(instructions)`` and hang up when that reply's last mark
    echoes (as ``end_call`` does). Otherwise the agent is not up: replace the call's TwiML with
    ``<Say>message</Say><Hangup/>`` through the REST API (Twilio then stops the stream) and end
    the upstream session. ``interrupt``: something is playing (a greeting given on the timer):
    ``clear`` it first.
    """

    message: str
    instructions: str
    via_agent: bool
    interrupt: bool = False


@dataclass(frozen=True, slots=True)
class HangUpNow:
    """End the call at once (a fax machine answered)."""

    reason: str


@dataclass(frozen=True, slots=True)
class AmdLog:
    level: int
    message: str


AmdAction = Greet | LeaveVoicemail | HangUpNow | AmdLog


def greeting_instructions(greeting: str) -> str:
    """``reply.create`` instructions that make the agent say the configured greeting."""
    return (
        "A person has just answered the phone. Greet them by saying exactly this, "
        f"word for word, and nothing else: {greeting}"
    )


def voicemail_instructions(message: str) -> str:
    """``reply.create`` instructions that make the agent leave the voicemail message."""
    return (
        "You have reached an answering machine and its beep has sounded: nobody is listening "
        "live. Leave this message, word for word, and say nothing else: "
        f"{message}"
    )


class AnsweringMachineDetector:
    """One outbound call's AMD decisions.

    Args:
        greeting: what the agent says first once a person is there (empty: the agent waits for
            the callee to speak, no :class:`Greet` is sent).
        voicemail_message: ``VOICEMAIL_MESSAGE``.
        wait_s: ``AMD_WAIT_S``: greet anyway when no result came this long after the answer.
        answered_at: when the call was answered (the stream started), on the call's clock.
        machine_end_timeout_s: after ``machine_start``, leave the voicemail anyway this long
            after the answer if Twilio never says the greeting ended.

    The session calls :meth:`agent_ready` when the upstream session is ready, :meth:`result`
    for each AMD callback of this call, and :meth:`tick` at :meth:`next_deadline`.
    """

    def __init__(
        self,
        *,
        greeting: str,
        voicemail_message: str,
        wait_s: float,
        answered_at: float,
        machine_end_timeout_s: float = MACHINE_END_TIMEOUT_S,
    ) -> None:
        self.greeting = greeting
        self.voicemail_message = voicemail_message
        self.phase = AmdPhase.WAITING
        self.answered_by: AnsweredBy | None = None  # the first documented result: the record's
        self.agent_up = False
        self.greeted_on_timer = False
        self._wait_until = answered_at + wait_s
        self._machine_until = answered_at + max(wait_s, machine_end_timeout_s)
        self._person_known = False

    @property
    def listening(self) -> bool:
        """Whether caller audio may go to the agent (only once a person is assumed there)."""
        return self.phase is AmdPhase.GREETED

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must run next, or None when no timer is pending."""
        if self.phase is AmdPhase.WAITING and not self._person_known:
            return self._wait_until
        if self.phase is AmdPhase.MACHINE:
            return self._machine_until
        return None

    def agent_ready(self, now: float) -> list[AmdAction]:
        """The upstream session is ready: a greeting that was waiting for it goes out now."""
        self.agent_up = True
        if self.phase is AmdPhase.WAITING and (self._person_known or now >= self._wait_until):
            return self._greet(on_timer=not self._person_known)
        return []

    def result(self, value: str, now: float) -> list[AmdAction]:
        """Twilio's ``AnsweredBy`` for this call arrived (hostile text is tolerated)."""
        answered = parse_answered_by(value)
        if answered is None:
            shown = value[:40].encode("unicode_escape").decode("ascii")
            return [AmdLog(logging.WARNING, f"AMD: ignored an undocumented AnsweredBy {shown!r}")]
        if self.phase is AmdPhase.FINISHED:
            return []
        if self.answered_by is None or self.answered_by is AnsweredBy.MACHINE_START:
            self.answered_by = answered
        if self.phase is AmdPhase.GREETED and not self.greeted_on_timer:
            return [AmdLog(logging.INFO, f"AMD: {answered.value} after a person answered: ignored")]
        log = AmdLog(logging.INFO, f"AMD: answered by {answered.value}")
        if answered is AnsweredBy.FAX:
            self.phase = AmdPhase.FINISHED
            return [log, HangUpNow("a fax machine answered")]
        if answered in MACHINE_END:
            return [log, self._voicemail()]
        if answered is AnsweredBy.MACHINE_START:
            if self.phase is AmdPhase.WAITING:
                self.phase = AmdPhase.MACHINE
            return [log]
        # human or unknown
        if self.phase is AmdPhase.GREETED:  # greeted on the timer already: carry on
            self.greeted_on_timer = False
            return [log]
        self._person_known = True
        if self.phase is AmdPhase.MACHINE:  # Twilio changed its mind: talk to the person
            self.phase = AmdPhase.WAITING
        if self.agent_up:
            return [log, *self._greet(on_timer=False)]
        return [log]

    def tick(self, now: float) -> list[AmdAction]:
        """Run the timers: greet when ``wait_s`` passed, leave the voicemail after a stuck
        ``machine_start``."""
        if self.phase is AmdPhase.WAITING and not self._person_known and now >= self._wait_until:
            if not self.agent_up:
                return []  # agent_ready() greets
            return [
                AmdLog(logging.INFO, "AMD: no answer from Twilio in time: greeting anyway"),
                *self._greet(on_timer=True),
            ]
        if self.phase is AmdPhase.MACHINE and now >= self._machine_until:
            return [
                AmdLog(logging.INFO, "AMD: the machine's greeting never ended: leaving the voicemail"),
                self._voicemail(),
            ]
        return []

    def _greet(self, *, on_timer: bool) -> list[AmdAction]:
        self.phase = AmdPhase.GREETED
        self.greeted_on_timer = on_timer
        if not self.greeting.strip():
            return []
        return [Greet(greeting_instructions(self.greeting))]

    def _voicemail(self) -> LeaveVoicemail:
        interrupt = self.phase is AmdPhase.GREETED
        self.phase = AmdPhase.FINISHED
        return LeaveVoicemail(
            message=self.voicemail_message,
            instructions=voicemail_instructions(self.voicemail_message),
            via_agent=self.agent_up,
            interrupt=interrupt,
        )
