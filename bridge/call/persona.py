"""Per-call persona: a session hook chooses the prompt, greeting, voice and tools of one call.

Set ``BRIDGE_SESSION_HOOK=package.module:function``. The function takes the call's
:class:`~bridge.call.context.CallContext` (sync or ``async``) and returns a
:class:`PersonaOverride`, a dict with the same keys, or None for the configured defaults::

    from bridge.call.context import CallContext
    from bridge.call.persona import PersonaOverride

    KNOWN = {"+14155550100": "Ada"}

    def persona(context: CallContext) -> PersonaOverride | None:
        name = KNOWN.get(context.from_number)
        return PersonaOverride(greeting=f"Hi {name}, welcome back!") if name else None

The hook runs before the agent session opens, so it has a short deadline (2 s by default). A
hook that raises, overruns or returns something invalid never breaks the call: the defaults are
used and one WARNING line on logger ``bridge.persona`` says why.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeAlias

import trio

from bridge.agent.events import SessionConfig
from bridge.agent.tools import ToolRegistry
from bridge.call.context import CallContext
from bridge.config import Persona
from bridge.errors import ConfigError

log = logging.getLogger("bridge.persona")

_VOICE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class PersonaOverride:
    """What a session hook changes for one call; a None field keeps the configured default.

    ``tools`` names the registered tools to offer (None: all of them, ``[]``: none). The
    call-control tools (``end_call``, ``transfer_call``) follow the configuration, not this list.
    An empty ``greeting`` makes the agent wait for the caller to speak first.
    """

    system_prompt: str | None = None
    greeting: str | None = None
    voice: str | None = None
    tools: Sequence[str] | None = None


HookResult: TypeAlias = PersonaOverride | Mapping[str, Any] | None
SessionHook: TypeAlias = Callable[[CallContext], HookResult | Awaitable[HookResult]]

_FIELDS = tuple(f.name for f in fields(PersonaOverride))


class _InvalidOverride(Exception):
    pass


def load_session_hook(path: str | None) -> SessionHook | None:
    """Import ``BRIDGE_SESSION_HOOK`` (``package.module:function``); None when it is unset.

    Raises :class:`ConfigError`, one line naming ``BRIDGE_SESSION_HOOK``, when the value is
    malformed, the module cannot be imported, or the attribute is missing or not callable.
    """
    if path is None or not path.strip():
        return None
    module_name, sep, attr = path.strip().partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ConfigError(
            f"BRIDGE_SESSION_HOOK={path!r} is not module:function: use e.g. BRIDGE_SESSION_HOOK=mypackage.hooks:persona"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        cause = " ".join(str(exc).split())
        raise ConfigError(
            f"BRIDGE_SESSION_HOOK: cannot import module '{module_name}': {type(exc).__name__}: {cause}"
        ) from exc
    hook = getattr(module, attr, None)
    if hook is None:
        raise ConfigError(f"BRIDGE_SESSION_HOOK: module '{module_name}' has no attribute '{attr}'")
    if not callable(hook):
        raise ConfigError(f"BRIDGE_SESSION_HOOK: '{module_name}:{attr}' is a {type(hook).__name__}, not a function")
    return hook  # type: ignore[no-any-return]


def _text(value: Any, key: str, *, allow_empty: bool) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        raise _InvalidOverride(f"{key} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _InvalidOverride(f"{key} must not be empty")
    return value


def _check(raw: object, registry: ToolRegistry, extra_names: set[str]) -> PersonaOverride:
    """Validate a hook's return value. Raises _InvalidOverride saying what is wrong."""
    if raw is None:
        return PersonaOverride()
    if isinstance(raw, PersonaOverride):
        values: dict[str, Any] = {f: getattr(raw, f) for f in _FIELDS}
    elif isinstance(raw, Mapping):
        unknown = [str(k) for k in raw if k not in _FIELDS]
        if unknown:
            raise _InvalidOverride(f"unknown key '{unknown[0]}' (allowed: {', '.join(_FIELDS)})")
        values = dict(raw)
    else:
        raise _InvalidOverride(f"returned a {type(raw).__name__}; return a PersonaOverride, a dict or None")
    voice = _text(values.get("voice"), "voice", allow_empty=False)
    if voice is not None and not _VOICE.match(voice):
        raise _InvalidOverride(f"voice {voice!r} is not a lower-case voice id such as 'ivy'")
    tools = values.get("tools")
    if tools is not None:
        if isinstance(tools, str | bytes) or not isinstance(tools, Sequence | set | frozenset):
            raise _InvalidOverride("tools must be a list of tool names")
        for name in tools:
            if type(name) is not str:
                raise _InvalidOverride(f"tools must be a list of tool names, found {name!r}")
            if name not in registry and name not in extra_names:
                available = ", ".join(registry.names()) or "(none)"
                raise _InvalidOverride(f"unknown tool '{name}' (available: {available})")
        tools = [n for n in dict.fromkeys(tools) if n not in extra_names]
    return PersonaOverride(
        system_prompt=_text(values.get("system_prompt"), "system_prompt", allow_empty=False),
        greeting=_text(values.get("greeting"), "greeting", allow_empty=True),
        voice=voice,
        tools=tools,
    )


