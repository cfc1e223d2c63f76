"""Catches an incompatible upgrade of the pinned serving stack before it reaches a phone call."""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import trio_websocket
from hypercorn.config import Config

ROOT = Path(__file__).resolve().parent.parent


def test_installed_versions_match_the_pins() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in deps:
        name, pinned = re.match(r"([\w\-\[\]]+)==([\w.]+)", spec).groups()  # type: ignore[union-attr]
        name = name.split("[")[0]  # an extra (psycopg[binary]) names the same distribution
        assert version(name) == pinned, f"{name} is {version(name)}, pinned {pinned}"


def test_trio_websocket_client_api_we_use() -> None:
    params = inspect.signature(trio_websocket.wrap_client_stream).parameters
    assert {"extra_headers", "message_queue_size", "max_message_size"} <= set(params)
    assert hasattr(trio_websocket.WebSocketConnection, "ping")


def test_hypercorn_has_the_one_request_per_connection_setting() -> None:
    """server.hypercorn_config sets it (the front door must see every request head); an
    attribute Hypercorn does not know would be set silently and do nothing."""
    assert Config().keep_alive_max_requests == 1000  # the default we override, so it is read


# --- library privates: only in bridge/net/, each listed in its docstring ----------------------

LIBRARIES = ("trio_websocket", "wsproto", "hypercorn")
_LISTED = re.compile(r"``((?:trio_websocket|wsproto|hypercorn)(?:\.\w+)*)\.(_[a-z]\w*)``")
_GUARD = re.compile(r"Guard: ``(tests/[\w/]+\.py)::(\w+)``")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _library_private_names() -> set[str]:
    """Every single-underscore name a pinned library defines or uses as an attribute."""
    return _private_names_of(LIBRARIES) - _private_names_of(_ELSEWHERE)


def _private_names_of(libraries: tuple[str, ...]) -> set[str]:
    import importlib

    names: set[str] = set()
    for library in libraries:
        root = Path(importlib.import_module(library).__file__ or "").parent
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute):
                    candidate = node.attr
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    candidate = node.name
                else:
                    continue
                if _is_private(candidate):
                    names.add(candidate)
    return names


def _project_files() -> list[Path]:
    files = sorted(p for d in ("bridge", "tools", "tests") for p in (ROOT / d).rglob("*.py"))
    return [p for p in files if p != Path(__file__).resolve()]  # this file names them as strings


# prometheus_client's privates the tests read (``Counter._value``) are not these libraries':
# a name private there too only counts when read off a library module, class or subclass.
_ELSEWHERE = ("prometheus_client",)


