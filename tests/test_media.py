"""Twilio Media Streams codec (bridge.phone.media): wire text -> typed event, typed action -> text.

Frames follow ../shared/reference/twilio.md §1.2-§1.3 field for field: numeric-looking values are
strings, only ``mediaFormat.sampleRate``/``channels`` are JSON numbers.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.phone import media
from bridge.phone.media import (
    Connected,
    Dtmf,
    InvalidFrame,
    Mark,
    Media,
    Start,
    Stop,
    UnknownEvent,
    clear_frame,
    mark_frame,
    media_frame,
    parse,
    silence_payload,
)

STREAM_SID = "MZ5d3c0f9a2b7e4c1d8f6a0b3e9c2d7f41"
CALL_SID = "CA9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
ACCOUNT_SID = "AC0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SILENCE_20MS = base64.b64encode(b"\xff" * 160).decode()  # 216 chars, as Twilio sends
RESULT_TYPES = (Connected, Start, Media, Dtmf, Mark, Stop, UnknownEvent, InvalidFrame)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def start_msg(**start_overrides: Any) -> dict[str, Any]:
    start: dict[str, Any] = {
        "accountSid": ACCOUNT_SID,
        "streamSid": STREAM_SID,
        "callSid": CALL_SID,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"session": "s-7f3a", "lang": "en-US"},
    }
    start.update(start_overrides)
    return {"event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID, "start": start}


def media_msg(payload: Any = SILENCE_20MS, **media_overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload}
    body.update(media_overrides)
    return {"event": "media", "sequenceNumber": "2", "streamSid": STREAM_SID, "media": body}


# --- every documented message -----------------------------------------------------------------

DOCUMENTED = [
    pytest.param(
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        Connected(protocol="Call", version="1.0.0"),
        id="connected",
    ),
    pytest.param(
        media_msg(),
        Media(STREAM_SID, SILENCE_20MS, "inbound", 20, 2),
        id="media",
    ),
    pytest.param(
        {
            "event": "dtmf",
            "sequenceNumber": "311",
            "streamSid": STREAM_SID,
            "dtmf": {"track": "inbound_track", "digit": "7"},
        },
        Dtmf(STREAM_SID, "7", 311),
        id="dtmf",
    ),
    pytest.param(
        {"event": "mark", "sequenceNumber": "402", "streamSid": STREAM_SID, "mark": {"name": "resp3-seg12"}},
        Mark(STREAM_SID, "resp3-seg12", 402),
        id="mark",
    ),
    pytest.param(
        {
            "event": "stop",
            "sequenceNumber": "1803",
            "streamSid": STREAM_SID,
            "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
        },
        Stop(STREAM_SID, CALL_SID, 1803),
        id="stop",
    ),
]


@pytest.mark.parametrize(("msg", "expected"), DOCUMENTED)
def test_documented_messages_parse_to_typed_events(msg: dict[str, Any], expected: object) -> None:
    assert parse(dumps(msg)) == expected


def test_start_carries_every_field_with_string_numbers_as_ints() -> None:
    event = parse(dumps(start_msg()))
    assert isinstance(event, Start)
    assert event.stream_sid == STREAM_SID
    assert event.call_sid == CALL_SID
    assert event.account_sid == ACCOUNT_SID
    assert event.tracks == ("inbound",)
    assert event.custom_parameters == {"session": "s-7f3a", "lang": "en-US"}
    assert (event.encoding, event.sample_rate, event.channels) == ("audio/x-mulaw", 8000, 1)
    assert event.sequence_number == 1


def test_media_payload_is_kept_byte_identical() -> None:
    payload = base64.b64encode(bytes(range(256))[:159]).decode()
    event = parse(dumps(media_msg(payload)))
    assert isinstance(event, Media)
    assert event.payload is not None and event.payload == payload


def test_parse_accepts_bytes_only_as_an_invalid_binary_frame() -> None:
    """Twilio sends text only; a binary frame (31950) is refused, even if it holds valid JSON."""
    result = parse(dumps(media_msg()).encode())
    assert isinstance(result, InvalidFrame)
    assert "binary" in result.reason


# --- leniency where Twilio's documentation leaves room ----------------------------------------

LENIENT = [
    pytest.param(media_msg(timestamp="123456"), "timestamp_ms", 123456, id="timestamp-string"),
    pytest.param(media_msg(timestamp=40), "timestamp_ms", 40, id="timestamp-number"),
    pytest.param(media_msg(timestamp="-5"), "timestamp_ms", None, id="timestamp-negative"),
    pytest.param(media_msg(timestamp="20.5"), "timestamp_ms", None, id="timestamp-fraction"),
    pytest.param(media_msg(timestamp=None), "timestamp_ms", None, id="timestamp-null"),
    pytest.param({**media_msg(), "sequenceNumber": 7}, "sequence_number", 7, id="seq-number"),
    pytest.param({**media_msg(), "sequenceNumber": "abc"}, "sequence_number", None, id="seq-garbage"),
    pytest.param({**media_msg(), "sequenceNumber": "9" * 30}, "sequence_number", None, id="seq-huge"),
    pytest.param({**media_msg(), "sequenceNumber": True}, "sequence_number", None, id="seq-bool"),
    pytest.param(
        {k: v for k, v in media_msg().items() if k != "sequenceNumber"}, "sequence_number", None, id="seq-missing"
    ),
    pytest.param(media_msg(track=5), "track", "", id="track-wrong-type"),
    pytest.param({**media_msg(), "media": {"payload": SILENCE_20MS}}, "track", "inbound", id="track-missing"),
    pytest.param({**media_msg(), "extra": {"x" * 10_000: 1}}, "payload", SILENCE_20MS, id="oversized-extra-key"),
]


@pytest.mark.parametrize(("msg", "attr", "value"), LENIENT)
def test_media_field_leniency(msg: dict[str, Any], attr: str, value: object) -> None:
    event = parse(dumps(msg))
    assert isinstance(event, Media)
    assert getattr(event, attr) == value


@pytest.mark.parametrize("seq", ["\u00b2", "\u0661\u0662", "\u00b34", "\U0001d7d9"])
def test_unicode_digit_sequence_numbers_do_not_raise(seq: str) -> None:
    """Regression: ``str.isdigit`` is true for '²', and ``int('²')`` raised out of ``parse``."""
    event = parse(dumps({**media_msg(), "sequenceNumber": seq}))
    assert isinstance(event, Media)
    assert event.sequence_number is None


def test_start_stream_sid_falls_back_to_top_level_and_format_defaults() -> None:
    msg = start_msg(mediaFormat=None, customParameters=None, tracks=None)
    del msg["start"]["streamSid"]
    event = parse(dumps(msg))
    assert isinstance(event, Start)
    assert event.stream_sid == STREAM_SID
    assert (event.encoding, event.sample_rate, event.channels) == ("audio/x-mulaw", 8000, 1)
    assert event.custom_parameters == {}
    assert event.tracks == ()


def test_start_custom_parameters_become_strings_and_are_bounded() -> None:
    params: dict[str, Any] = {f"k{i}": str(i) for i in range(100)}
    params["k0"] = 42
    params["k" * 1000] = "long key"
    event = parse(dumps(start_msg(customParameters=params)))
    assert isinstance(event, Start)
    assert event.custom_parameters["k0"] == "42"
    assert len(event.custom_parameters) == 64
    assert all(type(v) is str for v in event.custom_parameters.values())
    assert all(len(k) <= 256 for k in event.custom_parameters)


def test_start_sample_rate_as_string_is_an_int() -> None:
    event = parse(dumps(start_msg(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": "1"})))
    assert isinstance(event, Start)
    assert (event.sample_rate, event.channels) == (8000, 1)


def test_stop_without_stop_object_still_stops() -> None:
    """Ending a call must not depend on optional fields."""
    assert parse(dumps({"event": "stop", "sequenceNumber": "9", "streamSid": STREAM_SID})) == Stop(STREAM_SID, "", 9)
    assert parse(dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {"callSid": 5}})) == Stop(
        STREAM_SID, "", None
    )


def test_connected_with_missing_fields() -> None:
    assert parse('{"event":"connected"}') == Connected("", "")


def test_unknown_events_are_named_and_truncated() -> None:
    assert parse('{"event":"frobnicate","streamSid":"x"}') == UnknownEvent("frobnicate")
    result = parse(dumps({"event": "e" * 10_000}))
    assert result == UnknownEvent("e" * 64)


# --- malformed and partial frames --------------------------------------------------------------

INVALID = [
    pytest.param("", id="empty"),
    pytest.param("not json", id="not-json"),
    pytest.param('{"event":"media"', id="truncated"),
    pytest.param("[1,2]", id="array"),
    pytest.param('"media"', id="string"),
    pytest.param("42", id="number"),
    pytest.param("null", id="null"),
    pytest.param("{}", id="no-event"),
    pytest.param('{"event":5}', id="event-number"),
    pytest.param('{"event":null}', id="event-null"),
    pytest.param('{"event":["media"]}', id="event-list"),
    pytest.param("[" * 5000 + "]" * 5000, id="deeply-nested"),
    pytest.param('{"a":' + "9" * 500 + "}", id="huge-int"),
    pytest.param('{"event":"media","media":{"payload":"AA=="},"streamSid":"\\ud800"}', id="lone-surrogate-escape"),
    # media
    pytest.param(dumps({"event": "media", "streamSid": STREAM_SID}), id="media-no-object"),
    pytest.param(dumps({**media_msg(), "media": "AA=="}), id="media-object-is-string"),
    pytest.param(dumps({**media_msg(), "media": {"track": "inbound"}}), id="media-no-payload"),
    pytest.param(dumps(media_msg(payload=None)), id="payload-null"),
    pytest.param(dumps(media_msg(payload=1234)), id="payload-number"),
    pytest.param(dumps(media_msg(payload="")), id="payload-empty"),
    pytest.param(dumps(media_msg(payload='AAAA"AAA')), id="payload-quote"),
    pytest.param(dumps(media_msg(payload="AAAA\\AAA")), id="payload-backslash"),
    pytest.param(dumps(media_msg(payload="AAAA AAA")), id="payload-space"),
    pytest.param(dumps(media_msg(payload="AAAA\nAAA")), id="payload-newline"),
    pytest.param(dumps(media_msg(payload="AA-_")), id="payload-urlsafe-alphabet"),
    pytest.param(dumps(media_msg(payload="AAA")), id="payload-bad-length"),
    pytest.param(dumps(media_msg(payload="A")), id="payload-one-char"),
    pytest.param(dumps(media_msg(payload="=")), id="payload-only-padding"),
    pytest.param(dumps(media_msg(payload="AA=A")), id="payload-padding-inside"),
    pytest.param(dumps(media_msg(payload="A===")), id="payload-too-much-padding"),
    pytest.param(dumps(media_msg(payload="//////é=")), id="payload-non-ascii"),
    pytest.param(dumps({k: v for k, v in media_msg().items() if k != "streamSid"}), id="media-no-streamSid"),
    pytest.param(dumps({**media_msg(), "streamSid": 5}), id="media-streamSid-number"),
    pytest.param(dumps({**media_msg(), "streamSid": 'MZ"x'}), id="media-streamSid-quote"),
    pytest.param(dumps({**media_msg(), "streamSid": "MZ" + "a" * 70}), id="media-streamSid-oversized"),
    pytest.param(dumps({**media_msg(), "streamSid": ""}), id="media-streamSid-empty"),
    # start
    pytest.param(dumps({"event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID}), id="start-no-object"),
    pytest.param(dumps(start_msg(callSid=None)), id="start-no-callSid"),
    pytest.param(dumps(start_msg(callSid="CA 1")), id="start-callSid-space"),
    pytest.param(dumps(start_msg(streamSid='MZ"1')), id="start-streamSid-quote"),
    pytest.param(dumps(start_msg(customParameters=["a"])), id="start-params-list"),
    pytest.param(dumps(start_msg(mediaFormat="audio/x-mulaw")), id="start-format-string"),
    # mark, dtmf, stop
    pytest.param(dumps({"event": "mark", "sequenceNumber": "4", "streamSid": STREAM_SID}), id="mark-no-object"),
    pytest.param(dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {}}), id="mark-no-name"),
    pytest.param(dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": 3}}), id="mark-name-number"),
    pytest.param(dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": 'a"b'}}), id="mark-name-quote"),
    pytest.param(dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "n" * 200}}), id="mark-name-long"),
    pytest.param(dumps({"event": "mark", "mark": {"name": "resp3"}}), id="mark-no-streamSid"),
    pytest.param(
        dumps({"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"track": "inbound_track"}}), id="dtmf-no-digit"
    ),
    pytest.param(dumps({"event": "dtmf", "streamSid": STREAM_SID}), id="dtmf-no-object"),
    pytest.param(dumps({"event": "stop", "stop": {"callSid": CALL_SID}}), id="stop-no-streamSid"),
]


@pytest.mark.parametrize("frame", INVALID)
def test_malformed_frames_are_invalid_never_raised(frame: str) -> None:
    result = parse(frame)
    assert isinstance(result, InvalidFrame), result
    assert result.reason


# --- what we send ------------------------------------------------------------------------------


def test_media_frame_has_exactly_the_documented_fields() -> None:
    text = media_frame(STREAM_SID, SILENCE_20MS)
    assert orjson.loads(text) == {"event": "media", "streamSid": STREAM_SID, "media": {"payload": SILENCE_20MS}}
    assert SILENCE_20MS in text  # placed byte for byte, never re-encoded


def test_mark_frame_has_exactly_the_documented_fields() -> None:
    assert orjson.loads(mark_frame(STREAM_SID, "goodbye-1")) == {
        "event": "mark",
        "streamSid": STREAM_SID,
        "mark": {"name": "goodbye-1"},
    }


def test_clear_frame_has_exactly_the_documented_fields() -> None:
    assert orjson.loads(clear_frame(STREAM_SID)) == {"event": "clear", "streamSid": STREAM_SID}


@pytest.mark.parametrize(("ms", "size"), [(0, 0), (1, 8), (20, 160), (500, 4000)])
def test_silence_payload_is_mulaw_silence(ms: int, size: int) -> None:
    assert base64.b64decode(silence_payload(ms), validate=True) == b"\xff" * size
    assert media.is_base64(silence_payload(ms))


def test_inbound_payload_round_trips_through_an_outbound_frame() -> None:
    event = parse(dumps(media_msg()))
    assert isinstance(event, Media)
    echoed = parse(dumps({**orjson.loads(media_frame(event.stream_sid, event.payload)), "sequenceNumber": "3"}))
    assert isinstance(echoed, Media)
    assert echoed.payload == SILENCE_20MS


# --- properties ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
sids = st.from_regex(r"[A-Za-z0-9_\-]{1,64}", fullmatch=True)
b64 = st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode())


@settings(max_examples=300)
@given(st.text())
def test_parse_never_raises_on_arbitrary_text(text: str) -> None:
    assert isinstance(parse(text), RESULT_TYPES)


@settings(max_examples=200)
@given(st.binary())
def test_parse_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(parse(data), InvalidFrame)


@settings(max_examples=300)
@given(json_values)
def test_parse_never_raises_on_arbitrary_json(value: Any) -> None:
    assert isinstance(parse(dumps(value)), RESULT_TYPES)


@settings(max_examples=400)
@given(
    st.sampled_from(["connected", "start", "media", "dtmf", "mark", "stop"]),
    st.dictionaries(
        st.sampled_from(["streamSid", "sequenceNumber", "start", "media", "dtmf", "mark", "stop", "protocol"]),
        json_values,
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "payload",
                "track",
                "timestamp",
                "chunk",
                "name",
                "digit",
                "callSid",
                "streamSid",
                "customParameters",
                "mediaFormat",
                "tracks",
                "accountSid",
            ]
        ),
        json_values | sids | b64,
    ),
)
def test_parse_never_raises_on_right_event_with_random_fields(
    event: str, top: dict[str, Any], nested: dict[str, Any]
) -> None:
    msg = {**top, "event": event}
    if event in msg and type(msg.get(event)) is not dict:
        msg[event] = nested
    result = parse(dumps(msg))
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, Media):
        assert media.is_base64(result.payload) and result.payload


@settings(max_examples=200)
@given(sids, b64, st.from_regex(r"[A-Za-z0-9_\-.:]{1,128}", fullmatch=True))
def test_builders_round_trip(stream_sid: str, payload: str, name: str) -> None:
    assert orjson.loads(media_frame(stream_sid, payload)) == {
        "event": "media",
        "streamSid": stream_sid,
        "media": {"payload": payload},
    }
    assert orjson.loads(mark_frame(stream_sid, name))["mark"] == {"name": name}
    if payload:
        inbound = parse(dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}))
        assert isinstance(inbound, Media) and inbound.payload == payload
    echo = parse(dumps({"event": "mark", "sequenceNumber": "5", "streamSid": stream_sid, "mark": {"name": name}}))
    assert echo == Mark(stream_sid, name, 5)


def test_is_base64_is_exactly_the_padded_base64_pattern() -> None:
    """Every string up to 6 characters over base64 letters, '=' and a few strangers, and up to 9
    over a smaller set (two groups, padding anywhere): the C check accepts exactly what the pattern
    it replaced accepted."""
    pattern = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?").fullmatch
    for alphabet, sizes in (("AQg+/=\né", range(7)), ("Ag=\n", range(7, 10))):
        for size in sizes:
            for chars in itertools.product(alphabet, repeat=size):
                text = "".join(chars)
                assert media.is_base64(text) == bool(pattern(text)), text


@settings(max_examples=500)
@given(st.text(alphabet='AB+/=z9-_ \n"\\é', max_size=12) | b64)
def test_is_base64_accepts_only_padded_base64(text: str) -> None:
    """What passes decodes strictly, to exactly the byte count the flood meter derives from its length
    (regression: "A" or "=" passed, and "=" even counted as -0.125 ms of audio)."""
    padded = _decodes_strictly(text) and len(text) % 4 == 0 and "=" not in text[:-2]
    assert bool(media.is_base64(text)) == padded
    if padded:
        pad = len(text) - len(text.rstrip("="))
        assert len(base64.b64decode(text)) == len(text) * 3 // 4 - pad


def _decodes_strictly(text: str) -> bool:
    try:
        binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeError):
        return False
    return True
