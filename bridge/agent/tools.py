"""Tools: a decorated Python function becomes something the agent can call.

Write a module, point ``BRIDGE_TOOLS`` at it (``BRIDGE_TOOLS=mypkg.tools``, comma-separated for
several) and every function decorated with :func:`tool` is offered to the agent::

    from __future__ import annotations

    from typing import Literal

    from bridge.agent.tools import tool
    from bridge.call.context import CallContext


    @tool
    async def get_order_status(order_id: str, context: CallContext) -> dict[str, str]:
        \"\"\"Look up the delivery status of one of the caller's orders.

        Args:
            order_id: The order number the caller reads out, e.g. "A-1042".
        \"\"\"
        return {"order_id": order_id, "status": "shipped", "caller": context.from_number}


    @tool(name="book_slot")
    def book(day: Literal["monday", "tuesday"], notes: str | None = None) -> str:
        \"\"\"Book an appointment for the caller.

        :param day: The day the caller wants.
        :param notes: Anything the caller wants us to know.
        \"\"\"
        return f"Booked for {day}."

How a function becomes a tool:

- The name is the function's name (or ``name=``); the description, which tells the model *when*
  to call it, is the docstring's first paragraph (or ``description=``).
- Each parameter becomes a JSON Schema property: ``str``, ``int``, ``float``, ``bool``,
  ``list[X]``, ``dict[str, X]``, ``Literal[...]``, ``Enum`` subclasses, ``X | None`` and
  ``Annotated[X, "description"]``. Parameters without a default are required; ``X | None`` ones
  and those with a default are not. Descriptions come from an ``Args:`` section (Google style) or
  ``:param x:`` lines (reST). A parameter annotated :class:`CallContext` is filled in by the
  bridge and is not shown to the model. Anything else is refused with :class:`ToolDefinitionError`
  when the module is imported.
- Arguments are checked before your function runs; the model gets a precise error (``argument
  'max': expected integer, got "ten"``) and usually retries. ``3.0`` is accepted for an ``int``.
- Return a ``str`` (sent as is) or anything orjson can encode (dict, list, number, dataclass...);
  ``None`` is sent as ``{"ok":true}``. Raise to report a failure: the model reads
  ``{"error": "ValueError: <your message>"}``, so write messages for it.
- ``async def`` tools run in the call's Trio nursery and must not block. Plain ``def`` tools run
  in a worker thread, so blocking I/O (``requests``, a database driver) is fine there.
- Every call has a deadline (``TOOL_TIMEOUT_S``); on timeout the model is told so. An async tool
  is cancelled; a sync tool's thread is abandoned and runs on in the background.
- Decorated functions are returned unchanged: call them directly in your own tests.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
import functools
import importlib
import inspect
import logging
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import PurePath
from typing import Any, TypeVar, overload

import orjson
import trio

from bridge.call.context import CallContext
from bridge.errors import BridgeError, ConfigError

# Sync tools get threads of their own: a hung tool whose thread was abandoned at its timeout
# keeps its slot until it returns, and must not starve Trio's default limiter (DNS, hooks...).
TOOL_THREADS = 32
_limiter: trio.CapacityLimiter | None = None


def _tool_threads() -> trio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(TOOL_THREADS)
    return _limiter

log = logging.getLogger("bridge.tools")

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__bridge_tool__"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
# Names the call state machine answers itself (bridge/call/state.py); a user tool may not take them.
RESERVED_NAMES = frozenset({"end_call", "transfer_call"})
_MISSING = object()


class ToolDefinitionError(BridgeError):
    """A decorated function cannot become a tool. The message names the function and parameter."""


class ToolArgumentError(BridgeError):
    """The model's arguments do not fit the tool's schema. The message names the failing field."""


# --- types: annotation -> schema + checker ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Type:
    """One supported annotation: its JSON Schema and how to check (and coerce) a JSON value."""

    schema: dict[str, Any]
    label: str  # what the model is told it should have sent, e.g. "integer"
    # (value, field path) -> coerced value; raises ToolArgumentError
    check: Callable[[Any, str], Any]
    nullable: bool = False


def _show(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, expected: str, value: Any) -> ToolArgumentError:
    return ToolArgumentError(f"argument '{path}': expected {expected}, got {_show(value)}")


def _check_string(value: Any, path: str) -> str:
    if type(value) is not str:
        raise _fail(path, "string", value)
    return value


def _check_integer(value: Any, path: str) -> int:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)  # models often write 3.0 for 3
    raise _fail(path, "integer", value)


def _check_number(value: Any, path: str) -> float:
    if type(value) in (int, float):
        return float(value)
    raise _fail(path, "number", value)


def _check_boolean(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise _fail(path, "boolean", value)
    return value


_SCALARS: dict[Any, _Type] = {
    str: _Type({"type": "string"}, "string", _check_string),
    int: _Type({"type": "integer"}, "integer", _check_integer),
    float: _Type({"type": "number"}, "number", _check_number),
    bool: _Type({"type": "boolean"}, "boolean", _check_boolean),
}


def _json_type(values: Iterable[Any]) -> str | None:
    kinds = {_SCALARS[type(v)].label for v in values}
    return kinds.pop() if len(kinds) == 1 else None


def _enum_type(choices: list[Any], convert: Callable[[Any], Any] | None) -> _Type:
    schema: dict[str, Any] = {"enum": choices}
    kind = _json_type(choices)
    if kind is not None:
        schema = {"type": kind, "enum": choices}
    expected = "one of " + ", ".join(_show(c) for c in choices)
    choice_types = {type(c) for c in choices}

    def check(value: Any, path: str) -> Any:
        if type(value) is float and value.is_integer() and int in choice_types:
            value = int(value)  # 2.0 for Literal[1, 2], as for an integer parameter
        # True == 1 in Python but not in JSON: compare the JSON type too
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return convert(choice) if convert else choice
        raise _fail(path, expected, value)

    return _Type(schema, expected, check)


def _nullable(inner: _Type) -> _Type:
    if inner.nullable:
        return inner
    check = inner.check
    return dataclasses.replace(inner, nullable=True, check=lambda v, path: None if v is None else check(v, path))


def _resolve(annotation: Any, where: str) -> _Type:
    """Map an annotation to a :class:`_Type`; ``where`` names the parameter in errors."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = _resolve(args[0], where)
        notes = [a for a in args[1:] if isinstance(a, str)]
        if notes:
            return dataclasses.replace(inner, schema={**inner.schema, "description": notes[0]})
        return inner
    if isinstance(annotation, type) and annotation in _SCALARS:
        return _SCALARS[annotation]
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) != 1:
            raise ToolDefinitionError(
                f"{where}: unions of several types are not supported ({annotation}); use one type, optionally '| None'"
            )
        inner = _resolve(members[0], where)
        if len(members) == len(args):
            return inner
        return _nullable(inner)
    if origin is typing.Literal:
        if not all(type(a) in (str, int, float, bool) for a in args):
            raise ToolDefinitionError(f"{where}: Literal values must be str, int, float or bool")
        return _enum_type(list(args), None)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [m.value for m in annotation]
        if not values or not all(type(v) in (str, int, float, bool) for v in values):
            raise ToolDefinitionError(f"{where}: Enum {annotation.__name__} needs str, int, float or bool values")
        return _enum_type(values, annotation)
    if origin is list and len(args) == 1:
        item = _resolve(args[0], where)
        item_check = item.check

        def check_list(value: Any, path: str) -> list[Any]:
            if type(value) is not list:
                raise _fail(path, f"array of {item.label}", value)
            return [item_check(v, f"{path}[{i}]") for i, v in enumerate(value)]

        return _Type({"type": "array", "items": item.schema}, f"array of {item.label}", check_list)
    if origin is dict and len(args) == 2 and args[0] is str:
        val = _resolve(args[1], where)
        val_check = val.check

        def check_dict(value: Any, path: str) -> dict[str, Any]:
            if type(value) is not dict:
                raise _fail(path, "object", value)
            return {k: val_check(v, f"{path}.{k}") for k, v in value.items()}

        schema = {"type": "object", "additionalProperties": val.schema}
        return _Type(schema, "object", check_dict)
    hint = ""
    if annotation in (list, dict) or origin in (list, dict):
        hint = "; write list[X] or dict[str, X] with a supported X"
    raise ToolDefinitionError(f"{where}: unsupported type annotation {annotation!r}{hint}")