def _own_private_names(files: list[Path]) -> set[str]:
    """Private names the project itself defines (methods, assigned attributes, slots, globals)."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)  # __slots__ entries
    return {n for n in names if _is_private(n)}


def library_privates_used(source: str, library_private: set[str], own: set[str]) -> set[str]:
    """The library private names ``source`` uses: imported, read off a library module or class,
    used in a subclass of a library class (``self._x``/``super()._x`` it does not define itself),
    read by ``getattr``, or read off any object when the project defines no such name itself."""
    tree = ast.parse(source)
    library_bound: set[str] = set()  # local names bound to a library module or class
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    library_bound.add((alias.asname or alias.name).split(".")[0])
                    used.update(part for part in alias.name.split(".") if _is_private(part))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
            used.update(part for part in (node.module or "").split(".") if _is_private(part))
            for alias in node.names:
                library_bound.add(alias.asname or alias.name)
                if _is_private(alias.name):
                    used.add(alias.name)

    def root_name(expr: ast.expr) -> str | None:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    def check(node: ast.AST, subclass_defines: set[str] | None) -> None:
        for child in ast.walk(node):
            if isinstance(child, ast.Attribute) and _is_private(child.attr):
                base = child.value
                if root_name(base) in library_bound:
                    used.add(child.attr)
                elif subclass_defines is not None and (
                    (isinstance(base, ast.Name) and base.id == "self")
                    or (isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super")
                ):
                    if child.attr not in subclass_defines:
                        used.add(child.attr)
                elif child.attr in library_private and child.attr not in own:
                    used.add(child.attr)
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Name)
                and child.func.id in ("getattr", "hasattr", "setattr")
                and len(child.args) >= 2
                and isinstance(child.args[1], ast.Constant)
                and isinstance(child.args[1].value, str)
                and child.args[1].value in library_private
                and child.args[1].value not in own
            ):
                used.add(child.args[1].value)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(root_name(b) in library_bound for b in node.bases):
            defines = {
                t.attr
                for t in ast.walk(node)
                if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store) and isinstance(t.value, ast.Name)
            } | {f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
            # Its own methods override the library's: calling super()'s is still a use.
            supers = {
                c.attr
                for c in ast.walk(node)
                if isinstance(c, ast.Attribute)
                and isinstance(c.value, ast.Call)
                and getattr(c.value.func, "id", "") == "super"
            }
            check(node, defines - supers)
    check(tree, None)
    return used


def _listed_privates() -> list[tuple[str, str, str, str]]:
    """(owner, name, guard file, guard test) for each entry of bridge/net's docstring list."""
    import bridge.net

    doc = bridge.net.__doc__ or ""
    entries = []
    for item in doc.split("\n- ")[1:]:
        listed, guard = _LISTED.search(item), _GUARD.search(" ".join(item.split()))
        if listed and guard:
            entries.append((listed.group(1), listed.group(2), guard.group(1), guard.group(2)))
    return entries


def test_no_module_outside_bridge_net_uses_a_library_private() -> None:
    files = _project_files()
    net = ROOT / "bridge" / "net"
    library_private, own = _library_private_names(), _own_private_names(files)
    offenders = {
        str(path.relative_to(ROOT)): sorted(found)
        for path in files
        if net not in path.parents
        if (found := library_privates_used(path.read_text(), library_private, own))
    }
    assert offenders == {}


def test_bridge_net_docstring_lists_exactly_the_library_privates_it_uses() -> None:
    net_files = sorted((ROOT / "bridge" / "net").glob("*.py"))
    # Strict here: a name counts as ours only if bridge/net itself defines it.
    library_private, own = _library_private_names(), _own_private_names(net_files)
    used = set().union(*(library_privates_used(p.read_text(), library_private, own) for p in net_files))
    listed = {name for _, name, _, _ in _listed_privates()}
    assert used == listed


def test_every_listed_library_private_still_exists_and_its_guard_test_too() -> None:
    import importlib

    entries = _listed_privates()
    assert len(entries) >= 17
    for owner, name, guard_file, guard_test in entries:
        module_name, _, class_name = owner.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        assigned = re.search(rf"self\.{name}\b[^=\n]*=(?!=)", inspect.getsource(cls))
        assert hasattr(cls, name) or assigned, f"{owner}.{name} is gone"
        guard = ROOT / guard_file
        assert re.search(rf"^(async )?def {guard_test}\(", guard.read_text(), re.M), f"{guard_file}::{guard_test}"


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import trio_websocket\nc = trio_websocket.WebSocketConnection\nc._reader_task", {"_reader_task"}),
        ("from trio_websocket import _impl", {"_impl"}),
        ("import hypercorn.trio._server", {"_server"}),
        ("def f(ws):\n    return ws._wsproto", {"_wsproto"}),
        ("def f(ws):\n    return getattr(ws, '_stream_lock')", {"_stream_lock"}),
        (
            "import trio_websocket\nclass C(trio_websocket.WebSocketConnection):\n"
            "    def __init__(self):\n        self._mine = 1\n"
            "    async def f(self):\n        return self._stream, self._mine",
            {"_stream"},
        ),
        ("def f(x):\n    return x._own_thing", set()),
    ],
)
def test_the_private_name_scan_finds_what_it_should(source: str, found: set[str]) -> None:
    library_private = {"_reader_task", "_impl", "_server", "_wsproto", "_stream_lock", "_stream"}
    assert library_privates_used(source, library_private, {"_own_thing", "_mine", "_stream"}) == found
