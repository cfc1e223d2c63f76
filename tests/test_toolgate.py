"""bridge.call.toolgate: when each tool result may go (reference §7), as tables of steps."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.call.toolgate import GateState, Release, ToolGate

R = Release


def run(steps: list[tuple[str, Any]], hold_max_s: float = 5.0) -> list[list[Release]]:
    """Each step is (input, argument); returns the releases of every step, in order."""
    gate = ToolGate(hold_max_s)
    out: list[list[Release]] = []
    for kind, arg in steps:
        if kind == "call":  # (tool_call_id, reply_id)
            gate.called(*arg)
            out.append([])
        elif kind == "turn":
            gate.turn_started()
            out.append([])
        elif kind == "done":
            out.append(gate.reply_completed())
        elif kind == "cut":  # reply_id
            gate.reply_interrupted(arg)
            out.append([])
        elif kind == "result":  # (tool_call_id, now)
            out.append(gate.finished(arg[0], f"r-{arg[0]}", False, arg[1]))
        elif kind == "tick":
            out.append(gate.due(arg))
        elif kind == "fresh":
            gate.forget_pending()
            out.append([])
    return out


@pytest.mark.parametrize(
    ("name", "steps", "released"),
    [
        (
            "finished after reply.done: at once",
            [("call", ("t1", "r1")), ("done", None), ("result", ("t1", 1.0))],
            [[], [], [R("t1", "r-t1", False)]],
        ),
        (
            "finished inside the reply: held until reply.done",
            [("call", ("t1", "r1")), ("result", ("t1", 0.5)), ("done", None)],
            [[], [], [R("t1", "r-t1", False)]],
        ),
        (
            "a new reply after reply.done holds again",
            [("call", ("t1", "r1")), ("done", None), ("turn", None), ("result", ("t1", 1.0)), ("done", None)],
            [[], [], [], [], [R("t1", "r-t1", False)]],
        ),
        (
            "held ones go in order",
            [("call", ("t1", "r1")), ("call", ("t2", "r1")), ("result", ("t2", 0.1)), ("result", ("t1", 0.2)),
             ("done", None)],
            [[], [], [], [], [R("t2", "r-t2", False), R("t1", "r-t1", False)]],
        ),
        (
            "interrupted reply: its results never go, held or late",
            [("call", ("t1", "r1")), ("call", ("t2", "r1")), ("result", ("t1", 0.1)), ("cut", "r1"),
             ("result", ("t2", 0.3)), ("done", None)],
            [[], [], [], [], [], []],
        ),
        (
            "a duplicated or unknown result changes nothing",
            [("call", ("t1", "r1")), ("done", None), ("result", ("t1", 1.0)), ("result", ("t1", 1.1)),
             ("result", ("nope", 1.2))],
            [[], [], [R("t1", "r-t1", False)], [], []],
        ),
        (
            "a reply.done that never comes: held results go after hold_max_s",
            [("call", ("t1", "r1")), ("result", ("t1", 1.0)), ("tick", 5.9), ("tick", 6.0), ("tick", 7.0)],
            [[], [], [], [R("t1", "r-t1", False)], []],
        ),
        (
            "a fresh session: nothing unfinished reaches it",
            [("call", ("t1", "r1")), ("call", ("t2", "r1")), ("result", ("t1", 0.1)), ("fresh", None),
             ("result", ("t2", 0.5)), ("done", None)],
            [[], [], [], [], [], []],
        ),
    ],
)
def test_the_gate(name: str, steps: list[tuple[str, Any]], released: list[list[Release]]) -> None:
    assert run(steps) == released, name


def test_a_duplicate_tool_call_is_refused_and_closes_the_gate_anyway() -> None:
    gate = ToolGate(5.0)
    assert gate.called("t1", "r1") is not None
    gate.reply_completed()
    assert gate.state is GateState.OPEN
    assert gate.called("t1", "r2") is None
    assert gate.state is GateState.HOLDING
