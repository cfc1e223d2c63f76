"""End to end through the real Quart-Trio app under Hypercorn (loopback, real time)."""

from __future__ import annotations

import base64
import logging

import pytest
import trio

from tests.harness import API_KEY, running_bridge
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan


def _caller_audio(frames: int) -> bytes:
    # Unique bytes per 160-byte frame, so order and identity can be checked at the agent.
    return b"".join(bytes([0x7F - (i % 64)]) * 4 + i.to_bytes(4, "big") + bytes([0xFE]) * 152 for i in range(frames))


async def _no_orphans(bridge) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(10):  # bounds a hang only (a loaded 2-core machine is slow, not wrong)
        while bridge.agent.connections_open or bridge.app.active_calls:
            await trio.sleep(0.01)


# Enough forwarded frames that "byte-identical and in order" is a real check, not one frame.
_FORWARDED_ENOUGH = 50


async def test_inbound_call_end_to_end() -> None:
    """webhook -> TwiML -> stream -> greeting heard -> caller audio byte-identical upstream -> hang-up."""
    # 30 s of call time (3 s at speed 10): the caller hangs up once the greeting was heard and
    # enough audio reached the agent, not at a fixed time, so a slow session.ready under load
    # costs frames before it (dropped by design) but never the check after it.
    audio = _caller_audio(1500)
    async with running_bridge(agent_config=FakeAgentConfig(api_key=API_KEY, vad=False)) as bridge:
        greeting = bridge.agent.greeting_audio

        def done(result) -> bool:  # type: ignore[no-untyped-def]
            forwarded = sum(len(s.input_audio) for s in bridge.agent.sessions.values())
            return forwarded >= _FORWARDED_ENOUGH and greeting in result.heard

        plan = CallPlan(caller_audio=audio, speed=10.0, hangup_when=done, hangup_after_s=32.0)
        with trio.fail_after(60):  # bounds a hang only
            result = await bridge.twilio.call(plan)
        assert result.webhook_status == 200
        assert result.handshake_status == 101
        assert result.violations == []
        assert result.ended_by == "caller"
        assert result.custom_parameters["CallSid"] == result.call_sid
        assert result.first_audio_s is not None
        assert greeting in result.heard  # the whole greeting reached the caller, untouched

        session = await bridge.agent.wait_for_session(1)
        with trio.fail_after(10):  # bounds a hang only
            await session.ended.wait()  # hang-up -> session.end upstream -> session.ended
        sent = [base64.b64encode(audio[i : i + 160]).decode() for i in range(0, len(audio), 160)]
        # Frames that arrived before session.ready are not forwarded; from then on every frame
        # goes upstream byte-identical and in order, up to the hang-up.
        first = sent.index(session.input_audio[0])
        forwarded = session.input_audio[: len(sent) - first]
        assert len(forwarded) >= _FORWARDED_ENOUGH
        assert forwarded == sent[first : first + len(forwarded)]
        assert session.audio_before_ready == 0
        assert session.config["input"]["format"]["encoding"] == "audio/pcmu"
        assert session.config["output"]["format"]["encoding"] == "audio/pcmu"
        await _no_orphans(bridge)


async def test_barge_in_clears_twilio_playback() -> None:
    async with running_bridge(agent_config=FakeAgentConfig(api_key=API_KEY, vad=False, speed=1.0)) as bridge:

        async def barge_in_during_greeting() -> None:
            session = await bridge.agent.wait_for_session(1)
            await trio.sleep(0.5)
            await bridge.agent.barge_in(session.session_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(barge_in_during_greeting)
            with trio.fail_after(30):
                result = await bridge.twilio.call(CallPlan(speed=1.0, hangup_after_s=2.0))
        assert result.violations == []
        assert len(result.clears) >= 1
        assert len(result.heard) < len(bridge.agent.greeting_audio)  # the rest was cleared, not played
        await _no_orphans(bridge)


async def test_upstream_drop_is_resumed_without_dropping_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    from tools.fake_agent import FaultPlan

    caplog.set_level(logging.INFO, "bridge.call")
    for faults in (FaultPlan(drop_tcp_after_s=0.5), FaultPlan(close_1011_after_s=0.5)):
        config = FakeAgentConfig(api_key=API_KEY, vad=False, faults=faults)
        async with running_bridge(agent_config=config) as bridge:
            with trio.fail_after(30):
                result = await bridge.twilio.call(CallPlan(speed=5.0, hangup_after_s=10.0))
            assert result.ended_by == "caller"  # the Twilio leg stayed up through the drop
            assert result.violations == []
            session = await bridge.agent.wait_for_session(1)
            assert bridge.agent.connections_total == 2  # one drop, one resume, same session
            assert len(bridge.agent.sessions) == 1
            with trio.fail_after(5):
                await session.ended.wait()
            await _no_orphans(bridge)
            metrics = bridge.app.metrics.render().decode()
            assert 'bridge_agent_resumes_total{result="ok"} 1.0' in metrics
            assert 'bridge_agent_resumes_total{result="failed"}' not in metrics
            summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call summary:")][-1]
            assert " resumes=1 " in summary and " gap=" in summary


async def test_rejected_voice_is_logged_in_one_line_and_the_caller_hears_the_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=config, env={"VOICE": "claire"}) as bridge:
        with trio.fail_after(30):
            result = await bridge.twilio.call(CallPlan(speed=5.0, max_call_s=20.0))
        assert result.ended_by == "server"
        assert result.post_connect_verbs and result.post_connect_verbs[0].startswith("Say")
        await _no_orphans(bridge)
    lines = [r.getMessage() for r in caplog.records if "was rejected by the Voice Agent API" in r.getMessage()]
    assert lines and lines[0].startswith("VOICE 'claire' was rejected by the Voice Agent API: ")
    assert "ivy" in lines[0]  # the service's message lists the valid voices
    assert "\n" not in lines[0]


async def test_unreachable_agent_sends_the_caller_to_the_fallback_number() -> None:
    from tools.fake_agent import FaultPlan

    config = FakeAgentConfig(api_key=API_KEY, faults=FaultPlan(unauthorized=True))
    async with running_bridge(agent_config=config, env={"FALLBACK_NUMBER": "+14155550199"}) as bridge:
        with trio.fail_after(30):
            result = await bridge.twilio.call(CallPlan(speed=5.0, max_call_s=20.0))
        assert result.ended_by == "server"  # we closed the stream: Twilio ran the fallback
        assert [v.split(":")[0] for v in result.post_connect_verbs] == ["Say", "Dial"]
        assert "+14155550199" in result.post_connect_verbs[1]
        await _no_orphans(bridge)
