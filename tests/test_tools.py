"""The tool registry: schema from signatures, argument checks, running, loading."""

import dataclasses
import enum
import importlib
import inspect
import logging
import textwrap
import threading
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import orjson
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.agent.builtin_tools import call_control_definitions, generate_random_number
from bridge.agent.tools import (
    Tool,
    ToolArgumentError,
    ToolDefinitionError,
    ToolRegistry,
    encode_result,
    load_tools,
    parse_docstring,
    tool,
    tool_of,
)
from bridge.call.context import CallContext
from bridge.errors import BridgeError, ConfigError

CTX = CallContext(call_id="c1", call_sid="CA123", direction="inbound", from_number="+14155550100")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


def make_tool(annotation: Any, default: Any = inspect.Parameter.empty) -> Tool:
    """A one-parameter tool ``fn(x: annotation [= default])``."""

    def fn(x):  # type: ignore[no-untyped-def]
        """Doc."""
        return x

    fn.__annotations__ = {"x": annotation}
    if default is not inspect.Parameter.empty:
        fn.__defaults__ = (default,)
    return Tool(fn)


# --- schema -----------------------------------------------------------------------------------

EMPTY = inspect.Parameter.empty
SCHEMA_CASES = [
    # (annotation, default, property schema, required)
    (str, EMPTY, {"type": "string"}, True),
    (int, EMPTY, {"type": "integer"}, True),
    (float, EMPTY, {"type": "number"}, True),
    (bool, EMPTY, {"type": "boolean"}, True),
    (list[str], EMPTY, {"type": "array", "items": {"type": "string"}}, True),
    (list[list[int]], EMPTY, {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}, True),
    (dict[str, int], EMPTY, {"type": "object", "additionalProperties": {"type": "integer"}}, True),
    (
        dict[str, list[bool]],
        EMPTY,
        {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "boolean"}}},
        True,
    ),
    (Literal["a", "b"], EMPTY, {"type": "string", "enum": ["a", "b"]}, True),
    (Literal[1, 2, 3], EMPTY, {"type": "integer", "enum": [1, 2, 3]}, True),
    (Literal[True], EMPTY, {"type": "boolean", "enum": [True]}, True),
    (Literal["a", 1], EMPTY, {"enum": ["a", 1]}, True),
    (Color, EMPTY, {"type": "string", "enum": ["red", "blue"]}, True),
    (Size, EMPTY, {"type": "integer", "enum": [1, 2]}, True),
    (str | None, EMPTY, {"type": "string"}, False),
    (Optional[int], EMPTY, {"type": "integer"}, False),  # noqa: UP045 - the spelling under test
    (Literal["x", "y"] | None, None, {"type": "string", "enum": ["x", "y"]}, False),
    (int, 5, {"type": "integer", "default": 5}, False),
    (str, "hi", {"type": "string", "default": "hi"}, False),
    (list[str], ["a"], {"type": "array", "items": {"type": "string"}, "default": ["a"]}, False),
    (Color, Color.BLUE, {"type": "string", "enum": ["red", "blue"], "default": "blue"}, False),
    (str, None, {"type": "string"}, False),  # `x: str = None` is treated as optional
    (Annotated[int, "how many"], EMPTY, {"type": "integer", "description": "how many"}, True),
]


@pytest.mark.parametrize(("annotation", "default", "expected", "required"), SCHEMA_CASES)
def test_schema_for_annotation(annotation: Any, default: Any, expected: dict[str, Any], required: bool) -> None:
    t = make_tool(annotation, default)
    assert t.parameters == {
        "type": "object",
        "properties": {"x": expected},
        "required": ["x"] if required else [],
    }


