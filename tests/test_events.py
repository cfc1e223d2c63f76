"""Voice Agent API codec (bridge.agent.events): server events parse, client events build.

Shapes follow ../shared/reference/voice-agent-api.md §2-§4 and §8 (error codes, compared
case-insensitively).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.agent import events as ag
from bridge.agent.events import (
    FATAL_ERROR_CODES,
    RESUME_FAILED_CODES,
    RETRYABLE_CONNECT_CODES,
    SESSION_END,
    InvalidEvent,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    SessionConfig,
    SessionEnded,
    SessionError,
    SessionReady,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    TranscriptAgent,
    TranscriptAgentDelta,
    TranscriptUser,
    TranscriptUserDelta,
    UnknownEvent,
    input_audio,
    parse,
    reply_create,
    session_resume,
    session_update,
    tool_result,
)

RESULT_TYPES = (
    TranscriptAgentDelta,
    SessionReady,
    SessionUpdated,
    SessionEnded,
    SessionError,
    SpeechStarted,
    SpeechStopped,
    TranscriptUserDelta,
    TranscriptUser,
    ReplyStarted,
    ReplyAudio,
    TranscriptAgent,
    ReplyDone,
    ToolCall,
    UnknownEvent,
    InvalidEvent,
)
TS = 1790210400.12
CONFIG = {
    "greeting": "Hi!",
    "input": {"type": "audio", "format": {"encoding": "audio/pcmu", "sample_rate": 8000}},
    "output": {"type": "audio", "voice": "ivy", "format": {"encoding": "audio/pcmu", "sample_rate": 8000}},
    "tools": [],
}
AUDIO = "/v7+/n5+fn5+"


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


# --- every server event of reference §3 --------------------------------------------------------

DOCUMENTED = [
    pytest.param(
        {
            "type": "session.ready",
            "session_id": "sess_7a1e",
            "expires_at": 1790214000,
            "resume_token": "rt-1",
            "config": CONFIG,
            "timestamp": TS,
        },
        SessionReady("sess_7a1e", "rt-1", 1790214000.0, CONFIG),
        id="session.ready",
    ),
    pytest.param(
        {"type": "session.updated", "config": CONFIG, "timestamp": TS}, SessionUpdated(CONFIG), id="session.updated"
    ),
    pytest.param(
        {"type": "session.ended", "session_duration_seconds": 35.28, "audio_duration_seconds": None, "timestamp": TS},
        SessionEnded(35.28),
        id="session.ended",
    ),
    pytest.param(
        {
            "type": "session.error",
            "code": "immutable_field",
            "message": "voice is immutable",
            "param": "output.voice",
            "session_id": "sess_7a1e",
            "timestamp": TS,
        },
        SessionError("immutable_field", "voice is immutable", "output.voice"),
        id="session.error",
    ),
    pytest.param({"type": "input.speech.started", "timestamp": TS}, SpeechStarted(), id="input.speech.started"),
    pytest.param({"type": "input.speech.stopped", "timestamp": TS}, SpeechStopped(), id="input.speech.stopped"),
    pytest.param(
        {"type": "transcript.user.delta", "item_id": "item_1", "text": "I need", "timestamp": TS},
        TranscriptUserDelta("item_1", "I need"),
        id="transcript.user.delta",
    ),
    pytest.param(
        {"type": "transcript.user", "item_id": "item_1", "text": "I need help", "timestamp": TS},
        TranscriptUser("item_1", "I need help"),
        id="transcript.user",
    ),
    pytest.param(
        {"type": "reply.started", "reply_id": "resp_91c2", "item_id": "item_2", "timestamp": TS},
        ReplyStarted("resp_91c2"),
        id="reply.started",
    ),
    pytest.param(
        {"type": "reply.audio", "reply_id": "resp_91c2", "data": AUDIO, "timestamp": TS},
        ReplyAudio("resp_91c2", AUDIO),
        id="reply.audio",
    ),
    pytest.param(
        {
            "type": "transcript.agent",
            "reply_id": "resp_91c2",
            "item_id": "item_2",
            "text": "Sure, I",
            "interrupted": True,
            "timestamp": TS,
        },
        TranscriptAgent("resp_91c2", "Sure, I", True),
        id="transcript.agent",
    ),
    pytest.param(
        {"type": "reply.done", "reply_id": "resp_91c2", "status": "interrupted", "timestamp": TS},
        ReplyDone("resp_91c2", True),
        id="reply.done-interrupted",
    ),
    pytest.param(
        {"type": "reply.done", "reply_id": "resp_91c2", "status": "completed", "timestamp": TS},
        ReplyDone("resp_91c2", False),
        id="reply.done-completed",
    ),
    pytest.param(
        {"type": "reply.done", "reply_id": "resp_91c2", "timestamp": TS},
        ReplyDone("resp_91c2", False),
        id="reply.done-no-status-is-completed",
    ),
    pytest.param(
        {
            "type": "tool.call",
            "call_id": "chatcmpl-tool-5e6f",
            "name": "get_balance",
            "arguments": {"account": "1234"},
            "timestamp": TS,
        },
        ToolCall("chatcmpl-tool-5e6f", "get_balance", {"account": "1234"}),
        id="tool.call",
    ),
    pytest.param(
        {
            "type": "transcript.agent.delta",
            "reply_id": "r",
            "item_id": "i",
            "delta": "Hi",
            "start_ms": 0,
            "end_ms": None,
            "timestamp": TS,
        },
        TranscriptAgentDelta("r", "i", "Hi", 0, None),
        id="transcript.agent.delta",
    ),
    pytest.param(
        {"type": "transcript.agent.delta", "reply_id": "r", "delta": " there", "start_ms": 120, "end_ms": 380},
        TranscriptAgentDelta("r", "", " there", 120, 380),
        id="transcript.agent.delta-timed",
    ),
    pytest.param(
        # Timings that are not non-negative integers are unknown, never guessed.
        {"type": "transcript.agent.delta", "reply_id": "r", "delta": 5, "start_ms": -1, "end_ms": "380"},
        TranscriptAgentDelta("r", "", "", None, None),
        id="transcript.agent.delta-hostile",
    ),
    pytest.param({"type": "reply.error", "timestamp": TS}, UnknownEvent("reply.error"), id="reply.error-ignored"),
]


@pytest.mark.parametrize(("msg", "expected"), DOCUMENTED)
def test_documented_events_parse_to_typed_events(msg: dict[str, Any], expected: object) -> None:
    result = parse(dumps(msg))
    assert result == expected
    if isinstance(expected, (SessionReady, SessionUpdated, ToolCall)):  # dict fields are excluded from eq
        assert result.__getattribute__("config" if not isinstance(expected, ToolCall) else "arguments") == (
            expected.config if not isinstance(expected, ToolCall) else expected.arguments
        )


def test_reply_audio_data_is_kept_byte_identical() -> None:
    data = base64.b64encode(bytes(range(256)) * 2).decode()
    result = parse(dumps({"type": "reply.audio", "reply_id": "r1", "data": data, "timestamp": TS}))
    assert isinstance(result, ReplyAudio)
    assert result.data == data


@pytest.mark.parametrize("timestamp", [TS, "2026-09-24T12:00:00Z", None, {"x": 1}])
def test_timestamp_is_parsed_leniently(timestamp: object) -> None:
    assert parse(dumps({"type": "input.speech.started", "timestamp": timestamp})) == SpeechStarted()


def test_session_ready_optional_fields() -> None:
    result = parse(dumps({"type": "session.ready", "session_id": "sess_1", "expires_at": "soon", "config": []}))
    assert result == SessionReady("sess_1", None, None, {})
    assert isinstance(result, SessionReady) and result.config == {}


def test_session_ended_duration_may_be_missing() -> None:
    assert parse('{"type":"session.ended"}') == SessionEnded(None)
    assert parse('{"type":"session.ended","session_duration_seconds":"35"}') == SessionEnded(None)


def test_session_updated_without_config() -> None:
    result = parse('{"type":"session.updated"}')
    assert isinstance(result, SessionUpdated) and result.config == {}


# --- errors (reference §0, §8) -----------------------------------------------------------------


def test_error_frame_without_type_but_with_code_is_an_error() -> None:
    """Early-beta frames had no ``type``; such a frame must still end a failed connect."""
    result = parse(dumps({"code": "UNAUTHORIZED", "message": "Invalid API key"}))
    assert result == SessionError("unauthorized", "Invalid API key", None)
    assert isinstance(result, SessionError) and result.fatal


def test_frame_without_type_or_code_is_invalid() -> None:
    assert isinstance(parse(dumps({"message": "hello"})), InvalidEvent)


@pytest.mark.parametrize(
    ("code", "fatal"),
    [
        ("unauthorized", True),
        ("UNAUTHORIZED", True),
        ("FORBIDDEN", True),
        ("INTERNAL_ERROR", True),
        ("Internal_Error", True),
        ("at_capacity", True),
        ("concurrency_exceeded", True),
        ("agent_init_failed", True),
        ("agent_timeout", True),
        ("agent_not_found", True),
        ("session_not_found", True),
        ("SESSION_FORBIDDEN", True),
        ("session_expired", True),
        ("invalid_format", False),
        ("invalid_audio", False),
        ("INVALID_VALUE", False),
        ("immutable_field", False),
        ("invalid_config", False),
        ("agent_id_not_first", False),
        ("audio_rate_violation", False),
        ("server_error", False),  # live: not fatal mid-session
        ("something_new", False),
    ],
)
def test_error_codes_are_compared_case_insensitively(code: str, fatal: bool) -> None:
    result = parse(dumps({"type": "session.error", "code": code, "message": "m", "timestamp": TS}))
    assert isinstance(result, SessionError)
    assert result.code == code.lower()
    assert result.fatal is fatal


def test_error_code_sets_are_lower_case_and_consistent() -> None:
    for codes in (FATAL_ERROR_CODES, RETRYABLE_CONNECT_CODES, RESUME_FAILED_CODES):
        assert all(c == c.lower() for c in codes)
    assert RESUME_FAILED_CODES <= FATAL_ERROR_CODES
    assert {"at_capacity", "concurrency_exceeded", "internal_error"} <= RETRYABLE_CONNECT_CODES
    assert all(c == c.lower() for c in ag.ERROR_CODES)
    assert FATAL_ERROR_CODES | RETRYABLE_CONNECT_CODES | RESUME_FAILED_CODES <= ag.ERROR_CODES
    assert {"invalid_audio", "audio_rate_violation", "immutable_field"} <= ag.ERROR_CODES - FATAL_ERROR_CODES


@pytest.mark.parametrize("message", ["no order A1", 'a "quoted" word', "naïve \\ back\nslash", ""])
def test_tool_result_texts_are_json_the_model_can_read(message: str) -> None:
    assert orjson.loads(ag.tool_error(message)) == {"error": message}
    assert orjson.loads(ag.tool_ok(message)) == {"ok": True, "note": message}
    assert orjson.loads(ag.TOOL_OK) == {"ok": True}
    # A tool's exception text may carry a lone surrogate (surrogateescape): still JSON, never a crash.
    assert orjson.loads(ag.tool_error("bad \udcff byte")) == {"error": "bad ? byte"}


def test_call_control_tool_names_are_the_reserved_ones() -> None:
    from bridge.agent.builtin_tools import call_control_definitions
    from bridge.agent.tools import RESERVED_NAMES
    from bridge.call.keypad import TOOL_NAME

    offered = {d["name"] for d in call_control_definitions(True, ["+14155550100"], keypad=True)}
    assert offered == ag.CALL_CONTROL_TOOLS == RESERVED_NAMES
    assert TOOL_NAME == ag.COLLECT_DIGITS_TOOL


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        ({"type": "session.error"}, SessionError("unknown", "", None)),
        ({"type": "session.error", "code": 1008, "message": None, "param": 5}, SessionError("1008", "None", None)),
        ({"type": "session.error", "code": "x" * 500, "message": "m" * 5000}, SessionError("x" * 64, "m" * 1000, None)),
    ],
)
def test_error_frames_with_odd_fields_are_bounded(msg: dict[str, Any], expected: SessionError) -> None:
    assert parse(dumps(msg)) == expected


# --- tool.call arguments (reference §0, §7) ------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "arguments", "error"),
    [
        pytest.param({"arguments": {"account": "1234"}}, {"account": "1234"}, None, id="object"),
        pytest.param({"arguments": '{"account":"1234"}'}, {"account": "1234"}, None, id="json-string"),
        pytest.param({"args": {"account": "1234"}}, {"account": "1234"}, None, id="args-fallback"),
        pytest.param({"args": '{"account":"1234"}'}, {"account": "1234"}, None, id="args-json-string"),
        pytest.param({"arguments": {"a": 1}, "args": {"b": 2}}, {"a": 1}, None, id="arguments-wins-over-args"),
        pytest.param({}, {}, None, id="missing"),
        pytest.param({"arguments": None}, {}, None, id="null"),
        pytest.param({"arguments": ""}, {}, None, id="empty-string"),
        pytest.param({"arguments": "   "}, {}, None, id="blank-string"),
        pytest.param({"arguments": "{not json"}, None, "arguments is not valid JSON", id="garbage-string"),
        pytest.param({"arguments": "[1,2]"}, None, "arguments is not a JSON object", id="json-string-array"),
        pytest.param({"arguments": '"text"'}, None, "arguments is not a JSON object", id="json-string-string"),
        pytest.param({"arguments": [1, 2]}, None, "arguments is not a JSON object", id="array"),
        pytest.param({"arguments": 42}, None, "arguments is not a JSON object", id="number"),
        pytest.param({"arguments": True}, None, "arguments is not a JSON object", id="bool"),
    ],
)
def test_tool_call_arguments(fields: dict[str, Any], arguments: dict[str, Any] | None, error: str | None) -> None:
    result = parse(dumps({"type": "tool.call", "call_id": "chatcmpl-tool-1", "name": "lookup", **fields}))
    assert isinstance(result, ToolCall)
    assert (result.tool_call_id, result.name) == ("chatcmpl-tool-1", "lookup")
    assert result.arguments == arguments
    assert result.arguments_error == error


def test_tool_call_without_call_id_is_invalid() -> None:
    assert isinstance(parse(dumps({"type": "tool.call", "name": "lookup", "arguments": {}})), InvalidEvent)
    assert isinstance(parse(dumps({"type": "tool.call", "call_id": 7, "name": "lookup"})), InvalidEvent)


def test_tool_call_without_name_still_answers_its_call_id() -> None:
    result = parse(dumps({"type": "tool.call", "call_id": "c1", "arguments": {}}))
    assert isinstance(result, ToolCall)
    assert result.tool_call_id == "c1" and result.arguments is None and result.arguments_error


# --- malformed frames ----------------------------------------------------------------------------

INVALID = [
    pytest.param("", id="empty"),
    pytest.param("nope", id="not-json"),
    pytest.param('{"type":"reply.audio"', id="truncated"),
    pytest.param("[]", id="array"),
    pytest.param('"session.ready"', id="string"),
    pytest.param("1.5", id="number"),
    pytest.param("null", id="null"),
    pytest.param("{}", id="no-type"),
    pytest.param('{"type":5}', id="type-number"),
    pytest.param('{"type":["reply.audio"]}', id="type-list"),
    pytest.param("[" * 5000 + "]" * 5000, id="deeply-nested"),
    pytest.param('{"type":"x","n":' + "9" * 500 + "}", id="huge-int"),
    pytest.param('{"type":"\\udc00"}', id="lone-surrogate-escape"),
    pytest.param(dumps({"type": "reply.audio", "reply_id": "r"}), id="audio-no-data"),
    pytest.param(dumps({"type": "reply.audio", "reply_id": "r", "data": 5}), id="audio-data-number"),
    pytest.param(dumps({"type": "reply.audio", "reply_id": "r", "data": 'AAAA"AAA'}), id="audio-data-quote"),
    pytest.param(dumps({"type": "reply.audio", "reply_id": "r", "data": "AAAA\\AAA"}), id="audio-data-backslash"),
    pytest.param(dumps({"type": "reply.audio", "reply_id": "r", "data": "AA-_"}), id="audio-data-urlsafe"),
    pytest.param(dumps({"type": "reply.audio", "reply_id": "r", "data": "AAA"}), id="audio-data-bad-length"),
    pytest.param(dumps({"type": "session.ready", "config": {}}), id="ready-no-session-id"),
    pytest.param(dumps({"type": "session.ready", "session_id": ""}), id="ready-empty-session-id"),
]


@pytest.mark.parametrize("frame", INVALID)
def test_malformed_frames_are_invalid_never_raised(frame: str) -> None:
    result = parse(frame)
    assert isinstance(result, InvalidEvent), result
    assert result.reason


def test_binary_frames_are_invalid() -> None:
    result = parse(dumps({"type": "input.speech.started"}).encode())
    assert isinstance(result, InvalidEvent) and "binary" in result.reason


def test_unknown_type_is_truncated() -> None:
    assert parse(dumps({"type": "t" * 10_000})) == UnknownEvent("t" * 64)


# --- builders (reference §2, §4) -----------------------------------------------------------------

END_CALL_TOOL = {
    "type": "function",
    "name": "end_call",
    "description": "Hang up after saying goodbye.",
    "parameters": {"type": "object", "properties": {}, "required": []},
}


def test_session_update_has_exactly_the_documented_fields() -> None:
    text = session_update(SessionConfig("Be brief.", "Thanks for calling Acme!", "ivy", (END_CALL_TOOL,)))
    assert orjson.loads(text) == {
        "type": "session.update",
        "session": {
            "system_prompt": "Be brief.",
            "greeting": "Thanks for calling Acme!",
            "input": {"type": "audio", "format": {"encoding": "audio/pcmu"}},
            "output": {"type": "audio", "voice": "ivy", "format": {"encoding": "audio/pcmu"}},
            "tools": [END_CALL_TOOL],
        },
    }


def test_session_update_without_greeting_omits_it_never_null() -> None:
    """``greeting: null`` is rejected with invalid_format (reference §4); omit it instead."""
    session = orjson.loads(session_update(SessionConfig("Be brief.", "", "james")))["session"]
    assert "greeting" not in session
    assert session["tools"] == []
    assert session["output"]["voice"] == "james"


def test_session_resume_has_exactly_the_documented_fields() -> None:
    assert orjson.loads(session_resume("sess_7a1e")) == {"type": "session.resume", "session_id": "sess_7a1e"}


def test_input_audio_places_the_payload_byte_identically() -> None:
    payload = base64.b64encode(b"\xff" * 160).decode()
    text = input_audio(payload)
    assert text == '{"type":"input.audio","audio":"' + payload + '"}'
    assert orjson.loads(text) == {"type": "input.audio", "audio": payload}


@pytest.mark.parametrize("is_error", [False, True])
def test_tool_result_has_exactly_the_documented_fields(is_error: bool) -> None:
    result = '{"balance":42.1,"note":"quote \\" and newline \\n and ünïcode"}'
    assert orjson.loads(tool_result("chatcmpl-tool-1a2b", result, is_error=is_error)) == {
        "type": "tool.result",
        "call_id": "chatcmpl-tool-1a2b",
        "result": result,
        "is_error": is_error,
    }


def test_reply_create_and_session_end() -> None:
    assert orjson.loads(reply_create()) == {"type": "reply.create"}
    assert orjson.loads(reply_create("")) == {"type": "reply.create"}
    assert orjson.loads(reply_create("Say goodbye.")) == {"type": "reply.create", "instructions": "Say goodbye."}
    assert orjson.loads(SESSION_END) == {"type": "session.end"}


# --- properties ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
KNOWN_TYPES = [
    "session.ready",
    "session.updated",
    "session.ended",
    "session.error",
    "input.speech.started",
    "input.speech.stopped",
    "transcript.user.delta",
    "transcript.user",
    "reply.started",
    "reply.audio",
    "transcript.agent",
    "reply.done",
    "tool.call",
    "transcript.agent.delta",
    "reply.error",
]
FIELDS = [
    "session_id",
    "config",
    "expires_at",
    "resume_token",
    "session_duration_seconds",
    "code",
    "message",
    "param",
    "item_id",
    "text",
    "reply_id",
    "data",
    "status",
    "interrupted",
    "call_id",
    "name",
    "arguments",
    "args",
    "timestamp",
]
b64 = st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
# Valid UTF-8 text only: JSON text frames cannot carry lone surrogates.
utf8_text = st.text(st.characters(exclude_categories=["Cs"]))


@settings(max_examples=300)
@given(st.text())
def test_parse_never_raises_on_arbitrary_text(text: str) -> None:
    assert isinstance(parse(text), RESULT_TYPES)


@settings(max_examples=300)
@given(json_values)
def test_parse_never_raises_on_arbitrary_json(value: Any) -> None:
    assert isinstance(parse(dumps(value)), RESULT_TYPES)


@settings(max_examples=500)
@given(
    st.sampled_from(KNOWN_TYPES) | st.none(),
    st.dictionaries(st.sampled_from(FIELDS), json_values | b64 | st.sampled_from(["interrupted", "completed"])),
)
def test_parse_never_raises_on_right_type_with_random_fields(kind: str | None, fields: dict[str, Any]) -> None:
    msg = dict(fields) if kind is None else {**fields, "type": kind}
    result = parse(dumps(msg))
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, ReplyAudio):
        assert result.data == fields["data"]
    if isinstance(result, ToolCall):
        assert (result.arguments is None) != (result.arguments_error is None)
    if isinstance(result, SessionError):
        assert result.code == result.code.lower()


@settings(max_examples=200)
@given(utf8_text, utf8_text, st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True), utf8_text, st.booleans())
def test_builders_round_trip(prompt: str, greeting: str, voice: str, text: str, is_error: bool) -> None:
    session = orjson.loads(session_update(SessionConfig(prompt, greeting, voice)))["session"]
    assert session["system_prompt"] == prompt
    assert session.get("greeting", "") == greeting
    assert session["output"]["voice"] == voice
    assert orjson.loads(tool_result(text, text, is_error=is_error)) == {
        "type": "tool.result",
        "call_id": text,
        "result": text,
        "is_error": is_error,
    }
    assert orjson.loads(session_resume(text)) == {"type": "session.resume", "session_id": text}
    created = orjson.loads(reply_create(text))
    assert created == ({"type": "reply.create", "instructions": text} if text else {"type": "reply.create"})


@settings(max_examples=200)
@given(b64)
def test_input_audio_and_reply_audio_round_trip(payload: str) -> None:
    assert orjson.loads(input_audio(payload)) == {"type": "input.audio", "audio": payload}
    echoed = parse(dumps({"type": "reply.audio", "reply_id": "r1", "data": payload}))
    assert echoed == ReplyAudio("r1", payload)


def test_tool_result_with_lone_surrogate_does_not_raise() -> None:
    """Regression: a tool returning surrogateescape text made ``tool_result`` raise inside
    ``CallState`` (on ``on_tool_done`` or, for a held result, on a later ``reply.done``)."""
    assert orjson.loads(ag.tool_result("c1", "bad \udcff text", is_error=True)) == {
        "type": "tool.result",
        "call_id": "c1",
        "result": "bad ? text",
        "is_error": True,
    }


@settings(max_examples=200)
@given(st.text(), st.text(), st.booleans())
def test_tool_result_never_raises(call_id: str, result: str, is_error: bool) -> None:
    event = orjson.loads(tool_result(call_id, result, is_error=is_error))
    assert set(event) == {"type", "call_id", "result", "is_error"}
    assert type(event["result"]) is str and event["is_error"] is is_error
