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

from bridge.agent.events import CALL_CONTROL_TOOLS, TOOL_OK, tool_error
from bridge.agent.schema import (
    ToolArgumentError,
    ToolDefinitionError,
    TypeSpec,
    argument_error,
    nullable,
    parse_docstring,
    resolve,
    show,
)
from bridge.call.context import CallContext
from bridge.errors import ConfigError

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

__all__ = [
    "RESERVED_NAMES", "Tool", "ToolArgumentError", "ToolDefinitionError", "ToolRegistry",
    "encode_result", "load_tools", "parse_docstring", "tool", "tool_of",
]

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__bridge_tool__"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
RESERVED_NAMES = CALL_CONTROL_TOOLS  # the call core answers these itself (bridge/agent/events.py)
_MISSING = object()


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
    type: TypeSpec
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
            kind = resolve(hints[p.name], where)
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
                kind = nullable(kind)
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
            raise ToolArgumentError(f"arguments must be a JSON object, got {show(arguments)}")
        unknown = [k for k in arguments if k not in self._params]
        if unknown:
            expected = ", ".join(self._params) if self._params else "none (this tool takes no arguments)"
            raise ToolArgumentError(f"unknown argument '{unknown[0]}'; expected: {expected}")
        kwargs: dict[str, Any] = {}
        for name, param in self._params.items():
            if name in arguments:
                value = arguments[name]
                if value is None and not param.type.nullable:
                    raise argument_error(name, param.type.label, value)
                kwargs[name] = param.type.check(value, name)
            elif param.required:
                raise ToolArgumentError(f"missing required argument '{name}' ({param.type.label})")
            elif param.default is _MISSING:
                kwargs[name] = None
        return kwargs

    async def call(self, kwargs: dict[str, Any], context: CallContext) -> str:
        """Call the function with ``kwargs`` from :meth:`validate` (and ``context`` for its
        context parameters); return its result as text.

        Raises whatever the function raises. Cancellation cancels an async tool; a sync tool's
        worker thread is abandoned (it runs to completion in the background and its result is
        dropped).
        """
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
        return TOOL_OK
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
            return tool_error(f"unknown tool '{name}'; available: {available}"), True
        try:
            kwargs = found.validate(arguments)
        except ToolArgumentError as exc:
            log.info("tool %r: invalid arguments: %s", name, exc)
            return tool_error(str(exc)), True
        with trio.move_on_after(timeout_s):
            try:
                return await found.call(kwargs, context), False
            except Exception as exc:
                log.warning("tool %r raised %s", name, type(exc).__name__, exc_info=True)
                text = str(exc)
                return tool_error(f"{type(exc).__name__}: {text}" if text else type(exc).__name__), True
        # Only reached when the deadline cancelled the call: every other path returned above.
        log.warning("tool %r timed out after %g s", name, timeout_s)
        return tool_error(f"tool '{name}' timed out after {timeout_s:g} s"), True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_tools(modules: str | None, *, include_builtins: bool = True) -> ToolRegistry:
    """Import each comma-separated module of ``BRIDGE_TOOLS`` and register its decorated tools.

    The built-in example tools (:mod:`bridge.agent.builtin_tools`) come first when
    ``include_builtins``. Raises :class:`ConfigError` (one line naming ``BRIDGE_TOOLS``, the
    module and the cause) when a module cannot be imported, a tool definition is invalid, or two
    tools share a name.
    """
    registry = ToolRegistry()
    paths = [m.strip() for m in (modules or "").split(",") if m.strip()]
    if include_builtins:
        paths.insert(0, "bridge.agent.builtin_tools")
    origin: dict[str, str] = {}
    for path in paths:
        try:
            module = importlib.import_module(path)
        except Exception as exc:
            raise ConfigError(f"BRIDGE_TOOLS: cannot import module '{path}': {_one_line(exc)}") from exc
        found = [t for t in map(tool_of, vars(module).values()) if t is not None]
        if not found and path != "bridge.agent.builtin_tools":
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