@pytest.mark.parametrize(
    ("annotation", "fragment"),
    [
        (tuple[int, int], "unsupported type annotation"),
        (set[str], "unsupported type annotation"),
        (int | str, "unions of several types"),
        (list, "write list[X]"),
        (dict, "write list[X] or dict[str, X]"),
        (dict[int, str], "unsupported type annotation"),
        (object, "unsupported type annotation"),
        (Any, "unsupported type annotation"),
        (list[object], "unsupported type annotation"),
    ],
)
def test_unsupported_annotation_names_function_and_parameter(annotation: Any, fragment: str) -> None:
    with pytest.raises(ToolDefinitionError) as info:
        make_tool(annotation)
    message = str(info.value)
    assert "fn" in message and "parameter 'x'" in message and fragment in message
    assert isinstance(info.value, BridgeError)


def test_missing_annotation_and_varargs_are_refused() -> None:
    def untyped(a):  # type: ignore[no-untyped-def]
        """Doc."""

    def varargs(*a: int) -> None:
        """Doc."""

    with pytest.raises(ToolDefinitionError, match=r"untyped, parameter 'a': add a type annotation"):
        tool(untyped)
    with pytest.raises(ToolDefinitionError, match=r"varargs, parameter 'a': \*args"):
        tool(varargs)


def test_tool_without_description_is_refused_and_description_can_be_given() -> None:
    def silent(a: int) -> int:
        return a

    with pytest.raises(ToolDefinitionError, match="silent: no description"):
        tool(silent)
    assert tool_of(tool(description="Echo a number.")(silent)).description == "Echo a number."  # type: ignore[union-attr]


def test_name_override_and_invalid_name() -> None:
    @tool(name="lookup-v2")
    def lookup(q: str) -> str:
        """Look something up."""
        return q

    t = tool_of(lookup)
    assert t is not None and t.name == "lookup-v2"
    assert t.definition()["name"] == "lookup-v2"
    with pytest.raises(ToolDefinitionError, match="must be 1-64 letters"):
        tool(name="has space")(lookup)


def test_google_docstring() -> None:
    doc = """Find a flight.

    Searches the
    schedule.

    Args:
        origin (str): Airport code
            the caller departs from.
        when: Date, e.g. 2026-01-02.
        *rest: ignored.

    Returns:
        origin: not a parameter.
    """
    summary, params = parse_docstring(doc)
    assert summary == "Find a flight."
    assert params == {
        "origin": "Airport code the caller departs from.",
        "when": "Date, e.g. 2026-01-02.",
        "rest": "ignored.",
    }


def test_rest_docstring() -> None:
    doc = """Find a flight, quickly
    and cheaply.
    :param origin: Airport code
        the caller departs from.
    :type origin: str
    :param str when: Date.
    :returns: a flight.
    """
    summary, params = parse_docstring(doc)
    assert summary == "Find a flight, quickly and cheaply."
    assert params == {"origin": "Airport code the caller departs from.", "when": "Date."}


def test_docstring_descriptions_reach_the_definition() -> None:
    @tool
    def find(origin: str, when: str | None = None) -> str:
        """Find a flight.

        Args:
            origin: Airport code.
            when: Date.
        """
        return origin

    assert tool_of(find).definition() == {  # type: ignore[union-attr]
        "type": "function",
        "name": "find",
        "description": "Find a flight.",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "description": "Airport code."},
                "when": {"type": "string", "description": "Date."},
            },
            "required": ["origin"],
        },
    }


def test_definition_is_a_fresh_copy() -> None:
    t = tool_of(generate_random_number)
    assert t is not None
    t.definition()["parameters"]["properties"].clear()
    assert "min" in t.definition()["parameters"]["properties"]


def test_decorator_returns_function_unchanged() -> None:
    def plain(a: int) -> int:
        """Double."""
        return a * 2

    async def coro(a: int) -> int:
        """Double."""
        return a * 2

    assert tool(plain) is plain and plain(2) == 4
    assert tool(name="c")(coro) is coro
    assert tool_of(plain) is not None and tool_of(len) is None


# --- context injection ------------------------------------------------------------------------


