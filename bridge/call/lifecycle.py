"""The upstream (Voice Agent) session's lifecycle, a pure sub-machine of ``CallState``.

It decides where the call's upstream session stands — connecting, ready, resuming after a drop,
recovering with a fresh session after a refused resume, over — and which of its deadlines
(ready, resume, recovery) has passed. ``CallState`` feeds it the upstream's events and turns its
answers into actions and log lines; the agent leg's retry pacing is ``call/upstream.py``.

States (``Phase``) and transitions, all in this module:

    AWAITING_START --start--> CONNECTING --ready--> LIVE
    LIVE --closed (a session id, resume_window_s > 0)--> RECONNECTING
    RECONNECTING --closed (before the resume deadline)--> RECONNECTING (the next attempt)
    RECONNECTING --ready--> LIVE (resumed)
    RECONNECTING --error (a resume-failed code, recovery on, under max_recoveries)--> RECOVERING
    RECOVERING --ready--> LIVE (recovered: a fresh session)
    any --end--> ENDING (final: nothing leaves it)

Invariants:
- Caller audio may go upstream only in LIVE (``CallState`` reads ``phase``).
- The ready deadline runs from ``start`` to the first ``ready``. The resume deadline runs from
  the drop of a LIVE session for ``resume_window_s``; every attempt inside that window is
  numbered from 1, and a ``ready`` or a recovery clears it. A drop while RECONNECTING past the
  deadline, or without a session id or a resume window, ends the upstream.
- A recovery starts at most ``max_recoveries`` times per call. Its deadline (``recovery_s``
  from the refusal) is met once the phase is LIVE and more agent audio went to Twilio than when
  the fresh session became ready (``CallStats.frames_to_twilio``).
- Any error before a session is ready (CONNECTING, RECONNECTING, RECOVERING) is fatal, except a
  refused resume that starts a recovery; live, only the service's fatal codes are.
- ``upstream_ended`` (the upstream session is over: ``session.ended`` or its socket gone) never
  goes back to False. ``CallStats.resumes`` and ``CallStats.recoveries`` count the LIVE
  re-entries from RECONNECTING and RECOVERING.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from bridge.agent.events import RESUME_FAILED_CODES, RETRYABLE_CONNECT_CODES
from bridge.call.actions import CallStats

MAX_RECOVERIES = 3  # per call: a service that refuses every resume must not loop for the whole call


class Phase(Enum):
    AWAITING_START = "awaiting_start"
    CONNECTING = "connecting"  # start seen, upstream not ready yet
    LIVE = "live"
    RECONNECTING = "reconnecting"
    RECOVERING = "recovering"  # resume refused: a fresh session is opening
    ENDING = "ending"


_OPEN = frozenset({Phase.CONNECTING, Phase.LIVE, Phase.RECONNECTING, Phase.RECOVERING})
_NOT_READY = frozenset({Phase.CONNECTING, Phase.RECONNECTING, Phase.RECOVERING})


class Ready(Enum):
    """What a ``session.ready`` was."""

    FIRST = "first"  # the call's first session is up
    AGAIN = "again"  # another ready outside a resume or a recovery (a duplicate)
    RESUMED = "resumed"
    RECOVERED = "recovered"  # a fresh session replaced a refused resume


class Verdict(Enum):
    """What a ``session.error`` means for the call."""

    GOES_ON = "goes_on"
    FATAL = "fatal"
    RECOVER = "recover"  # the resume was refused: a fresh session is opening (phase RECOVERING)


class ConnectFailure(Enum):
    """Which connect could not be made."""

    OPEN = "open"  # the call's first session
    RESUME = "resume"
    RECOVERY = "recovery"  # the fresh session of a recovery


class Expired(Enum):
    """Which deadline passed."""

    READY = "ready"
    RESUME = "resume"
    RECOVERY = "recovery"


@dataclass(frozen=True, slots=True)
class Resume:
    """Connect again to resume ``session_id``; ``attempt`` counts from 1 in one resume window."""

    session_id: str
    attempt: int


class UpstreamLifecycle:
    """The upstream session's phase and deadlines for one call. See the module docstring."""

    __slots__ = (
        "_ready_deadline",
        "_ready_seen",
        "_recovery_deadline",
        "_recovery_frames",
        "_resume_attempts",
        "_resume_deadline",
        "drop_upstream",
        "max_recoveries",
        "phase",
        "ready_timeout_s",
        "recovered",
        "recovery_s",
        "resume_window_s",
        "session_id",
        "stats",
        "upstream_ended",
    )

    def __init__(
        self,
        stats: CallStats,
        *,
        ready_timeout_s: float,
        resume_window_s: float,
        recovery_s: float,
        max_recoveries: int = MAX_RECOVERIES,
    ) -> None:
        self.stats = stats
        self.ready_timeout_s = ready_timeout_s
        self.resume_window_s = resume_window_s
        self.recovery_s = recovery_s
        self.max_recoveries = max_recoveries
        self.phase = Phase.AWAITING_START
        self.session_id: str | None = None
        self.upstream_ended = False
        self.recovered = False
        self.drop_upstream = False  # the session stops reading the refused socket (and retires it)
        self._ready_seen = False
        self._ready_deadline: float | None = None
        self._resume_deadline: float | None = None
        self._resume_attempts = 0
        self._recovery_deadline: float | None = None
        self._recovery_frames = 0

    def start(self, now: float) -> None:
        """Twilio's ``start``: the first session is connecting (from AWAITING_START only)."""
        if self.phase is Phase.AWAITING_START:
            self.phase = Phase.CONNECTING
            self._ready_deadline = now + self.ready_timeout_s

    def ready(self, session_id: str, now: float) -> Ready:
        """A ``session.ready``: LIVE from here, whatever came before (not after ``end``)."""
        was = self.phase
        if was is Phase.ENDING:
            return Ready.AGAIN
        first = not self._ready_seen
        self._ready_seen = True
        self.phase = Phase.LIVE
        self.session_id = session_id
        self._ready_deadline = None
        self._resume_deadline = None
        if was is Phase.RECONNECTING:
            self.stats.resumes += 1
            return Ready.RESUMED
        if was is Phase.RECOVERING:
            self.stats.recoveries += 1
            self.recovered = True
            self._recovery_frames = self.stats.frames_to_twilio  # heard once more agent audio went out
            return Ready.RECOVERED
        return Ready.FIRST if first else Ready.AGAIN

    def closed(self, now: float) -> Resume | None:
        """The upstream socket closed without ``session.ended``: resume it while the window allows
        (a ``Resume`` to connect with), else ``None``: the upstream is over."""
        if self.session_id is not None and self.resume_window_s > 0:
            if self.phase is Phase.LIVE:
                self.phase = Phase.RECONNECTING
                self._resume_deadline = now + self.resume_window_s
                self._resume_attempts = 1
                return Resume(self.session_id, 1)
            deadline = self._resume_deadline
            if self.phase is Phase.RECONNECTING and deadline is not None and now < deadline:
                self._resume_attempts += 1
                return Resume(self.session_id, self._resume_attempts)
        self.upstream_ended = True
        return None

    def connect_failed(self) -> ConnectFailure:
        """A connect (first, resume or recovery) could not be made: the call ends (the caller
        calls :meth:`end`). Not called once ENDING (nothing was connecting)."""
        if self.phase is Phase.RECONNECTING:
            return ConnectFailure.RESUME
        if self.phase is Phase.RECOVERING:
            return ConnectFailure.RECOVERY
        self.upstream_ended = True
        return ConnectFailure.OPEN

    def ended(self) -> None:
        """A ``session.ended``: the service closed the session."""
        self.upstream_ended = True

    def error(self, code: str, fatal: bool, now: float) -> Verdict:
        """A ``session.error`` with ``code`` (``fatal``: one after which the service closes)."""
        if (
            self.phase is Phase.RECONNECTING
            and code in RESUME_FAILED_CODES
            and self.recovery_s > 0
            and self.stats.recoveries < self.max_recoveries
        ):
            self.phase = Phase.RECOVERING
            self.drop_upstream = True
            self._resume_deadline = None
            self._recovery_deadline = now + self.recovery_s
            return Verdict.RECOVER
        if fatal or self.phase in _NOT_READY:  # any error before ready was fatal live (closes 1008)
            return Verdict.FATAL
        return Verdict.GOES_ON

    def refused_for_now(self, code: str) -> bool:
        """A refusal of a fresh session that another connect may pass (reference §8)."""
        return (self.phase is Phase.CONNECTING or self.phase is Phase.RECOVERING) and code in RETRYABLE_CONNECT_CODES

    def expired(self, now: float) -> Expired | None:
        """The first deadline that has passed at ``now`` (ready, resume, recovery), if any."""
        if self.phase is Phase.ENDING:
            return None
        if self._ready_deadline is not None and now >= self._ready_deadline:
            return Expired.READY
        if self._resume_deadline is not None and now >= self._resume_deadline:
            return Expired.RESUME
        if self._recovery_deadline is not None:
            if self.phase is Phase.LIVE and self.stats.frames_to_twilio > self._recovery_frames:
                self._recovery_deadline = None  # the caller hears the agent again
            elif now >= self._recovery_deadline:
                return Expired.RECOVERY
        return None

    def end(self, *, upstream: bool = True) -> bool:
        """The call ends (ENDING, final). Whether to end the upstream session too: asked
        (``upstream``), one was open or opening, and it is not over already."""
        had_upstream = self.phase in _OPEN
        self.phase = Phase.ENDING
        return upstream and had_upstream and not self.upstream_ended
