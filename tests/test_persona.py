"""The per-call session hook: persona overrides, validation and fallbacks."""

import importlib
import logging
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bridge.agent.builtin_tools import call_control_definitions
from bridge.agent.events import SessionConfig
from bridge.agent.tools import Tool, ToolRegistry
from bridge.call.context import CallContext
from bridge.call.persona import PersonaOverride, SessionHook, load_session_hook, resolve_session
from bridge.config import Persona
from bridge.errors import ConfigError

PERSONA = Persona(system_prompt="Default prompt.", greeting="Hello!", voice="ivy")
CTX = CallContext(call_id="c1", call_sid="CA1", direction="inbound", from_number="+14155550100")
STRANGER = CallContext(call_id="c2", call_sid="CA2", direction="inbound", from_number="+14155550111")
EXTRA = call_control_definitions(True, ["+14155550199"])


def lookup(order_id: str) -> str:
    """Look up an order."""
    return order_id


def book(day: str) -> str:
    """Book a day."""
    return day


REGISTRY = ToolRegistry([Tool(lookup), Tool(book)])


def names(config: SessionConfig) -> list[str]:
    return [t["name"] for t in config.tools]


async def resolve(hook: SessionHook | None, context: CallContext = CTX, **kw: Any) -> SessionConfig:
    return await resolve_session(
        hook=hook, context=context, persona=PERSONA, registry=REGISTRY, extra_tools=EXTRA, **kw
    )


DEFAULTS = SessionConfig("Default prompt.", "Hello!", "ivy", tuple(REGISTRY.definitions() + EXTRA))


async def test_no_hook_gives_defaults_with_all_tools_then_call_control() -> None:
    config = await resolve(None)
    assert config == DEFAULTS
    assert names(config) == ["lookup", "book", "end_call", "transfer_call"]


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (None, DEFAULTS),
        (PersonaOverride(), DEFAULTS),
        ({}, DEFAULTS),
        (
            {"greeting": "Hi Ada!", "voice": "james", "tools": ["book"]},
            SessionConfig("Default prompt.", "Hi Ada!", "james", (REGISTRY.definitions(["book"])[0], *EXTRA)),
        ),
        (
            PersonaOverride(system_prompt="Be brief.", tools=[]),
            SessionConfig("Be brief.", "Hello!", "ivy", tuple(EXTRA)),
        ),
        (
            {"greeting": "", "system_prompt": None},  # empty greeting: wait for the caller
            SessionConfig("Default prompt.", "", "ivy", DEFAULTS.tools),
        ),
        (
            PersonaOverride(tools=("book", "lookup", "book", "end_call")),  # call control is always there
            SessionConfig("Default prompt.", "Hello!", "ivy", (*REGISTRY.definitions(["book", "lookup"]), *EXTRA)),
        ),
    ],
)
@pytest.mark.parametrize("is_async", [False, True])
async def test_hook_result(returned: object, expected: SessionConfig, is_async: bool) -> None:
    seen: list[CallContext] = []

    def sync_hook(context: CallContext) -> Any:
        seen.append(context)
        return returned

    async def async_hook(context: CallContext) -> Any:
        seen.append(context)
        return returned

    assert await resolve(async_hook if is_async else sync_hook) == expected
    assert seen == [CTX]


async def test_sync_hook_runs_in_a_thread() -> None:
    main = threading.get_ident()
    threads: list[int] = []

    def hook(context: CallContext) -> None:
        threads.append(threading.get_ident())

    await resolve(hook)
    assert threads and threads[0] != main


async def test_callable_object_with_async_call() -> None:
    class Hook:
        async def __call__(self, context: CallContext) -> PersonaOverride:
            await trio.lowlevel.checkpoint()
            return PersonaOverride(voice="winter")

    assert (await resolve(Hook())).voice == "winter"


async def test_greets_a_known_caller_by_name() -> None:
    known = {"+14155550100": "Ada"}

    async def hook(context: CallContext) -> PersonaOverride | None:
        name = known.get(context.from_number)
        return PersonaOverride(greeting=f"Hi {name}, welcome back!") if name else None

    assert (await resolve(hook)).greeting == "Hi Ada, welcome back!"
    assert (await resolve(hook, STRANGER)).greeting == "Hello!"


def only_warning(caplog: pytest.LogCaptureFixture) -> str:
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.name == "bridge.persona"
    assert record.exc_info is None  # one line
    message = record.getMessage()
    assert "\n" not in message and message.endswith("using the default persona")
    return message


