"""Call records end to end through the real server (tests/harness.py): a simulated call leaves a
record in SQLite and in a real PostgreSQL server, readable through the API while live and after;
the database stopped mid-call costs the call nothing and its record lands once it is back; a
webhook receiver that is down is retried, then given up with one warning."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from bridge.records import webhook as webhook_module
from bridge.records.backends import Backend
from tests.harness import API_KEY, Running, running_bridge
from tests.pg import PostgresServer
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan

TOKEN = "console-token-e2e-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def stored_record(bridge: Running, call_sid: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """The call's record once it is written (the store answers for a held one before)."""
    store = bridge.app.record_store
    assert store is not None
    with trio.fail_after(timeout_s):
        while True:
            written = store.ready.is_set() and store.held(call_sid) is None
            record = await store.get(call_sid) if written else None
            if record is not None:
                return record
            await trio.sleep(0.05)


@dataclass
class Look:
    """One look at the API while a call ends: GET /api/calls/<sid> and GET /api/calls."""

    held: bool  # the store held the finished record just before the look
    get_status: int
    get_live: bool | None
    list_status: int
    listed: list[bool]  # the ``live`` of each entry of the call in the list's ``calls``


async def watch_the_call_end(bridge: Running, after_stored: int = 5) -> tuple[str, list[Look]]:
    """From the moment the call is live until its record has been written (and ``after_stored``
    looks more): look at the API as fast as it answers, one look after another."""
    records, store = bridge.app.records, bridge.app.record_store
    assert records is not None and store is not None
    with trio.fail_after(30):
        while not records.live_count():
            await trio.sleep(0.01)
    call_sid = str(records.live_summaries()[0]["call_sid"])
    looks: list[Look] = []
    left = after_stored
    async with httpx.AsyncClient(base_url=bridge.http_base, headers=AUTH, timeout=30) as http:
        with trio.fail_after(120):
            while left:
                held = store.held(call_sid) is not None
                written = records.live(call_sid) is None and not held
                one = await http.get(f"/api/calls/{call_sid}")
                many = await http.get("/api/calls")
                calls = many.json().get("calls", [])
                listed = [bool(c["live"]) for c in calls if c["call_sid"] == call_sid]
                looks.append(Look(held, one.status_code, one.json().get("live"), many.status_code, listed))
                left -= written
    return call_sid, looks


def check_never_missing(looks: list[Look]) -> None:
    """Every look found the call (never a 404), live then not live, and listed exactly once."""
    assert [k.get_status for k in looks] == [200] * len(looks), looks
    lives = [k.get_live for k in looks]
    assert lives[0] is True and lives[-1] is False and lives == sorted(lives, reverse=True), lives
    assert all(len(k.listed) == 1 for k in looks), [k.listed for k in looks]
    assert any(k.held and k.get_live is False for k in looks), "no look fell between the call's end and its row"


def greeting_started(live: list[dict[str, Any]]) -> bool:
    turns = live[0]["turns"] if live else []
    return bool(turns) and turns[0]["speaker"] == "agent" and turns[0].get("first_audio_ms") is not None


async def talk(
    bridge: Running, *, barge_in: bool = False, barge_in_after_s: float = 0.5, after_first_audio: bool = False
) -> None:
    """After the greeting (or barging into it), the caller says something and the agent answers."""
    session = await bridge.agent.wait_for_session(1)
    if barge_in:
        records = bridge.app.records
        with trio.fail_after(10):  # barge_in_after_s counts from the greeting's first audio
            while after_first_audio and records is not None and not greeting_started(records.live_records()):
                await trio.sleep(0.01)
        await trio.sleep(barge_in_after_s)
        await bridge.agent.barge_in(session.session_id)
        await trio.sleep(0.2)
    else:
        with trio.fail_after(20):
            while not session.replies_sent:
                await trio.sleep(0.02)
        await trio.sleep(2.5)  # the 3.45 s greeting plays at speed 2 (CallPlan)
    await bridge.agent.user_turn(session.session_id, "I would like to book a table please")


async def one_call(
    bridge: Running,
    *,
    hangup_after_s: float = 14.0,
    barge_in: bool = False,
    barge_in_after_s: float = 0.5,
    after_first_audio: bool = False,
) -> Any:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: talk(
                bridge,
                barge_in=barge_in,
                barge_in_after_s=barge_in_after_s,
                after_first_audio=after_first_audio,
            )
        )
        with trio.fail_after(60):
            result = await bridge.twilio.call(CallPlan(speed=2.0, hangup_after_s=hangup_after_s))
        nursery.cancel_scope.cancel()
    return result


