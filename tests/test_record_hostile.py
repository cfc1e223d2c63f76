"""Hostile input through the real server (tests/harness.py) into the store and out of the API, with
SQLite and a real PostgreSQL: transcripts with quotes, newlines, NUL, emoji and RTL text, tool
arguments like them, a 1 MB tool result, 10 000 turns, and CallSids that are not ones. Stored
and returned intact, or truncated with a marker; never a 500, never SQL built from strings."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio

from bridge.agent.tools import tool
from bridge.records.record import MAX_RESULT_CHARS, MAX_TURNS, TRUNCATED_MARK
from tests.harness import API_KEY, Running, running_bridge
from tests.test_record_e2e import stored_record
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan

TOKEN = "console-token-hostile-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOSTILE = 'quote " \' newline\n NUL\x00 emoji 🎉 RTL \u202e\u05e9\u05dc\u05d5\u05dd %_\\ ; DROP TABLE call_records; --'
# 1 MB: the tool.result frame carrying it stays under the 1 MiB WebSocket message limit of the
# fake agent (trio-websocket's default); a bigger result closes the upstream socket with 1009.
BIG_BYTES = 1_000_000


@tool
def big_result(q: str) -> str:
    """Answers with the question and then a megabyte (the record keeps its start and a marker)."""
    return q + "y" * BIG_BYTES


@pytest.fixture(params=["sqlite", "postgresql"])
def records_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env = {"CONSOLE_TOKEN": TOKEN}
    if request.param == "postgresql":
        env["RECORDS_URL"] = request.getfixturevalue("pg_url")
    return env


async def wait_for(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


async def api(bridge: Running, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=bridge.http_base, timeout=30) as http:
        return await http.get(path, headers=AUTH)


async def test_hostile_transcripts_tool_arguments_and_a_megabyte_result_are_stored_and_returned(
    records_env: dict[str, str],
) -> None:
    config = FakeAgentConfig(
        api_key=API_KEY,
        vad=False,
        word_deltas="off",  # the agent's text is transcript.agent's, byte for byte
        reply_text=HOSTILE,
        tool_on_turn={1: ("big_result", {"q": HOSTILE})},
    )
    env = {**records_env, "BRIDGE_TOOLS": __name__}
    async with running_bridge(agent_config=config, env=env) as bridge:

        async def script() -> None:
            session = await bridge.agent.wait_for_session(1)
            await wait_for(lambda: session.replies_sent, "the greeting")
            await bridge.agent.user_turn(session.session_id, HOSTILE)
            await wait_for(lambda: session.tool_results, "the tool result")
            await wait_for(lambda: len(session.replies_sent) >= 3, "the answer after the tool")
            await bridge.agent.user_turn(session.session_id, "and then?")  # answered with reply_text
            await wait_for(lambda: len(session.replies_sent) >= 4, "the hostile answer")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            with trio.fail_after(60):
                result = await bridge.twilio.call(CallPlan(speed=4.0, hangup_after_s=20.0))
        record = await stored_record(bridge, result.call_sid)
        via_api = await api(bridge, f"/api/calls/{result.call_sid}")
        found = await api(bridge, "/api/calls?q=" + quote("NUL\x00 emoji 🎉 RTL"))
        wildcard = await api(bridge, "/api/calls?q=" + quote("%_\\ ; DROP"))
        nothing = await api(bridge, "/api/calls?q=" + quote("x%x' OR '1'='1"))
    caller = [t for t in record["turns"] if t["speaker"] == "caller"]
    assert [t["text"] for t in caller] == [HOSTILE, "and then?"]
    assert HOSTILE in [t["text"] for t in record["turns"] if t["speaker"] == "agent"]
    (run,) = record["tools"]
    assert run["name"] == "big_result" and run["arguments"] == {"q": HOSTILE} and run["is_error"] is False
    assert run["result"].startswith(HOSTILE + "y" * 1000)
    assert TRUNCATED_MARK in run["result"] and len(run["result"]) < MAX_RESULT_CHARS + 100
    assert run["result"].endswith(f"({len(HOSTILE) + BIG_BYTES - MAX_RESULT_CHARS} more characters)")
    assert via_api.status_code == 200 and via_api.json() == record
    assert found.status_code == 200 and [c["call_sid"] for c in found.json()["calls"]] == [result.call_sid]
    assert wildcard.status_code == 200 and [c["call_sid"] for c in wildcard.json()["calls"]] == [result.call_sid]
    assert nothing.status_code == 200 and nothing.json()["calls"] == []


async def test_ten_thousand_turns_through_the_server_are_kept_and_the_rest_counted(
    records_env: dict[str, str],
) -> None:
    # A tiny reply per turn (no leading silence, 20 ms) and no pacing: caller turns and the
    # agent's (mostly interrupted) replies pile up until the record holds MAX_TURNS and counts
    # the rest in "truncated".
    config = FakeAgentConfig(
        api_key=API_KEY, vad=False, word_deltas="off", leading_silence_ms=0, reply_audio=bytes([0x7E]) * 160
    )
    async with running_bridge(agent_config=config, env=records_env) as bridge:
        records = bridge.app.records
        assert records is not None

        async def script() -> None:
            session = await bridge.agent.wait_for_session(1)
            await wait_for(lambda: session.replies_sent and records.live_count(), "the greeting")
            call_sid = records.live_summaries()[0]["call_sid"]
            sent = 0
            while True:
                for _ in range(250):
                    await bridge.agent.user_turn(session.session_id, f"turn {sent} \u05e9\u05dc\u05d5\u05dd 🎉")
                    sent += 1
                live: dict[str, Any] = {}

                def caught_up(want: int = sent, live: dict[str, Any] = live) -> bool:
                    live.update(records.live(call_sid) or {})
                    callers = sum(1 for t in live.get("turns", ()) if t["speaker"] == "caller")
                    return callers >= want or bool(live.get("truncated", {}).get("turns"))

                await wait_for(caught_up, "the bridge to take the turns", 60)
                if live["truncated"].get("turns"):
                    break
            bridge.twilio.request_hangup(call_sid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            with trio.fail_after(180):
                result = await bridge.twilio.call(CallPlan(speed=4.0, max_call_s=4000.0))
        record = await stored_record(bridge, result.call_sid, timeout_s=60)
        via_api = await api(bridge, f"/api/calls/{result.call_sid}")
        listing = await api(bridge, "/api/calls?limit=1")
    assert len(record["turns"]) == MAX_TURNS
    assert record["truncated"]["turns"] > 0
    callers = [t["text"] for t in record["turns"] if t["speaker"] == "caller"]
    assert callers[:3] == [f"turn {n} \u05e9\u05dc\u05d5\u05dd 🎉" for n in range(3)]
    assert via_api.status_code == 200 and via_api.json() == record
    assert listing.status_code == 200 and listing.json()["calls"][0]["turn_count"] == MAX_TURNS


@pytest.mark.parametrize(
    "bad_sid",
    [
        "CA" + "0" * 31,
        "CA" + "g" * 32,
        "'; DROP TABLE call_records; --",
        "CA" + "0" * 32 + "%00",
        "..%2F..%2Fetc%2Fpasswd",
        "%E2%80%AE" + "CA" + "0" * 32,
    ],
)
async def test_a_callsid_that_is_not_one_is_a_400_never_a_500(bad_sid: str) -> None:
    async with running_bridge(env={"CONSOLE_TOKEN": TOKEN}) as bridge:
        response = await api(bridge, f"/api/calls/{bad_sid}")
        assert response.status_code in (400, 404), response.text  # 404: a path no route matches
        if response.status_code == 400:
            assert "not a CallSid" in response.json()["error"]
        listing = await api(bridge, "/api/calls?q=" + quote(bad_sid))
        assert listing.status_code == 200 and listing.json()["calls"] == []
