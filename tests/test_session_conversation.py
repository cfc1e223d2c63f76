"""Issue 15 through CallSession on Trio's MockClock: recovery after a refused resume, idle callers,
the keypad, answering machines. In-memory sockets, the fake peers of tests/fakes.py."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio.testing

from bridge.call.amd import greeting_instructions, voicemail_instructions
from bridge.call.idle import GOODBYE_INSTRUCTIONS, REPROMPT_INSTRUCTIONS
from bridge.call.recovery import BEGIN_MARK
from bridge.call.session import CallSetup
from bridge.call.signals import AmdResult, CallSignals
from bridge.call.state import Outcome, Phase
from bridge.records import facts as fx
from tests.fakes import CALL_SID, FakeRecorder, Peer, ev, payload, ready
from tests.test_session import CONFIG, Call, drain, make_setup

SECOND = "sess_" + "b" * 32
THIRD = "sess_" + "c" * 32


class Control:
    """Twilio REST as the session sees it: records what it was asked."""

    def __init__(self) -> None:
        self.hung_up: list[str] = []
        self.twiml: list[str] = []

    async def hang_up(self, call_sid: str) -> None:
        self.hung_up.append(call_sid)

    async def update_twiml(self, call_sid: str, twiml: str) -> None:
        self.twiml.append(twiml)


def setup_with(control: Control | None = None, **policy: Any) -> CallSetup:
    setup = make_setup(**policy)
    setup.control = control
    return setup


def types(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages]


async def wait_peers(call: Call, count: int) -> Peer:
    while len(call.connector.peers) < count:
        await trio.sleep(0.01)
    return call.connector.peers[count - 1]


async def speak(call: Call, agent: Peer, reply_id: str, *, heard: bool = True) -> list[str]:
    """One agent reply with audio; its marks echoed by Twilio when ``heard``. Returns the marks."""
    await agent.send(ev("reply.started", reply_id=reply_id))
    await agent.send(ev("reply.audio", reply_id=reply_id, data=payload(7)))
    await agent.send(ev("reply.done", reply_id=reply_id, status="completed"))
    frames = await call.twilio_frames()
    marks = [f["mark"]["name"] for f in frames if f["event"] == "mark"]
    if heard:
        for name in marks:
            await call.twilio.send(call.script.mark(name))
        await trio.testing.wait_all_tasks_blocked()
    return marks


# --- 1. recovery when session.resume is refused ------------------------------------------------


async def a_conversation_then_a_refused_resume(call: Call) -> tuple[Peer, Peer]:
    agent = await call.start()
    await agent.send(ev("transcript.user", item_id="i1", text="My order number is 4417."))
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("transcript.agent", reply_id="r1", item_id="a1", text="Let me look it up.", interrupted=False))
    await agent.send(ev("reply.done", reply_id="r1", status="completed"))
    await trio.testing.wait_all_tasks_blocked()
    agent.close()  # TCP drop: no session.ended
    second = await wait_peers(call, 2)
    assert await second.receive() == {"type": "session.resume", "session_id": "sess_" + "a" * 32}
    await second.send(ev("session.error", code="session_not_found", message="no such session"))
    return agent, second


async def test_a_refused_resume_opens_a_fresh_session_with_the_conversation_then_asks_for_the_apology(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, setup_with(recovery_s=5.0))
    await a_conversation_then_a_refused_resume(call)
    refused_at = trio.current_time()
    third = await wait_peers(call, 3)
    update = await third.receive()
    assert update is not None and update["type"] == "session.update"
    session = update["session"]
    assert "greeting" not in session  # no second greeting
    assert session["tools"] == list(CONFIG.tools) and session["output"]["voice"] == CONFIG.voice
    prompt = session["system_prompt"]
    assert prompt.startswith(CONFIG.system_prompt)
    assert BEGIN_MARK in prompt
    assert "Caller: My order number is 4417." in prompt and "Agent: Let me look it up." in prompt
    assert call.session.state.phase is Phase.RECOVERING
    assert call.connector.sockets[1].closed  # the refused socket is retired, not read any more
    await call.twilio.send(call.script.media(payload(1)))  # caller audio in the gap
    await trio.testing.wait_all_tasks_blocked()
    assert await drain(third) == []  # never replayed
    assert call.session.stats.frames_dropped_gap >= 1

    await third.send(ready(THIRD))
    [create] = await drain(third)
    assert create["type"] == "reply.create"
    assert "Apologise in one short sentence" in create["instructions"]
    assert "carry on exactly where the conversation left off" in create["instructions"]
    await third.send(ev("reply.started", reply_id="r9"))
    await third.send(ev("reply.audio", reply_id="r9", data=payload(9)))
    frames = await call.twilio_frames()
    assert any(f["event"] == "media" and f["media"]["payload"] == payload(9) for f in frames)
    assert trio.current_time() - refused_at < 5.0
    await call.twilio.send(call.script.media(payload(2)))
    assert [m["audio"] for m in await drain(third) if m["type"] == "input.audio"] == [payload(2)]
    await trio.sleep(10)  # past RECOVERY_S: the call goes on, the caller heard the agent
    assert not call.done.is_set()
    state = call.session.state
    assert state.recovered and state.session_id == THIRD and call.session.stats.recoveries == 1


async def test_the_fresh_session_is_told_the_conversation_from_the_call_record_when_one_is_kept(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    class RecordedCall(FakeRecorder):
        def snapshot(self, now: float) -> dict[str, Any]:
            return {
                "turns": [
                    {"speaker": "caller", "text": "What is my balance?", "started_at": "t1"},
                    {
                        "speaker": "agent",
                        "text": "Your balance is 10 euros and",
                        "heard_text": "Your balance",
                        "started_at": "t2",
                    },
                ]
            }

    setup = setup_with(recovery_s=5.0)
    recorder = RecordedCall()
    setup.recorder = recorder
    call = Call(nursery, setup)
    await a_conversation_then_a_refused_resume(call)
    third = await wait_peers(call, 3)
    update = await third.receive()
    assert update is not None
    prompt = update["session"]["system_prompt"]
    assert "Agent: Your balance\n" in prompt + "\n" and "10 euros" not in prompt  # as heard, not as said
    await third.send(ready(THIRD))
    await trio.testing.wait_all_tasks_blocked()
    [recovered] = [f for f in recorder.facts if isinstance(f, fx.SessionRecovered)]
    assert recovered.session_id == THIRD


async def test_the_prompt_is_bounded_to_recovery_context_chars(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery, setup_with(recovery_s=5.0, recovery_context_chars=300))
    agent = await call.start()
    for i in range(40):
        await agent.send(ev("transcript.user", item_id=f"i{i}", text=f"turn {i:02d} " + "x" * 40))
    await trio.testing.wait_all_tasks_blocked()
    agent.close()
    second = await wait_peers(call, 2)
    await second.receive()
    await second.send(ev("session.error", code="session_not_found", message="gone"))
    third = await wait_peers(call, 3)
    update = await third.receive()
    assert update is not None
    prompt = update["session"]["system_prompt"]
    transcript = prompt.split(BEGIN_MARK + "\n", 1)[1].rsplit("\n[end of", 1)[0]
    assert len(transcript) <= 300
    assert "turn 39" in transcript and "turn 00" not in transcript and "left out" in transcript


async def test_a_fresh_session_that_is_refused_too_ends_the_call_for_the_fallback(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, setup_with(recovery_s=5.0))
    await a_conversation_then_a_refused_resume(call)
    third = await wait_peers(call, 3)
    await third.receive()
    await third.send(ev("session.error", code="agent_init_failed", message="no"))
    await call.done.wait()
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED and call.phone_sock.closed
    assert len(call.connector.peers) == 3


async def test_a_fresh_session_that_never_speaks_ends_the_call_at_recovery_s(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, setup_with(recovery_s=5.0))
    await a_conversation_then_a_refused_resume(call)
    refused_at = trio.current_time()
    third = await wait_peers(call, 3)
    await third.receive()
    await third.send(ready(THIRD))  # ready, but the agent never says a word
    await call.done.wait()
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED and "within 5 s" in call.summary.reason
    assert 5.0 <= trio.current_time() - refused_at <= 5.5
    assert {"type": "session.end"} in await drain(third)  # the fresh session is not left billed


async def test_recovery_off_ends_the_call_when_the_resume_is_refused(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, setup_with(recovery_s=0.0))
    await a_conversation_then_a_refused_resume(call)
    await call.done.wait()
    assert call.summary.outcome is Outcome.UPSTREAM_FAILED and len(call.connector.peers) == 2


async def test_tool_results_of_the_refused_session_never_reach_the_fresh_one(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, setup_with(recovery_s=5.0))
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="r1"))
    await agent.send(ev("tool.call", call_id="t1", name="slow_lookup", arguments={"order_id": "1"}))
    await agent.send(ev("reply.done", reply_id="r1", status="completed"))
    await trio.testing.wait_all_tasks_blocked()
    agent.close()
    second = await wait_peers(call, 2)
    await second.receive()
    await second.send(ev("session.error", code="session_not_found", message="gone"))
    third = await wait_peers(call, 3)
    await third.receive()
    await third.send(ready(THIRD))
    await trio.sleep(3)  # the tool (1.5 s) finished meanwhile
    assert types(await drain(third)) == ["reply.create"]


# --- 2. the caller goes quiet ---------------------------------------------------------------


async def test_idle_caller_is_reprompted_then_told_goodbye_and_hung_up_after_it_was_heard(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    control = Control()
    call = Call(nursery, setup_with(control, idle_reprompt_s=8.0, idle_hangup_s=15.0))
    agent = await call.start()
    await speak(call, agent, "r1")  # the greeting, heard
    heard_at = trio.current_time()
    [reprompt] = [m for m in [await agent.receive()] if m]
    assert reprompt == {"type": "reply.create", "instructions": REPROMPT_INSTRUCTIONS}
    assert trio.current_time() - heard_at == pytest.approx(8.0, abs=0.26)
    await speak(call, agent, "r2")  # the reprompt, heard
    reprompt_heard = trio.current_time()
    goodbye = await agent.receive()
    assert goodbye == {"type": "reply.create", "instructions": GOODBYE_INSTRUCTIONS}
    assert trio.current_time() - reprompt_heard == pytest.approx(15.0, abs=0.26)
    assert control.hung_up == []
    [name] = await speak(call, agent, "r3", heard=False)  # the goodbye is playing
    assert name.startswith("goodbye")
    await trio.sleep(1)
    assert control.hung_up == [] and not call.done.is_set()  # not before it was heard
    await call.twilio.send(call.script.mark(name))
    await trio.testing.wait_all_tasks_blocked()
    assert control.hung_up == [CALL_SID]
    await call.done.wait()
    assert call.summary.outcome is Outcome.AGENT_ENDED


@pytest.mark.parametrize("sign_of_life", ["speech", "key", "tool"])
async def test_speech_keys_and_tools_reset_the_idle_timer(
    nursery: trio.Nursery, autojump_clock: Any, sign_of_life: str
) -> None:
    call = Call(nursery, setup_with(idle_reprompt_s=8.0, idle_hangup_s=15.0))
    agent = await call.start()
    await speak(call, agent, "r1")
    await trio.sleep(6)
    if sign_of_life == "speech":
        await agent.send(ev("input.speech.started"))
        await trio.sleep(3)  # speaking: no clock runs
        await agent.send(ev("input.speech.stopped"))
    elif sign_of_life == "key":
        await call.twilio.send(call.script.dtmf("5"))
    else:
        await agent.send(ev("reply.started", reply_id="r2"))  # a silent pre-amble reply
        await agent.send(ev("tool.call", call_id="t1", name="slow_lookup", arguments={"order_id": "1"}))
        await agent.send(ev("reply.done", reply_id="r2", status="completed"))
        result = await agent.receive()  # sent as the tool finishes, 1.5 s later: the clock restarts
        assert result is not None and result["type"] == "tool.result"
    reset_at = trio.current_time()
    message = await agent.receive()
    assert message == {"type": "reply.create", "instructions": REPROMPT_INSTRUCTIONS}
    assert trio.current_time() - reset_at == pytest.approx(8.0, abs=0.26)


async def test_caller_speech_during_the_idle_goodbye_keeps_the_call(nursery: trio.Nursery, autojump_clock: Any) -> None:
    control = Control()
    call = Call(nursery, setup_with(control, idle_reprompt_s=0.0, idle_hangup_s=5.0))
    agent = await call.start()
    await speak(call, agent, "r1")
    assert await agent.receive() == {"type": "reply.create", "instructions": GOODBYE_INSTRUCTIONS}
    await agent.send(ev("reply.started", reply_id="bye"))
    await agent.send(ev("reply.audio", reply_id="bye", data=payload(3)))
    await agent.send(ev("input.speech.started"))  # "wait, I'm here!"
    await agent.send(ev("reply.done", reply_id="bye", status="interrupted"))
    await trio.sleep(30)
    assert control.hung_up == [] and not call.done.is_set()


async def test_idle_zero_disables_both_steps(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery, setup_with(idle_reprompt_s=0.0, idle_hangup_s=0.0))
    agent = await call.start()
    await speak(call, agent, "r1")
    await trio.sleep(120)
    assert await drain(agent) == [] and not call.done.is_set()


# --- 3. keypad input --------------------------------------------------------------------------


async def collect(call: Call, agent: Peer, **arguments: Any) -> None:
    await agent.send(ev("reply.started", reply_id="ask"))
    await agent.send(ev("tool.call", call_id="k1", name="collect_digits", arguments=arguments))
    await agent.send(ev("reply.done", reply_id="ask", status="completed"))
    await trio.testing.wait_all_tasks_blocked()


async def press(call: Call, keys: str) -> None:
    for key in keys:
        await call.twilio.send(call.script.dtmf(key))
        await trio.sleep(0.5)


def digits_result(message: dict[str, Any] | None) -> dict[str, Any]:
    assert message is not None and message["type"] == "tool.result" and message["call_id"] == "k1"
    assert message["is_error"] is False
    result: dict[str, Any] = json.loads(message["result"])
    return result


async def test_digits_until_the_finish_key(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery, setup_with(keypad_tool=True))
    agent = await call.start()
    await collect(call, agent, max_digits=10)
    await press(call, "4417#")
    assert digits_result(await agent.receive()) == {"digits": "4417"}
    await call.twilio.send(call.script.dtmf("9"))  # outside a collection, DTMF_TO_AGENT off
    assert await drain(agent) == []


async def test_digits_until_the_limit(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery, setup_with(keypad_tool=True))
    agent = await call.start()
    await collect(call, agent, max_digits=3, finish_on_key="")
    await press(call, "123")
    assert digits_result(await agent.receive()) == {"digits": "123"}


async def test_digits_until_the_timeout(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery, setup_with(keypad_tool=True))
    agent = await call.start()
    await collect(call, agent, max_digits=6, timeout_s=4)
    await press(call, "12")
    last_key = trio.current_time() - 0.5
    assert digits_result(await agent.receive()) == {"digits": "12", "timed_out": True}
    assert trio.current_time() - last_key == pytest.approx(4.0, abs=0.26)


async def test_a_keypad_result_inside_its_reply_waits_for_reply_done(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, setup_with(keypad_tool=True))
    agent = await call.start()
    await agent.send(ev("reply.started", reply_id="ask"))
    await agent.send(ev("tool.call", call_id="k1", name="collect_digits", arguments={"max_digits": 0}))
    assert await drain(agent) == []  # the error result is held: reply.done is not the latest event
    await agent.send(ev("reply.done", reply_id="ask", status="completed"))
    [result] = await drain(agent)
    assert result["type"] == "tool.result" and result["is_error"] is True and "max_digits" in result["result"]


async def test_sensitive_digits_are_masked_in_logs_and_the_record(
    nursery: trio.Nursery, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    setup = setup_with(keypad_tool=True)
    recorder = FakeRecorder()
    setup.recorder = recorder
    call = Call(nursery, setup)
    agent = await call.start()
    await collect(call, agent, max_digits=4, sensitive=True)
    await press(call, "9753")
    assert digits_result(await agent.receive()) == {"digits": "9753"}  # the model gets them
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "caller pressed a key (sensitive entry: masked)" in logged
    for secret in ("9753", "'9'", "'7'", "'5'", "'3'"):
        assert secret not in logged
    [finished] = [f for f in recorder.facts if isinstance(f, fx.ToolFinished)]
    assert finished.result == '{"digits": "****"}'
    pressed = [f for f in recorder.facts if isinstance(f, fx.DtmfPressed)]
    assert [f.sensitive for f in pressed] == [True] * 4  # the record builder masks them
    assert all("9753" not in repr(f) for f in recorder.facts if not isinstance(f, fx.DtmfPressed))


async def test_keys_outside_a_collection_reach_the_agent_only_with_dtmf_to_agent(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    call = Call(nursery, setup_with(dtmf_to_agent=True))
    agent = await call.start()
    await call.twilio.send(call.script.dtmf("2"))
    [told] = await drain(agent)
    assert told["type"] == "reply.create" and "'2' key" in told["instructions"]


# --- 4. answering machines on outbound calls ----------------------------------------------------


GREETING = CONFIG.greeting


def outbound(signals: CallSignals, control: Control | None = None, **policy: Any) -> CallSetup:
    setup = setup_with(control, outbound=True, amd=True, amd_wait_s=4.0, voicemail_message="Call us back.", **policy)
    setup.direction = "outbound"
    setup.signals = signals
    return setup


async def start_outbound(call: Call) -> Peer:
    await call.twilio.send(call.script.start())
    agent = await call.connector.peer()
    update = await agent.receive()
    assert update is not None and update["type"] == "session.update"
    assert "greeting" not in update["session"]  # held until a person is known
    await agent.send(ready())
    await trio.testing.wait_all_tasks_blocked()
    return agent


def amd(signals: CallSignals, answered_by: str) -> None:
    signals.publish(AmdResult(CALL_SID, answered_by, 2300))


@pytest.mark.parametrize("answered_by", ["human", "unknown"])
async def test_a_person_answering_gets_the_greeting(
    nursery: trio.Nursery, autojump_clock: Any, answered_by: str
) -> None:
    signals = CallSignals()
    call = Call(nursery, outbound(signals))
    agent = await start_outbound(call)
    await call.twilio.send(call.script.media(payload(1)))  # the callee's "hello?" before the result
    await trio.sleep(1)
    assert await drain(agent) == []  # nothing said, nothing heard yet
    amd(signals, answered_by)
    await trio.testing.wait_all_tasks_blocked()
    assert await drain(agent) == [{"type": "reply.create", "instructions": greeting_instructions(GREETING)}]
    await call.twilio.send(call.script.media(payload(2)))
    assert [m["audio"] for m in await drain(agent)] == [payload(2)]
    assert call.session.stats.frames_dropped_pre_ready >= 1


@pytest.mark.parametrize("answered_by", ["machine_end_beep", "machine_end_silence", "machine_end_other"])
async def test_a_machine_gets_the_voicemail_and_the_call_ends_after_it_was_heard(
    nursery: trio.Nursery, autojump_clock: Any, answered_by: str
) -> None:
    signals, control = CallSignals(), Control()
    setup = outbound(signals, control)
    recorder = FakeRecorder()
    setup.recorder = recorder
    call = Call(nursery, setup)
    agent = await start_outbound(call)
    amd(signals, answered_by)
    await trio.testing.wait_all_tasks_blocked()
    assert await drain(agent) == [{"type": "reply.create", "instructions": voicemail_instructions("Call us back.")}]
    [name] = await speak(call, agent, "vm", heard=False)
    assert name.startswith("goodbye") and control.hung_up == []
    await call.twilio.send(call.script.mark(name))
    await call.done.wait()
    assert control.hung_up == [CALL_SID] and call.summary.outcome is Outcome.AGENT_ENDED
    assert [f.answered_by for f in recorder.facts if isinstance(f, fx.AnsweredBy)] == [answered_by]
    assert call.session.stats.frames_to_agent == 0  # the machine never reached the agent


async def test_a_fax_is_hung_up_at_once(nursery: trio.Nursery, autojump_clock: Any) -> None:
    signals, control = CallSignals(), Control()
    call = Call(nursery, outbound(signals, control))
    agent = await start_outbound(call)
    amd(signals, "fax")
    await call.done.wait()
    assert control.hung_up == [CALL_SID] and call.summary.outcome is Outcome.AGENT_ENDED
    assert types(await drain(agent)) == ["session.end"]


async def test_no_result_within_amd_wait_s_greets_anyway_and_a_late_machine_still_gets_the_voicemail(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    signals = CallSignals()
    call = Call(nursery, outbound(signals, Control()))
    started = trio.current_time()
    agent = await start_outbound(call)
    greet = await agent.receive()
    assert greet == {"type": "reply.create", "instructions": greeting_instructions(GREETING)}
    assert trio.current_time() - started == pytest.approx(4.0, abs=0.26)
    await agent.send(ev("reply.started", reply_id="g"))
    await agent.send(ev("reply.audio", reply_id="g", data=payload(4)))
    await trio.testing.wait_all_tasks_blocked()
    amd(signals, "machine_end_beep")  # late: the greeting is playing to a machine
    await trio.testing.wait_all_tasks_blocked()
    assert await drain(agent) == [{"type": "reply.create", "instructions": voicemail_instructions("Call us back.")}]
    frames = await call.twilio_frames()
    assert {"event": "clear", "streamSid": call.script.stream_sid} in frames  # the greeting is cut


async def test_a_machine_before_the_agent_is_up_gets_twilios_say(nursery: trio.Nursery, autojump_clock: Any) -> None:
    signals, control = CallSignals(), Control()
    amd(signals, "machine_end_beep")  # the callback beat the stream: kept for the call
    call = Call(nursery, outbound(signals, control))
    await call.twilio.send(call.script.start())
    await call.connector.peer()  # connecting, never ready
    await call.done.wait()
    assert len(control.twiml) == 1 and "<Say>Call us back.</Say><Hangup" in control.twiml[0]
    assert call.summary.outcome is Outcome.AGENT_ENDED


async def test_amd_off_greets_in_the_session_update(nursery: trio.Nursery, autojump_clock: Any) -> None:
    signals = CallSignals()
    setup = outbound(signals)
    setup.policy.amd = False
    call = Call(nursery, setup)
    await call.twilio.send(call.script.start())
    agent = await call.connector.peer()
    update = await agent.receive()
    assert update is not None and update["session"]["greeting"] == GREETING


# --- teardown (issue 12: the phone socket's abort is used) --------------------------------------


async def test_a_twilio_that_never_finishes_the_close_is_aborted(nursery: trio.Nursery, autojump_clock: Any) -> None:
    call = Call(nursery)
    agent = await call.start()
    phone = call.phone_sock
    polite = phone.aclose

    async def stuck_close(code: int = 1000) -> None:
        if not phone.aborted:
            await trio.sleep_forever()  # the peer stopped reading: no close handshake
        await polite(code)

    phone.aclose = stuck_close  # type: ignore[method-assign]
    await call.twilio.send(call.script.stop())
    assert await agent.receive() == {"type": "session.end"}
    await call.done.wait()
    assert phone.aborted and phone.closed