def check_record(record: dict[str, Any], call_sid: str) -> None:
    assert record["call_sid"] == call_sid and record["live"] is False
    assert record["outcome"] == "caller_hung_up"
    assert record["direction"] == "inbound" and record["from"] == "+14155550123"
    assert record["started_at"].endswith("Z") and record["ended_at"].endswith("Z")
    assert 0 < record["duration_s"] < 60
    assert len(record["agent_session_ids"]) == 1
    assert 0 < record["upstream_open_s"] <= record["duration_s"] + 1
    assert record["frames"]["from_twilio"] > 0 and record["frames"]["to_twilio"] > 0
    speakers = [t["speaker"] for t in record["turns"]]
    assert speakers[0] == "agent" and "caller" in speakers
    greeting = record["turns"][0]
    assert greeting["first_audio_ms"] is not None and greeting["first_audio_ms"] >= 0
    assert greeting["response_ms"] is None
    caller = next(t for t in record["turns"] if t["speaker"] == "caller")
    assert caller["text"] == "I would like to book a table please"
    answers = [t for t in record["turns"] if t["speaker"] == "agent" and t is not greeting]
    assert answers and answers[0]["response_ms"] is not None and answers[0]["response_ms"] >= 0


async def test_a_call_leaves_a_record_in_sqlite_readable_through_the_api() -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=config, env={"CONSOLE_TOKEN": TOKEN}) as bridge:
        assert bridge.settings.records_url.startswith("sqlite:///")
        result = await one_call(bridge)
        record = await stored_record(bridge, result.call_sid)
        check_record(record, result.call_sid)
        async with httpx.AsyncClient(base_url=bridge.http_base) as http:
            via_api = (await http.get(f"/api/calls/{result.call_sid}", headers=AUTH)).json()
            listing = (await http.get("/api/calls", headers=AUTH)).json()
        assert via_api == record
        assert listing["calls"][0]["call_sid"] == result.call_sid
        metrics = bridge.app.metrics.render().decode()
    assert "bridge_first_audio_seconds_count 1.0" in metrics
    assert "bridge_turn_response_seconds_count" in metrics
    assert 'bridge_agent_audio_seconds_total{kind="said"}' in metrics


async def test_a_call_leaves_a_record_in_postgresql(pg_url: str) -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=config, env={"RECORDS_URL": pg_url}) as bridge:
        result = await one_call(bridge)
        check_record(await stored_record(bridge, result.call_sid), result.call_sid)


class SlowWrites:
    """A backend whose writes take ``delay_s`` longer (a slow database): the window between a
    call's end and its row being written is then wide enough to look into many times."""

    def __init__(self, backend: Backend, delay_s: float) -> None:
        self._backend = backend
        self.delay_s = delay_s

    def write(self, record: dict[str, Any]) -> None:
        time.sleep(self.delay_s)  # in the writer's worker thread, as a slow database is
        self._backend.write(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


async def test_a_finished_call_is_readable_at_every_moment_until_its_record_is_written() -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=config, env={"CONSOLE_TOKEN": TOKEN}) as bridge:
        store = bridge.app.record_store
        assert store is not None
        store.backend = SlowWrites(store.backend, 1.5)  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            watched: dict[str, Any] = {}

            async def watch() -> None:
                watched["sid"], watched["looks"] = await watch_the_call_end(bridge)

            nursery.start_soon(watch)
            with trio.fail_after(60):
                result = await bridge.twilio.call(CallPlan(speed=2.0, hangup_after_s=3.0))
        assert watched["sid"] == result.call_sid
        check_never_missing(watched["looks"])
        stored = await stored_record(bridge, result.call_sid)
        async with httpx.AsyncClient(base_url=bridge.http_base, headers=AUTH) as http:
            assert (await http.get(f"/api/calls/{result.call_sid}")).json() == stored


async def test_api_404_without_token_401_wrong_token_and_live_true_during_the_call() -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=config) as bridge, httpx.AsyncClient(base_url=bridge.http_base) as http:
        assert (await http.get("/api/calls", headers=AUTH)).status_code == 404
    async with running_bridge(agent_config=config, env={"CONSOLE_TOKEN": TOKEN}) as bridge:
        seen: dict[str, Any] = {}

        async def look_while_live() -> None:
            async with httpx.AsyncClient(base_url=bridge.http_base) as http:
                with trio.fail_after(20):
                    while bridge.app.records is None or not bridge.app.records.live_count():
                        await trio.sleep(0.02)
                sid = bridge.app.records.live_summaries()[0]["call_sid"]
                seen["wrong"] = (await http.get(f"/api/calls/{sid}", headers={"Authorization": "Bearer nope"}))
                seen["missing"] = await http.get(f"/api/calls/{sid}")
                seen["live"] = (await http.get(f"/api/calls/{sid}", headers=AUTH)).json()
                seen["list"] = (await http.get("/api/calls", headers=AUTH)).json()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_while_live)
            with trio.fail_after(60):
                result = await bridge.twilio.call(CallPlan(speed=2.0, hangup_after_s=3.0))
        assert seen["wrong"].status_code == 401 and seen["missing"].status_code == 401
        assert seen["live"]["live"] is True and seen["live"]["call_sid"] == result.call_sid
        assert seen["live"]["ended_at"] is None
        assert seen["list"]["calls"][0]["live"] is True
        assert (await stored_record(bridge, result.call_sid))["live"] is False


