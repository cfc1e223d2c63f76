"""Facts the call core hands the call recorder, pure (no I/O, no trio).

The session and the call state emit these for things only they know (a mark's fate, the first
audio of a reply, a clear, an upstream socket's lifetime, a tool run, a DTMF digit, the call's end).
Every ``at`` is the call's monotonic clock (the ``now`` CallState gets); the recorder turns it into
wall-clock time with an origin it is given. Frozen and slotted: facts are made on the hot path and
only appended by the recorder.

Contract: /work/notes/facts_contract.md (H-core emits, H-records consumes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """A playback mark Twilio echoed; ``offset_ms`` is the reply's audio forwarded up to the mark.

    ``heard`` is False when the mark was flushed by a clear (Twilio echoes those too).
    """

    reply_id: str
    offset_ms: int
    heard: bool
    at: float


@dataclass(frozen=True, slots=True)
class AudioWritten:
    """The first agent audio frame of a reply was queued for Twilio."""

    reply_id: str
    at: float


@dataclass(frozen=True, slots=True)
class ClearSent:
    """We sent Twilio a ``clear`` (barge-in)."""

    at: float


@dataclass(frozen=True, slots=True)
class UpstreamOpened:
    """An upstream (Voice Agent) socket opened: billing starts."""

    at: float


@dataclass(frozen=True, slots=True)
class UpstreamClosed:
    """An upstream (Voice Agent) socket closed: billing stops."""

    at: float


@dataclass(frozen=True, slots=True)
class ToolStarted:
    tool_call_id: str
    name: str
    arguments: dict[str, Any] = field(hash=False)
    at: float


@dataclass(frozen=True, slots=True)
class ToolFinished:
    tool_call_id: str
    result: str
    is_error: bool
    at: float


@dataclass(frozen=True, slots=True)
class DtmfPressed:
    """A keypad digit; ``sensitive`` (collected as a secret) masks it in the record."""

    digit: str
    at: float
    sensitive: bool = False


@dataclass(frozen=True, slots=True)
class AnsweredBy:
    """Twilio's answering-machine result for an outbound call (the record's ``answered_by``)."""

    answered_by: str
    at: float


@dataclass(frozen=True, slots=True)
class SessionRecovered:
    """A fresh upstream session replaced one whose resume was refused (``recovered: true``)."""

    session_id: str
    at: float


@dataclass(frozen=True, slots=True)
class CallEnded:
    outcome: str
    reason: str
    at: float


Fact = (
    MarkPlayed
    | AudioWritten
    | ClearSent
    | UpstreamOpened
    | UpstreamClosed
    | ToolStarted
    | ToolFinished
    | DtmfPressed
    | AnsweredBy
    | SessionRecovered
    | CallEnded
)
