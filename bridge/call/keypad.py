"""Keypad input: the ``collect_digits`` tool's collection, and keys pressed outside one. Pure.

Twilio's ``dtmf`` events (one digit each), the tool's arguments and the call's clock go in;
tool results and ``reply.create`` instructions come out. No trio; time enters only as ``now``.

Invariants:
- At most one collection runs at a time; a second ``collect_digits`` while one runs gets an
  error result at once (the first keeps running).
- A collection ends exactly once: on the finish key (not included in the digits), when
  ``max_digits`` digits were pressed, or when ``timeout_s`` passed since it started or since the
  last key (as Twilio's ``<Gather timeout>``: the caller gets the whole timeout for each key).
  Its result is ``{"digits": "…"}``, or ``{"digits": "…", "timed_out": true}``.
- Bad arguments never start a collection: the result is ``{"error": "…"}`` (``is_error``) naming
  the argument and the allowed values, so the model can correct its call.
- ``sensitive`` digits leave this module only inside the tool result for the agent; everything
  meant for logs, records, metrics or the console (``logged``, :func:`mask_digits`) is masked.
- A key outside a collection is only told to the agent when ``dtmf_to_agent`` is on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bridge.agent.events import COLLECT_DIGITS_TOOL, tool_error

TOOL_NAME = COLLECT_DIGITS_TOOL  # the name is the agent codec's (one place for tool names)
KEYS = frozenset("0123456789*#")
MAX_DIGITS = 64  # longer than any card, account or IBAN digit string a caller would type
MAX_TIMEOUT_S = 120.0
DEFAULT_FINISH_ON_KEY = "#"
DEFAULT_TIMEOUT_S = 10.0
MASK_CHAR = "*"
_ARGUMENTS = frozenset({"max_digits", "finish_on_key", "timeout_s", "sensitive"})


def mask_digits(digits: str) -> str:
    """The form of sensitive digits for logs, records, metrics and the console."""
    return MASK_CHAR * len(digits)


@dataclass(frozen=True, slots=True)
class DigitsRequest:
    """Validated ``collect_digits`` arguments."""

    max_digits: int
    finish_on_key: str  # "" means no finish key
    timeout_s: float
    sensitive: bool


def parse_request(arguments: Mapping[str, Any]) -> DigitsRequest | str:
    """The request, or a one-line error naming the bad argument and what is allowed."""
    unknown = sorted(str(k)[:40] for k in arguments if k not in _ARGUMENTS)
    if unknown:
        return f"unknown argument(s) {', '.join(unknown)}: use max_digits, finish_on_key, timeout_s, sensitive"
    max_digits = arguments.get("max_digits")
    if isinstance(max_digits, float) and max_digits.is_integer():
        max_digits = int(max_digits)  # JSON numbers from a model: 4.0 means 4
    if not isinstance(max_digits, int) or isinstance(max_digits, bool):
        return f"max_digits is required and must be a whole number from 1 to {MAX_DIGITS}"
    if not 1 <= max_digits <= MAX_DIGITS:
        return f"max_digits is out of range: use 1 to {MAX_DIGITS}"
    finish = arguments.get("finish_on_key", DEFAULT_FINISH_ON_KEY)
    if finish is None:
        finish = ""
    if not isinstance(finish, str) or (finish and finish not in KEYS) or len(finish) > 1:
        return 'finish_on_key must be one key of 0-9, * or #, or "" for none'
    timeout = arguments.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not math.isfinite(timeout):
        return f"timeout_s must be a number of seconds from 1 to {MAX_TIMEOUT_S:g}"
    if not 1 <= timeout <= MAX_TIMEOUT_S:
        return f"timeout_s={timeout:g} is out of range: use 1 to {MAX_TIMEOUT_S:g} seconds"
    sensitive = arguments.get("sensitive", False)
    if not isinstance(sensitive, bool):
        return "sensitive must be true or false"
    return DigitsRequest(max_digits, finish, float(timeout), sensitive)


class KeypadPhase(Enum):
    IDLE = "idle"  # no collection: keys go to the agent only with dtmf_to_agent
    COLLECTING = "collecting"


@dataclass(frozen=True, slots=True)
class ToolResult:
    """Send ``tool.result`` for ``tool_call_id`` with ``result`` (JSON text).

    ``logged`` is the same result with sensitive digits masked: the only form that may go to
    logs, the call record (``ToolFinished``), metrics or the console.
    """

    tool_call_id: str
    result: str
    is_error: bool
    logged: str
    sensitive: bool = False


@dataclass(frozen=True, slots=True)
class TellAgent:
    """Send ``reply.create`` with these instructions (a key pressed outside a collection)."""

    instructions: str


@dataclass(frozen=True, slots=True)
class KeyRecorded:
    """A key for the call record (``DtmfPressed``): ``sensitive`` masks it there."""

    digit: str
    sensitive: bool


KeypadAction = ToolResult | TellAgent | KeyRecorded


def key_instructions(digit: str) -> str:
    """``reply.create`` instructions for a key pressed while no collection runs."""
    return (
        f"The caller just pressed the {digit!r} key on their phone's keypad. "
        "Take it into account and answer briefly."
    )


@dataclass(slots=True)
class _Collection:
    tool_call_id: str
    request: DigitsRequest
    digits: str
    deadline: float


class Keypad:
    """One call's keypad.

    Args:
        dtmf_to_agent: ``DTMF_TO_AGENT``: keys outside a collection become ``reply.create``.

    The session calls :meth:`start` for a ``collect_digits`` tool call (instead of running a
    Python tool), :meth:`press` for each Twilio ``dtmf`` event, :meth:`tick` at
    :meth:`next_deadline`, and :meth:`cancel` when the call ends (no result is sent then).
    """

    def __init__(self, *, dtmf_to_agent: bool = False) -> None:
        self.dtmf_to_agent = dtmf_to_agent
        self._current: _Collection | None = None

    @property
    def phase(self) -> KeypadPhase:
        return KeypadPhase.IDLE if self._current is None else KeypadPhase.COLLECTING

    @property
    def sensitive(self) -> bool:
        """True while a sensitive collection runs: keys must not be logged even one by one."""
        return self._current is not None and self._current.request.sensitive

    def next_deadline(self) -> float | None:
        return None if self._current is None else self._current.deadline

    def start(self, tool_call_id: str, arguments: Mapping[str, Any], now: float) -> list[KeypadAction]:
        """A ``collect_digits`` call: start collecting, or answer an error result at once."""
        if self._current is not None:
            return [_error(tool_call_id, "a keypad collection is already running: wait for its result")]
        request = parse_request(arguments)
        if isinstance(request, str):
            return [_error(tool_call_id, request)]
        self._current = _Collection(tool_call_id, request, "", now + request.timeout_s)
        return []

    def refuse(self, tool_call_id: str, message: str) -> list[KeypadAction]:
        """An error result for a ``collect_digits`` call that cannot start (e.g. its arguments
        could not be read at all); a running collection is not touched."""
        return [_error(tool_call_id, message)]

    def press(self, digit: str, now: float) -> list[KeypadAction]:
        """A Twilio ``dtmf`` event. Anything that is not one keypad key is ignored."""
        if digit not in KEYS:
            return []
        current = self._current
        if current is None:
            actions: list[KeypadAction] = [KeyRecorded(digit, sensitive=False)]
            if self.dtmf_to_agent:
                actions.append(TellAgent(key_instructions(digit)))
            return actions
        recorded = KeyRecorded(digit, sensitive=current.request.sensitive)
        if digit == current.request.finish_on_key:
            return [recorded, self._finish(timed_out=False)]
        current.digits += digit
        if len(current.digits) >= current.request.max_digits:
            return [recorded, self._finish(timed_out=False)]
        current.deadline = now + current.request.timeout_s
        return [recorded]

    def tick(self, now: float) -> list[KeypadAction]:
        """End a collection whose timeout passed."""
        if self._current is None or now < self._current.deadline:
            return []
        return [self._finish(timed_out=True)]

    def cancel(self) -> None:
        """Forget a running collection (the call or the upstream session ended)."""
        self._current = None

    def cancel_call(self, tool_call_id: str) -> bool:
        """Forget the collection of this tool call, if it is the one running (its reply was
        interrupted: reference §7 discards its result, so collecting on is pointless). True
        when a collection was cancelled; keys from here are keys outside a collection."""
        if self._current is None or self._current.tool_call_id != tool_call_id:
            return False
        self._current = None
        return True

    def _finish(self, *, timed_out: bool) -> ToolResult:
        current = self._current
        assert current is not None
        self._current = None
        sensitive = current.request.sensitive
        result: dict[str, Any] = {"digits": current.digits}
        shown: dict[str, Any] = {"digits": mask_digits(current.digits) if sensitive else current.digits}
        if timed_out:
            result["timed_out"] = shown["timed_out"] = True
        return ToolResult(
            current.tool_call_id,
            json.dumps(result),
            is_error=False,
            logged=json.dumps(shown),
            sensitive=sensitive,
        )


def _error(tool_call_id: str, message: str) -> ToolResult:
    text = tool_error(message)
    return ToolResult(tool_call_id, text, is_error=True, logged=text)
