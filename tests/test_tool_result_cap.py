"""Tool results over ``MAX_TOOL_RESULT_BYTES`` never go upstream (the Voice Agent closes with 1009
on a message over its ~1 MiB limit): the core sends an error result the model can act on instead,
and logs the size once, never the content. The first part is a table over the pure core; the last
test runs a ~2 MB result through the real server and the fake agent."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import trio

from bridge.agent.tools import tool
from bridge.call.state import Log, SendAgent
from bridge.call.toolgate import MAX_TOOL_RESULT_BYTES, cap_result
from tests.harness import API_KEY, running_bridge
from tests.test_state import LIVE, A, done, reply_done, reply_started, run, tool_call
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan

SECRET = "s3cr3t-"  # appears in every big result: must never be logged


def big(n_bytes: int, char: str = "x") -> str:
    """A JSON string result of exactly ``n_bytes`` UTF-8 bytes (``char`` may be multi-byte)."""
    width = len(char.encode())
    body = SECRET + char * ((n_bytes - len(SECRET) - 2) // width)
    text = orjson.dumps(body).decode()
    return text + " " * (n_bytes - len(text.encode()))


def sent_results(actions: list[Any]) -> list[dict[str, Any]]:
    out = []
    for a in actions:
        if isinstance(a, SendAgent):
            msg = orjson.loads(a.text)
            if msg["type"] == "tool.result":
                out.append(msg)
    return out


CASES = [
    ("a small result goes as it is", '{"balance":42.1}', False, False),
    ("exactly the limit goes as it is", big(MAX_TOOL_RESULT_BYTES), False, False),
    ("one byte over is replaced", big(MAX_TOOL_RESULT_BYTES + 1), False, True),
    ("multi-byte text is measured in bytes, not chars", big(MAX_TOOL_RESULT_BYTES + 2, "é"), False, True),
    ("under the limit in bytes with multi-byte text goes", big(MAX_TOOL_RESULT_BYTES - 1, "€"), False, False),
    ("two megabytes are replaced", big(2_000_000), False, True),
    ("a big error result is replaced too", big(200_000), True, True),
    ("a small error result stays an error", '{"error":"no such account"}', True, False),
]


@pytest.mark.parametrize(("name", "text", "is_error", "replaced"), CASES, ids=[c[0] for c in CASES])
def test_a_tool_result_is_capped_before_it_goes_upstream(name: str, text: str, is_error: bool, replaced: bool) -> None:
    size = len(text.encode())
    steps = [*LIVE, A(reply_started("r1"), 1.0), A(tool_call("c1", "get_balance"), 1.1), A(reply_done("r1"), 1.2)]
    state, _ = run(steps)
    actions = state.on_tool_done("c1", text, is_error, 2.0)
    results = sent_results(actions)
    assert len(results) == 1 and results[0]["call_id"] == "c1"
    warnings = [a for a in actions if isinstance(a, Log) and a.level == logging.WARNING]
    if not replaced:
        assert results[0]["result"] == text and results[0]["is_error"] is is_error
        assert warnings == []
        return
    assert results[0]["is_error"] is True
    error = orjson.loads(results[0]["result"])["error"]
    assert f"too large ({size} bytes" in error and str(MAX_TOOL_RESULT_BYTES) in error
    assert len(results[0]["result"].encode()) < 1024
    assert len(warnings) == 1 and f"({size} bytes)" in warnings[0].message
    assert all(SECRET not in a.message for a in actions if isinstance(a, Log))


def test_a_big_result_held_by_the_gate_is_replaced_when_it_is_released() -> None:
    """Finished before reply.done: held, then released as the error result, logged once."""
    text = big(300_000)
    _, outs = run(
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "get_balance"), 1.1),
            done("c1", text, 1.2),
            done("c1", text, 1.3),  # a duplicate changes nothing and is not logged again
            A(reply_done("r1"), 1.4),
        ]
    )
    held, duplicate, released = outs[-3], outs[-2], outs[-1]
    assert sent_results(held) == [] and duplicate == []
    assert [a for a in held if isinstance(a, Log) and "too large (300000 bytes)" in a.message]
    (result,) = sent_results(released)
    assert result["is_error"] is True and "too large (300000 bytes" in result["result"]


def test_a_big_result_of_an_interrupted_reply_is_dropped_without_a_warning() -> None:
    text = big(300_000)
    _, outs = run(
        [
            *LIVE,
            A(reply_started("r1"), 1.0),
            A(tool_call("c1", "get_balance"), 1.1),
            A(reply_done("r1", "interrupted"), 1.2),
            done("c1", text, 1.3),
        ]
    )
    assert sent_results(outs[-1]) == []
    assert not [a for a in outs[-1] if isinstance(a, Log) and a.level == logging.WARNING]


def test_cap_result_keeps_what_fits_and_names_the_size() -> None:
    assert cap_result("ok", False) == ("ok", False, None)
    text, is_error, size = cap_result("x" * (MAX_TOOL_RESULT_BYTES + 10), False)
    assert is_error and size == MAX_TOOL_RESULT_BYTES + 10 and "too large" in orjson.loads(text)["error"]


# Twice the fake agent's 1 MiB WebSocket message limit (trio-websocket's default, like the
# service's): sent as it is, the upstream socket closes with 1009 and the answer never comes.
HUGE_BYTES = 2_000_000


@tool
def huge_result(q: str) -> str:
    """Answers with two megabytes."""
    return q + "z" * HUGE_BYTES


async def wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    with trio.fail_after(timeout_s):  # bounds a hang only
        while not predicate():
            await trio.sleep(0.02)


async def test_a_two_megabyte_result_through_the_server_becomes_an_error_and_the_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False, tool_on_turn={1: ("huge_result", {"q": "all of it"})})
    async with running_bridge(agent_config=config, env={"BRIDGE_TOOLS": __name__}) as bridge:

        async def script() -> None:
            session = await bridge.agent.wait_for_session(1)
            await wait_for(lambda: session.replies_sent)
            await bridge.agent.user_turn(session.session_id, "tell me everything")
            await wait_for(lambda: session.tool_results)
            await wait_for(lambda: len(session.replies_sent) >= 3)  # the answer after the tool
            await bridge.agent.user_turn(session.session_id, "thanks")
            await wait_for(lambda: len(session.replies_sent) >= 4)  # the same session still answers

        with caplog.at_level(logging.INFO):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(script)
                with trio.fail_after(60):
                    await bridge.twilio.call(CallPlan(speed=4.0, hangup_after_s=20.0))
        (result,) = [r for s in bridge.agent.sessions.values() for r in s.tool_results]
        connections = bridge.agent.connections_total
    assert result["is_error"] is True
    assert f"too large ({len('all of it') + HUGE_BYTES} bytes" in orjson.loads(result["result"])["error"]
    assert connections == 1  # never closed with 1009, never resumed
    too_large = [r for r in caplog.records if "too large" in r.getMessage()]
    assert len(too_large) == 1 and "zzzz" not in too_large[0].getMessage()