async def test_call_context_is_injected_not_described() -> None:
    seen: list[CallContext | None] = []

    @tool
    async def whoami(greeting: str, context: CallContext, maybe: Optional[CallContext] = None) -> str:  # noqa: UP045
        """Tell the caller their number."""
        seen.extend([context, maybe])
        return f"{greeting} {context.from_number}"

    t = tool_of(whoami)
    assert t is not None
    assert list(t.parameters["properties"]) == ["greeting"]
    assert await t.call(t.validate({"greeting": "hi"}), CTX) == "hi +14155550100"
    assert seen == [CTX, CTX]
    with pytest.raises(ToolArgumentError, match="unknown argument 'context'"):
        t.validate({"greeting": "hi", "context": {}})


# --- validation -------------------------------------------------------------------------------


@tool
def everything(
    name: str,
    count: int,
    ratio: float,
    flag: bool,
    tags: list[str],
    scores: dict[str, int],
    day: Literal["mon", "tue"],
    color: Color,
    note: str | None,
    limit: int = 10,
) -> str:
    """Exercise every type."""
    return "ok"


GOOD = {
    "name": "n",
    "count": 1,
    "ratio": 0.5,
    "flag": True,
    "tags": ["a"],
    "scores": {"x": 1},
    "day": "mon",
    "color": "red",
}

VALIDATION_ERRORS = [
    ({"count": "ten"}, """argument 'count': expected integer, got "ten\""""),
    ({"count": 1.5}, "argument 'count': expected integer, got 1.5"),
    ({"count": True}, "argument 'count': expected integer, got true"),
    ({"count": None}, "argument 'count': expected integer, got null"),
    ({"ratio": "0.5"}, """argument 'ratio': expected number, got "0.5\""""),
    ({"flag": "yes"}, """argument 'flag': expected boolean, got "yes\""""),
    ({"flag": 1}, "argument 'flag': expected boolean, got 1"),
    ({"name": 3}, "argument 'name': expected string, got 3"),
    ({"tags": "a"}, """argument 'tags': expected array of string, got "a\""""),
    ({"tags": ["a", 2]}, "argument 'tags[1]': expected string, got 2"),
    ({"scores": [1]}, "argument 'scores': expected object, got [1]"),
    ({"scores": {"x": "1"}}, """argument 'scores.x': expected integer, got "1\""""),
    ({"day": "sun"}, """argument 'day': expected one of "mon", "tue", got "sun\""""),
    ({"color": "green"}, """argument 'color': expected one of "red", "blue", got "green\""""),
    ({"limit": "x" * 100}, "argument 'limit': expected integer, got \"" + "x" * 56 + "..."),
    (
        {"extra": 1},
        "unknown argument 'extra'; expected: name, count, ratio, flag, tags, scores, day, color, note, limit",
    ),
]


@pytest.mark.parametrize(("change", "message"), VALIDATION_ERRORS)
def test_validation_message_names_the_field(change: dict[str, Any], message: str) -> None:
    t = tool_of(everything)
    assert t is not None
    with pytest.raises(ToolArgumentError) as info:
        t.validate({**GOOD, **change})
    assert str(info.value) == message


def test_missing_required_argument() -> None:
    t = tool_of(everything)
    assert t is not None
    args = dict(GOOD)
    del args["day"]
    with pytest.raises(ToolArgumentError, match=r"^missing required argument 'day' \(one of \"mon\", \"tue\"\)$"):
        t.validate(args)


def test_validation_coerces_harmless_cases() -> None:
    t = tool_of(everything)
    assert t is not None
    out = t.validate({**GOOD, "count": 3.0, "ratio": 2, "color": "blue", "limit": 7.0})
    assert out["count"] == 3 and type(out["count"]) is int
    assert out["ratio"] == 2.0 and type(out["ratio"]) is float
    assert out["color"] is Color.BLUE
    assert out["limit"] == 7 and type(out["limit"]) is int
    assert out["note"] is None  # optional without default: passed as None
    assert "limit" not in t.validate(GOOD)  # defaulted and absent: the function's default applies
    assert t.validate({**GOOD, "note": None})["note"] is None
    assert make_tool(Literal[1, 2]).validate({"x": 2.0}) == {"x": 2}
    assert make_tool(Size).validate({"x": 2}) == {"x": Size.LARGE}


