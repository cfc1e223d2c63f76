"""Voice Agent API events, sans-IO: text in -> typed event (or typed error) out; builders out.

Invariants:
- ``parse`` never raises: any input yields an event class, :class:`UnknownEvent` or
  :class:`InvalidEvent`.
- ``reply.audio`` ``data`` is checked to be base64 and kept as the exact string received, so it
  can be placed into a Twilio frame untouched (zero transcoding).
- Error codes are compared lower-cased (live codes are lower-case, the docs show upper-case).

Reference: ../shared/reference/voice-agent-api.md §2-§4, §7-§8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.phone.media import is_base64
from bridge.wire import json_object

# Codes after which the service closes the session (reference §8).
FATAL_ERROR_CODES = frozenset(
    {
        "unauthorized",
        "forbidden",
        "internal_error",
        "at_capacity",
        "concurrency_exceeded",
        "agent_init_failed",
        "agent_timeout",
        "agent_not_found",
        "session_not_found",
        "session_forbidden",
        "session_expired",
    }
)
# Worth another connect attempt with backoff (reference §8).
RETRYABLE_CONNECT_CODES = frozenset({"at_capacity", "concurrency_exceeded", "internal_error", "server_error"})
# A resume that failed this way will never succeed: start over or end the call.
RESUME_FAILED_CODES = frozenset({"session_not_found", "session_forbidden", "session_expired"})
# Every documented code (reference §8): the labels a metric may use; any other code is "other".
ERROR_CODES = FATAL_ERROR_CODES | {
    "server_error",
    "invalid_format",
    "invalid_audio",
    "invalid_value",
    "immutable_field",
    "invalid_config",
    "agent_id_not_first",
    "audio_rate_violation",
}

# The call-control tools: the call core answers them itself (call/state.py, call/keypad.py), so a
# user tool may not take their names.
END_CALL_TOOL = "end_call"
TRANSFER_CALL_TOOL = "transfer_call"
COLLECT_DIGITS_TOOL = "collect_digits"
CALL_CONTROL_TOOLS = frozenset({END_CALL_TOOL, TRANSFER_CALL_TOOL, COLLECT_DIGITS_TOOL})

# A tool's result text for the model (``tool.result``'s ``result`` is a string, reference §2):
# JSON, ``{"ok": true}`` for a tool with nothing to say, ``{"error": ...}`` for every failure.
TOOL_OK = '{"ok":true}'


def tool_error(message: str) -> str:
    """The result text of a failed tool call: ``{"error": message}`` (a message for the model).
    Never raises: the message may quote a tool's exception, lone surrogates and all."""
    return orjson.dumps({"error": _utf8(message)}).decode()


def tool_ok(note: str) -> str:
    """The result text of a call-control tool that worked: ``{"ok": true, "note": note}``."""
    return orjson.dumps({"ok": True, "note": _utf8(note)}).decode()