# --- docstrings -------------------------------------------------------------------------------

_GOOGLE_HEADER = re.compile(r"^(Args|Arguments|Parameters|Params|Keyword Args):\s*$")
_SECTION_HEADER = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")
_GOOGLE_ITEM = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_REST_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")
_REST_FIELD = re.compile(r"^:\w+")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a docstring into (first paragraph, {parameter: description}).

    Understands Google style (an ``Args:`` section) and reST (``:param name:`` lines). Whitespace
    inside each part is collapsed to single spaces.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped or _GOOGLE_HEADER.match(stripped) or _REST_FIELD.match(stripped):
            break
        summary.append(stripped)
    params: dict[str, str] = {}
    current: str | None = None
    in_google = False
    item_indent = -1
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            continue
        if _GOOGLE_HEADER.match(stripped) and indent == 0:
            in_google, current, item_indent = True, None, -1
            continue
        if in_google:
            if indent == 0:  # the section ended (``Returns:``, ``:raises:``, prose)
                in_google, current = False, None
            else:
                item = _GOOGLE_ITEM.match(stripped)
                if item and (item_indent < 0 or indent <= item_indent):
                    item_indent = indent
                    current = item.group(1).lstrip("*")
                    params[current] = item.group(3).strip()
                elif current is not None:
                    params[current] = f"{params[current]} {stripped}".strip()
                continue
        rest = _REST_PARAM.match(stripped)
        if rest:
            current = rest.group(1)
            params[current] = rest.group(2).strip()
        elif _REST_FIELD.match(stripped):
            current = None
        elif current is not None and indent > 0:
            params[current] = f"{params[current]} {stripped}".strip()
    return " ".join(summary), params