def test_no_argument_tool_rejects_arguments_and_accepts_none() -> None:
    def ping() -> str:
        """Ping."""
        return "pong"

    t = Tool(ping)
    assert t.parameters == {"type": "object", "properties": {}, "required": []}
    assert t.validate(None) == {}
    with pytest.raises(ToolArgumentError, match="this tool takes no arguments"):
        t.validate({"a": 1})
    with pytest.raises(ToolArgumentError, match="arguments must be a JSON object"):
        t.validate([1])  # type: ignore[arg-type]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*GOOD, "note", "limit", "junk"]), JSON))
def test_validate_raises_only_argument_errors(arguments: dict[str, Any]) -> None:
    t = tool_of(everything)
    assert t is not None
    try:
        t.validate(arguments)
    except ToolArgumentError as exc:
        assert str(exc).startswith(("argument '", "unknown argument '", "missing required argument '"))


# --- results ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain text", "plain text"),
        ({"a": 1}, '{"a":1}'),
        ([1, "b"], '[1,"b"]'),
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        (None, '{"ok":true}'),
        (Point(1, 2), '{"x":1,"y":2}'),
        ({1: "one"}, '{"1":"one"}'),
        (Decimal("1.10"), '"1.10"'),
        ({"s": frozenset({3})}, '{"s":[3]}'),
        (Color.RED, '"red"'),
    ],
)
def test_encode_result(value: Any, text: str) -> None:
    assert encode_result(value) == text


async def test_unencodable_result_becomes_an_error() -> None:
    @tool
    def weird() -> object:
        """Return something odd."""
        return object()

    registry = ToolRegistry([tool_of(weird)])  # type: ignore[list-item]
    text, is_error = await registry.run("weird", {}, CTX, timeout_s=5)
    assert is_error
    assert orjson.loads(text) == {
        "error": "TypeError: the tool's return value cannot be encoded as JSON (Type is not JSON serializable: object)"
    }


# --- running ----------------------------------------------------------------------------------


async def test_async_and_sync_tools_run() -> None:
    @tool
    async def add(a: int, b: int) -> dict[str, int]:
        """Add."""
        await trio.lowlevel.checkpoint()
        return {"sum": a + b}

    @tool
    def mul(a: float, b: float) -> float:
        """Multiply."""
        return a * b

    registry = ToolRegistry([tool_of(add), tool_of(mul)])  # type: ignore[list-item]
    assert await registry.run("add", {"a": 2, "b": 3.0}, CTX, timeout_s=1) == ('{"sum":5}', False)
    assert await registry.run("mul", {"a": 2, "b": 4}, CTX, timeout_s=1) == ("8.0", False)