async def _call_hook(hook: SessionHook, context: CallContext) -> object:
    if inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(
        getattr(hook, "__call__", None)  # noqa: B004 - an object with an async __call__
    ):
        result: object = hook(context)
    else:
        # A sync hook may block (a CRM lookup): keep it off the event loop.
        result = await trio.to_thread.run_sync(hook, context, abandon_on_cancel=True)
    if inspect.isawaitable(result):
        result = await result
    return result


def _hook_name(hook: SessionHook) -> str:
    module = getattr(hook, "__module__", None)
    name = getattr(hook, "__qualname__", None) or type(hook).__name__
    return f"{module}:{name}" if module else str(name)


async def resolve_session(
    *,
    hook: SessionHook | None,
    context: CallContext,
    persona: Persona,
    registry: ToolRegistry,
    extra_tools: Sequence[dict[str, Any]] = (),
    timeout_s: float = 2.0,
) -> SessionConfig:
    """The :class:`SessionConfig` for one call: ``persona`` as changed by ``hook``.

    ``tools`` is the registry's definitions (all, or those the hook names) followed by
    ``extra_tools`` (the call-control tools). A hook that raises, takes longer than
    ``timeout_s`` or returns an invalid override is ignored: the defaults are used and one
    WARNING line says why. Never raises but Cancelled; on cancellation an async hook is
    cancelled and a sync hook's thread is abandoned (its result is dropped).
    """
    extra = tuple(extra_tools)
    extra_names = {str(d.get("name")) for d in extra}
    override = PersonaOverride()
    if hook is not None:
        name = _hook_name(hook)
        raw: object = None
        # The agent session, and the caller, wait for this: a slow CRM must not stall the call.
        with trio.move_on_after(timeout_s) as scope:
            try:
                raw = await _call_hook(hook, context)
            except Exception as exc:
                text = " ".join(str(exc).split())
                log.warning(
                    "session hook %s raised %s%s; using the default persona",
                    name,
                    type(exc).__name__,
                    f": {text}" if text else "",
                )
                log.debug("session hook %s traceback", name, exc_info=True)
                raw = None
        if scope.cancelled_caught:
            log.warning("session hook %s took longer than %g s; using the default persona", name, timeout_s)
        else:
            try:
                override = _check(raw, registry, extra_names)
            except _InvalidOverride as exc:
                log.warning(
                    "session hook %s returned an invalid persona: %s; using the default persona",
                    name,
                    exc,
                )
    tools = registry.definitions(override.tools)
    return SessionConfig(
        system_prompt=override.system_prompt if override.system_prompt is not None else persona.system_prompt,
        greeting=override.greeting if override.greeting is not None else persona.greeting,
        voice=override.voice if override.voice is not None else persona.voice,
        tools=(*tools, *extra),
    )
