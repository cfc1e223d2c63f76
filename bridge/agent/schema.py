"""From Python type hints and docstrings to the JSON Schema the agent sees, and back: checking
(and harmlessly coercing) the JSON arguments the model sends. Pure: no I/O, no trio.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from bridge.errors import BridgeError


class ToolDefinitionError(BridgeError):
    """A decorated function cannot become a tool. The message names the function and parameter."""


class ToolArgumentError(BridgeError):
    """The model's arguments do not fit the tool's schema. The message names the failing field."""


# --- types: annotation -> schema + checker ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TypeSpec:
    """One supported annotation: its JSON Schema and how to check (and coerce) a JSON value."""

    schema: dict[str, Any]
    label: str  # what the model is told it should have sent, e.g. "integer"
    # (value, field path) -> coerced value; raises ToolArgumentError
    check: Callable[[Any, str], Any]
    nullable: bool = False


def show(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def argument_error(path: str, expected: str, value: Any) -> ToolArgumentError:
    return ToolArgumentError(f"argument '{path}': expected {expected}, got {show(value)}")


def _check_string(value: Any, path: str) -> str:
    if type(value) is not str:
        raise argument_error(path, "string", value)
    return value


def _check_integer(value: Any, path: str) -> int:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)  # models often write 3.0 for 3
    raise argument_error(path, "integer", value)


def _check_number(value: Any, path: str) -> float:
    if type(value) in (int, float):
        return float(value)
    raise argument_error(path, "number", value)


def _check_boolean(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise argument_error(path, "boolean", value)
    return value


_SCALARS: dict[Any, TypeSpec] = {
    str: TypeSpec({"type": "string"}, "string", _check_string),
    int: TypeSpec({"type": "integer"}, "integer", _check_integer),
    float: TypeSpec({"type": "number"}, "number", _check_number),
    bool: TypeSpec({"type": "boolean"}, "boolean", _check_boolean),
}


def _json_type(values: Iterable[Any]) -> str | None:
    kinds = {_SCALARS[type(v)].label for v in values}
    return kinds.pop() if len(kinds) == 1 else None


def _enum_type(choices: list[Any], convert: Callable[[Any], Any] | None) -> TypeSpec:
    schema: dict[str, Any] = {"enum": choices}
    kind = _json_type(choices)
    if kind is not None:
        schema = {"type": kind, "enum": choices}
    expected = "one of " + ", ".join(show(c) for c in choices)
    choice_types = {type(c) for c in choices}

    def check(value: Any, path: str) -> Any:
        if type(value) is float and value.is_integer() and int in choice_types:
            value = int(value)  # 2.0 for Literal[1, 2], as for an integer parameter
        # True == 1 in Python but not in JSON: compare the JSON type too
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return convert(choice) if convert else choice
        raise argument_error(path, expected, value)

    return TypeSpec(schema, expected, check)


def nullable(inner: TypeSpec) -> TypeSpec:
    if inner.nullable:
        return inner
    check = inner.check
    return dataclasses.replace(inner, nullable=True, check=lambda v, path: None if v is None else check(v, path))


def resolve(annotation: Any, where: str) -> TypeSpec:
    """Map an annotation to a :class:`TypeSpec`; ``where`` names the parameter in errors."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = resolve(args[0], where)
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
        inner = resolve(members[0], where)
        if len(members) == len(args):
            return inner
        return nullable(inner)
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
        item = resolve(args[0], where)
        item_check = item.check

        def check_list(value: Any, path: str) -> list[Any]:
            if type(value) is not list:
                raise argument_error(path, f"array of {item.label}", value)
            return [item_check(v, f"{path}[{i}]") for i, v in enumerate(value)]

        return TypeSpec({"type": "array", "items": item.schema}, f"array of {item.label}", check_list)
    if origin is dict and len(args) == 2 and args[0] is str:
        val = resolve(args[1], where)
        val_check = val.check

        def check_dict(value: Any, path: str) -> dict[str, Any]:
            if type(value) is not dict:
                raise argument_error(path, "object", value)
            return {k: val_check(v, f"{path}.{k}") for k, v in value.items()}

        schema = {"type": "object", "additionalProperties": val.schema}
        return TypeSpec(schema, "object", check_dict)
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
