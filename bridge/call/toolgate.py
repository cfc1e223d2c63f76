"""The tool-result gate (reference voice-agent-api.md §7), a pure sub-machine of ``CallState``.

The agent asks for a tool inside a reply (``tool.call`` before that reply's ``reply.done``);
the result must reach it when ``reply.done`` is the most recent turn event. This module keeps
every tool call of the call and decides, for each result, to send it now, hold it, or drop it.

Invariants:
- The gate is OPEN only while ``reply.done`` (completed) is the latest turn event; a reply
  start, caller speech or a new ``tool.call`` close it. A closed gate holds results in
  arrival order; the completed ``reply.done`` opens it and releases them all, in order.
- A result is released at most once per tool call, and never for a call the gate does not
  know (a duplicated or late result changes nothing).
- A call whose reply was interrupted is discarded: its result, held or still to come, is
  never released. :meth:`ToolGate.forget_pending` discards every unfinished call at once (a
  fresh upstream session never made them).
- Held results wait at most ``hold_max_s`` (a safety net for a ``reply.done`` that never
  comes): :meth:`ToolGate.due` releases them then.
- Bounded by the call: one entry per ``tool.call`` the agent made.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import orjson

# The Voice Agent closes the connection with 1009 on a message over its limit (~1 MiB), and the
# call then waits for an answer that never comes. 64 KiB of result keeps one tool.result far
# under that limit even when JSON escaping of the string inflates it six-fold (every byte a
# \u00XX), and is more than a model reads usefully in one turn anyway.
MAX_TOOL_RESULT_BYTES = 65_536


def cap_result(result: str, is_error: bool) -> tuple[str, bool, int | None]:
    """``(result, is_error, None)`` when ``result`` fits in ``MAX_TOOL_RESULT_BYTES`` (UTF-8);
    otherwise an error result the model can act on, and the original size in bytes."""
    if len(result) * 4 <= MAX_TOOL_RESULT_BYTES:  # a str of n chars is at most 4n UTF-8 bytes
        return result, is_error, None
    size = len(result.encode("utf-8", "surrogatepass"))
    if size <= MAX_TOOL_RESULT_BYTES:
        return result, is_error, None
    message = (
        f"the tool's result was too large ({size} bytes; the limit is {MAX_TOOL_RESULT_BYTES}) and was"
        " not sent. Do not call it again the same way: ask for less (a narrower query, fewer items)"
        " or tell the caller the answer is not available."
    )
    return orjson.dumps({"error": message}).decode(), True, size


class GateState(Enum):
    OPEN = "open"  # reply.done is the latest turn event: results go at once
    HOLDING = "holding"  # a reply, speech or a tool call came after it: results wait


@dataclass(slots=True)
class ToolCallState:
    reply_id: str | None  # the reply that asked (None: outside a reply)
    done: bool = False  # its result was released, held or discarded: no second one
    discarded: bool = False
    running: bool = False  # a Python tool or a transfer runs for it (the caller is not idle)


@dataclass(frozen=True, slots=True)
class Release:
    """Send this ``tool.result`` now."""

    tool_call_id: str
    result: str
    is_error: bool


class ToolGate:
    """Every tool call of one call, and when each result may go. See the module docstring."""

    __slots__ = ("_calls", "_held", "hold_max_s", "state")

    def __init__(self, hold_max_s: float) -> None:
        self.hold_max_s = hold_max_s
        self.state = GateState.OPEN
        self._calls: dict[str, ToolCallState] = {}
        self._held: list[tuple[Release, float]] = []

    def get(self, tool_call_id: str) -> ToolCallState | None:
        return self._calls.get(tool_call_id)

    # --- turn events ------------------------------------------------------------------------

    def turn_started(self) -> None:
        """``reply.started`` or ``input.speech.started``: results wait from here."""
        self.state = GateState.HOLDING

    def called(self, tool_call_id: str, reply_id: str | None) -> ToolCallState | None:
        """A ``tool.call``; None for a duplicate (already known: ignore it)."""
        self.state = GateState.HOLDING
        if tool_call_id in self._calls:
            return None
        call = self._calls[tool_call_id] = ToolCallState(reply_id)
        return call

    def reply_completed(self) -> list[Release]:
        """``reply.done`` (completed): the gate opens and what was held goes, in order."""
        self.state = GateState.OPEN
        held, self._held = self._held, []
        return [release for release, _ in held]

    def reply_interrupted(self, reply_id: str) -> list[str]:
        """``reply.done`` (interrupted): the calls that reply made are discarded (their ids)."""
        self.state = GateState.HOLDING
        dropped = [tid for tid, call in self._calls.items() if call.reply_id == reply_id and not call.discarded]
        for tool_call_id in dropped:
            self._calls[tool_call_id].discarded = True
        if dropped:
            self._held = [(r, at) for r, at in self._held if not self._calls[r.tool_call_id].discarded]
        return dropped

    def forget_pending(self) -> None:
        """A fresh upstream session replaced the old one: nothing unfinished is sent to it."""
        for call in self._calls.values():
            if not call.done:
                call.discarded = True
        self._held = []
        self.state = GateState.OPEN

    # --- results ----------------------------------------------------------------------------

    def finished(self, tool_call_id: str, result: str, is_error: bool, now: float) -> list[Release]:
        """A call's result: released now, held, or dropped (unknown, already done, discarded)."""
        call = self._calls.get(tool_call_id)
        if call is None or call.done:
            return []
        call.done = True
        if call.discarded:
            return []
        release = Release(tool_call_id, result, is_error)
        if self.state is GateState.OPEN:
            return [release]
        self._held.append((release, now))
        return []

    def due(self, now: float) -> list[Release]:
        """Held results past ``hold_max_s``: all of them go (a reply.done that never came)."""
        if self._held and now - self._held[0][1] >= self.hold_max_s:
            held, self._held = self._held, []
            return [release for release, _ in held]
        return []
