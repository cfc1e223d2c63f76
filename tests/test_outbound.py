"""Outbound calls and call control, end to end: fake Twilio REST API + fake Twilio phone +
fake Voice Agent + the real bridge under Hypercorn (loopback, real time)."""

from __future__ import annotations

import base64

import trio

from bridge.phone.rest import TrioHttpClient, TwilioRest
from tests.harness import ACCOUNT_SID, API_KEY, AUTH_TOKEN, PUBLIC, Running, running_bridge
from tests.test_record_e2e import stored_record
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan, CallResult

OUTBOUND_ENV = {
    "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
    "TWILIO_PHONE_NUMBER": "+14155550100",
    "TARGET_PHONE_NUMBER": "+14155550123",
    "OUTBOUND_GREETING": "Hi, this is Acme calling about your order.",
    "OUTBOUND_GREETING_DELAY_MS": "400",
    "TRANSFER_NUMBER": "+14155550199",
    # These calls are placed without answering-machine detection, so nothing would ever tell
    # the bridge a person is there (AMD on: tests/test_conversation_e2e.py).
    "AMD": "off",
}


async def place_call(bridge: Running) -> str:
    assert bridge.rest is not None and bridge.rest.base_url is not None
    client = TwilioRest(ACCOUNT_SID, AUTH_TOKEN, http_client=TrioHttpClient(api_base=bridge.rest.base_url))
    async with client:
        return await client.place_call(
            to="+14155550123",
            from_="+14155550100",
            url=f"{PUBLIC}/outbound-twiml",
            status_callback=f"{PUBLIC}/call-status",
        )


async def finished(bridge: Running, call_sid: str) -> CallResult:
    with trio.fail_after(30):
        return await bridge.twilio.wait_for_call(call_sid)


def hangup_requests(bridge: Running) -> list[list[tuple[str, str]]]:
    assert bridge.rest is not None
    return [r.form for r in bridge.rest.requests if ("Status", "completed") in r.form]


async def test_outbound_call_agent_speaks_first_after_silence() -> None:
    agent = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=agent, env=OUTBOUND_ENV, with_rest=True) as bridge:
        bridge.outbound_plan = CallPlan(speed=5.0, hangup_after_s=6.0)
        call_sid = await place_call(bridge)
        result = await finished(bridge, call_sid)
        assert result.violations == [] and result.webhook_status == 200
        assert result.webhook_params["Direction"] == "outbound-api"
        session = await bridge.agent.wait_for_session(1)
        assert session.config["greeting"] == OUTBOUND_ENV["OUTBOUND_GREETING"]
        greeting = bridge.agent.greeting_audio
        start = result.heard.index(greeting)
        assert start >= 400 * 8  # at least the configured pad of silence first
        assert set(result.heard[:start]) == {0xFF}  # only silence before the greeting
        first = base64.b64decode(result.received_media_payloads[0])
        assert len(first) >= 400 * 8 and set(first) == {0xFF}  # the pad: silence frames streamed first
        create = bridge.rest.requests[0].form  # type: ignore[union-attr]
        assert ("Url", f"{PUBLIC}/outbound-twiml") in create
        assert [v for k, v in create if k == "StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]


async def test_end_call_hangs_up_after_the_goodbye_was_played() -> None:
    agent = FakeAgentConfig(api_key=API_KEY, vad=False, speed=5.0)
    async with running_bridge(agent_config=agent, env=OUTBOUND_ENV, with_rest=True) as bridge:
        bridge.outbound_plan = CallPlan(speed=5.0, max_call_s=60.0)
        call_sid = await place_call(bridge)
        session = await bridge.agent.wait_for_session(1)
        goodbye = bridge.agent.reply_audio
        await bridge.agent.user_turn(session.session_id, "bye", reply_audio=goodbye)
        await bridge.agent.tool_call(session.session_id, "end_call", {})
        result = await finished(bridge, call_sid)
        assert result.ended_by == "api"  # hung up through REST, so no fallback TwiML plays
        assert result.violations == []
        assert result.heard.endswith(goodbye) or goodbye in result.heard  # the goodbye was heard in full
        goodbye_marks = [(name, how) for name, how in result.marks_echoed if name.startswith("goodbye")]
        assert len(goodbye_marks) == 1 and goodbye_marks[0][1] == "played"  # played, not flushed
        # The server answers end_call's tool.result with a reply of its own (reference §7), whose
        # audio may follow the goodbye mark (and its marks be played) until the hang-up lands: on
        # a loaded machine it does. What is checked is the order: the goodbye, then the hang-up.
        mark_at = max(t for t, kind, detail in result.timeline if kind == "mark" and "goodbye" in detail)
        # The call's end, whichever the fake saw first: the REST hang-up acted on ("hangup"), or
        # the bridge closing the stream once the REST call had answered ("closed"), which on a
        # loaded machine can come before the fake's call loop gets to its hang-up.
        ended_at = min(t for t, kind, _ in result.timeline if kind in ("hangup", "stop", "closed", "server_close"))
        assert mark_at <= ended_at
        assert len(hangup_requests(bridge)) == 1
        record = await stored_record(bridge, call_sid)  # why it hung up: the goodbye played, not a deadline
        assert record["outcome"] == "agent_ended" and "the goodbye was played" in record["reason"], record["reason"]
        with trio.fail_after(20):  # bounds a hang only
            await session.ended.wait()


async def test_barge_in_during_the_goodbye_cancels_the_hang_up() -> None:
    agent = FakeAgentConfig(api_key=API_KEY, vad=False, speed=1.0)
    async with running_bridge(agent_config=agent, env=OUTBOUND_ENV, with_rest=True) as bridge:
        bridge.outbound_plan = CallPlan(speed=1.0, hangup_after_s=6.0)
        call_sid = await place_call(bridge)
        session = await bridge.agent.wait_for_session(1)
        await trio.sleep(0.5)
        await bridge.agent.user_turn(session.session_id, "bye", reply_audio=bridge.agent.reply_audio)
        await bridge.agent.tool_call(session.session_id, "end_call", {})
        await trio.sleep(0.8)
        await bridge.agent.barge_in(session.session_id)  # the callee talks over the goodbye
        result = await finished(bridge, call_sid)
        assert result.ended_by == "caller"  # no premature hang-up: the callee hung up at 6 s
        assert hangup_requests(bridge) == []
        assert any(how == "cleared" for _, how in result.marks_echoed) or result.clears


async def test_transfer_call_redirects_with_dial_and_does_not_hang_up() -> None:
    agent = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(agent_config=agent, env=OUTBOUND_ENV, with_rest=True) as bridge:
        bridge.outbound_plan = CallPlan(speed=5.0, max_call_s=60.0)
        call_sid = await place_call(bridge)
        session = await bridge.agent.wait_for_session(1)
        definitions = {t["name"] for t in session.config["tools"]}
        assert {"end_call", "transfer_call", "generate_random_number"} <= definitions
        await bridge.agent.tool_call(session.session_id, "transfer_call", {})
        result = await finished(bridge, call_sid)
        assert result.ended_by == "redirect"
        assert result.redirect_twiml is not None and "<Dial>+14155550199</Dial>" in result.redirect_twiml
        assert hangup_requests(bridge) == []  # the stop caused by the transfer is not a hang-up
        with trio.fail_after(20):  # bounds a hang only
            await session.ended.wait()  # the upstream session was ended cleanly
        assert session.tool_results and session.tool_results[-1]["is_error"] is False
