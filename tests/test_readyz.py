"""GET /readyz (readiness: whether to send us calls) and GET /healthz (liveness) through the real
server: ready while accepting, not ready from the first moment of a drain while alive until
exit, and degraded (still ready) while the shared state is down."""

from __future__ import annotations

import httpx
import trio

from bridge.fleet.shared import InProcessState
from bridge.web import default_collaborators
from tests.harness import running_bridge, settings_for
from tools.fake_twilio import CallPlan


async def _get(base: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        return await http.get(path)


async def test_ready_while_accepting_and_healthy() -> None:
    async with running_bridge() as bridge:
        ready, health = await _get(bridge.http_base, "/readyz"), await _get(bridge.http_base, "/healthz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ok", "active_calls": 0})
        assert ready.headers["content-type"].startswith("application/json")
        assert (health.status_code, health.json()["status"]) == (200, "ok")


async def test_a_drain_makes_readyz_503_at_once_while_healthz_stays_200_and_the_call_goes_on() -> None:
    async with running_bridge(env={"DRAIN_SECONDS": "30"}) as bridge, trio.open_nursery() as nursery:
        results = []

        async def call() -> None:
            results.append(await bridge.twilio.call(CallPlan(speed=4.0, hangup_after_s=3.0)))

        nursery.start_soon(call)
        with trio.fail_after(10):
            while bridge.app.active_calls < 1:
                await trio.sleep(0.01)
        bridge.shutdown.set()  # what SIGTERM does
        with trio.fail_after(1):  # serve()'s drain task wakes on its next turn
            while not bridge.app.calls.draining:
                await trio.sleep(0.001)
        ready, health = await _get(bridge.http_base, "/readyz"), await _get(bridge.http_base, "/healthz")
        assert (ready.status_code, ready.json()) == (503, {"status": "draining", "active_calls": 1})
        assert (health.status_code, health.json()["status"], health.json()["active_calls"]) == (200, "draining", 1)
        with trio.fail_after(15):
            while not results:
                await trio.sleep(0.05)
        assert results[0].ended_by == "caller" and results[0].violations == []


class _SharedStateDown(InProcessState):
    """Admission keeps working in process; the shared part reports itself down."""

    @property
    def up(self) -> bool:
        return False


async def test_readyz_says_degraded_but_ready_while_the_shared_state_is_down() -> None:
    collaborators = default_collaborators(settings_for("ws://127.0.0.1:9/"))  # no call is placed
    collaborators.shared = _SharedStateDown(100)
    async with running_bridge(collaborators=collaborators) as bridge:
        ready = await _get(bridge.http_base, "/readyz")
        assert (ready.status_code, ready.json()) == (
            200,
            {"status": "degraded", "active_calls": 0, "shared_state": "down"},
        )
        assert (await _get(bridge.http_base, "/healthz")).status_code == 200
