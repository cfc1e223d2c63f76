"""Webhooks, health, metrics and call-status records through the real app on loopback."""

from __future__ import annotations

import logging
import os

import httpx
import orjson
import pytest
import trio
import trio.testing

from bridge.agent.connection import AgentEndpoint, open_agent_socket
from bridge.call.ports import MessageSocket
from bridge.fleet.shared import InProcessState
from bridge.observe import CallTags, call_tags, setup_logging
from bridge.web import Collaborators
from tests.harness import API_KEY, AUTH_TOKEN, running_bridge
from tools.fake_agent import FakeAgentConfig
from tools.fake_twilio import CallPlan

CALL_SID = "CA" + "1" * 32


async def test_healthz_metrics_and_call_outcome() -> None:
    async with running_bridge(agent_config=FakeAgentConfig(api_key=API_KEY, vad=False)) as bridge:
        async with httpx.AsyncClient(base_url=bridge.http_base) as http:
            health = await http.get("/healthz")
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "active_calls": 0, "pid": os.getpid()}
            with trio.fail_after(30):
                await bridge.twilio.call(CallPlan(speed=10.0, hangup_after_s=2.0))
            with trio.fail_after(5):
                while bridge.app.active_calls:
                    await trio.sleep(0.01)
            text = (await http.get("/metrics")).text
        assert 'bridge_calls_total{outcome="caller_hung_up"} 1.0' in text
        assert "bridge_active_calls 0.0" in text
        assert 'bridge_agent_connects_total{result="ok"} 1.0' in text
        prefix = 'bridge_frames_total{direction="bridge_to_phone"'
        sent = [line for line in text.splitlines() if line.startswith(prefix)]
        assert sent and float(sent[0].split()[-1]) > 0
        assert "bridge_time_to_first_agent_audio_seconds_count 1.0" in text


async def test_call_status_counts_outcomes_and_warns_on_unanswered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bridge.web")
    async with running_bridge() as bridge:
        ok = await bridge.twilio.post_status_callback(
            CALL_SID, "completed", url="/call-status", call_duration_s=42, sip_response_code=200
        )
        assert ok.status_code == 204
        busy = await bridge.twilio.post_status_callback(
            "CA" + "2" * 32, "busy", url="/call-status", direction="outbound-api", sip_response_code=486
        )
        assert busy.status_code == 204
        odd = await bridge.twilio.post_webhook("/call-status", {"CallSid": CALL_SID, "CallStatus": "x" * 500})
        assert odd.status_code == 204
        unsigned = await bridge.twilio.post_webhook("/call-status", {"CallSid": CALL_SID}, sign=False)
        assert unsigned.status_code == 403
        async with httpx.AsyncClient(base_url=bridge.http_base) as http:
            text = (await http.get("/metrics")).text
    counted = dict(line.split() for line in text.splitlines() if line.startswith("bridge_call_statuses_total"))
    # An undocumented status is "other": a signed caller cannot grow the label set.
    assert counted == {
        'bridge_call_statuses_total{status="completed"}': "1.0",
        'bridge_call_statuses_total{status="busy"}': "1.0",
        'bridge_call_statuses_total{status="other"}': "1.0",
    }
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"call {CALL_SID} status completed" in m and "duration=42 sip=200" in m for m in messages)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("status busy" in m and "did not pick up" in m for m in warnings)


async def test_draining_server_answers_busy_and_is_not_ready_but_alive() -> None:
    async with running_bridge() as bridge:
        bridge.app.start_drain()
        async with httpx.AsyncClient(base_url=bridge.http_base) as http:
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
        response = await bridge.twilio.post_webhook("/twiml", {"CallSid": CALL_SID, "From": "+1", "To": "+2"})
        assert response.status_code == 200
        assert "<Connect>" not in response.text and "<Hangup" in response.text and "<Say>" in response.text
        assert bridge.agent.connections_total == 0


async def test_twiml_passes_call_parameters_and_the_fallback() -> None:
    async with running_bridge() as bridge:
        response = await bridge.twilio.post_webhook(
            "/twiml", {"CallSid": CALL_SID, "From": "+14155550123", "To": "+14155550100"}
        )
    assert response.headers["content-type"].startswith("text/xml")
    body = response.text
    assert '<Stream statusCallback="https://bridge.example.com/stream-status"' in body
    assert 'url="wss://bridge.example.com/media-stream/i.' + CALL_SID in body
    assert '<Parameter name="From" value="+14155550123" />' in body
    assert '<Parameter name="CallSid" value="' + CALL_SID + '" />' in body
    assert body.index("</Connect>") < body.index("<Say>") < body.index("<Hangup />")
    assert AUTH_TOKEN not in body and API_KEY not in body


def test_json_logs_carry_the_call_ids(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json", secrets=["supersecretvalue123"])
    try:
        token = call_tags.set(CallTags("c-1234", CALL_SID, "sess_1"))
        logging.getLogger("bridge.call").info("agent: hello (key supersecretvalue123)")
        call_tags.reset(token)
        entry = orjson.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        logging.getLogger().handlers.clear()
    assert entry["call_id"] == "c-1234" and entry["call_sid"] == CALL_SID and entry["session_id"] == "sess_1"
    assert entry["msg"] == "agent: hello (key [redacted])"
    assert entry["level"] == "info" and entry["logger"] == "bridge.call"




class _HeldRelease(InProcessState):
    """In-process state whose release waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(100)
        self.releasing = trio.Event()
        self.may_release = trio.Event()

    async def release(self, call_id: str) -> None:
        self.releasing.set()
        await self.may_release.wait()
        await super().release(call_id)


async def test_a_call_stays_live_until_its_slot_is_given_back() -> None:
    # The drain waits on the registry's idle event: it must not see "no calls" while an ended
    # call's slot is still held by the shared state (the process could exit with it held).
    shared = _HeldRelease()
    agent_url: list[str] = []

    async def connect(nursery: trio.Nursery) -> MessageSocket:
        return await open_agent_socket(nursery, AgentEndpoint(url=agent_url[0], api_key=API_KEY))

    collaborators = Collaborators(connect_agent=connect, shared=shared)
    agent = FakeAgentConfig(api_key=API_KEY, vad=False)
    async with running_bridge(collaborators=collaborators, agent_config=agent) as bridge:
        agent_url.append(bridge.agent.url)
        result = await bridge.twilio.call(CallPlan(speed=10.0, hangup_after_s=1.0))
        assert result.ended_by == "caller"
        with trio.fail_after(5):
            await shared.releasing.wait()
        await trio.testing.wait_all_tasks_blocked()
        idle = bridge.app.calls.idle
        assert bridge.app.active_calls == 1 and not idle.is_set()
        shared.may_release.set()
        with trio.fail_after(5):
            await idle.wait()
        assert bridge.app.active_calls == 0 and shared.ledger.live_calls == 0


async def test_status_callbacks_log_bounded_lines_whatever_they_carry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bridge.web")
    async with running_bridge() as bridge:
        huge = {"CallSid": "CA" + "9" * 5000, "StreamEvent": "stream-error", "StreamError": "x" * 50_000}
        assert (await bridge.twilio.post_webhook("/stream-status", huge)).status_code == 204
        status = {"CallSid": "CA" + "9" * 5000, "CallStatus": "failed", "StatusCallbackEvent": "e" * 5000,
                  "CallDuration": "7" * 5000, "SipResponseCode": "5" * 5000}
        assert (await bridge.twilio.post_webhook("/call-status", status)).status_code == 204
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if "stream stream-error" in m or "status failed" in m]
    assert len(lines) == 2 and all(len(line) < 600 for line in lines), [len(line) for line in lines]
