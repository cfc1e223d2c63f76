"""The whole security suite (tests/test_security_e2e.py) again, with WORKERS=2.

Each bridge here is two workers exactly as ``bridge/workers.py`` wires them — two apps, each
with its own front door, Hypercorn and metrics, accepting from one shared listening socket (the
kernel picks the worker), each asking the one :class:`~bridge.fleet.parent.Authority` over its
own real socketpair — but inside this test's Trio run rather than in child processes, so the
suite can read every worker's metrics and live calls (summed). Real processes are covered by
tests/test_workers_shared.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import trio

import tests.test_security_e2e as suite
from bridge.fleet.parent import Authority, ParentState
from bridge.server import serve
from bridge.web import BridgeApp, Collaborators, create_app, default_collaborators
from tests.harness import ACCOUNT_SID, AUTH_TOKEN, PUBLIC, Running, settings_for
from tests.test_security_e2e import *  # noqa: F403 - the suite's tests, collected again here
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, FakeTwilio, new_sid

WORKERS = 2


class _SummedRegistry:
    def __init__(self, apps: list[BridgeApp]) -> None:
        self._apps = apps

    def get_sample_value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        values = [app.metrics.registry.get_sample_value(name, labels) for app in self._apps]
        found = [v for v in values if v is not None]
        return sum(found) if found else None


class _SummedMetrics:
    def __init__(self, apps: list[BridgeApp]) -> None:
        self.registry = _SummedRegistry(apps)


class WorkersView:
    """What the suite reads from ``bridge.app``, over all the workers."""

    def __init__(self, apps: list[BridgeApp]) -> None:
        self.apps = apps
        self.metrics = _SummedMetrics(apps)

    @property
    def active_calls(self) -> int:
        return sum(app.active_calls for app in self.apps)


@asynccontextmanager
async def running_workers(
    *,
    agent_config: FakeAgentConfig | None = None,
    env: Mapping[str, str] | None = None,
    collaborators: Collaborators | None = None,
    with_rest: bool = False,
) -> AsyncIterator[Running]:
    """``tests.harness.running_bridge`` with WORKERS=2 (same arguments; no REST fake)."""
    assert collaborators is None and not with_rest, "not needed by the security suite"
    _started.append(WORKERS)
    agent = FakeAgent(agent_config or FakeAgentConfig(api_key=suite.API_KEY))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        settings = settings_for(agent.url, **(env or {}))
        authority = Authority(settings.max_concurrent_calls)
        listener = socket.create_server(("127.0.0.1", 0), backlog=2048)
        shutdowns: list[trio.Event] = []
        apps: list[BridgeApp] = []
        http_base = ""
        try:
            for number in range(1, WORKERS + 1):
                ours, theirs = socket.socketpair()
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
                nursery.start_soon(authority.serve_worker, f"worker {number}", stream)
                wiring = default_collaborators(settings)
                wiring.shared = ParentState(theirs)
                app = create_app(settings, wiring)
                shutdown = trio.Event()
                # Each worker its own descriptor of the one listening socket, as inherited ones are.
                bind = [f"fd://{os.dup(listener.fileno())}"]

                async def run(app: BridgeApp, bind: list[str], shutdown: trio.Event,
                              task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                    await serve(app, settings, bind=bind, handle_signals=False, shutdown=shutdown,
                                task_status=task_status)

                http_base = (await nursery.start(run, app, bind, shutdown))[0]
                apps.append(app)
                shutdowns.append(shutdown)
        finally:
            listener.close()
        twilio = FakeTwilio(http_base=http_base, public_base=PUBLIC, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
        running = Running(cast(BridgeApp, WorkersView(apps)), settings, agent, twilio, http_base, shutdowns[0])
        try:
            yield running
        finally:
            for shutdown in shutdowns:
                shutdown.set()
            with trio.move_on_after(10):
                for app in apps:
                    await app.calls.idle.wait()
            nursery.cancel_scope.cancel()


_started: list[int] = []  # bridges started by running_workers, so the fixture can tell it was used


@pytest.fixture(autouse=True)
def _as_two_workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(suite, "running_bridge", running_workers)
    before = len(_started)
    yield
    assert len(_started) > before, "the suite's test did not run on the two workers"


async def test_both_workers_take_connections_and_share_one_authority() -> None:
    """The premise of running the suite here: the kernel really spreads connections over both
    workers, and a slot taken on one is seen by the other."""
    async with running_workers(agent_config=suite._agent(), env={"MAX_CONCURRENT_CALLS": "1"}) as bridge:
        view = cast(WorkersView, bridge.app)
        with trio.fail_after(20):
            while not all(app.metrics.registry.get_sample_value(
                    "bridge_webhooks_total", {"route": "/call-status", "result": "ok"}) for app in view.apps):
                form = {"AccountSid": bridge.twilio.account_sid, "CallSid": new_sid("CA"), "CallStatus": "completed"}
                assert (await bridge.twilio.post_webhook("/call-status", form)).status_code == 204
        first = await bridge.twilio.post_webhook("/twiml", bridge.twilio.voice_params(CallPlan(), new_sid("CA")))
        assert "<Stream" in first.text
        for _ in range(8):  # whichever worker answers: the one slot is reserved
            busy = await bridge.twilio.post_webhook("/twiml", bridge.twilio.voice_params(CallPlan(), new_sid("CA")))
            assert "<Stream" not in busy.text
