"""Real-socket harness: the bridge under Hypercorn on an ephemeral loopback port, a fake Voice
Agent server and a fake Twilio, all in one Trio nursery. No autojump: real time, loopback only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from bridge.config import Settings, from_env
from bridge.server import serve
from bridge.web import BridgeApp, Collaborators, create_app, default_collaborators
from tools.fake_agent import FakeAgent, FakeAgentConfig
from tools.fake_twilio import FakeTwilio

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
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


def settings_for(agent_url: str, **overrides: str) -> Settings:
    env: dict[str, str] = {
        "ASSEMBLYAI_API_KEY": API_KEY,
        "HOSTNAME": PUBLIC,
        "VOICE_AGENT_URL": agent_url,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "STREAM_TOKEN_SECRET": "test-stream-token-secret-0123456789",
        "CALLER_AUDIO_BURST_MS": "600000",  # tests stream faster than real time
    }
    env.update(overrides)
    return from_env(env)


@asynccontextmanager
async def running_bridge(
    *,
    agent_config: FakeAgentConfig | None = None,
    env: Mapping[str, str] | None = None,
    collaborators: Collaborators | None = None,
) -> AsyncIterator[Running]:
    agent = FakeAgent(agent_config or FakeAgentConfig(api_key=API_KEY))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        settings = settings_for(agent.url, **(env or {}))
        app = create_app(settings, collaborators or default_collaborators(settings))
        shutdown = trio.Event()
        binds = await nursery.start(
            lambda task_status: serve(
                app, settings, bind=["127.0.0.1:0"], handle_signals=False, shutdown=shutdown, task_status=task_status
            )
        )
        http_base = binds[0]
        twilio = FakeTwilio(http_base=http_base, public_base=PUBLIC, auth_token=AUTH_TOKEN)
        try:
            yield Running(app, settings, agent, twilio, http_base, shutdown)
        finally:
            shutdown.set()
            with trio.move_on_after(10):
                await app.idle.wait()
            nursery.cancel_scope.cancel()