@dataclass(frozen=True, slots=True)
class SessionReady:
    session_id: str
    resume_token: str | None
    expires_at: float | None
    config: dict[str, Any] = field(hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    config: dict[str, Any] = field(hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class SessionEnded:
    session_duration_s: float | None


@dataclass(frozen=True, slots=True)
class SessionError:
    code: str  # lower-cased
    message: str
    param: str | None

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_ERROR_CODES


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    pass


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    pass


@dataclass(frozen=True, slots=True)
class TranscriptUserDelta:
    item_id: str
    text: str


@dataclass(frozen=True, slots=True)
class TranscriptUser:
    item_id: str
    text: str


@dataclass(frozen=True, slots=True)
class ReplyStarted:
    reply_id: str


@dataclass(frozen=True, slots=True)
class ReplyAudio:
    reply_id: str
    data: str  # base64 in the output encoding, exactly as received


@dataclass(frozen=True, slots=True)
class TranscriptAgent:
    reply_id: str
    text: str
    interrupted: bool


@dataclass(frozen=True, slots=True)
class TranscriptAgentDelta:
    """A word (or a few) of a reply and where it sits in the reply's audio: the records' word
    timings for what the caller heard. ``start_ms``/``end_ms`` are None when the service sends
    null or something that is not an integer."""

    reply_id: str
    item_id: str
    delta: str
    start_ms: int | None
    end_ms: int | None


@dataclass(frozen=True, slots=True)
class ReplyDone:
    reply_id: str
    interrupted: bool


@dataclass(frozen=True, slots=True)
class ToolCall:
    tool_call_id: str  # the wire's ``call_id``: the agent's id for this tool call, not our call's
    name: str
    arguments: dict[str, Any] | None = field(hash=False)
    arguments_error: str | None = None  # why ``arguments`` could not be read, if it could not


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    type: str


@dataclass(frozen=True, slots=True)
class InvalidEvent:
    """The agent's fault: a frame we cannot read. ``reason`` says why."""

    reason: str


AgentEvent = (
    SessionReady
    | SessionUpdated
    | SessionEnded
    | SessionError
    | SpeechStarted
    | SpeechStopped
    | TranscriptUserDelta
    | TranscriptUser
    | ReplyStarted
    | ReplyAudio
    | TranscriptAgent
    | TranscriptAgentDelta
    | ReplyDone
    | ToolCall
    | UnknownEvent
)


def parse(frame: str | bytes) -> AgentEvent | InvalidEvent:
    """Parse one message from the Voice Agent API. Never raises."""
    msg = json_object(frame, "the Voice Agent API")
    if isinstance(msg, str):
        return InvalidEvent(msg)
    kind = msg.get("type")
    if kind == "reply.audio":
        data = msg.get("data")
        if type(data) is not str or not is_base64(data):
            return InvalidEvent("reply.audio without base64 'data'")
        return ReplyAudio(_s(msg, "reply_id"), data)
    if kind is None and "code" in msg:  # early-beta error frames had no type (reference §0)
        kind = "session.error"
    if type(kind) is not str:
        return InvalidEvent("missing or non-string 'type'")
    builder = _BUILDERS.get(kind)
    if builder is None:
        return UnknownEvent(kind[:64])
    event: AgentEvent | InvalidEvent = builder(msg)
    return event


def _s(msg: dict[str, Any], key: str) -> str:
    value = msg.get(key)
    return value if type(value) is str else ""


def _ms(msg: dict[str, Any], key: str) -> int | None:
    value = msg.get(key)
    return value if type(value) is int and value >= 0 else None


def _ready(msg: dict[str, Any]) -> SessionReady | InvalidEvent:
    session_id = msg.get("session_id")
    if type(session_id) is not str or not session_id:
        return InvalidEvent("session.ready without session_id")
    config = msg.get("config")
    expires = msg.get("expires_at")
    return SessionReady(
        session_id=session_id,
        resume_token=msg.get("resume_token") if type(msg.get("resume_token")) is str else None,
        expires_at=float(expires) if isinstance(expires, (int, float)) else None,
        config=config if type(config) is dict else {},
    )


def _error(msg: dict[str, Any]) -> SessionError:
    code = msg.get("code")
    param = msg.get("param")
    return SessionError(
        code=str(code).lower()[:64] if code is not None else "unknown",
        message=str(msg.get("message", ""))[:1000],
        param=param if type(param) is str else None,
    )


def _ended(msg: dict[str, Any]) -> SessionEnded:
    duration = msg.get("session_duration_seconds")
    return SessionEnded(float(duration) if isinstance(duration, (int, float)) else None)


def _tool_call(msg: dict[str, Any]) -> ToolCall | InvalidEvent:
    call_id, name = msg.get("call_id"), msg.get("name")
    if type(call_id) is not str or not call_id:
        return InvalidEvent("tool.call without call_id")
    if type(name) is not str or not name:
        return ToolCall(call_id, "", None, "tool.call without a name")
    raw = msg["arguments"] if "arguments" in msg else msg.get("args", {})
    if type(raw) is str:  # accepted as a fallback (reference §0)
        try:
            raw = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            return ToolCall(call_id, name, None, "arguments is not valid JSON")
    if raw is None:
        raw = {}
    if type(raw) is not dict:
        return ToolCall(call_id, name, None, "arguments is not a JSON object")
    return ToolCall(call_id, name, raw)


_BUILDERS: dict[str, Any] = {
    "session.ready": _ready,
    "session.updated": lambda m: SessionUpdated(m["config"] if type(m.get("config")) is dict else {}),
    "session.ended": _ended,
    "session.error": _error,
    "input.speech.started": lambda m: SpeechStarted(),
    "input.speech.stopped": lambda m: SpeechStopped(),
    "transcript.user.delta": lambda m: TranscriptUserDelta(_s(m, "item_id"), _s(m, "text")),
    "transcript.user": lambda m: TranscriptUser(_s(m, "item_id"), _s(m, "text")),
    "reply.started": lambda m: ReplyStarted(_s(m, "reply_id")),
    "transcript.agent": lambda m: TranscriptAgent(_s(m, "reply_id"), _s(m, "text"), m.get("interrupted") is True),
    "transcript.agent.delta": lambda m: TranscriptAgentDelta(
        _s(m, "reply_id"), _s(m, "item_id"), _s(m, "delta"), _ms(m, "start_ms"), _ms(m, "end_ms")
    ),
    "reply.done": lambda m: ReplyDone(_s(m, "reply_id"), m.get("status") == "interrupted"),
    "tool.call": _tool_call,
}


# --- what we send -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What one call's agent is told in its first ``session.update``."""

    system_prompt: str
    greeting: str
    voice: str
    tools: tuple[dict[str, Any], ...] = ()


def session_update(config: SessionConfig) -> str:
    """The first ``session.update``: prompt, greeting, voice, tools, ``audio/pcmu`` both ways."""
    session: dict[str, Any] = {
        "system_prompt": config.system_prompt,
        "input": {"type": "audio", "format": {"encoding": "audio/pcmu"}},
        "output": {"type": "audio", "voice": config.voice, "format": {"encoding": "audio/pcmu"}},
        "tools": list(config.tools),
    }
    if config.greeting:  # omitted, the agent waits for the caller; null is rejected
        session["greeting"] = config.greeting
    return orjson.dumps({"type": "session.update", "session": session}).decode()


def session_resume(session_id: str) -> str:
    return orjson.dumps({"type": "session.resume", "session_id": session_id}).decode()


def input_audio(payload: str) -> str:
    """``input.audio`` around a base64 payload checked by ``phone.media.parse`` (no escaping needed)."""
    return '{"type":"input.audio","audio":"' + payload + '"}'


def tool_result(call_id: str, result: str, *, is_error: bool = False) -> str:
    """``tool.result``. Never raises: it runs inside ``CallState``, often on a later ``reply.done``."""
    event = {"type": "tool.result", "call_id": call_id, "result": result, "is_error": is_error}
    try:
        return orjson.dumps(event).decode()
    except orjson.JSONEncodeError:  # a lone surrogate (e.g. surrogateescape text from a tool)
        event.update(call_id=_utf8(call_id), result=_utf8(result))
        return orjson.dumps(event).decode()


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def reply_create(instructions: str | None = None) -> str:
    event: dict[str, Any] = {"type": "reply.create"}
    if instructions:
        event["instructions"] = instructions
    return orjson.dumps(event).decode()


SESSION_END = '{"type":"session.end"}'