def _is_context(annotation: Any) -> bool:
    """``CallContext`` (or ``CallContext | None``): injected by the bridge, not in the schema."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return annotation is CallContext


def _parameter_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Evaluated parameter annotations (strings too, for ``from __future__ import annotations``).

    The return annotation is left out: it is not part of the schema and may name something the
    module defines later.
    """
    annotations = getattr(fn, "__annotations__", None) or {}
    stand_in = types.SimpleNamespace(
        __annotations__={k: v for k, v in annotations.items() if k != "return"},
        __globals__=getattr(inspect.unwrap(fn), "__globals__", {}),
    )
    return typing.get_type_hints(stand_in, include_extras=True)


# --- tools ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Param:
    name: str
    type: _Type
    required: bool
    default: Any  # _MISSING when the function has none


class Tool:
    """One callable tool: its definition for the agent, argument checks and invocation."""

    __slots__ = (
        "_context_params",
        "_fn",
        "_is_async",
        "_params",
        "description",
        "name",
        "parameters",
    )

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> None:
        """Build a tool from ``fn``. Raises :class:`ToolDefinitionError` naming what is wrong."""
        label = getattr(fn, "__qualname__", repr(fn))
        self.name = name if name is not None else getattr(fn, "__name__", "")
        if not _NAME.match(self.name):
            raise ToolDefinitionError(f"tool {label}: name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        summary, param_docs = parse_docstring(inspect.getdoc(fn))
        self.description = " ".join((description if description is not None else summary).split())
        if not self.description:
            raise ToolDefinitionError(
                f"tool {label}: no description; the model needs one to know when to call it: "
                "add a docstring or pass @tool(description=...)"
            )
        try:
            hints = _parameter_hints(fn)
        except Exception as exc:
            raise ToolDefinitionError(
                f"tool {label}: cannot resolve its type annotations ({type(exc).__name__}: {exc}); "
                "import every annotated type at module level, not only under TYPE_CHECKING"
            ) from exc
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn)
        self._context_params: list[str] = []
        self._params: dict[str, _Param] = {}
        properties: dict[str, Any] = {}
        required: list[str] = []
        for p in inspect.signature(fn).parameters.values():
            where = f"tool {label}, parameter '{p.name}'"
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise ToolDefinitionError(f"{where}: *args, **kwargs and positional-only parameters are not supported")
            if p.name not in hints:
                raise ToolDefinitionError(f"{where}: add a type annotation (e.g. '{p.name}: str')")
            if _is_context(hints[p.name]):
                self._context_params.append(p.name)
                continue
            kind = _resolve(hints[p.name], where)
            default = _MISSING if p.default is p.empty else p.default
            schema = dict(kind.schema)
            if param_docs.get(p.name):
                schema["description"] = param_docs[p.name]
            if default is not _MISSING and default is not None:
                try:
                    orjson.dumps(default)
                except TypeError as exc:
                    raise ToolDefinitionError(f"{where}: default {default!r} is not JSON") from exc
                schema["default"] = default.value if isinstance(default, enum.Enum) else default
            if default is None:
                kind = _nullable(kind)
            param = _Param(p.name, kind, default is _MISSING and not kind.nullable, default)
            self._params[p.name] = param
            properties[p.name] = schema
            if param.required:
                required.append(p.name)
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "required": required,
        }

    @property
    def function(self) -> Callable[..., Any]:
        """The decorated function, unchanged."""
        return self._fn

    def __repr__(self) -> str:
        return f"<Tool {self.name}({', '.join(self._params)})>"

    def definition(self) -> dict[str, Any]:
        """The flat Voice Agent API tool object (a fresh copy, safe to modify)."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": orjson.loads(orjson.dumps(self.parameters)),
        }

    def validate(self, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check the model's arguments and return the keyword arguments to call with.

        Coerces only harmless cases (``3`` for a number, ``3.0`` for an integer, an Enum's value
        to its member). A missing ``X | None`` parameter without a default is passed as ``None``.
        Raises :class:`ToolArgumentError` naming the first failing field.
        """
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(f"arguments must be a JSON object, got {_show(arguments)}")
        unknown = [k for k in arguments if k not in self._params]
        if unknown:
            expected = ", ".join(self._params) if self._params else "none (this tool takes no arguments)"
            raise ToolArgumentError(f"unknown argument '{unknown[0]}'; expected: {expected}")
        kwargs: dict[str, Any] = {}
        for name, param in self._params.items():
            if name in arguments:
                value = arguments[name]
                if value is None and not param.type.nullable:
                    raise _fail(name, param.type.label, value)
                kwargs[name] = param.type.check(value, name)
            elif param.required:
                raise ToolArgumentError(f"missing required argument '{name}' ({param.type.label})")
            elif param.default is _MISSING:
                kwargs[name] = None
        return kwargs

    async def invoke(self, arguments: Mapping[str, Any] | None, context: CallContext) -> str:
        """Validate ``arguments``, call the function and return its result as text.

        Raises :class:`ToolArgumentError` for bad arguments and whatever the function raises.
        Cancellation cancels an async tool; a sync tool's worker thread is abandoned (it runs to
        completion in the background and its result is dropped).
        """
        return await self._call(self.validate(arguments), context)

    async def _call(self, kwargs: dict[str, Any], context: CallContext) -> str:
        for name in self._context_params:
            kwargs[name] = context
        if self._is_async:
            result = await self._fn(**kwargs)
        else:
            # Sync tools may block (HTTP, databases): keep them off the event loop.
            result = await trio.to_thread.run_sync(
                functools.partial(self._fn, **kwargs), abandon_on_cancel=True, limiter=_tool_threads()
            )
        return encode_result(result)


