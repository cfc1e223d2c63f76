"""What the call state machine decides, and what it is told: outcomes, actions, counts.

Pure data (frozen where the wire or the I/O shell consumes it): ``CallState`` returns lists of
these actions and the session performs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bridge.records import facts


class Outcome(Enum):
    CALLER_HUNG_UP = "caller_hung_up"
    AGENT_ENDED = "agent_ended"  # end_call tool
    TRANSFERRED = "transferred"
    UPSTREAM_FAILED = "upstream_failed"
    REJECTED = "rejected"  # the stream broke the rules before the call began
    TIME_LIMIT = "time_limit"
    SERVER_SHUTDOWN = "server_shutdown"
    STUCK = "stuck"


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendAgent:
    text: str
    audio: bool = False  # caller audio may be dropped when the upstream is slow; control never


@dataclass(frozen=True, slots=True)
class SendPhone:
    text: str
    epoch: int | None = None  # agent audio: dropped by the writer if a clear came after it


@dataclass(frozen=True, slots=True)
class ConnectAgent:
    """Open the upstream session: ``session.update`` built by ``CallState.session_config``, or
    ``session.resume`` of ``resume_session_id``. ``fresh``: a new session replacing one whose
    resume was refused (recovery): what was queued for the old one is dropped, not sent."""

    resume_session_id: str | None = None
    attempt: int = 0  # reconnects so far in this gap: the session backs off between them
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class RunTool:
    tool_call_id: str  # the agent's id for this tool call (ours is the call's call_id)
    name: str
    arguments: dict[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True)
class Transfer:
    tool_call_id: str
    number: str


@dataclass(frozen=True, slots=True)
class HangUp:
    reason: str


@dataclass(frozen=True, slots=True)
class SayAndHangUp:
    """Replace the call's TwiML with ``<Say>message</Say><Hangup/>`` (REST), then end the call
    (the agent is not up to speak it: a voicemail left before the session was ready)."""

    message: str
    reason: str


@dataclass(frozen=True, slots=True)
class EndCall:
    reason: str
    outcome: Outcome
    end_upstream: bool  # send session.end (a bare close keeps the session billed for 30 s)


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Fact:
    """Something the call recorder keeps (``setup.recorder.fact``); returned only with records on."""

    fact: facts.Fact


Action = SendAgent | SendPhone | ConnectAgent | RunTool | Transfer | HangUp | SayAndHangUp | EndCall | Log | Fact


@dataclass(slots=True)
class CallStats:
    frames_from_twilio: int = 0
    frames_to_agent: int = 0
    frames_dropped_pre_ready: int = 0
    frames_dropped_flood: int = 0
    frames_from_agent: int = 0
    frames_to_twilio: int = 0
    frames_dropped_interrupted: int = 0
    frames_dropped_backpressure: int = 0
    frames_dropped_gap: int = 0  # caller audio while the upstream was reconnecting or recovering
    resumes: int = 0
    recoveries: int = 0  # fresh sessions that replaced a refused resume
    invalid_twilio: int = 0
    invalid_agent: int = 0
    turns: int = 0
    barge_ins: int = 0
    tool_calls: int = 0
    upstream_errors: int = 0
    first_audio_at: float | None = None
    started_at: float | None = None
