"""bridge.call.keypad (the collect_digits collection) and the tool's definition, on plain data."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.agent.builtin_tools import call_control_definitions, collect_digits_definition
from bridge.agent.events import tool_error
from bridge.call.keypad import (
    MAX_DIGITS,
    DigitsRequest,
    Keypad,
    KeypadPhase,
    KeyRecorded,
    TellAgent,
    ToolResult,
    key_instructions,
    mask_digits,
    parse_request,
)

T0 = 50.0


def results(actions: list[Any]) -> list[ToolResult]:
    return [a for a in actions if isinstance(a, ToolResult)]


def collect(keys: str, arguments: dict[str, Any], *, step_s: float = 1.0) -> tuple[Keypad, list[Any]]:
    """Start a collection at T0 and press ``keys`` one per ``step_s``; every action in order."""
    pad = Keypad()
    actions: list[Any] = list(pad.start("call-1", arguments, T0))
    for i, key in enumerate(keys, start=1):
        actions += pad.press(key, T0 + i * step_s)
    return pad, actions


@pytest.mark.parametrize(
    ("keys", "arguments", "digits"),
    [
        ("1234#", {"max_digits": 10}, "1234"),  # the finish key ends it and is left out
        ("#", {"max_digits": 10}, ""),  # finish at once: no digits, not a time-out
        ("12345678", {"max_digits": 4}, "1234"),  # the limit ends it; later keys are not digits
        ("12*3", {"max_digits": 3, "finish_on_key": "*"}, "12"),
        ("12#3", {"max_digits": 3, "finish_on_key": "*"}, "12#"),  # '#' is a digit when '*' finishes
        ("1#2", {"max_digits": 2, "finish_on_key": ""}, "1#"),  # no finish key: only the limit
        ("1x2 3", {"max_digits": 3}, "123"),  # not keypad keys: ignored
    ],
)
def test_a_collection_ends_on_the_finish_key_or_the_limit(keys: str, arguments: dict[str, Any], digits: str) -> None:
    pad, actions = collect(keys, arguments)
    [result] = results(actions)
    assert result == ToolResult("call-1", json.dumps({"digits": digits}), False, json.dumps({"digits": digits}))
    assert pad.phase is KeypadPhase.IDLE and pad.next_deadline() is None


def test_the_timeout_restarts_with_each_key_and_reports_what_was_typed() -> None:
    pad, actions = collect("12", {"max_digits": 6, "timeout_s": 5})
    assert results(actions) == []
    assert pad.next_deadline() == T0 + 2 + 5  # 5 s from the last key, not from the start
    assert pad.tick(T0 + 6.99) == []
    [result] = pad.tick(T0 + 7.0)
    assert isinstance(result, ToolResult)
    assert json.loads(result.result) == {"digits": "12", "timed_out": True}
    assert pad.tick(T0 + 100) == []  # ended once


def test_a_timeout_with_no_key_at_all() -> None:
    pad = Keypad()
    assert pad.start("c", {"max_digits": 4}, T0) == []
    assert pad.next_deadline() == T0 + 10  # the default timeout
    [result] = pad.tick(T0 + 10)
    assert isinstance(result, ToolResult)
    assert json.loads(result.result) == {"digits": "", "timed_out": True} and not result.is_error


def test_sensitive_digits_are_masked_everywhere_but_the_agents_result() -> None:
    _pad, actions = collect("4321#", {"max_digits": 8, "sensitive": True})
    assert [a for a in actions if isinstance(a, KeyRecorded)] == [KeyRecorded(d, sensitive=True) for d in "4321#"]
    [result] = results(actions)
    assert json.loads(result.result) == {"digits": "4321"}  # the model needs them
    assert json.loads(result.logged) == {"digits": "****"} and result.sensitive
    assert "4321" not in result.logged and "4321" not in repr(json.loads(result.logged))


def test_sensitive_timeout_is_masked_too() -> None:
    pad = Keypad()
    pad.start("c", {"max_digits": 8, "sensitive": True, "timeout_s": 2}, T0)
    assert pad.sensitive
    pad.press("9", T0 + 1)
    [result] = pad.tick(T0 + 3)
    assert isinstance(result, ToolResult)
    assert json.loads(result.logged) == {"digits": "*", "timed_out": True}
    assert not pad.sensitive


def test_keys_outside_a_collection_are_recorded_and_told_only_with_dtmf_to_agent() -> None:
    assert Keypad().press("5", T0) == [KeyRecorded("5", sensitive=False)]
    assert Keypad(dtmf_to_agent=True).press("5", T0) == [
        KeyRecorded("5", sensitive=False),
        TellAgent(key_instructions("5")),
    ]
    assert "'5'" in key_instructions("5")
    assert Keypad(dtmf_to_agent=True).press("A", T0) == []  # not a keypad key


def test_a_second_collection_while_one_runs_is_an_error_and_the_first_goes_on() -> None:
    pad = Keypad()
    pad.start("first", {"max_digits": 2}, T0)
    [error] = pad.start("second", {"max_digits": 2}, T0 + 1)
    assert isinstance(error, ToolResult) and error.is_error and error.tool_call_id == "second"
    assert "already" in json.loads(error.result)["error"]
    pad.press("1", T0 + 2)
    [done] = results(pad.press("2", T0 + 3))
    assert done.tool_call_id == "first" and json.loads(done.result) == {"digits": "12"}


def test_cancel_forgets_the_collection_without_a_result() -> None:
    pad = Keypad()
    pad.start("c", {"max_digits": 2}, T0)
    pad.cancel()
    assert pad.phase is KeypadPhase.IDLE and pad.tick(T0 + 60) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "max_digits is required and must be a whole number from 1 to 64"),
        ({"max_digits": "4"}, "max_digits is required and must be a whole number from 1 to 64"),
        ({"max_digits": True}, "max_digits is required and must be a whole number from 1 to 64"),
        ({"max_digits": 4.5}, "max_digits is required and must be a whole number from 1 to 64"),
        ({"max_digits": 0}, "max_digits is out of range: use 1 to 64"),
        ({"max_digits": 10**5000}, "max_digits is out of range: use 1 to 64"),
        ({"max_digits": 4, "finish_on_key": "##"}, 'finish_on_key must be one key of 0-9, * or #, or "" for none'),
        ({"max_digits": 4, "finish_on_key": "A"}, 'finish_on_key must be one key of 0-9, * or #, or "" for none'),
        ({"max_digits": 4, "finish_on_key": 1}, 'finish_on_key must be one key of 0-9, * or #, or "" for none'),
        ({"max_digits": 4, "timeout_s": 0}, "timeout_s=0 is out of range: use 1 to 120 seconds"),
        ({"max_digits": 4, "timeout_s": 1e9}, "timeout_s=1e+09 is out of range: use 1 to 120 seconds"),
        ({"max_digits": 4, "timeout_s": float("nan")}, "timeout_s must be a number of seconds from 1 to 120"),
        ({"max_digits": 4, "timeout_s": "10"}, "timeout_s must be a number of seconds from 1 to 120"),
        ({"max_digits": 4, "sensitive": "yes"}, "sensitive must be true or false"),
        ({"max_digits": 4, "pin": 1}, "unknown argument(s) pin: use max_digits, finish_on_key, timeout_s, sensitive"),
    ],
)
def test_bad_arguments_get_a_precise_error_result_and_start_nothing(arguments: dict[str, Any], message: str) -> None:
    assert parse_request(arguments) == message
    pad = Keypad()
    [error] = pad.start("c", arguments, T0)
    assert error == ToolResult("c", tool_error(message), True, tool_error(message))
    assert json.loads(error.result) == {"error": message}
    assert pad.phase is KeypadPhase.IDLE


def test_defaults_and_coercions() -> None:
    assert parse_request({"max_digits": 4}) == DigitsRequest(4, "#", 10.0, False)
    assert parse_request({"max_digits": 4.0, "finish_on_key": None, "timeout_s": 3}) == DigitsRequest(4, "", 3.0, False)


def test_mask_digits() -> None:
    assert mask_digits("") == "" and mask_digits("0451") == "****"


def test_the_tool_definition_matches_the_validation() -> None:
    definition = collect_digits_definition()
    assert definition["name"] == "collect_digits"
    properties = definition["parameters"]["properties"]
    assert list(properties) == ["max_digits", "finish_on_key", "timeout_s", "sensitive"]
    assert definition["parameters"]["required"] == ["max_digits"]
    assert properties["max_digits"]["maximum"] == MAX_DIGITS
    assert properties["finish_on_key"]["default"] == "#" and properties["timeout_s"]["default"] == 10
    assert properties["sensitive"]["default"] is False
    for key in properties["finish_on_key"]["enum"]:
        assert isinstance(parse_request({"max_digits": 1, "finish_on_key": key}), DigitsRequest)
    description = definition["description"].lower()
    for use in ("account", "pin", "menu"):
        assert use in description


def test_no_user_tool_may_take_the_name() -> None:
    from bridge.agent.tools import RESERVED_NAMES
    from bridge.call.keypad import TOOL_NAME

    assert TOOL_NAME == "collect_digits" and TOOL_NAME in RESERVED_NAMES


def test_the_tool_is_offered_only_when_asked_for() -> None:
    assert [d["name"] for d in call_control_definitions(True, [])] == ["end_call"]
    names = [d["name"] for d in call_control_definitions(True, ["+14155550100"], keypad=True)]
    assert names == ["end_call", "transfer_call", "collect_digits"]


def test_cancel_call_stops_only_the_collection_of_that_tool_call() -> None:
    keypad = Keypad()
    assert keypad.start("c1", {"max_digits": 4}, 0.0) == []
    assert keypad.cancel_call("c_other") is False and keypad.phase is KeypadPhase.COLLECTING
    assert keypad.cancel_call("c1") is True and keypad.phase is KeypadPhase.IDLE
    assert keypad.cancel_call("c1") is False
    assert keypad.next_deadline() is None and keypad.tick(100.0) == []
    assert [type(a) for a in keypad.press("1", 1.0)] == [KeyRecorded]  # a key outside a collection
