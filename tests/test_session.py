"""CallSession with in-memory sockets on Trio's MockClock: deterministic, no network."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing

from bridge.agent import events as ag
from bridge.agent.tools import ToolRegistry, tool
from bridge.call.context import CallContext
from bridge.call.session import AGENT_OUT_FRAMES, CallSession, CallSetup
from bridge.call.state import CallPolicy, Outcome
from tests.fakes import (
    CALL_SID,
    STREAM_SID,
    AgentConnector,
    FakeRecorder,
    Peer,
    TwilioScript,
    ev,
    payload,
    ready,
    socket_pair,
)

CONFIG = ag.SessionConfig(system_prompt="Be brief.", greeting="Hello!", voice="ivy", tools=())


@tool
async def slow_lookup(order_id: str) -> dict[str, str]:
    """Look up an order."""
    await trio.sleep(1.5)
    return {"order_id": order_id, "status": "shipped"}


@tool
async def stuck_lookup() -> str:
    """Never answers in time."""
    await trio.sleep(60)
    return "late"


@tool
async def broken(x: int) -> str:
    """Always fails."""
    raise RuntimeError("database is down")


@tool
async def whoami(context: CallContext) -> str:
    """Who is calling."""
    return context.from_number


def make_setup(**policy: Any) -> CallSetup:
    policy.setdefault("twilio_silence_s", 3600.0)  # these fake Twilios only speak when told to
    async def session_config(context: CallContext) -> ag.SessionConfig:
        return CONFIG

    registry = ToolRegistry()
    for fn in (slow_lookup, stuck_lookup, broken, whoami):
        registry.add(fn.__bridge_tool__)  # type: ignore[attr-defined]
    return CallSetup(
        call_id="c-test",
        direction="inbound",
        policy=CallPolicy(**policy),
        session_config=session_config,
        expected_call_sid=CALL_SID,
        tools=registry,
        tool_timeout_s=2.0,
    )


class Call:
    """A running session plus the two peers a test drives."""

    def __init__(self, nursery: trio.Nursery, setup: CallSetup | None = None, connect: Any = None) -> None:
        self.phone_sock, self.twilio = socket_pair()
        self.connector = AgentConnector()
        self.session = CallSession(setup or make_setup(), self.phone_sock, connect or self.connector)
        self.script = TwilioScript()
        self.summary: Any = None
        self.done = trio.Event()
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        self.summary = await self.session.run()
        self.done.set()

    async def start(self) -> Peer:
        """connected + start from Twilio, session.update answered with ready. Returns the agent peer."""
        await self.twilio.send(self.script.connected())
        await self.twilio.send(self.script.start())
        agent = await self.connector.peer()
        update = await agent.receive()
        assert update is not None and update["type"] == "session.update"
        await agent.send(ready())
        await trio.testing.wait_all_tasks_blocked()
        return agent

    async def twilio_frames(self) -> list[dict[str, Any]]:
        await trio.testing.wait_all_tasks_blocked()
        out = []
        while True:
            try:
                text = self.twilio.from_bridge.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return out
            out.append(orjson.loads(text))


async def drain(peer: Peer) -> list[dict[str, Any]]:
    await trio.testing.wait_all_tasks_blocked()
    out = []
    while True:
        try:
            text = peer.from_bridge.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return out
        out.append(orjson.loads(text))


async def test_happy_path_forwards_audio_both_ways_byte_identical(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    sent = [payload(i) for i in range(20)]
    for data in sent:
        await call.twilio.send(call.script.media(data))
    upstream = await drain(agent)
    assert [e["audio"] for e in upstream if e["type"] == "input.audio"] == sent
    assert all(set(e) == {"type", "audio"} for e in upstream)

    replies = [payload(1000 + i, 300) for i in range(5)]
    await agent.send(ev("reply.started", reply_id="r1"))
    for data in replies:
        await agent.send(ev("reply.audio", reply_id="r1", data=data))
    frames = await call.twilio_frames()
    assert frames == [{"event": "media", "streamSid": STREAM_SID, "media": {"payload": d}} for d in replies]


async def test_session_update_carries_pcmu_both_ways_and_no_audio_before_ready(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery)
    await call.twilio.send(call.script.start())
    agent = await call.connector.peer()
    update = await agent.receive()
    assert update == {
        "type": "session.update",
        "session": {
            "system_prompt": "Be brief.",
            "greeting": "Hello!",
            "tools": [],
            "input": {"type": "audio", "format": {"encoding": "audio/pcmu"}},
            "output": {"type": "audio", "voice": "ivy", "format": {"encoding": "audio/pcmu"}},
        },
    }
    await call.twilio.send(call.script.media(payload(1)))
    assert await drain(agent) == []  # not before session.ready
    await agent.send(ready())
    await call.twilio.send(call.script.media(payload(2)))
    assert [e["audio"] for e in await drain(agent)] == [payload(2)]
    assert call.session.stats.frames_dropped_pre_ready == 1


async def test_barge_in_clears_at_once_and_drops_the_interrupted_reply(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery)
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("reply.audio", reply_id="r1", data=payload(1)))
    assert len(await call.twilio_frames()) == 1
    await agent.send(ev("input.speech.started"))
    await agent.send(ev("reply.audio", reply_id="r1", data=payload(2)))  # late audio of the cut reply
    await agent.send(ev("reply.done", reply_id="r1", status="interrupted"))
    frames = await call.twilio_frames()
    assert frames[0] == {"event": "clear", "streamSid": STREAM_SID}
    assert all(f["event"] == "clear" for f in frames)
    assert call.session.stats.barge_ins == 1
    await agent.send(ev("reply.started", reply_id="r2"))
    await agent.send(ev("reply.audio", reply_id="r2", data=payload(3)))
    assert await call.twilio_frames() == [{"event": "media", "streamSid": STREAM_SID, "media": {"payload": payload(3)}}]


async def test_audio_queued_before_a_clear_is_never_sent(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    # The state machine tags audio with the playback epoch; a clear bumps it.
    call.session._apply(call.session.state.on_agent(ag.ReplyAudio("r1", payload(1)), 0.0))
    call.session._apply(call.session.state.on_agent(ag.SpeechStarted(), 0.0))
    frames = await call.twilio_frames()
    assert frames == [{"event": "clear", "streamSid": STREAM_SID}]
    del agent


async def test_tool_round_trip_result_after_reply_done(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("tool.call", call_id="t1", name="slow_lookup", arguments={"order_id": "42"}))
    await agent.send(ev("reply.done", reply_id="r1", status="completed"))
    # Audio keeps flowing while the tool runs.
    await call.twilio.send(call.script.media(payload(7)))
    assert [e["type"] for e in await drain(agent)] == ["input.audio"]
    start = trio.current_time()
    result = await agent.receive()
    assert trio.current_time() - start == pytest.approx(1.5)
    assert result == {
        "type": "tool.result",
        "call_id": "t1",
        "is_error": False,
        "result": '{"order_id":"42","status":"shipped"}',
    }


async def test_tool_result_held_until_reply_done(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("tool.call", call_id="t1", name="whoami", arguments={}))
    await trio.sleep(1)
    assert await drain(agent) == []  # finished, but reply.done is not the latest event yet
    await agent.send(ev("reply.done", reply_id="r1", status="completed"))
    assert await drain(agent) == [{"type": "tool.result", "call_id": "t1", "result": "+14155550123", "is_error": False}]


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("nope", {}, "unknown tool 'nope'"),
        ("broken", {"x": 1}, "RuntimeError: database is down"),
        ("broken", {"x": "ten"}, "expected integer"),
        ("stuck_lookup", {}, "timed out after 2 s"),
    ],
)
async def test_failing_tools_give_the_agent_an_error_and_the_call_goes_on(
    nursery: trio.Nursery, autojump_clock: Any, name: str, arguments: dict[str, Any], expected: str
) -> None:
    call = Call(nursery)
    agent = await call.start()
    await agent.send(ev("tool.call", call_id="t9", name=name, arguments=arguments))
    result = await agent.receive()
    assert result is not None and result["type"] == "tool.result" and result["is_error"] is True
    assert expected in orjson.loads(result["result"])["error"]
    await call.twilio.send(call.script.media(payload(1)))
    assert [e["type"] for e in await drain(agent)] == ["input.audio"]
    assert not call.done.is_set()


async def test_hangup_sends_session_end_and_every_task_finishes_within_a_second(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery)
    agent = await call.start()
    await call.twilio.send(call.script.stop())
    end = await agent.receive()
    assert end == {"type": "session.end"}
    t0 = trio.current_time()
    await agent.send(ev("session.ended", session_duration_seconds=3.2, audio_duration_seconds=None))
    agent.close()
    await call.done.wait()
    assert trio.current_time() - t0 < 1.0
    assert call.summary.outcome is Outcome.CALLER_HUNG_UP
    assert call.connector.sockets[0].closed and call.phone_sock.closed


async def test_closed_twilio_socket_without_stop_still_ends_the_upstream_session(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery)
    agent = await call.start()
    call.twilio.close()
    assert await agent.receive() == {"type": "session.end"}
    t0 = trio.current_time()
    await call.done.wait()  # no session.ended: the goodbye wait is bounded
    assert trio.current_time() - t0 <= 1.0
    assert call.connector.sockets[0].closed


async def test_upstream_close_closes_the_twilio_socket(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    agent.close()
    await call.done.wait()
    assert call.phone_sock.closed
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED
    assert all(e["type"] != "session.end" for e in await drain(agent))


async def test_session_ended_upstream_ends_the_call(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    await agent.send(ev("session.ended", session_duration_seconds=1.0, audio_duration_seconds=None))
    await call.done.wait()
    assert call.phone_sock.closed and call.summary.outcome is Outcome.UPSTREAM_FAILED


async def test_fatal_session_error_ends_the_call_non_fatal_does_not(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    await agent.send(ev("session.error", code="invalid_audio", message="bad base64"))
    await trio.sleep(1)
    assert not call.done.is_set()
    await agent.send(ev("session.error", code="SESSION_EXPIRED", message="cap"))
    await call.done.wait()
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED


async def test_never_ready_upstream_ends_the_call_after_the_deadline(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, make_setup(ready_timeout_s=10.0))
    await call.twilio.send(call.script.start())
    agent = await call.connector.peer()
    await agent.receive()  # session.update, never answered
    t0 = trio.current_time()
    await call.done.wait()
    assert 10.0 <= trio.current_time() - t0 <= 11.5
    assert call.connector.sockets[0].closed and call.phone_sock.closed
    assert {"type": "session.end"} in await drain(agent)


async def test_wrong_call_sid_in_start_closes_before_any_upstream(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    call.script = TwilioScript(call_sid="CA" + "0" * 32)
    await call.twilio.send(call.script.start())
    await call.done.wait()
    assert call.connector.peers == []
    assert call.summary.outcome is Outcome.REJECTED


async def test_unreachable_agent_ends_the_call(nursery: trio.Nursery, autojump_clock: Any) -> None:
    from bridge.errors import UpstreamError

    call = Call(nursery)
    call.connector.fail_with = UpstreamError("connect_failed", "nope", retryable=False)
    await call.twilio.send(call.script.start())
    await call.done.wait()
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED and call.phone_sock.closed


async def test_at_capacity_is_retried_with_backoff(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    await call.twilio.send(call.script.start())
    first = await call.connector.peer()
    await first.receive()
    await first.send(ev("session.error", code="at_capacity", message="busy"))
    first.close()
    while len(call.connector.peers) < 2:
        await trio.sleep(0.05)
    second = call.connector.peers[1]
    assert (await second.receive() or {})["type"] == "session.update"
    await second.send(ready())
    await call.twilio.send(call.script.media(payload(1)))
    assert [e["type"] for e in await drain(second)] == ["input.audio"]


async def test_end_call_hangs_up_only_after_the_goodbye_mark_is_played(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    hung_up: list[str] = []

    class Control:
        async def hang_up(self, call_sid: str) -> None:
            hung_up.append(call_sid)

        async def update_twiml(self, call_sid: str, twiml: str) -> None:
            raise AssertionError("no transfer here")

    setup = make_setup()
    setup.control = Control()
    call = Call(nursery, setup)
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="bye"))
    await agent.send(ev("reply.audio", reply_id="bye", data=payload(1)))
    await agent.send(ev("tool.call", call_id="t1", name="end_call", arguments={}))
    await agent.send(ev("reply.audio", reply_id="bye", data=payload(2)))
    await agent.send(ev("reply.done", reply_id="bye", status="completed"))
    frames = await call.twilio_frames()
    assert [f["event"] for f in frames] == ["media", "media", "mark"]
    await trio.sleep(1)
    assert hung_up == []  # not before Twilio says the goodbye was played
    await call.twilio.send(call.script.mark(frames[-1]["mark"]["name"]))
    await call.done.wait()
    assert hung_up == [CALL_SID]
    assert call.summary.outcome is Outcome.AGENT_ENDED


async def test_a_cleared_goodbye_mark_does_not_hang_up(nursery: trio.Nursery, autojump_clock: Any) -> None:
    hung_up: list[str] = []

    class Control:
        async def hang_up(self, call_sid: str) -> None:
            hung_up.append(call_sid)

        async def update_twiml(self, call_sid: str, twiml: str) -> None: ...

    setup = make_setup()
    setup.control = Control()
    call = Call(nursery, setup)
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="bye"))
    await agent.send(ev("reply.audio", reply_id="bye", data=payload(1)))
    await agent.send(ev("tool.call", call_id="t1", name="end_call", arguments={}))
    await agent.send(ev("reply.done", reply_id="bye", status="completed"))
    mark = (await call.twilio_frames())[-1]["mark"]["name"]
    await agent.send(ev("input.speech.started"))  # caller barges in over the goodbye
    assert (await call.twilio_frames())[0]["event"] == "clear"
    await call.twilio.send(call.script.mark(mark))  # Twilio echoes the flushed mark
    await trio.sleep(30)
    assert hung_up == [] and not call.done.is_set()


async def test_outside_cancellation_still_closes_both_sockets(nursery: trio.Nursery, autojump_clock: Any) -> None:
    phone_sock, twilio = socket_pair()
    connector = AgentConnector()
    session = CallSession(make_setup(), phone_sock, connector)
    with trio.move_on_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(session.run)
            script = TwilioScript()
            await twilio.send(script.start())
            agent = await connector.peer()
            await agent.receive()
            await agent.send(ready())
    assert phone_sock.closed and connector.sockets[0].closed
    assert {"type": "session.end"} in await drain(agent)


async def test_upstream_drop_is_resumed_and_the_gap_is_not_burst(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    await call.twilio.send(call.script.media(payload(1)))
    assert [e["audio"] for e in await drain(agent)] == [payload(1)]
    agent.close()  # TCP drop: no session.ended
    await trio.testing.wait_all_tasks_blocked()
    await call.twilio.send(call.script.media(payload(2)))  # caller audio during the gap
    while len(call.connector.peers) < 2:
        await trio.sleep(0.05)
    second = call.connector.peers[1]
    assert await second.receive() == {"type": "session.resume", "session_id": "sess_" + "a" * 32}
    await second.send(ready())
    await call.twilio.send(call.script.media(payload(3)))
    assert [e["audio"] for e in await drain(second)] == [payload(3)]  # the gap's audio is not sent
    assert not call.done.is_set() and not call.phone_sock.closed
    assert call.session.stats.resumes == 1 and call.session.stats.frames_dropped_gap >= 1


async def drop_then_refuse_the_resume(call: Call) -> None:
    """The upstream drops; the resume on the new socket is answered session_not_found."""
    agent = await call.start()
    agent.close()
    while len(call.connector.peers) < 2:
        await trio.sleep(0.05)
    second = call.connector.peers[1]
    await second.receive()
    await second.send(ev("session.error", code="session_not_found", message="gone"))
    await call.done.wait()


async def test_failed_resume_ends_the_call(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    await drop_then_refuse_the_resume(call)
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED and call.phone_sock.closed


async def test_resume_gives_up_after_the_window(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery, make_setup(resume_window_s=5.0))
    agent = await call.start()
    call.connector.fail_with = OSError("connection refused")
    t0 = trio.current_time()
    agent.close()
    await call.done.wait()
    assert 5.0 <= trio.current_time() - t0 <= 6.0
    assert "resume" in call.summary.reason


async def test_speech_after_the_reply_finished_playing_is_not_a_barge_in(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery)
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("reply.audio", reply_id="r1", data=payload(1)))
    await agent.send(ev("reply.done", reply_id="r1", status="completed"))
    frames = await call.twilio_frames()
    assert [f["event"] for f in frames] == ["media", "mark"]
    await call.twilio.send(call.script.mark(frames[1]["mark"]["name"]))  # Twilio: it has played
    await agent.send(ev("input.speech.started"))
    assert [f["event"] for f in await call.twilio_frames()] == ["clear"]  # harmless, always sent
    assert call.session.stats.barge_ins == 0


async def test_a_silent_twilio_socket_ends_the_call(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery, make_setup(twilio_silence_s=10.0))
    agent = await call.start()
    t0 = trio.current_time()
    await call.done.wait()  # Twilio's TCP is still open, but it sends nothing
    assert 10.0 <= trio.current_time() - t0 <= 11.0
    assert call.summary.outcome is Outcome.STUCK and "Twilio sent nothing" in call.summary.reason
    assert {"type": "session.end"} in await drain(agent)


async def test_an_upstream_that_stops_reading_is_cut_and_resumed(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()

    async def never_returns(text: str) -> None:
        await trio.sleep_forever()

    call.connector.sockets[0].send = never_returns  # type: ignore[method-assign]
    await call.twilio.send(call.script.media(payload(1)))
    t0 = trio.current_time()
    second = await resumed(call)
    assert 5.0 <= trio.current_time() - t0 <= 6.5  # the send deadline
    assert call.connector.sockets[0].aborted
    await call.twilio.send(call.script.media(payload(2)))
    assert [e["audio"] for e in await drain(second)] == [payload(2)]
    assert not call.done.is_set()
    del agent


async def test_an_upstream_that_stops_answering_pings_is_cut_and_resumed(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    from bridge.agent.leg import KEEPALIVE_S, PING_TIMEOUT_S

    call = Call(nursery)
    await call.start()
    call.connector.sockets[0].answer_pings = False
    t0 = trio.current_time()
    await resumed(call)
    assert KEEPALIVE_S + PING_TIMEOUT_S <= trio.current_time() - t0 <= KEEPALIVE_S + PING_TIMEOUT_S + 1.0
    assert call.connector.sockets[0].aborted and not call.done.is_set()


async def resumed(call: Call) -> Peer:
    """Wait for the session to open a second upstream socket; answer its session.resume."""
    while len(call.connector.peers) < 2:
        await trio.sleep(0.05)
    second = call.connector.peers[1]
    assert await second.receive() == {"type": "session.resume", "session_id": "sess_" + "a" * 32}
    await second.send(ready())
    await trio.testing.wait_all_tasks_blocked()
    return second


async def test_a_failed_resume_is_counted_as_failed(nursery: trio.Nursery, autojump_clock: Any) -> None:
    from bridge.observe import Metrics

    setup = make_setup()
    setup.metrics = Metrics()
    call = Call(nursery, setup)
    await drop_then_refuse_the_resume(call)
    text = setup.metrics.render().decode()
    assert 'bridge_agent_resumes_total{result="failed"} 1.0' in text
    assert 'bridge_agent_resumes_total{result="ok"}' not in text


async def test_agent_audio_after_the_twilio_writer_ended_still_lets_the_call_end_upstream(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    """Twilio stops taking frames (its socket is going away) while the agent still speaks: the
    audio for it is dropped, the agent leg is not mistaken for a failed connect, and hanging up
    still sends ``session.end``."""
    call = Call(nursery)
    agent = await call.start()
    call.twilio.from_bridge.close()  # the bridge's next send to Twilio fails: its writer ends
    await agent.send(ev("reply.started", reply_id="r1"))
    for i in range(5):
        await agent.send(ev("reply.audio", reply_id="r1", data=payload(i, 300)))
        await trio.testing.wait_all_tasks_blocked()
    await call.twilio.send(call.script.stop())
    with trio.fail_after(2):
        while (event := await agent.receive()) is not None and event["type"] != "session.end":
            pass
    assert event == {"type": "session.end"}
    await agent.send(ev("session.ended", session_duration_seconds=1.0, audio_duration_seconds=None))
    agent.close()
    await call.done.wait()
    assert call.summary.outcome is Outcome.CALLER_HUNG_UP


# --- issue 12 bugs (each test failed on e1a1348) --------------------------------------------------


async def test_control_keeps_its_order_and_is_never_dropped_when_caller_audio_fills_the_queue(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    """Issue 12 bug 1: with ``agent_out`` full, each control message used to be sent by a task of
    its own, and Trio does not keep those tasks' order. Two held tool results flushed by one
    ``reply.done`` are the realistic case; eight rounds make a 50 % reorder show up."""
    call = Call(nursery)
    agent = await call.start()
    sock = call.connector.sockets[0]
    real_send = sock.send
    hold = trio.Event()

    async def held_send(text: str) -> None:
        await hold.wait()
        await real_send(text)

    sock.send = held_send  # type: ignore[method-assign]
    for rnd in range(8):
        hold = trio.Event()
        reply, first, second = f"r{rnd}", f"t{rnd}a", f"t{rnd}b"
        await agent.send(ev("reply.started", reply_id=reply))
        for tool_call_id in (first, second):  # unreadable arguments: an error result at once, held
            await agent.send(ev("tool.call", call_id=tool_call_id, name="slow_lookup", arguments="{not json"))
        for i in range(AGENT_OUT_FRAMES + 10):  # the upstream is not taking anything: the queue fills
            await call.twilio.send(call.script.media(payload(i)))
        await trio.testing.wait_all_tasks_blocked()
        dropped = call.session.stats.frames_dropped_backpressure
        await agent.send(ev("reply.done", reply_id=reply, status="completed"))  # flushes both results
        await trio.testing.wait_all_tasks_blocked()
        hold.set()
        results = [e["call_id"] for e in await drain(agent) if e["type"] == "tool.result"]
        assert results == [first, second], f"round {rnd}"
        assert dropped > 0  # caller audio was dropped: the queue really was full
        await trio.sleep(3)  # the caller-audio budget refills
    assert not call.done.is_set()


async def test_every_connect_error_of_a_group_is_heeded(nursery: trio.Nursery, autojump_clock: Any) -> None:
    """Issue 12 bug 2: the agent leg reduced an exception group to its first member. Here the
    handshake's reader fails first with a retryable error and the connect itself with a refusal
    that will never pass: the refusal must end the call at once (it used to be retried until
    the ready deadline), and both errors are reported."""
    from bridge.errors import UpstreamError

    attempts: list[int] = []

    async def connect(nursery: trio.Nursery) -> Any:
        attempts.append(1)

        async def reader() -> None:
            raise OSError("connection reset by peer")

        nursery.start_soon(reader)
        with trio.CancelScope(shield=True):
            await trio.testing.wait_all_tasks_blocked()  # the reader has failed first
        raise UpstreamError("unauthorized", "the API key was revoked", retryable=False)

    call = Call(nursery, connect=connect)
    t0 = trio.current_time()
    await call.twilio.send(call.script.start())
    await call.done.wait()
    assert attempts == [1]
    assert trio.current_time() - t0 < 1.0
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED
    assert "the API key was revoked" in call.summary.reason
    assert "connection reset by peer" in call.summary.reason


async def test_the_phone_writer_does_not_close_the_channel_it_reads(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    """Issue 12 bug 3: ``_phone_tx`` closed its receive channel on the way out; the session owns
    both ends of its channels and closes them in teardown."""
    call = Call(nursery)
    agent = await call.start()
    call.twilio.from_bridge.close()  # the next send to Twilio fails: the writer ends
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("reply.audio", reply_id="r1", data=payload(1, 300)))
    await trio.testing.wait_all_tasks_blocked()
    stats = call.session._phone_out_send.statistics()
    assert stats.open_receive_channels == 1 and not call.done.is_set()
    await call.twilio.send(call.script.stop())
    await call.done.wait()
    stats = call.session._phone_out_send.statistics()
    assert (stats.open_send_channels, stats.open_receive_channels) == (0, 0)
    stats = call.session._agent_out_send.statistics()
    assert (stats.open_send_channels, stats.open_receive_channels) == (0, 0)


# --- records ------------------------------------------------------------------------------------


async def test_the_recorder_sees_events_and_facts_but_no_audio(nursery: trio.Nursery, autojump_clock: Any) -> None:
    from bridge.phone import media as tw
    from bridge.records import facts

    setup = make_setup()
    setup.recorder = recorder = FakeRecorder()
    call = Call(nursery, setup)
    agent = await call.start()
    for i in range(3):
        await call.twilio.send(call.script.media(payload(i)))
    await agent.send(ev("reply.started", reply_id="r1"))
    for i in range(7):  # 7 x 37.5 ms: one periodic mark
        await agent.send(ev("reply.audio", reply_id="r1", data=payload(i, 300)))
    await agent.send(ev("reply.done", reply_id="r1", status="completed"))
    frames = await call.twilio_frames()
    marks = [f["mark"]["name"] for f in frames if f["event"] == "mark"]
    assert [f["event"] for f in frames] == ["media"] * 7 + ["mark", "mark"]
    for name in marks:  # Twilio: played
        await call.twilio.send(call.script.mark(name))
    await call.twilio.send(call.script.stop())
    await agent.receive()  # session.end
    await agent.send(ev("session.ended", session_duration_seconds=3.2, audio_duration_seconds=None))
    agent.close()
    await call.done.wait()
    assert not any(type(e) is tw.Media for e in recorder.phone_events)
    assert [type(e) for e in recorder.phone_events] == [tw.Connected, tw.Start, tw.Mark, tw.Mark, tw.Stop]
    assert not any(type(e) is ag.ReplyAudio for e in recorder.agent_events)
    assert [type(e) for e in recorder.agent_events] == [ag.SessionReady, ag.ReplyStarted, ag.ReplyDone, ag.SessionEnded]
    assert [type(f) for f in recorder.facts] == [
        facts.UpstreamOpened,
        facts.AudioWritten,
        facts.MarkPlayed,
        facts.MarkPlayed,
        facts.UpstreamClosed,
        facts.CallEnded,
    ]
    heard = [(f.reply_id, f.offset_ms, f.heard) for f in recorder.facts if type(f) is facts.MarkPlayed]
    assert heard == [("r1", 262, True), ("r1", 262, True)]
    assert recorder.facts[-1].outcome == "caller_hung_up"
    assert len(recorder.finished) == 1


@pytest.mark.parametrize("method", ["phone", "agent", "fact"])
async def test_a_failing_recorder_costs_no_call(nursery: trio.Nursery, autojump_clock: Any, method: str) -> None:
    setup = make_setup()
    setup.recorder = FakeRecorder(fail_in=method)
    call = Call(nursery, setup)
    agent = await call.start()
    await call.twilio.send(call.script.media(payload(1)))
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("reply.audio", reply_id="r1", data=payload(2, 300)))
    assert [e["audio"] for e in await drain(agent)] == [payload(1)]
    assert [f["event"] for f in await call.twilio_frames()] == ["media"]
    assert not call.done.is_set()


def test_every_socket_implements_the_whole_port() -> None:
    """The session calls these without asking (no getattr on sockets); mypy checks the real
    sockets where they are handed to the session, this checks the fakes as well."""
    import inspect

    from bridge.agent.connection import AgentSocket
    from bridge.call.ports import MessageSocket
    from bridge.phone.stream import WsPhoneSocket
    from tests.fakes import MemorySocket

    port = {name for name in vars(MessageSocket) if not name.startswith("_")}
    assert port == {"receive", "send", "ping", "abort", "aclose", "describe_close"}
    for cls in (AgentSocket, WsPhoneSocket, MemorySocket):
        for name in port:
            method = getattr(cls, name)
            assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(getattr(MessageSocket, name))
