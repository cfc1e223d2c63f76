"""Real-socket harness: the bridge under Hypercorn on an ephemeral loopback port, a fake Voice
Agent server and a fake Twilio, all in one Trio nursery. No autojump: real time, loopback only."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from bridge.config import Settings, from_env
from bridge.phone.rest import TrioHttpClient, TwilioRest
from bridge.server import serve
from bridge.web import BridgeApp, Collaborators, create_app, default_collaborators
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import CallPlan, FakeTwilio
from tools.fake_twilio_rest import CallRecord, FakeTwilioRest

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
ACCOUNT_SID = "AC" + "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
API_KEY = "aai-test-key-0123456789abcdef"
PUBLIC = "https://bridge.example.com"


@dataclass
class Running:
    app: BridgeApp
    settings: Settings
    agent: FakeAgent
    twilio: FakeTwilio
    http_base: str
    shutdown: trio.Event
    rest: FakeTwilioRest | None = None
    outbound_plan: CallPlan | None = None  # what the callee does when a REST-placed call is answered

    @property
    def port(self) -> int:
        """The bridge's TCP port on 127.0.0.1."""
        port = urlsplit(self.http_base).port
        assert port is not None
        return port


@functools.cache
def _records_root() -> str:
    root = tempfile.mkdtemp(prefix="bridge-test-records-")
    atexit.register(shutil.rmtree, root, True)
    return root


def settings_for(agent_url: str, **overrides: str) -> Settings:
    env: dict[str, str] = {
        "ASSEMBLYAI_API_KEY": API_KEY,
        "HOSTNAME": PUBLIC,
        "VOICE_AGENT_URL": agent_url,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "STREAM_TOKEN_SECRET": "test-stream-token-secret-0123456789",
        "CALLER_AUDIO_BURST_MS": "600000",  # tests stream faster than real time
        # Call records are on by default: each bridge gets its own SQLite file, not ./data/.
        "RECORDS_URL": f"sqlite:///{_records_root()}/calls-{uuid.uuid4().hex[:12]}.sqlite3",
    }
    env.update(overrides)
    return from_env(env)


@asynccontextmanager
async def running_bridge(
    *,
    agent_config: FakeAgentConfig | None = None,
    env: Mapping[str, str] | None = None,
    collaborators: Collaborators | None = None,
    with_rest: bool = False,
) -> AsyncIterator[Running]:
    """Start a fake agent, the bridge (and, ``with_rest``, a fake Twilio REST API wired to the
    fake Twilio: a placed call is answered and streams; REST hang-up/redirect act on it)."""
    agent = FakeAgent(agent_config or FakeAgentConfig(api_key=API_KEY))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        settings = settings_for(agent.url, **(env or {}))
        rest: FakeTwilioRest | None = None
        if collaborators is None:
            collaborators = default_collaborators(settings)
        if with_rest:
            rest = FakeTwilioRest(ACCOUNT_SID, AUTH_TOKEN)
            rest_base = await nursery.start(rest.serve)
            collaborators.control = TwilioRest(ACCOUNT_SID, AUTH_TOKEN, http_client=TrioHttpClient(api_base=rest_base))
        app = create_app(settings, collaborators)
        shutdown = trio.Event()
        binds = await nursery.start(
            lambda task_status: serve(
                app, settings, bind=["127.0.0.1:0"], handle_signals=False, shutdown=shutdown, task_status=task_status
            )
        )
        http_base = binds[0]
        twilio = FakeTwilio(http_base=http_base, public_base=PUBLIC, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
        running = Running(app, settings, agent, twilio, http_base, shutdown, rest)
        if rest is not None:
            _wire_rest(rest, running)
        try:
            yield running
        finally:
            shutdown.set()
            with trio.move_on_after(10):
                await app.calls.idle.wait()
            nursery.cancel_scope.cancel()


def _wire_rest(rest: FakeTwilioRest, running: Running) -> None:
    twilio = running.twilio

    async def answered(call: CallRecord) -> None:
        assert call.url is not None
        await twilio.outbound_answered(call.sid, call.url, running.outbound_plan, from_=call.from_, to=call.to)

    async def hung_up(call: CallRecord) -> None:
        twilio.request_hangup(call.sid)

    async def redirected(call: CallRecord) -> None:
        twiml = call.redirects[-1].twiml if call.redirects else None
        twilio.request_redirect(call.sid, twiml or "")

    rest.on_create = answered
    rest.on_hangup = hung_up
    rest.on_redirect = redirected
