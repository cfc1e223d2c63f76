"""The call record builder, pure (sans-IO): parsed Twilio and agent events, facts and the call's
clock in; one JSON-ready record out.

Invariants:
- Only in-memory appends and updates per input; the record (a plain dict of JSON types) is made
  only by :meth:`RecordBuilder.build`, at the end of the call or when a live record is asked for.
- Bounded: at most ``MAX_TURNS`` turns, ``MAX_TOOLS`` tool runs, ``MAX_DTMF`` digits and
  ``MAX_ERRORS`` upstream errors are kept (the rest are counted in ``truncated``); a text or tool
  result longer than its cap is cut and ends with :data:`TRUNCATED_MARK` plus how much was cut.
  Text is otherwise kept exactly (quotes, newlines, NUL, emoji, RTL).
- Times: every ``now``/``at`` is the call's monotonic clock; wall time is ``origin_wall +
  (at - origin_mono)``, written as ISO 8601 UTC.
- What the caller heard comes from the marks Twilio echoed (``MarkPlayed``): ``heard_ms`` is the
  offset of the reply's last heard mark; a mark flushed by a ``clear`` was not heard and makes the
  reply ``interrupted``. ``heard_text``: the words of ``transcript.agent.delta`` whose ``end_ms``
  ≤ ``heard_ms``; without word timings, the service's trimmed ``transcript.agent`` text for an
  interrupted reply, else the whole text. ``text`` is always what the agent said.
- A reply that was neither interrupted nor cut by the end of the call was heard whole.

Field names of the record are an external API (issue 13): keep them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.agent import events as ag
from bridge.phone import media as tw
from bridge.records import facts as fx

MAX_TURNS = 10_000
MAX_TOOLS = 1_000
MAX_DTMF = 1_000
MAX_ERRORS = 50
MAX_TEXT_CHARS = 32_768  # one turn's text: minutes of speech
MAX_RESULT_CHARS = 65_536  # one tool result or its arguments as JSON
MAX_WORDS = 4_096  # word timings kept per reply
TRUNCATED_MARK = "…[truncated]"
MASK = "***"
_NO_SPACE_BEFORE = frozenset(",.;:!?)]}%'\"\u2019\u201d\u2026")  # no space before these


def iso(wall_s: float) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``."""
    return datetime.fromtimestamp(wall_s, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cap_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` if it fits, else its first ``limit`` characters, the marker and the cut length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}{TRUNCATED_MARK} ({len(text) - limit} more characters)"


def mask(value: str) -> str:
    """Masked value: phone-number-like values keep their last two characters (enough to tell two
    callers apart on the console), anything shorter is masked whole."""
    return MASK + value[-2:] if len(value) >= 10 else MASK


def join_words(pieces: list[str]) -> str:
    """Join ``transcript.agent.delta`` pieces: kept as sent when they carry their own spacing,
    else one space between words and none before punctuation."""
    out: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        if out and not out[-1][-1:].isspace() and not piece[0].isspace() and piece[0] not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(piece)
    return "".join(out)


@dataclass(slots=True)
class _Word:
    text: str
    end_ms: int | None


@dataclass(slots=True)
class _AgentTurn:
    reply_id: str
    started_at: float
    words: list[_Word] = field(default_factory=list)
    transcript: str | None = None  # the service's transcript.agent text (trimmed on barge-in)
    service_interrupted: bool = False
    done: bool = False
    audio_at: float | None = None
    response_ms: int | None = None
    first_audio_ms: int | None = None
    heard_ms: int = 0
    said_ms: int = 0  # forwarded audio up to the reply's last mark, heard or flushed
    flushed: bool = False

    @property
    def interrupted(self) -> bool:
        return self.flushed or self.service_interrupted

    def said_text(self) -> str:
        if self.words:
            return join_words([w.text for w in self.words])
        return self.transcript or ""

    def timed(self) -> bool:
        return any(w.end_ms is not None for w in self.words)


@dataclass(slots=True)
class _Tool:
    tool_call_id: str
    name: str
    arguments: Any
    started_at: float
    result: str | None = None
    is_error: bool | None = None
    finished_at: float | None = None


@dataclass(slots=True)
class _Digit:
    digit: str
    at: float
    sensitive: bool = False
    from_phone: bool = False
    from_fact: bool = False


class RecordBuilder:
    """Everything one call's record needs, appended as the call goes.

    Args:
        call_id: our id of the call (logs carry it).
        direction: ``"inbound"`` or ``"outbound"`` (a ``Direction`` custom parameter overrides).
        origin_mono, origin_wall: one instant on the call's clock and on the wall clock.
        redact: names of custom parameters whose values are masked (``From``/``To`` mask those
            fields too); compared case-insensitively.
    """

    def __init__(
        self,
        call_id: str,
        direction: str,
        *,
        origin_mono: float,
        origin_wall: float,
        redact: frozenset[str] = frozenset(),
    ) -> None:
        self.call_id = call_id
        self.direction = direction
        self._origin_mono = origin_mono
        self._origin_wall = origin_wall
        self._redact = frozenset(name.lower() for name in redact)
        self.created_at = origin_mono
        self.call_sid = ""
        self.stream_started_at: float | None = None
        self.stopped_at: float | None = None
        self.custom_parameters: dict[str, str] = {}
        self.session_ids: list[str] = []
        self.recovered = False  # a fresh session replaced a refused resume (issue 15)
        self.answered_by: str | None = None  # Twilio's AMD result (outbound calls with AMD)
        self.errors: list[dict[str, Any]] = []
        self.turns: list[_AgentTurn | dict[str, Any]] = []
        self.replies: dict[str, _AgentTurn] = {}
        self._last_reply: _AgentTurn | None = None
        self.tools: dict[str, _Tool] = {}
        self.dtmf: list[_Digit] = []
        self.truncated: dict[str, int] = {}
        self.upstream_open_s = 0.0
        self._upstream_since: float | None = None
        self._speech_started_at: float | None = None
        self._speech_stopped_at: float | None = None  # pending until a reply's first audio
        self._first_audio_seen = False
        self._caller_spoke = False
        self.outcome: str | None = None
        self.reason: str | None = None
        self.ended_at: float | None = None
        self.finished = False
        self.recording: str | None = None  # RECORD_AUDIO=on: the call's WAV file
        self.revision = 0  # bumped on every change, so a live view can tell what is new

    # --- inputs -------------------------------------------------------------------------------

    def phone(self, event: tw.TwilioEvent, now: float) -> None:
        """A parsed Twilio event (``Media`` is never passed; ``Mark`` is read through facts)."""
        if isinstance(event, tw.Start):
            self.call_sid = event.call_sid
            self.stream_started_at = now
            self.custom_parameters = dict(event.custom_parameters)
            direction = event.custom_parameters.get("Direction")
            if direction in ("inbound", "outbound"):
                self.direction = direction
        elif isinstance(event, tw.Dtmf):
            self._digit(event.digit, now, phone=True)
        elif isinstance(event, tw.Stop):
            self.stopped_at = now
        else:
            return
        self.revision += 1

    def agent(self, event: ag.AgentEvent, now: float) -> None:
        """A parsed agent event (``ReplyAudio`` is never passed: its first frame is a fact)."""
        if isinstance(event, ag.SpeechStarted):
            self._speech_started_at = now
            return
        if isinstance(event, ag.SpeechStopped):
            self._speech_stopped_at = now
            return
        if isinstance(event, ag.TranscriptUser):
            if event.text:
                started = self._speech_started_at if self._speech_started_at is not None else now
                self._add_turn({"speaker": "caller", "text": cap_text(event.text), "started_at": started})
                self._caller_spoke = True
            self._speech_started_at = None
        elif isinstance(event, ag.ReplyStarted):
            self._reply(event.reply_id, now)
        elif isinstance(event, ag.TranscriptAgent):
            turn = self._reply(event.reply_id, now)
            if turn is not None:
                turn.transcript = cap_text(event.text)
                turn.service_interrupted |= event.interrupted
        elif isinstance(event, ag.ReplyDone):
            turn = self._reply(event.reply_id, now)
            if turn is not None:
                turn.done = True
                turn.service_interrupted |= event.interrupted
        elif isinstance(event, ag.ToolCall):
            if event.tool_call_id not in self.tools:
                self._tool(event.tool_call_id, event.name, event.arguments, now)
        elif isinstance(event, ag.SessionReady):
            if event.session_id not in self.session_ids:
                self.session_ids.append(event.session_id)
        elif isinstance(event, ag.SessionError):
            if len(self.errors) < MAX_ERRORS:
                self.errors.append({"code": event.code, "message": event.message, "at": now})
            else:
                self._count_truncated("errors")
        elif isinstance(event, ag.TranscriptAgentDelta):
            self.agent_delta(event.reply_id, event.delta, event.end_ms, now)
        else:
            return
        self.revision += 1

    def agent_delta(self, reply_id: str, delta: str, end_ms: int | None, now: float) -> None:
        """One ``transcript.agent.delta``: a word (or a few) and when it ends in the reply audio."""
        turn = self._reply(reply_id, now)
        if turn is None or not isinstance(delta, str):
            return
        if len(turn.words) >= MAX_WORDS:
            self._count_truncated("words")
            return
        turn.words.append(_Word(delta[:MAX_TEXT_CHARS], end_ms if type(end_ms) is int else None))
        self.revision += 1

    def fact(self, fact: object) -> None:
        """A ``bridge.records.facts`` object; anything else is ignored."""
        if isinstance(fact, fx.MarkPlayed):
            turn = self.replies.get(fact.reply_id)
            if turn is None:
                return
            turn.said_ms = max(turn.said_ms, fact.offset_ms)
            if fact.heard:
                turn.heard_ms = max(turn.heard_ms, fact.offset_ms)
            else:
                turn.flushed = True
        elif isinstance(fact, fx.AudioWritten):
            turn = self._reply(fact.reply_id, fact.at)
            if turn is None or turn.audio_at is not None:
                return
            turn.audio_at = fact.at
            if self._speech_stopped_at is not None:
                turn.response_ms = _ms(fact.at - self._speech_stopped_at)
                self._speech_stopped_at = None
            if not self._first_audio_seen:
                self._first_audio_seen = True
                start = self.stream_started_at if self.stream_started_at is not None else self.created_at
                turn.first_audio_ms = _ms(fact.at - start)
        elif isinstance(fact, fx.ClearSent):
            return  # its effect arrives as flushed marks
        elif isinstance(fact, fx.UpstreamOpened):
            if self._upstream_since is None:
                self._upstream_since = fact.at
        elif isinstance(fact, fx.UpstreamClosed):
            if self._upstream_since is not None:
                self.upstream_open_s += max(0.0, fact.at - self._upstream_since)
                self._upstream_since = None
        elif isinstance(fact, fx.ToolStarted):
            tool = self.tools.get(fact.tool_call_id)
            if tool is None:
                self._tool(fact.tool_call_id, fact.name, fact.arguments, fact.at)
            else:
                tool.started_at = fact.at
                tool.name = fact.name or tool.name
        elif isinstance(fact, fx.ToolFinished):
            tool = self.tools.get(fact.tool_call_id)
            if tool is None:
                return
            tool.result = cap_text(fact.result, MAX_RESULT_CHARS)
            tool.is_error = fact.is_error
            tool.finished_at = fact.at
        elif isinstance(fact, fx.DtmfPressed):
            self._digit(fact.digit, fact.at, phone=False, sensitive=fact.sensitive)
        elif isinstance(fact, fx.SessionRecovered):
            self.recovered = True
        elif isinstance(fact, fx.AnsweredBy):
            self.answered_by = fact.answered_by[:40]
        elif isinstance(fact, fx.CallEnded):
            if self.outcome is None:
                self.outcome, self.reason, self.ended_at = fact.outcome, fact.reason, fact.at
        else:
            return
        self.revision += 1

    def finish(self, now: float) -> None:
        """The call is over: open upstream time is closed at ``now``; later inputs change nothing
        that matters (the record is final)."""
        if self.finished:
            return
        if self._upstream_since is not None:
            self.upstream_open_s += max(0.0, now - self._upstream_since)
            self._upstream_since = None
        if self.ended_at is None:
            self.ended_at = now
        self.finished = True
        self.revision += 1

    # --- state for live views -----------------------------------------------------------------

    def activity(self) -> str:
        """What is happening now: connecting, greeting, listening, agent speaking, tool running,
        ending, ended."""
        if self.finished:
            return "ended"
        if self.outcome is not None:
            return "ending"
        if self.stream_started_at is None or not self.session_ids:
            return "connecting"
        if any(t.finished_at is None for t in self.tools.values()):
            return "tool running"
        last = self._last_reply
        if last is not None and not last.done and not last.interrupted:
            return "agent speaking" if self._caller_spoke else "greeting"
        return "listening"

    def last_turn(self) -> dict[str, Any] | None:
        """The newest turn as it appears in the record (for a live ``turn`` event)."""
        return self.turn_json(self.turns[-1]) if self.turns else None

    # --- output -------------------------------------------------------------------------------

    def build(self, now: float, frames: dict[str, int] | None = None) -> dict[str, Any]:
        """The record so far (``live`` until :meth:`finish`). JSON types only."""
        start = self.stream_started_at if self.stream_started_at is not None else self.created_at
        end = self.ended_at if self.finished else None
        upstream_s = self.upstream_open_s
        if self._upstream_since is not None:
            upstream_s += max(0.0, now - self._upstream_since)
        params = {
            k: (mask(v) if k.lower() in self._redact else v) for k, v in self.custom_parameters.items()
        }
        record: dict[str, Any] = {
            "call_sid": self.call_sid,
            "call_id": self.call_id,
            "direction": self.direction,
            "from": self.party("From"),
            "to": self.party("To"),
            "started_at": iso(self.wall(start)),
            "ended_at": iso(self.wall(end)) if end is not None else None,
            "duration_s": round((end if end is not None else now) - start, 3),
            "outcome": self.outcome,
            "reason": self.reason,
            "live": not self.finished,
            "activity": self.activity(),
            "agent_session_ids": list(self.session_ids),
            "recovered": self.recovered,
            "answered_by": self.answered_by,
            "upstream_open_s": round(upstream_s, 3),
            "frames": dict(frames or {}),
            "recording": self.recording,
            "custom_parameters": params,
            "turns": [self.turn_json(t) for t in self.turns],
            "tools": [self.tool_json(t) for t in self.tools.values()],
            "dtmf": [{"digit": MASK if d.sensitive else d.digit, "at": iso(self.wall(d.at))} for d in self.dtmf],
            "errors": [{**e, "at": iso(self.wall(e["at"]))} for e in self.errors],
            "truncated": dict(self.truncated),
        }
        return record

    def agent_turns(self) -> list[_AgentTurn]:
        return [t for t in self.turns if isinstance(t, _AgentTurn)]

    def heard(self, turn: _AgentTurn) -> tuple[str, int]:
        """(heard_text, heard_ms) of a reply, by the rule of the module docstring."""
        said = turn.said_text()
        cut = turn.interrupted or (self.finished and not turn.done and turn.audio_at is not None)
        if not cut:
            last_end = max((w.end_ms for w in turn.words if w.end_ms is not None), default=0)
            return said, max(turn.heard_ms, turn.said_ms, last_end)
        if turn.timed():
            kept = [w.text for w in turn.words if w.end_ms is not None and w.end_ms <= turn.heard_ms]
            return join_words(kept), turn.heard_ms
        if turn.interrupted and turn.transcript is not None:
            return turn.transcript, turn.heard_ms
        return said, turn.heard_ms

    # --- helpers ------------------------------------------------------------------------------

    def wall(self, at: float) -> float:
        return self._origin_wall + (at - self._origin_mono)

    def party(self, name: str) -> str:
        value = self.custom_parameters.get(name, "")
        return mask(value) if value and name.lower() in self._redact else value

    def _count_truncated(self, what: str) -> None:
        self.truncated[what] = self.truncated.get(what, 0) + 1

    def _add_turn(self, turn: _AgentTurn | dict[str, Any]) -> bool:
        if len(self.turns) >= MAX_TURNS:
            self._count_truncated("turns")
            return False
        self.turns.append(turn)
        return True

    def _reply(self, reply_id: str, now: float) -> _AgentTurn | None:
        turn = self.replies.get(reply_id)
        if turn is None:
            if len(self.replies) >= MAX_TURNS:
                return None
            turn = _AgentTurn(reply_id, now)
            if not self._add_turn(turn):
                return None
            self.replies[reply_id] = turn
            self._last_reply = turn
        return turn

    def _tool(self, tool_call_id: str, name: str, arguments: Any, now: float) -> None:
        if len(self.tools) >= MAX_TOOLS:
            self._count_truncated("tools")
            return
        self.tools[tool_call_id] = _Tool(tool_call_id, name, _cap_arguments(arguments), now)

    def _digit(self, digit: str, at: float, *, phone: bool, sensitive: bool = False) -> None:
        # Twilio's dtmf event and the core's DtmfPressed fact describe the same key press, in the
        # same order: whichever comes first adds the digit, the other is merged into it.
        for entry in self.dtmf:
            mine, other = (entry.from_phone, entry.from_fact) if phone else (entry.from_fact, entry.from_phone)
            if entry.digit == digit and other and not mine:
                entry.from_phone = entry.from_fact = True
                entry.sensitive |= sensitive
                return
        if len(self.dtmf) >= MAX_DTMF:
            self._count_truncated("dtmf")
            return
        self.dtmf.append(_Digit(digit[:8], at, sensitive, from_phone=phone, from_fact=not phone))

    def turn_json(self, turn: _AgentTurn | dict[str, Any]) -> dict[str, Any]:
        if isinstance(turn, dict):
            return {**turn, "started_at": iso(self.wall(turn["started_at"]))}
        heard_text, heard_ms = self.heard(turn)
        return {
            "speaker": "agent",
            "text": turn.said_text(),
            "started_at": iso(self.wall(turn.started_at)),
            "reply_id": turn.reply_id,
            "heard_text": heard_text,
            "heard_ms": heard_ms,
            "said_ms": max(turn.said_ms, heard_ms),
            "interrupted": turn.interrupted,
            "response_ms": turn.response_ms,
            "first_audio_ms": turn.first_audio_ms,
        }

    def tool_json(self, tool: _Tool) -> dict[str, Any]:
        duration = _ms(tool.finished_at - tool.started_at) if tool.finished_at is not None else None
        return {
            "tool_call_id": tool.tool_call_id,
            "name": tool.name,
            "arguments": tool.arguments,
            "result": tool.result,
            "is_error": tool.is_error,
            "started_at": iso(self.wall(tool.started_at)),
            "duration_ms": duration,
        }


def frames_summary(stats: object) -> dict[str, int]:
    """The ``frames`` counters of a ``CallStats``-like object: its ``frames_*`` fields, prefix cut."""
    try:
        names = [f.name for f in fields(stats)]  # type: ignore[arg-type]
    except TypeError:
        return {}
    return {n[len("frames_") :]: int(getattr(stats, n)) for n in names if n.startswith("frames_")}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The list view of a record (``GET /api/calls``)."""
    turns = record.get("turns") or []
    return {
        "call_sid": record.get("call_sid"),
        "call_id": record.get("call_id"),
        "direction": record.get("direction"),
        "from": record.get("from"),
        "to": record.get("to"),
        "started_at": record.get("started_at"),
        "ended_at": record.get("ended_at"),
        "duration_s": record.get("duration_s"),
        "outcome": record.get("outcome"),
        "reason": record.get("reason"),
        "live": record.get("live"),
        "upstream_open_s": record.get("upstream_open_s"),
        "turn_count": len(turns),
        "tool_count": len(record.get("tools") or []),
        "interrupted_count": sum(1 for t in turns if t.get("interrupted")),
    }


def search_text(record: dict[str, Any]) -> str:
    """What text search looks through: every turn's said and heard text, one per line, without NUL
    (PostgreSQL text cannot hold it; the record itself keeps it, escaped in JSON)."""
    parts: list[str] = []
    for turn in record.get("turns") or []:
        parts.append(str(turn.get("text", "")))
        heard = turn.get("heard_text")
        if heard and heard != turn.get("text"):
            parts.append(str(heard))
    return "\n".join(parts).replace("\x00", " ")


def _cap_arguments(arguments: Any) -> Any:
    # Once per tool call: arguments bigger than a result may be are kept as capped JSON text.
    try:
        encoded = orjson.dumps(arguments)
    except (TypeError, orjson.JSONEncodeError):
        return repr(arguments)[:MAX_RESULT_CHARS]
    if len(encoded) <= MAX_RESULT_CHARS:
        return arguments
    return cap_text(encoded.decode(), MAX_RESULT_CHARS)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


__all__ = ["MASK", "MAX_TURNS", "TRUNCATED_MARK", "RecordBuilder", "cap_text", "frames_summary", "iso", "summary"]
