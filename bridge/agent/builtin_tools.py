"""The bridge's built-in tools: the seed's example tool and the call-control definitions.

``generate_random_number`` is an ordinary :func:`~bridge.agent.tools.tool`, offered unless
``load_tools(..., include_builtins=False)``. ``end_call``, ``transfer_call`` and
``collect_digits`` are not Python tools: the call core answers them itself (the call state
machine, :mod:`bridge.call.keypad` for the keypad), so only their definitions live here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from bridge.agent.events import COLLECT_DIGITS_TOOL, END_CALL_TOOL, TRANSFER_CALL_TOOL
from bridge.agent.tools import tool
from bridge.call.keypad import DEFAULT_FINISH_ON_KEY, DEFAULT_TIMEOUT_S, MAX_DIGITS, MAX_TIMEOUT_S

END_CALL_DESCRIPTION = (
    "End the phone call. Use it when the conversation is over or the caller asks to hang up. "
    "First say a short goodbye to the caller, then call this tool; the line closes once the "
    "goodbye has been heard."
)
TRANSFER_CALL_DESCRIPTION = (
    "Hand the caller over to a human. Use it when the caller asks for a person or you cannot "
    "help. Tell the caller you are transferring them before calling this tool."
)
COLLECT_DIGITS_DESCRIPTION = (
    "Collect digits the caller types on their phone's keypad. Use it whenever you need a number "
    "typed rather than spoken: an account or order number, a PIN or passcode, a date of birth, "
    "or a menu choice ('press 1 for sales'). First tell the caller what to type and how to "
    "finish (for example 'then press the hash key'), then call this tool; it returns "
    '{"digits": "..."} once the caller presses the finish key, reaches max_digits, or stops '
    'typing for timeout_s seconds (then with "timed_out": true, possibly with fewer or no '
    "digits: ask again). Set sensitive to true for PINs, passwords and card numbers: the digits "
    "are then kept out of logs and records. Never ask the caller to say such secrets aloud."
)


def collect_digits_definition() -> dict[str, Any]:
    """The flat definition of the built-in ``collect_digits`` tool (validated by
    :func:`bridge.call.keypad.parse_request`, whose limits the schema repeats)."""
    return {
        "type": "function",
        "name": COLLECT_DIGITS_TOOL,
        "description": COLLECT_DIGITS_DESCRIPTION,
        "parameters": {
            "type": "object",
            "properties": {
                "max_digits": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_DIGITS,
                    "description": "The most digits to collect; collection ends when this many were typed.",
                },
                "finish_on_key": {
                    "type": "string",
                    "enum": ["#", "*", ""],
                    "default": DEFAULT_FINISH_ON_KEY,
                    "description": 'The key that ends the entry (not included in the digits); "" for none.',
                },
                "timeout_s": {
                    "type": "number",
                    "minimum": 1,
                    "maximum": MAX_TIMEOUT_S,
                    "default": DEFAULT_TIMEOUT_S,
                    "description": "Seconds to wait for each key before giving up.",
                },
                "sensitive": {
                    "type": "boolean",
                    "default": False,
                    "description": "True for PINs, passwords and card numbers: masked in logs and records.",
                },
            },
            "required": ["max_digits"],
        },
    }


@tool
def generate_random_number(min: int, max: int) -> dict[str, int]:
    """Generate a random integer between min and max (inclusive).

    Args:
        min: Minimum value (inclusive).
        max: Maximum value (inclusive).
    """
    if min > max:
        raise ValueError(f"min ({min}) must not be greater than max ({max}); swap them")
    return {"result": random.randint(min, max), "min": min, "max": max}


def call_control_definitions(
    end_call: bool, transfer_numbers: Sequence[str], *, keypad: bool = False
) -> list[dict[str, Any]]:
    """Flat tool definitions for the call-control tools the configuration enables.

    ``end_call`` takes no arguments. ``transfer_call`` is offered when ``transfer_numbers`` is
    not empty; its optional ``number`` is limited to those numbers (the first is the default).
    ``collect_digits`` comes last with ``keypad`` (``KEYPAD_TOOL``; off unless asked for, so a
    caller that does not route the tool to :class:`bridge.call.keypad.Keypad` never offers it).
    """
    definitions: list[dict[str, Any]] = []
    if end_call:
        definitions.append(
            {
                "type": "function",
                "name": END_CALL_TOOL,
                "description": END_CALL_DESCRIPTION,
                "parameters": {"type": "object", "properties": {}, "required": []},
            }
        )
    numbers = list(dict.fromkeys(transfer_numbers))
    if numbers:
        number_doc = "Which number to transfer to"
        if len(numbers) > 1:
            number_doc += f"; leave it out for the default ({numbers[0]})"
        else:
            number_doc += " (there is only one; it may be left out)"
        definitions.append(
            {
                "type": "function",
                "name": TRANSFER_CALL_TOOL,
                "description": TRANSFER_CALL_DESCRIPTION,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "number": {
                            "type": "string",
                            "enum": numbers,
                            "description": number_doc + ".",
                        }
                    },
                    "required": [],
                },
            }
        )
    if keypad:
        definitions.append(collect_digits_definition())
    return definitions
