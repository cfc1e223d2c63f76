"""The bridge's built-in tools: the seed's example tool and the call-control definitions.

``generate_random_number`` is an ordinary :func:`~bridge.agent.tools.tool`, offered unless
``load_tools(..., include_builtins=False)``. ``end_call`` and ``transfer_call`` are not Python
tools: the call state machine (:mod:`bridge.call.state`) answers them itself, so only their
definitions live here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from bridge.agent.tools import tool

END_CALL_DESCRIPTION = (
    "End the phone call. Use it when the conversation is over or the caller asks to hang up. "
    "First say a short goodbye to the caller, then call this tool; the line closes once the "
    "goodbye has been heard."
)
TRANSFER_CALL_DESCRIPTION = (
    "Hand the caller over to a human. Use it when the caller asks for a person or you cannot "
    "help. Tell the caller you are transferring them before calling this tool."
)


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


def call_control_definitions(end_call: bool, transfer_numbers: Sequence[str]) -> list[dict[str, Any]]:
    """Flat tool definitions for the call-control tools the configuration enables.

    ``end_call`` takes no arguments. ``transfer_call`` is offered when ``transfer_numbers`` is
    not empty; its optional ``number`` is limited to those numbers (the first is the default).
    """
    definitions: list[dict[str, Any]] = []
    if end_call:
        definitions.append(
            {
                "type": "function",
                "name": "end_call",
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
                "name": "transfer_call",
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
    return definitions