@pytest.mark.parametrize(
    ("returned", "why"),
    [
        ({"greting": "typo"}, "unknown key 'greting' (allowed: system_prompt, greeting, voice, tools)"),
        ({"greeting": 5}, "greeting must be a string, got int"),
        ({"system_prompt": "  "}, "system_prompt must not be empty"),
        ({"voice": "Ivy"}, "voice 'Ivy' is not a lower-case voice id"),
        (PersonaOverride(voice="ivy!"), "voice 'ivy!' is not a lower-case voice id"),
        (PersonaOverride(voice=""), "voice must not be empty"),
        ({"tools": "lookup"}, "tools must be a list of tool names"),
        ({"tools": [1]}, "tools must be a list of tool names, found 1"),
        ({"tools": ["lookup", "refund"]}, "unknown tool 'refund' (available: lookup, book)"),
        (["greeting"], "returned a list; return a PersonaOverride, a dict or None"),
    ],
)
async def test_invalid_override_falls_back_with_one_warning(
    returned: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(context: CallContext) -> Any:
        return returned

    with caplog.at_level(logging.DEBUG, logger="bridge.persona"):
        assert await resolve(hook) == DEFAULTS
    message = only_warning(caplog)
    assert "returned an invalid persona" in message and why in message


@pytest.mark.parametrize("is_async", [False, True])
async def test_raising_hook_falls_back(is_async: bool, caplog: pytest.LogCaptureFixture) -> None:
    def sync_hook(context: CallContext) -> None:
        raise KeyError("crm down")

    async def async_hook(context: CallContext) -> None:
        raise KeyError("crm down")

    with caplog.at_level(logging.WARNING, logger="bridge.persona"):
        assert await resolve(async_hook if is_async else sync_hook) == DEFAULTS
    message = only_warning(caplog)
    assert "raised KeyError: 'crm down'" in message


async def test_slow_async_hook_times_out_exactly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def hook(context: CallContext) -> PersonaOverride:
        await trio.sleep(60)
        return PersonaOverride(greeting="too late")

    start = trio.current_time()
    with caplog.at_level(logging.WARNING, logger="bridge.persona"):
        assert await resolve(hook) == DEFAULTS
    assert trio.current_time() - start == 2.0
    assert "took longer than 2 s" in only_warning(caplog)


async def test_slow_sync_hook_is_abandoned(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def hook(context: CallContext) -> PersonaOverride:
        release.wait(timeout=5)
        return PersonaOverride(greeting="too late")

    start = trio.current_time()
    with caplog.at_level(logging.WARNING, logger="bridge.persona"):
        assert await resolve(hook, timeout_s=0.5) == DEFAULTS
    release.set()
    assert trio.current_time() - start == 0.5
    assert "took longer than 0.5 s" in only_warning(caplog)


async def test_outside_cancellation_propagates() -> None:
    async def hook(context: CallContext) -> None:
        await trio.sleep_forever()

    with trio.move_on_after(0) as scope:
        await resolve(hook)
    assert scope.cancelled_caught


# --- loading the hook -------------------------------------------------------------------------


def write_module(tmp_path: Path, source: str) -> str:
    name = f"userhooks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    return name


async def test_load_session_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(
        tmp_path,
        """
        from bridge.call.context import CallContext

        def persona(context: CallContext) -> dict[str, str]:
            return {"greeting": f"Hello {context.from_number}"}

        NOT_CALLABLE = 3
        """,
    )
    assert load_session_hook(None) is None and load_session_hook("  ") is None
    hook = load_session_hook(f"{name}:persona")
    assert hook is not None
    assert (await resolve(hook)).greeting == "Hello +14155550100"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nocolon", "BRIDGE_SESSION_HOOK='nocolon' is not module:function"),
        ("mod:", "BRIDGE_SESSION_HOOK='mod:' is not module:function"),
        ("no_such_mod_xyz:f", "BRIDGE_SESSION_HOOK: cannot import module 'no_such_mod_xyz': ModuleNotFoundError"),
        ("bridge.errors:nothing", "BRIDGE_SESSION_HOOK: module 'bridge.errors' has no attribute 'nothing'"),
        (
            "bridge.call.persona:_FIELDS",
            "BRIDGE_SESSION_HOOK: 'bridge.call.persona:_FIELDS' is a tuple, not a function",
        ),
    ],
)
def test_load_session_hook_errors_name_the_variable(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_session_hook(value)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_load_session_hook_import_error_inside_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, "raise RuntimeError('missing CRM_URL')\n")
    with pytest.raises(
        ConfigError, match=rf"^BRIDGE_SESSION_HOOK: cannot import module '{name}': RuntimeError: missing CRM_URL$"
    ):
        load_session_hook(f"{name}:persona")