def _default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, decimal.Decimal | PurePath):
        return str(value)
    dump = getattr(value, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        return dump(mode="json")
    raise TypeError(type(value).__name__)


def encode_result(value: Any) -> str:
    """A tool's return value as the ``tool.result`` text: str as is, else JSON (None -> ok)."""
    if isinstance(value, str):
        return value
    if value is None:
        return '{"ok":true}'
    try:
        return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError as exc:  # orjson names the offending type
        raise TypeError(f"the tool's return value cannot be encoded as JSON ({exc})") from None


@overload
def tool(fn: F, /) -> F: ...
@overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[F], F]: ...
def tool(fn: F | None = None, /, *, name: str | None = None, description: str | None = None) -> F | Callable[[F], F]:
    """Mark a function as a tool: ``@tool`` or ``@tool(name=..., description=...)``.

    The function is returned unchanged, with its :class:`Tool` in an attribute that
    :func:`load_tools` finds. Raises :class:`ToolDefinitionError` at decoration time for a
    signature that cannot be described to the model.
    """

    def mark(f: F) -> F:
        setattr(f, _MARK, Tool(f, name=name, description=description))
        return f

    return mark(fn) if fn is not None else mark


def tool_of(obj: object) -> Tool | None:
    """The :class:`Tool` attached to a decorated function, or None."""
    found = getattr(obj, _MARK, None)
    return found if isinstance(found, Tool) else None


