"""The caller goes quiet: ask whether they are still there, then say goodbye and end. Pure.

What happens on the call goes in (the agent started speaking, its last words were heard by
marks, the caller started/stopped speaking, a keypad key, a tool started/finished), with the
call's clock as ``now``; :meth:`IdleTimer.tick` returns what to do. No trio.

Invariants:
- The silence clock runs only while nobody is busy: not while the agent speaks (from its reply's
  start until its last mark echoed), not while the caller speaks, not while a tool runs. It
  starts from the moment the last of these ended; nothing runs before the agent's first words
  were heard, the caller's first sign of life, or :meth:`IdleTimer.arm`.
- ``reprompt_s`` of silence → one :class:`Reprompt`; then ``hangup_s`` more of silence (counted
  again after the reprompt was heard, and from the reprompt itself if it is never heard) →
  :class:`Goodbye`, once. ``0`` disables a step: with ``reprompt_s`` 0 the goodbye follows
  ``hangup_s`` of silence directly; with ``hangup_s`` 0 there is no goodbye.
- Caller speech, a key or a tool start the whole cycle again (the reprompt may come again after
  a later silence). The agent's own words do not: a reprompt heard does not earn another one.
- After :class:`Goodbye` nothing more is decided, unless the caller speaks or presses a key
  (the session then cancels the hang-up, as for an interrupted ``end_call`` goodbye).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEFAULT_REPROMPT_S = 8.0
DEFAULT_HANGUP_S = 15.0
REPROMPT_INSTRUCTIONS = (
    "The caller has said nothing for a while. Ask them, in one short sentence, whether they are "
    "still there. Do not repeat your previous answer."
)
GOODBYE_INSTRUCTIONS = (
    "The caller has not answered for a long time. Say a short, friendly goodbye in one sentence "
    "(for example that they are welcome to call again). Do not ask anything; the call ends after it."
)


class IdleStage(Enum):
    OFF = "off"  # not armed yet (the agent's first words not heard), or both steps disabled
    REPROMPT = "reprompt"  # counting towards the reprompt
    HANGUP = "hangup"  # reprompted (or reprompt disabled): counting towards the goodbye
    ENDED = "ended"  # goodbye requested


@dataclass(frozen=True, slots=True)
class Reprompt:
    """Send ``reply.create`` with ``instructions``."""

    instructions: str = REPROMPT_INSTRUCTIONS


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Send ``reply.create`` with ``instructions`` and end the call the way ``end_call`` does:
    once that reply's last mark echoed (the goodbye was heard), or at ``END_CALL_DEADLINE_S``."""

    instructions: str = GOODBYE_INSTRUCTIONS


IdleAction = Reprompt | Goodbye


class IdleTimer:
    """One call's idle-caller timers.

    Args:
        reprompt_s: ``IDLE_REPROMPT_S`` (0 disables the reprompt).
        hangup_s: ``IDLE_HANGUP_S`` (0 disables the goodbye).
    """

    def __init__(self, *, reprompt_s: float = DEFAULT_REPROMPT_S, hangup_s: float = DEFAULT_HANGUP_S) -> None:
        if reprompt_s < 0 or hangup_s < 0:
            raise ValueError("idle timers must not be negative")
        self.reprompt_s = reprompt_s
        self.hangup_s = hangup_s
        self.stage = IdleStage.OFF
        self._agent_speaking = False
        self._caller_speaking = False
        self._tools = 0
        self._since: float | None = None  # when the silence began (None: somebody is busy)

    @property
    def enabled(self) -> bool:
        return self.reprompt_s > 0 or self.hangup_s > 0

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must run next, or None while nothing is counting."""
        wait = self._wait()
        if wait is None or self._since is None:
            return None
        return self._since + wait

    # --- inputs -----------------------------------------------------------------------------

    def arm(self, now: float) -> None:
        """Start counting without waiting for the agent's words (e.g. no greeting)."""
        if self.stage is IdleStage.OFF and self.enabled:
            self.stage = self._first_stage()
            self._resume(now)

    def agent_started(self, now: float) -> None:
        """A reply started (``reply.started``, or its first audio)."""
        self._agent_speaking = True
        self._since = None

    def agent_heard(self, now: float) -> None:
        """The reply's last words were heard (its last mark echoed). Also call it for a reply
        that ended without being heard (flushed), so the silence is counted from then."""
        self._agent_speaking = False
        if self.stage is IdleStage.OFF and self.enabled:
            self.stage = self._first_stage()
        self._resume(now)

    def caller_started(self, now: float) -> None:
        """``input.speech.started``: the caller is there."""
        self._caller_speaking = True
        self._restart()
        self._since = None

    def caller_stopped(self, now: float) -> None:
        """``input.speech.stopped`` (or the final ``transcript.user``)."""
        self._caller_speaking = False
        self._restart()
        self._resume(now)

    def key_pressed(self, now: float) -> None:
        """A keypad key (Twilio ``dtmf``)."""
        self._restart()
        self._resume(now)

    def tool_started(self, now: float) -> None:
        self._tools += 1
        self._restart()
        self._since = None

    def tool_finished(self, now: float) -> None:
        self._tools = max(0, self._tools - 1)
        self._restart()
        self._resume(now)

    # --- the clock --------------------------------------------------------------------------

    def tick(self, now: float) -> list[IdleAction]:
        """What to do at ``now``: at most one action."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        if self.stage is IdleStage.REPROMPT:
            self.stage = IdleStage.HANGUP  # with hangup_s 0 nothing counts until the caller acts
            # Counted from the reprompt too, so a reply that never plays cannot hold the call.
            self._since = now
            return [Reprompt()]
        self.stage = IdleStage.ENDED
        self._since = None
        return [Goodbye()]

    # --- helpers ----------------------------------------------------------------------------

    def _first_stage(self) -> IdleStage:
        return IdleStage.REPROMPT if self.reprompt_s > 0 else IdleStage.HANGUP

    def _wait(self) -> float | None:
        if self.stage is IdleStage.REPROMPT:
            return self.reprompt_s
        if self.stage is IdleStage.HANGUP and self.hangup_s > 0:
            return self.hangup_s
        return None

    def _restart(self) -> None:
        """The caller (or a tool) showed signs of life: the whole cycle starts again."""
        if self.enabled:
            self.stage = self._first_stage()

    def _resume(self, now: float) -> None:
        busy = self._agent_speaking or self._caller_speaking or self._tools > 0
        self._since = None if busy or self.stage in (IdleStage.OFF, IdleStage.ENDED) else now