async def test_sync_tool_runs_in_a_thread_without_blocking_the_loop() -> None:
    released = threading.Event()
    main_thread = threading.get_ident()

    @tool
    def blocking() -> dict[str, bool]:
        """Block until released."""
        return {"released": released.wait(timeout=5), "other_thread": threading.get_ident() != main_thread}

    registry = ToolRegistry([tool_of(blocking)])  # type: ignore[list-item]
    results: list[tuple[str, bool]] = []

    async def call() -> None:
        results.append(await registry.run("blocking", {}, CTX, timeout_s=10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        released.set()  # only reachable if the tool is not holding the event loop
    assert results == [('{"released":true,"other_thread":true}', False)]


async def test_async_tool_timeout_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    @tool
    async def slow() -> str:
        """Take forever."""
        await trio.sleep(100)
        return "late"

    registry = ToolRegistry([tool_of(slow)])  # type: ignore[list-item]
    start = trio.current_time()
    text, is_error = await registry.run("slow", {}, CTX, timeout_s=2.5)
    assert trio.current_time() - start == 2.5
    assert is_error and orjson.loads(text) == {"error": "tool 'slow' timed out after 2.5 s"}


async def test_sync_tool_timeout_abandons_the_thread(autojump_clock: trio.testing.MockClock) -> None:
    release = threading.Event()

    @tool
    def stuck() -> str:
        """Block."""
        release.wait(timeout=5)
        return "late"

    registry = ToolRegistry([tool_of(stuck)])  # type: ignore[list-item]
    start = trio.current_time()
    text, is_error = await registry.run("stuck", {}, CTX, timeout_s=3)
    release.set()
    assert trio.current_time() - start == 3
    assert is_error and orjson.loads(text) == {"error": "tool 'stuck' timed out after 3 s"}


@pytest.mark.parametrize("is_async", [False, True])
async def test_tool_exception_becomes_error_result_and_is_logged(
    is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(order_id: str) -> str:
        """Fail."""
        raise LookupError(f"no order {order_id}")

    async def afail(order_id: str) -> str:
        """Fail."""
        raise LookupError(f"no order {order_id}")

    registry = ToolRegistry([Tool(afail if is_async else fail, name="fail")])
    with caplog.at_level(logging.WARNING, logger="bridge.tools"):
        text, is_error = await registry.run("fail", {"order_id": "A1"}, CTX, timeout_s=1)
    assert is_error and orjson.loads(text) == {"error": "LookupError: no order A1"}
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is not None


async def test_exception_without_message_gives_its_type() -> None:
    async def boom() -> str:
        """Boom."""
        raise RuntimeError

    registry = ToolRegistry([Tool(boom)])
    assert await registry.run("boom", {}, CTX, timeout_s=1) == ('{"error":"RuntimeError"}', True)


async def test_an_exception_text_that_is_not_utf8_still_becomes_an_error_result() -> None:
    async def read_file() -> str:
        """Read a file whose name was decoded with surrogateescape."""
        raise FileNotFoundError(b"/tmp/caf\xe9".decode("utf-8", "surrogateescape"))

    registry = ToolRegistry([Tool(read_file)])
    text, is_error = await registry.run("read_file", {}, CTX, timeout_s=1)
    assert is_error and orjson.loads(text) == {"error": "FileNotFoundError: /tmp/caf?"}


async def test_unknown_tool_lists_available() -> None:
    registry = load_tools(None)
    text, is_error = await registry.run("nope", {}, CTX, timeout_s=1)
    assert is_error and orjson.loads(text) == {"error": "unknown tool 'nope'; available: generate_random_number"}
    empty = ToolRegistry()
    assert await empty.run("x", None, CTX, timeout_s=1) == ('{"error":"unknown tool \'x\'; available: (none)"}', True)


async def test_invalid_arguments_become_error_result() -> None:
    registry = load_tools(None)
    text, is_error = await registry.run("generate_random_number", {"min": 1, "max": "ten"}, CTX, timeout_s=1)
    assert is_error and orjson.loads(text) == {"error": "argument 'max': expected integer, got \"ten\""}


async def test_outside_cancellation_propagates() -> None:
    started = trio.Event()

    async def hang() -> str:
        """Hang."""
        started.set()
        await trio.sleep_forever()
        return ""

    registry = ToolRegistry([Tool(hang)])
    with trio.move_on_after(0) as scope:
        await registry.run("hang", {}, CTX, timeout_s=100)
    assert scope.cancelled_caught


def test_registry_add_get_names_definitions() -> None:
    def a() -> str:
        """A."""
        return "a"

    def b() -> str:
        """B."""
        return "b"

    ta, tb = Tool(a), Tool(b)
    registry = ToolRegistry([ta])
    registry.add(tb)
    registry.add(tb)  # the same tool twice is harmless
    assert registry.names() == ["a", "b"] and len(registry) == 2 and "a" in registry
    assert registry.get("b") is tb and registry.get("c") is None
    assert [d["name"] for d in registry.definitions()] == ["a", "b"]
    assert [d["name"] for d in registry.definitions(["b", "a", "b"])] == ["b", "a"]
    assert registry.definitions([]) == []
    with pytest.raises(KeyError, match="unknown tool 'c'"):
        registry.definitions(["c"])
    with pytest.raises(ValueError, match="duplicate tool name 'a'"):
        registry.add(Tool(b, name="a"))


# --- loading ----------------------------------------------------------------------------------


def write_module(tmp_path: Path, source: str) -> str:
    name = f"usertools_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    return name


USER_TOOLS = '''
    from __future__ import annotations

    import enum
    from typing import Literal

    from bridge.agent.tools import tool
    from bridge.call.context import CallContext


    class Unit(enum.Enum):
        C = "celsius"
        F = "fahrenheit"


    @tool
    async def weather(city: str, context: CallContext, unit: Unit = Unit.C) -> Report:
        """Get the weather for a city.

        Args:
            city: City name.
            unit: Temperature unit.
        """
        return Report(city, unit.value, context.call_id)


    @tool(name="pick")
    def choose(option: Literal["a", "b"], note: str | None = None) -> str:
        """Pick an option."""
        return f"{option}:{note}"


    def not_a_tool() -> None:
        pass


    class Report:  # defined after use: return annotations are not evaluated
        def __init__(self, city: str, unit: str, call_id: str) -> None:
            self.city, self.unit, self.call_id = city, unit, call_id

        def model_dump(self, mode: str) -> dict[str, str]:
            return {"city": self.city, "unit": self.unit, "call": self.call_id}
'''


async def test_load_tools_from_module_with_future_annotations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, USER_TOOLS)
    registry = load_tools(name)
    assert registry.names() == ["generate_random_number", "weather", "pick"]
    weather = registry.get("weather")
    assert weather is not None
    assert weather.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name."},
            "unit": {
                "type": "string",
                "enum": ["celsius", "fahrenheit"],
                "description": "Temperature unit.",
                "default": "celsius",
            },
        },
        "required": ["city"],
    }
    assert await registry.run("weather", {"city": "Oslo", "unit": "fahrenheit"}, CTX, timeout_s=1) == (
        '{"city":"Oslo","unit":"fahrenheit","call":"c1"}',
        False,
    )
    assert await registry.run("pick", {"option": "b"}, CTX, timeout_s=1) == ("b:None", False)
    assert load_tools(name, include_builtins=False).names() == ["weather", "pick"]


