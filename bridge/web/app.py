"""The application object: its collaborators, admission of Media Streams calls, the live calls.

The webhooks are in ``bridge/web/webhooks.py``. A stream normally arrives through the front door
(``bridge/net/front.py``), which calls :meth:`BridgeApp.admit_stream` and :meth:`BridgeApp.run_call`;
the ASGI route does the same for an upgrade that reaches Hypercorn.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from bridge.agent import events as ag
from bridge.agent.builtin_tools import call_control_definitions
from bridge.agent.connection import AgentEndpoint, open_agent_socket
from bridge.agent.tools import ToolRegistry, load_tools
from bridge.call.context import CallContext
from bridge.call.persona import SessionHook, load_session_hook, resolve_session
from bridge.call.registry import CallRegistry
from bridge.call.session import AgentConnector, CallControl, CallSession, CallSetup, MessageSocket
from bridge.call.state import CallPolicy
from bridge.config import Settings
from bridge.observe import Metrics, release_free_memory
from bridge.phone.security import SignatureChecker, StreamGrant, TokenLedger, check_token
from bridge.phone.stream import STREAM_PREFIX, AsgiPhoneSocket, Receive, Scope, Send, header, reject
from bridge.web.webhooks import CallOutcomeRecord, build_quart

log = logging.getLogger("bridge.web")


@dataclass
class Collaborators:
    """What the app talks to; tests swap these without monkeypatching."""

    connect_agent: AgentConnector
    control: CallControl | None = None
    tools: ToolRegistry = field(default_factory=ToolRegistry)
    session_hook: SessionHook | None = None
    wall_clock: Callable[[], float] = time.time


class BridgeApp:
    """The ASGI application: the media-stream WebSocket goes to the raw handler, the rest to Quart."""

    def __init__(self, settings: Settings, collaborators: Collaborators, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.deps = collaborators
        self.calls = CallRegistry(settings.max_concurrent_calls)
        self.metrics = metrics or Metrics(live_stats=self._live_stats)
        self.tokens = TokenLedger()
        self.signatures = SignatureChecker(settings.twilio_auth_token) if settings.twilio_auth_token else None
        self.call_outcomes: dict[str, CallOutcomeRecord] = {}
        self.quart = build_quart(self)
        self._sessions: dict[str, CallSession] = {}
        self.idle = trio.Event()
        self.idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith(STREAM_PREFIX):
            await self.media_stream(scope, receive, send)
        else:
            await self.quart(scope, receive, send)  # type: ignore[arg-type]

    def _live_stats(self) -> list[object]:
        return [s.stats for s in self._sessions.values()]

    @property
    def active_calls(self) -> int:
        return len(self._sessions)

    def start_drain(self) -> None:
        """Stop taking calls: /healthz turns 503, webhooks answer busy, streams are refused."""
        self.calls.start_drain()

    def end_all_calls(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            session.request_end(reason)

    # --- the Media Streams route ------------------------------------------------------------

    async def media_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The same stream reached through Hypercorn (e.g. an upgrade on a reused keep-alive
        connection; the front door hands new connections to ``phone/stream`` directly)."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        raw_path = bytes(scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = bytes(scope.get("query_string") or b"").decode("latin-1")
        phone = AsgiPhoneSocket(receive, send)
        admitted = self.admit_stream(raw_path + (f"?{query}" if query else ""), scope.get("headers", ()), phone)
        if isinstance(admitted, int):
            await reject(send, admitted)
            return
        await send({"type": "websocket.accept"})
        await self.run_call(admitted)

    def admit_stream(
        self, target: str, headers: Iterable[tuple[bytes, bytes]], phone: MessageSocket
    ) -> CallSession | int:
        """Check a Media Streams upgrade (signature, token, replay, capacity) before it is
        accepted. Returns the admitted call, or the HTTP status to refuse it with (403 or 503)."""
        raw_path = target.partition("?")[0]
        signed_url = self.settings.public.ws_url(target)
        grant_or_reason = self._check_stream(headers, raw_path[len(STREAM_PREFIX) :], signed_url)
        if isinstance(grant_or_reason, str):
            self.metrics.rejected_streams.labels(grant_or_reason).inc()
            log.warning("refused a Media Stream before accept: %s", grant_or_reason)
            return 403
        grant = grant_or_reason
        call_id = "c-" + secrets.token_hex(4)
        session = CallSession(self._call_setup(call_id, grant), phone, self.deps.connect_agent)
        if not self.calls.admit(grant.token, call_id, session, now=self.deps.wall_clock()):
            self.metrics.rejected_streams.labels("capacity").inc()
            log.warning("refused a Media Stream: at capacity (%d calls) or draining", self.calls.max_calls)
            return 503
        return session

    async def run_call(self, session: CallSession) -> None:
        """Run an admitted call to its end (the socket is accepted by now)."""
        call_id = session.setup.call_id
        self._sessions[call_id] = session
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        try:
            await session.run()
        finally:
            self._sessions.pop(call_id, None)
            self.calls.release(call_id)
            if not self._sessions:
                self.idle.set()
                release_free_memory()

    def _check_stream(self, headers: Iterable[tuple[bytes, bytes]], token: str, signed_url: str) -> StreamGrant | str:
        if self.signatures is not None:
            signature = header(headers, b"x-twilio-signature")
            if not self.signatures.valid(signed_url, {}, signature):
                return "bad signature" if signature else "missing signature"
        now = self.deps.wall_clock()
        grant = check_token(self.settings.stream_token_secret, token, now=now)
        if isinstance(grant, str):
            return f"token {grant}"
        if not self.tokens.claim(grant, now=now):
            return "token replayed"
        return grant

    def _call_setup(self, call_id: str, grant: StreamGrant) -> CallSetup:
        s = self.settings
        outbound = grant.direction == "outbound"
        persona = s.outbound if outbound else s.inbound
        transfer_numbers = tuple(dict.fromkeys(n for n in (s.transfer_number, *s.transfer_allowlist) if n))
        policy = CallPolicy(
            ready_timeout_s=s.session_ready_timeout_s,
            max_call_s=s.max_call_seconds,
            end_call_deadline_s=s.end_call_deadline_s,
            end_call_enabled=s.end_call_tool,
            transfer_numbers=transfer_numbers,
            outbound=outbound,
            greeting_pad_ms=s.outbound_greeting_delay_ms if outbound else 0,
            voice=persona.voice,
            caller_burst_ms=s.caller_audio_burst_ms,
            resume_window_s=s.resume_window_s,
            twilio_silence_s=s.twilio_silence_s,
        )
        control_tools = call_control_definitions(s.end_call_tool, transfer_numbers)
        tools, hook = self.deps.tools, self.deps.session_hook

        async def session_config(context: CallContext) -> ag.SessionConfig:
            return await resolve_session(
                hook=hook, context=context, persona=persona, registry=tools, extra_tools=control_tools
            )

        return CallSetup(
            call_id=call_id,
            direction=grant.direction,
            policy=policy,
            session_config=session_config,
            expected_call_sid=grant.call_sid,
            tools=tools,
            tool_timeout_s=s.tool_timeout_s,
            control=self.deps.control,
            metrics=self.metrics,
        )


def default_collaborators(settings: Settings) -> Collaborators:
    """Production wiring: the real Voice Agent endpoint, Twilio REST when configured, user tools."""
    endpoint = AgentEndpoint(
        url=settings.voice_agent_url,
        api_key=settings.assemblyai_api_key,
        max_message_bytes=settings.max_agent_frame_bytes,
    )

    async def connect(nursery: trio.Nursery) -> Any:
        return await open_agent_socket(nursery, endpoint)

    control: CallControl | None = None
    if settings.twilio_account_sid and settings.twilio_auth_token:
        from bridge.phone.rest import TwilioRest

        control = TwilioRest(settings.twilio_account_sid, settings.twilio_auth_token)
    return Collaborators(
        connect_agent=connect,
        control=control,
        tools=load_tools(settings.tools_module),
        session_hook=load_session_hook(settings.session_hook),
    )


def create_app(settings: Settings, collaborators: Collaborators | None = None) -> BridgeApp:
    """Build the ASGI app with its collaborators injected (tests pass fakes)."""
    return BridgeApp(settings, collaborators or default_collaborators(settings))


__all__ = ["BridgeApp", "Collaborators", "create_app", "default_collaborators"]
