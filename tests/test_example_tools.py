"""examples/tools_example.py, exactly as the README shows it, through the real loaders."""

import orjson

from bridge.agent.builtin_tools import call_control_definitions
from bridge.agent.tools import load_tools
from bridge.call.context import CallContext
from bridge.call.persona import load_session_hook, resolve_session
from bridge.config import Persona
from examples import tools_example

ADA = CallContext(call_id="c1", call_sid="CA1", direction="inbound", from_number="+14155550100")
STRANGER = CallContext(call_id="c2", call_sid="CA2", direction="inbound", from_number="+14155550111")
PERSONA = Persona(system_prompt="You are Acme's assistant.", greeting="Thanks for calling Acme!", voice="ivy")


async def test_example_tools_run() -> None:
    registry = load_tools("examples.tools_example")
    assert registry.names() == ["generate_random_number", "get_order_status", "book_appointment"]

    text, is_error = await registry.run("get_order_status", {"order_id": "a-1042"}, ADA, timeout_s=5)
    assert not is_error
    assert orjson.loads(text) == {
        "order_id": "a-1042",
        "status": "shipped",
        "expected": "Thursday",
        "caller": "+14155550100",
    }

    text, is_error = await registry.run("get_order_status", {"order_id": "Z-1"}, ADA, timeout_s=5)
    assert is_error
    assert orjson.loads(text) == {"error": "LookupError: no order 'Z-1'; ask the caller to read the number again"}

    before = len(tools_example.BOOKINGS)
    text, is_error = await registry.run("book_appointment", {"day": "friday", "time": "14:30"}, ADA, timeout_s=5)
    assert not is_error
    assert orjson.loads(text) == {"day": "friday", "time": "14:30", "notes": None, "phone": "+14155550100"}
    assert len(tools_example.BOOKINGS) == before + 1

    text, is_error = await registry.run("book_appointment", {"day": "sunday", "time": "9:00"}, ADA, timeout_s=5)
    assert is_error
    assert "argument 'day': expected one of \"monday\"" in orjson.loads(text)["error"]


def test_example_schema() -> None:
    registry = load_tools("examples.tools_example", include_builtins=False)
    [book] = registry.definitions(["book_appointment"])
    params = book["parameters"]
    assert params["required"] == ["day", "time"]
    assert params["properties"]["day"]["enum"] == ["monday", "tuesday", "wednesday", "thursday", "friday"]
    assert "context" not in params["properties"]
    assert params["properties"]["notes"] == {
        "type": "string",
        "description": "Anything the caller wants the staff to know.",
    }


async def test_example_persona_hook() -> None:
    registry = load_tools("examples.tools_example")
    hook = load_session_hook("examples.tools_example:persona")
    extra = call_control_definitions(True, [])

    known = await resolve_session(hook=hook, context=ADA, persona=PERSONA, registry=registry, extra_tools=extra)
    assert known.greeting == "Hi Ada, welcome back! How can I help today?"
    assert "speaking with Ada" in known.system_prompt
    assert known.voice == "ivy"
    assert [t["name"] for t in known.tools] == ["get_order_status", "book_appointment", "end_call"]

    stranger = await resolve_session(hook=hook, context=STRANGER, persona=PERSONA, registry=registry, extra_tools=extra)
    assert stranger.greeting == "Thanks for calling Acme!"
    assert stranger.system_prompt == "You are Acme's assistant."
    assert [t["name"] for t in stranger.tools] == [
        "generate_random_number",
        "get_order_status",
        "book_appointment",
        "end_call",
    ]