# --- registry ---------------------------------------------------------------------------------


def _error(message: str) -> str:
    return orjson.dumps({"error": message}).decode()


class ToolRegistry:
    """The tools offered on calls, by name, and a runner that turns every outcome into a result."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> None:
        """Register ``tool``. Raises ValueError if another tool already has its name."""
        existing = self._tools.get(tool.name)
        if existing is not None and existing is not tool:
            raise ValueError(f"duplicate tool name '{tool.name}'")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        """Tool names in registration order."""
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def definitions(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Flat tool definitions for ``names`` (in that order), or for all tools when None.

        Raises KeyError for a name that is not registered.
        """
        chosen = self.names() if names is None else list(dict.fromkeys(names))
        missing = [n for n in chosen if n not in self._tools]
        if missing:
            raise KeyError(f"unknown tool '{missing[0]}'")
        return [self._tools[n].definition() for n in chosen]

    async def run(
        self,
        name: str,
        arguments: Mapping[str, Any] | None,
        context: CallContext,
        *,
        timeout_s: float,
    ) -> tuple[str, bool]:
        """Run one tool call; return ``(result text, is_error)``. Never raises but Cancelled.

        Every failure becomes a JSON ``{"error": ...}`` result written for the model: unknown
        tool, invalid arguments, the tool raising (logged with its traceback) or overrunning
        ``timeout_s``. Cancellation from outside propagates; an abandoned sync tool's thread
        finishes in the background.
        """
        found = self._tools.get(name)
        if found is None:
            log.info("the agent called unknown tool %r", name)
            available = ", ".join(self._tools) or "(none)"
            return _error(f"unknown tool '{name}'; available: {available}"), True
        try:
            kwargs = found.validate(arguments)
        except ToolArgumentError as exc:
            log.info("tool %r: invalid arguments: %s", name, exc)
            return _error(str(exc)), True
        with trio.move_on_after(timeout_s):
            try:
                return await found._call(kwargs, context), False
            except Exception as exc:
                log.warning("tool %r raised %s", name, type(exc).__name__, exc_info=True)
                text = str(exc)
                return _error(f"{type(exc).__name__}: {text}" if text else type(exc).__name__), True
        # Only reached when the deadline cancelled the call: every other path returned above.
        log.warning("tool %r timed out after %g s", name, timeout_s)
        return _error(f"tool '{name}' timed out after {timeout_s:g} s"), True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_tools(modules: str | None, *, include_builtins: bool = True) -> ToolRegistry:
    """Import each comma-separated module of ``BRIDGE_TOOLS`` and register its decorated tools.

    The built-in example tools (:mod:`bridge.builtin_tools`) come first when
    ``include_builtins``. Raises :class:`ConfigError` (one line naming ``BRIDGE_TOOLS``, the
    module and the cause) when a module cannot be imported, a tool definition is invalid, or two
    tools share a name.
    """
    registry = ToolRegistry()
    paths = [m.strip() for m in (modules or "").split(",") if m.strip()]
    if include_builtins:
        paths.insert(0, "bridge.builtin_tools")
    origin: dict[str, str] = {}
    for path in paths:
        try:
            module = importlib.import_module(path)
        except Exception as exc:
            raise ConfigError(f"BRIDGE_TOOLS: cannot import module '{path}': {_one_line(exc)}") from exc
        found = [t for t in map(tool_of, vars(module).values()) if t is not None]
        if not found and path != "bridge.builtin_tools":
            log.warning("BRIDGE_TOOLS: module '%s' defines no @tool functions", path)
        for t in found:
            if t.name in RESERVED_NAMES:
                raise ConfigError(
                    f"BRIDGE_TOOLS: module '{path}' defines tool '{t.name}', a name reserved for "
                    "the bridge's call control: rename it with @tool(name=...)"
                )
            existing = registry.get(t.name)
            if existing is not None and existing is not t:
                raise ConfigError(
                    f"BRIDGE_TOOLS: module '{path}' defines tool '{t.name}', already defined in "
                    f"module '{origin[t.name]}': rename one with @tool(name=...)"
                )
            registry.add(t)
            origin.setdefault(t.name, path)
    return registry
