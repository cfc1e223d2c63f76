"""POST /amd-status through the real server: signed like every webhook, kept per CallSid and
handed to the call's subscriber; the fake REST API sends it for a call placed with async AMD."""

from __future__ import annotations

import logging

import pytest
import trio

from bridge.call.signals import AmdResult
from bridge.fleet.shared import SharedStateUnavailable, SignalRoute
from tests.harness import PUBLIC, running_bridge
from tools.fake_twilio import CallPlan

CALL_SID = "CA" + "a" * 32


def form(answered_by: str = "human", call_sid: str = CALL_SID, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": call_sid,
        "AnsweredBy": answered_by,
        "MachineDetectionDuration": "1830",
        **extra,
    }


async def test_a_signed_result_is_kept_and_reaches_the_calls_subscriber() -> None:
    async with running_bridge() as bridge:
        signals = bridge.app.call_signals
        response = await bridge.twilio.post_webhook("/amd-status", form("machine_end_beep"))
        assert response.status_code == 204
        assert signals.answered_by(CALL_SID) == "machine_end_beep"
        with signals.subscribe(CALL_SID) as subscription:  # the stream came after the result
            assert subscription.receive.receive_nowait() == AmdResult(CALL_SID, "machine_end_beep", 1830)
            # A later one (Twilio never sends two, but a retry may) goes straight to it.
            extra = {"StirVerstat": "TN-Validation-Passed-A"}  # Twilio adds params; signed too
            response = await bridge.twilio.post_webhook("/amd-status", form("HUMAN", **extra))
            assert response.status_code == 204
            assert subscription.receive.receive_nowait() == AmdResult(CALL_SID, "human", 1830)


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"sign": False}, 403),
        ({"signature": "bm90IGEgc2lnbmF0dXJl"}, 403),
    ],
)
async def test_unsigned_or_badly_signed_results_are_refused(kwargs: dict[str, object], status: int) -> None:
    async with running_bridge() as bridge:
        response = await bridge.twilio.post_webhook("/amd-status", form("fax"), **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status
        assert bridge.app.call_signals.answered_by(CALL_SID) is None


async def test_malformed_results_never_fail_the_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bridge.web")
    async with running_bridge() as bridge:
        signals = bridge.app.call_signals
        bad_sid = await bridge.twilio.post_webhook("/amd-status", form(call_sid="CA123\n"))
        assert bad_sid.status_code == 400
        odd = await bridge.twilio.post_webhook("/amd-status", form("robot\nFORGED log line" + "x" * 500))
        assert odd.status_code == 204 and signals.answered_by(CALL_SID) is None
        no_duration = await bridge.twilio.post_webhook(
            "/amd-status", form("unknown", MachineDetectionDuration="\u0663\u0663")
        )
        assert no_duration.status_code == 204
        with signals.subscribe(CALL_SID) as subscription:
            assert subscription.receive.receive_nowait() == AmdResult(CALL_SID, "unknown", None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("undocumented AnsweredBy" in m for m in warnings)
    assert all("\n" not in m for m in warnings)


async def test_the_fake_rest_api_sends_the_result_of_a_placed_call() -> None:
    async with running_bridge(with_rest=True) as bridge:
        rest, control = bridge.rest, bridge.app.deps.control
        assert rest is not None and control is not None
        rest.amd_answered_by, rest.amd_delay_s = "machine_end_silence", 0.3
        rest.callback_url_map = lambda url: url.replace(PUBLIC, bridge.http_base)
        bridge.outbound_plan = CallPlan(direction="outbound-api", hangup_after_s=3.0, speed=10.0)
        with trio.fail_after(20):
            sid = await control.place_call(  # type: ignore[attr-defined]
                to="+14155550123",
                from_="+14155550100",
                url=f"{PUBLIC}/outbound-twiml",
                status_callback=f"{PUBLIC}/call-status",
                amd_status_callback=f"{PUBLIC}/amd-status",
            )
            await rest.callback_sent.wait()
        assert [c.status for c in rest.callbacks] == [204]
        assert bridge.app.call_signals.answered_by(sid) == "machine_end_silence"


async def test_a_result_the_shared_state_cannot_route_is_kept_here(caplog: pytest.LogCaptureFixture) -> None:
    """The authority does not answer (a WORKERS parent gone, Redis down): the best guess is this
    process, whose CallSignals keeps the result for a stream that lands here; still 204."""
    caplog.set_level(logging.INFO, "bridge.web")
    async with running_bridge() as bridge:

        async def unavailable(result: AmdResult) -> SignalRoute:
            raise SharedStateUnavailable("the WORKERS parent did not answer within 2 s")

        bridge.app.shared.deliver_amd = unavailable  # type: ignore[method-assign]
        response = await bridge.twilio.post_webhook("/amd-status", form("machine_end_other"))
        assert response.status_code == 204
        with bridge.app.call_signals.subscribe(CALL_SID) as subscription:
            assert subscription.receive.receive_nowait() == AmdResult(CALL_SID, "machine_end_other", 1830)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot route its AMD result (the WORKERS parent did not answer" in m for m in messages)