def test_load_tools_several_modules_and_reexports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    first = write_module(tmp_path, USER_TOOLS)
    second = write_module(
        tmp_path,
        f'''
        from bridge.agent.tools import tool
        from {first} import weather  # re-exported: the same tool, not a duplicate

        @tool
        def hello() -> str:
            """Say hello."""
            return "hello"
        ''',
    )
    registry = load_tools(f" {first} , {second},", include_builtins=False)
    assert registry.names() == ["weather", "pick", "hello"]


def test_load_tools_import_failure_names_bridge_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_tools("no_such_module_xyz")
    message = str(info.value)
    assert message.startswith("BRIDGE_TOOLS: cannot import module 'no_such_module_xyz': ModuleNotFoundError")
    assert "\n" not in message
    broken = write_module(tmp_path, "def f(:\n    pass\n")
    with pytest.raises(ConfigError, match=rf"^BRIDGE_TOOLS: cannot import module '{broken}': SyntaxError"):
        load_tools(broken)
    bad_tool = write_module(
        tmp_path,
        '''
        from bridge.agent.tools import tool

        @tool
        def bad(x: set[int]) -> None:
            """Bad."""
        ''',
    )
    with pytest.raises(ConfigError) as info:
        load_tools(bad_tool)
    assert f"module '{bad_tool}': ToolDefinitionError: tool bad, parameter 'x'" in str(info.value)


