"""The call recorder (port -> builder, sinks, metrics) and the live event hub."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from bridge.agent import events as ag
from bridge.call.actions import CallStats
from bridge.observe import Metrics
from bridge.phone import media as tw
from bridge.records import facts as fx
from bridge.records.live import LiveHub, TooManySubscribers
from bridge.records.recorder import Records

SID = "CA" + "b" * 32


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def submit(self, record: dict[str, Any]) -> None:
        self.records.append(record)


class BrokenSink:
    def submit(self, record: dict[str, Any]) -> None:
        raise RuntimeError("sink bug")


def make(**kw: Any) -> tuple[Records, ListSink]:
    sink = ListSink()
    clock = iter(range(10_000))
    records = Records(sinks=(BrokenSink(), sink), clock=lambda: 0.0, wall_clock=lambda: 1_800_000_000.0 + next(clock),
                      **kw)
    return records, sink


def start() -> tw.Start:
    return tw.Start("MZ1", SID, "AC1", ("inbound",), {"From": "+14155550100"}, "audio/x-mulaw", 8000, 1, 1)


def run_call(records: Records) -> None:
    rec = records.new_call("c-1", "inbound")
    rec.attach_stats(CallStats(frames_from_twilio=100, frames_to_twilio=80))
    rec.phone(start(), 0.0)
    rec.agent(ag.SessionReady("s1", None, None, {}), 0.2)
    rec.agent(ag.ReplyStarted("r0"), 0.3)
    rec.fact(fx.AudioWritten("r0", 0.6))
    rec.fact(fx.MarkPlayed("r0", 250, True, 0.9))
    rec.agent(ag.TranscriptAgent("r0", "Hi there.", False), 1.0)
    rec.agent(ag.ReplyDone("r0", False), 1.0)
    rec.agent(ag.SpeechStopped(), 2.0)
    rec.agent(ag.TranscriptUser("u", "book it"), 2.1)
    rec.agent(ag.ReplyStarted("r1"), 2.2)
    rec.fact(fx.AudioWritten("r1", 2.4))
    rec.fact(fx.MarkPlayed("r1", 250, True, 2.7))
    rec.fact(fx.MarkPlayed("r1", 500, False, 2.8))
    rec.agent(ag.TranscriptAgent("r1", "Sure", True), 2.8)
    rec.fact(fx.ToolStarted("t", "book", {}, 3.0))
    rec.fact(fx.ToolFinished("t", "ok", False, 3.5))
    rec.fact(fx.CallEnded("caller_hung_up", "stop", 4.0))
    rec.finish(4.0)
    rec.finish(4.5)  # twice: one record


def test_finish_hands_one_record_to_every_sink_and_frames_come_from_stats() -> None:
    records, sink = make()
    run_call(records)
    (record,) = sink.records
    assert record["live"] is False and record["call_sid"] == SID
    assert record["frames"]["from_twilio"] == 100
    assert [t["speaker"] for t in record["turns"]] == ["agent", "caller", "agent"]
    assert records.live(SID) is None and records.live_count() == 0


def test_a_live_call_gives_its_record_so_far() -> None:
    records, _ = make()
    rec = records.new_call("c-2", "outbound")
    assert records.live(SID) is None  # no CallSid before the start
    rec.phone(start(), 0.0)
    rec.agent(ag.TranscriptUser("u", "hello"), 1.0)
    live = records.live(SID)
    assert live is not None and live["live"] is True and live["turns"][0]["text"] == "hello"
    assert [s["call_sid"] for s in records.live_summaries()] == [SID]


def test_metrics_response_first_audio_interrupted_said_heard() -> None:
    metrics = Metrics()
    records, _ = make(metrics=metrics)
    run_call(records)
    value = metrics.registry.get_sample_value
    assert value("bridge_turn_response_seconds_count") == 1
    assert value("bridge_turn_response_seconds_sum") == pytest.approx(0.4)
    assert value("bridge_first_audio_seconds_sum") == pytest.approx(0.6)
    assert value("bridge_replies_interrupted_total") == 1
    assert value("bridge_agent_audio_seconds_total", {"kind": "said"}) == pytest.approx(0.75)
    assert value("bridge_agent_audio_seconds_total", {"kind": "heard"}) == pytest.approx(0.5)


def test_no_start_no_record() -> None:
    records, sink = make()
    rec = records.new_call("c-3", "inbound")
    rec.fact(fx.CallEnded("rejected", "no start", 1.0))
    rec.finish(1.0)
    assert sink.records == []


def test_a_builder_failure_is_logged_once_and_the_call_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    records, _ = make()
    rec = records.new_call("c-4", "inbound")

    def boom(*args: object) -> None:
        raise ValueError("bug")

    rec.builder.agent = boom  # type: ignore[method-assign]
    rec.agent(ag.SpeechStarted(), 0.0)
    rec.agent(ag.SpeechStarted(), 0.0)
    assert sum("call recorder failed" in r.message for r in caplog.records) == 1


async def test_events_reach_a_subscriber_in_order() -> None:
    records, _ = make()
    with records.hub.subscribe() as events:
        run_call(records)
        got: list[dict[str, Any]] = []
        while True:
            try:
                got.append(events.receive_nowait())
            except trio.WouldBlock:
                break
    kinds = [e["type"] for e in got]
    assert kinds[0] == "call.started" and kinds[-1] == "call.ended"
    assert got[0]["from"] == "+14155550100" and got[0]["call_sid"] == SID
    activities = [e["activity"] for e in got if e["type"] == "call.updated"]
    assert activities == [
        "listening", "greeting", "listening", "agent speaking", "listening", "tool running", "listening", "ending"
    ]
    r1 = [e for e in got if e["type"] == "turn" and e["turn"].get("reply_id") == "r1"]
    assert r1[-1]["index"] == 2 and r1[-1]["turn"]["interrupted"] is True
    tools = [e for e in got if e["type"] == "tool"]
    assert tools[-1]["tool"]["result"] == "ok" and tools[-1]["index"] == 0
    assert all(e["type"] != "turn" or "turn" in e for e in got)
    assert records.hub.subscribers == 0


async def test_a_slow_subscriber_loses_the_oldest_events_counted_others_do_not() -> None:
    hub = LiveHub(subscriber_events=3)
    with hub.subscribe() as slow, hub.subscribe() as fast:
        for i in range(5):
            hub.publish({"n": i})
            assert fast.receive_nowait() == {"n": i}
        assert [slow.receive_nowait()["n"] for _ in range(3)] == [2, 3, 4]
    assert hub.dropped == 2 and hub.published == 5
    hub.publish({"n": 9})  # nobody listens: nothing to do, no error


async def test_subscriber_cap_and_cleanup_on_cancel() -> None:
    hub = LiveHub(max_subscribers=1)
    with trio.CancelScope() as scope, hub.subscribe() as events:
        with pytest.raises(TooManySubscribers):
            hub.subscribe().__enter__()
        scope.cancel()
        await events.receive()
    assert hub.subscribers == 0
    with hub.subscribe():
        assert hub.subscribers == 1


async def test_subscriber_waits_for_events() -> None:
    hub = LiveHub()
    got: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:

        async def listen() -> None:
            with hub.subscribe() as events:
                got.append(await events.receive())

        nursery.start_soon(listen)
        await trio.testing.wait_all_tasks_blocked()
        hub.publish({"type": "x"})
    assert got == [{"type": "x"}]