async def test_barge_in_heard_text_is_a_strict_prefix_of_what_was_said() -> None:
    # The word timings arrive as a burst with the reply's first audio (reference: "the words
    # arrive in a burst"), so the record knows what was said beyond the barge-in, which comes
    # mid-greeting, after its first words played.
    # The agent sends faster than the fake Twilio plays (speed 2), so a backlog is queued at
    # Twilio when the clear comes: its marks are flushed, not heard.
    config = FakeAgentConfig(api_key=API_KEY, vad=False, speed=8.0, word_deltas="first_audio")
    async with running_bridge(agent_config=config) as bridge:
        result = await one_call(
            bridge, barge_in=True, barge_in_after_s=0.6, after_first_audio=True, hangup_after_s=8.0
        )
        record = await stored_record(bridge, result.call_sid)
    greeting = record["turns"][0]
    assert greeting["interrupted"] is True
    assert greeting["heard_text"] and greeting["text"].startswith(greeting["heard_text"])
    assert greeting["heard_text"] != greeting["text"]
    assert greeting["heard_ms"] < greeting["said_ms"]


async def test_the_database_stopped_mid_call_costs_the_call_nothing_and_the_record_lands_later(
    pg_url: str, postgres_server: PostgresServer
) -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    env = {"RECORDS_URL": pg_url, "CONSOLE_TOKEN": TOKEN}
    async with running_bridge(agent_config=config, env=env) as bridge, trio.open_nursery() as watching:
        store = bridge.app.record_store
        assert store is not None
        with trio.fail_after(20):
            await store.ready.wait()
        watched: dict[str, Any] = {}

        async def watch() -> None:  # the API, from the call's start until its record is written
            watched["sid"], watched["looks"] = await watch_the_call_end(bridge)

        watching.start_soon(watch)

        async def stop_database_mid_call() -> None:
            session = await bridge.agent.wait_for_session(1)
            assert session is not None
            await trio.to_thread.run_sync(postgres_server.stop)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_database_mid_call)
            nursery.start_soon(lambda: talk(bridge))
            with trio.fail_after(60):
                result = await bridge.twilio.call(CallPlan(speed=2.0, hangup_after_s=14.0))
        assert result.ended_by == "caller" and result.violations == []
        assert bridge.agent.greeting_audio in result.heard  # the call went on as usual
        with trio.fail_after(20):
            while store.up:
                await trio.sleep(0.05)
        assert store.pending == 1
        # The database is down and the record held: this instance still gives it whole, and
        # the list's 503 names it.
        async with httpx.AsyncClient(base_url=bridge.http_base, headers=AUTH, timeout=30) as http:
            held = await http.get(f"/api/calls/{result.call_sid}")
            listing = await http.get("/api/calls")
        assert held.status_code == 200 and held.json()["live"] is False
        check_record(held.json(), result.call_sid)
        assert listing.status_code == 503 and [c["call_sid"] for c in listing.json()["calls"]] == [result.call_sid]
        await trio.to_thread.run_sync(postgres_server.start)
        record = await stored_record(bridge, result.call_sid, timeout_s=60)
        check_record(record, result.call_sid)
        assert record == held.json()
        with trio.fail_after(60):
            while "looks" not in watched:
                await trio.sleep(0.05)
        assert watched["sid"] == result.call_sid
        looks: list[Look] = watched["looks"]
        check_never_missing(looks)
        assert any(k.held and k.list_status == 503 and k.listed == [False] for k in looks)
        assert store.pending == 0


async def test_webhook_receiver_down_is_retried_then_given_up_with_one_warning_the_calls_untouched(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_module, "RETRY_MIN_S", 0.1)
    with socket.socket() as s:  # a port nobody listens on: every POST is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RECORD_WEBHOOK_URL": f"http://127.0.0.1:{port}/records", "RECORD_WEBHOOK_SECRET": "s" * 32}
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=config, env=env) as bridge:
        runtime = bridge.app.records_runtime
        assert runtime is not None and runtime.webhook is not None
        runtime.webhook.give_up_s = 1.5  # the default is 10 minutes
        results = []
        for _ in range(2):
            with trio.fail_after(60):
                results.append(await bridge.twilio.call(CallPlan(speed=2.0, hangup_after_s=2.0)))
        with trio.fail_after(30):
            while runtime.webhook.given_up < 2:
                await trio.sleep(0.05)
        stored = [await stored_record(bridge, r.call_sid) for r in results]
        metrics = bridge.app.metrics.render().decode()
    assert all(r.ended_by == "caller" and r.violations == [] and r.heard_bytes > 0 for r in results)
    assert [s["call_sid"] for s in stored] == [r.call_sid for r in results]  # the store has both
    assert runtime.webhook.delivered == 0
    retried = float(metrics.split('bridge_record_webhooks_total{result="retried"} ', 1)[1].split()[0])
    assert retried >= 3  # the first record alone: after 0.1, 0.2 and 0.4 s, well inside its 1.5 s
    assert 'bridge_record_webhooks_total{result="given_up"} 2.0' in metrics
    warnings = [r.getMessage() for r in caplog.records if r.name == "bridge.records" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gave up" in warnings[0] and results[0].call_sid in warnings[0]