def test_load_tools_duplicate_name_names_both_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    source = '''
        from bridge.agent.tools import tool

        @tool
        def hello() -> str:
            """Say hello."""
            return "hi"
    '''
    first, second = write_module(tmp_path, source), write_module(tmp_path, source)
    with pytest.raises(ConfigError) as info:
        load_tools(f"{first},{second}")
    assert str(info.value) == (
        f"BRIDGE_TOOLS: module '{second}' defines tool 'hello', already defined in module "
        f"'{first}': rename one with @tool(name=...)"
    )
    clash = write_module(
        tmp_path,
        '''
        from bridge.agent.tools import tool

        @tool
        def generate_random_number() -> int:
            """Always four."""
            return 4
        ''',
    )
    with pytest.raises(ConfigError, match=r"already defined in module 'bridge\.agent\.builtin_tools'"):
        load_tools(clash)
    assert load_tools(clash, include_builtins=False).names() == ["generate_random_number"]


def test_load_tools_refuses_call_control_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(
        tmp_path,
        '''
        from bridge.agent.tools import tool

        @tool
        def end_call() -> str:
            """Hang up."""
            return ""
        ''',
    )
    with pytest.raises(ConfigError, match="'end_call', a name reserved"):
        load_tools(name)


def test_load_tools_warns_about_module_without_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, "def helper() -> None:\n    pass\n")
    with caplog.at_level(logging.WARNING, logger="bridge.tools"):
        assert load_tools(name, include_builtins=False).names() == []
    assert f"module '{name}' defines no @tool functions" in caplog.text


# --- built-ins --------------------------------------------------------------------------------


def test_generate_random_number_definition_matches_the_seed() -> None:
    assert tool_of(generate_random_number).definition() == {  # type: ignore[union-attr]
        "type": "function",
        "name": "generate_random_number",
        "description": "Generate a random integer between min and max (inclusive).",
        "parameters": {
            "type": "object",
            "properties": {
                "min": {"type": "integer", "description": "Minimum value (inclusive)."},
                "max": {"type": "integer", "description": "Maximum value (inclusive)."},
            },
            "required": ["min", "max"],
        },
    }


@given(st.integers(-1000, 1000), st.integers(0, 50))
def test_generate_random_number_stays_in_range(low: int, span: int) -> None:
    out = generate_random_number(low, low + span)
    assert low <= out["result"] <= low + span
    assert out["min"] == low and out["max"] == low + span


async def test_generate_random_number_through_the_registry() -> None:
    registry = load_tools(None)
    text, is_error = await registry.run("generate_random_number", {"min": 7.0, "max": 7}, CTX, timeout_s=1)
    assert (orjson.loads(text), is_error) == ({"result": 7, "min": 7, "max": 7}, False)
    text, is_error = await registry.run("generate_random_number", {"min": 9, "max": 1}, CTX, timeout_s=1)
    assert is_error
    assert orjson.loads(text) == {"error": "ValueError: min (9) must not be greater than max (1); swap them"}


def test_call_control_definitions() -> None:
    assert call_control_definitions(False, []) == []
    [end] = call_control_definitions(True, [])
    assert end["type"] == "function" and end["name"] == "end_call"
    assert end["parameters"] == {"type": "object", "properties": {}, "required": []}
    assert "goodbye" in end["description"] and "then call this tool" in end["description"]
    [transfer] = call_control_definitions(False, ["+14155550100", "+14155550199", "+14155550100"])
    assert transfer["name"] == "transfer_call" and "human" in transfer["description"]
    number = transfer["parameters"]["properties"]["number"]
    assert number["type"] == "string" and number["enum"] == ["+14155550100", "+14155550199"]
    assert transfer["parameters"]["required"] == []
    assert [d["name"] for d in call_control_definitions(True, ["+14155550100"])] == ["end_call", "transfer_call"]
