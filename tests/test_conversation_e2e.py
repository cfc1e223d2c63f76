"""Issue 15 end to end through the real server (tests/harness.py): the fake agent refusing every
resume and honouring ``reply.create`` instructions, the fake Twilio pressing keys, the fake REST
API sending the AMD callback of a call placed with async AMD; one stream per CallSid.

Real time on loopback; every wait is bounded; no timed assertions."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from bridge.call.keypad import TOOL_NAME as COLLECT_DIGITS
from bridge.call.recovery import BEGIN_MARK
from bridge.records.record import MASK
from tests.harness import API_KEY, PUBLIC, Running, running_bridge
from tests.test_outbound import OUTBOUND_ENV
from tests.test_record_e2e import stored_record
from tools.fake_agent import FakeAgentConfig, FakeSession, FaultPlan
from tools.fake_twilio import CallPlan, CallResult

CALLER_TEXT = "I would like to book a table for two please"


async def until(predicate: Any, timeout_s: float = 20.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


async def greeted(bridge: Running, n: int = 1) -> FakeSession:
    """The n-th session, once its first reply (the greeting) has been sent."""
    with trio.fail_after(20):
        session = await bridge.agent.wait_for_session(n)
    await until(lambda: bool(session.replies_sent))
    return session


# --- 1. recovery when session.resume is refused -------------------------------------------------


async def test_a_refused_resume_recovers_with_a_fresh_session_and_the_caller_hears_the_agent_again() -> None:
    config = FakeAgentConfig(
        api_key=API_KEY,
        faults=FaultPlan(refuse_resume=True),
        instruction_clips={"Apologise in one short sentence": "found"},
    )
    async with running_bridge(agent_config=config) as bridge:
        apology = bridge.agent.clip("found")
        sid = "CA" + "e" * 32
        result: CallResult | None = None

        async def caller() -> None:
            nonlocal result
            with trio.fail_after(60):
                result = await bridge.twilio.call(CallPlan(call_sid=sid, speed=2.0, max_call_s=60.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            first = await greeted(bridge)
            await trio.sleep(2.0)  # the greeting plays
            await bridge.agent.user_turn(first.session_id, CALLER_TEXT)
            await until(lambda: len(first.replies_sent) >= 2)
            await trio.sleep(2.0)  # the answer plays
            await bridge.agent.drop_connection(first.session_id)
            fresh = await greeted(bridge, 2)  # resume refused: a second session, not a resume
            await until(lambda: any(i and "Apologise" in i for i in bridge.agent.reply_instructions))
            await trio.sleep(3.0)  # the apology plays
            bridge.twilio.request_hangup(sid)
        assert result is not None
        assert fresh.session_id != first.session_id
        assert "greeting" not in fresh.config or not fresh.config.get("greeting")
        prompt = bridge.agent.system_prompts[-1]
        assert prompt is not None and BEGIN_MARK in prompt
        assert f"Caller: {CALLER_TEXT}" in prompt and "Agent: " in prompt
        assert apology in result.heard  # the caller heard the agent again
        assert result.violations == []
        record = await stored_record(bridge, result.call_sid)
        assert record["agent_session_ids"] == [first.session_id, fresh.session_id]
        assert record["recovered"] is True


async def test_recovery_off_ends_the_call_when_the_resume_is_refused() -> None:
    config = FakeAgentConfig(api_key=API_KEY, faults=FaultPlan(refuse_resume=True))
    async with running_bridge(agent_config=config, env={"RECOVERY": "off"}) as bridge:
        async with trio.open_nursery() as nursery:
            results: list[CallResult] = []

            async def caller() -> None:
                with trio.fail_after(60):
                    results.append(await bridge.twilio.call(CallPlan(speed=2.0, max_call_s=60.0)))

            nursery.start_soon(caller)
            first = await greeted(bridge)
            await bridge.agent.drop_connection(first.session_id)
        [result] = results
        assert result.ended_by != "timeout"  # the bridge ended it: the fallback TwiML plays
        assert len(bridge.agent.system_prompts) == 1
        record = await stored_record(bridge, result.call_sid)
        assert record["recovered"] is False and record["outcome"] == "upstream_failed"


# --- 3. keypad input ----------------------------------------------------------------------------


async def test_sensitive_digits_reach_the_agent_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bridge")
    config = FakeAgentConfig(api_key=API_KEY)
    async with running_bridge(agent_config=config) as bridge:
        plan = CallPlan(speed=2.0, hangup_after_s=16.0, dtmf=[(8.0, "4"), (8.5, "4"), (9.0, "1"), (9.5, "7")])
        async with trio.open_nursery() as nursery:
            results: list[CallResult] = []

            async def caller() -> None:
                with trio.fail_after(60):
                    results.append(await bridge.twilio.call(plan))

            nursery.start_soon(caller)
            session = await greeted(bridge)
            assert COLLECT_DIGITS in [t["name"] for t in session.config["tools"]]  # offered by default
            await bridge.agent.tool_call(session.session_id, COLLECT_DIGITS, {"max_digits": 4, "sensitive": True})
            await until(lambda: bool(session.tool_results))
        [result] = results
        assert session.tool_results[0]["result"] == '{"digits": "4417"}'
        bridge_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bridge"))
        assert "caller pressed a key (sensitive entry: masked)" in bridge_logs
        assert "4417" not in bridge_logs and "'4'" not in bridge_logs and "'7'" not in bridge_logs
        record = await stored_record(bridge, result.call_sid)
        assert [d["digit"] for d in record["dtmf"]] == [MASK] * 4
        [tool] = record["tools"]
        assert tool["name"] == COLLECT_DIGITS and "4417" not in str(tool)
        # In the metrics' names and labels: their sample values are numbers, whose digits may
        # hold any run (a timestamp 1.7963209944174047e+09 held "4417").
        exposition = bridge.app.metrics.render().decode().splitlines()
        assert not any("4417" in line.rpartition(" ")[0] for line in exposition if not line.startswith("#"))
        assert not any("4417" in line for line in exposition if line.startswith("#"))


# --- 4. answering machines on outbound calls ------------------------------------------------------


async def outbound_call(bridge: Running, answered_by: str | None, *, hangup_after_s: float = 12.0) -> CallResult:
    rest, control = bridge.rest, bridge.app.deps.control
    assert rest is not None and control is not None
    rest.amd_answered_by, rest.amd_delay_s = answered_by, 0.5
    rest.callback_url_map = lambda url: url.replace(PUBLIC, bridge.http_base)
    bridge.outbound_plan = CallPlan(direction="outbound-api", hangup_after_s=hangup_after_s, speed=2.0)
    with trio.fail_after(20):
        sid: str = await control.place_call(  # type: ignore[attr-defined]
            to="+14155550123",
            from_="+14155550100",
            url=f"{PUBLIC}/outbound-twiml",
            status_callback=f"{PUBLIC}/call-status",
            amd_status_callback=f"{PUBLIC}/amd-status",
        )
    with trio.fail_after(40):
        return await bridge.twilio.wait_for_call(sid)


AMD_ENV = {**OUTBOUND_ENV, "AMD": "on", "AMD_WAIT_S": "8", "VOICEMAIL_MESSAGE": "Please call Acme back."}
CLIPS = {"A person has just answered": "greeting", "You have reached an answering machine": "goodbye"}


async def test_a_person_answering_is_greeted_once_known() -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False, instruction_clips=CLIPS)
    async with running_bridge(agent_config=config, env=AMD_ENV, with_rest=True) as bridge:
        result = await outbound_call(bridge, "human")
        session = await bridge.agent.wait_for_session(1)
        assert not session.config.get("greeting")  # held in the session.update
        [greet] = [i for i in bridge.agent.reply_instructions if i]
        assert OUTBOUND_ENV["OUTBOUND_GREETING"] in greet
        assert bridge.agent.clip("greeting") in result.heard
        record = await stored_record(bridge, result.call_sid)
        assert record["answered_by"] == "human"


async def test_a_machine_gets_the_voicemail_then_the_call_is_hung_up() -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False, instruction_clips=CLIPS)
    async with running_bridge(agent_config=config, env=AMD_ENV, with_rest=True) as bridge:
        result = await outbound_call(bridge, "machine_end_beep", hangup_after_s=30.0)
        assert result.ended_by == "api"  # hung up through REST after the message was heard
        assert bridge.agent.clip("goodbye") in result.heard
        assert bridge.agent.clip("greeting") not in result.heard  # never greeted a machine
        [voicemail] = [i for i in bridge.agent.reply_instructions if i]
        assert "Please call Acme back." in voicemail
        record = await stored_record(bridge, result.call_sid)
        assert record["answered_by"] == "machine_end_beep" and record["outcome"] == "agent_ended"


async def test_a_fax_is_hung_up_at_once() -> None:
    config = FakeAgentConfig(api_key=API_KEY, vad=False, instruction_clips=CLIPS)
    async with running_bridge(agent_config=config, env=AMD_ENV, with_rest=True) as bridge:
        result = await outbound_call(bridge, "fax", hangup_after_s=30.0)
        assert result.ended_by == "api"
        assert bridge.agent.reply_instructions == []
        assert set(result.heard) <= {0xFF}  # silence only: nothing was said
        record = await stored_record(bridge, result.call_sid)
        assert record["answered_by"] == "fax"


# --- 5. one stream per call -----------------------------------------------------------------------


async def test_a_second_stream_for_a_call_sid_ends_the_first_cleanly() -> None:
    config = FakeAgentConfig(api_key=API_KEY)
    async with running_bridge(agent_config=config) as bridge:
        sid = "CA" + "d" * 32
        results: dict[str, CallResult] = {}

        async def caller(name: str, hangup_after_s: float) -> None:
            with trio.fail_after(60):
                plan = CallPlan(call_sid=sid, speed=2.0, hangup_after_s=hangup_after_s, max_call_s=60.0)
                results[name] = await bridge.twilio.call(plan)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, "first", 50.0)
            first = await greeted(bridge)
            nursery.start_soon(caller, "second", 8.0)  # a duplicated webhook, a Twilio retry
            second = await greeted(bridge, 2)
            with trio.fail_after(10):
                await first.ended.wait()  # session.end upstream: not billed for its grace window
            await until(lambda: "first" in results)  # its socket closed by the bridge
            assert bridge.app.active_calls == 1
        assert results["first"].ended_by != "timeout" and results["first"].close_code == 1000
        assert results["second"].violations == [] and bridge.agent.greeting_audio in results["second"].heard
        assert results["second"].ended_by == "caller" and second.ended.is_set()  # it went on to its own end
        assert len(bridge.agent.system_prompts) == 2
