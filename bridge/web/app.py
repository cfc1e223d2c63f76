"""The application object: its collaborators, admission of Media Streams calls, the live calls.

The webhooks are in ``bridge/web/webhooks.py``. A stream normally arrives through the front door
(``bridge/net/front.py``), which calls :meth:`BridgeApp.admit_stream` and :meth:`BridgeApp.run_call`;
the ASGI route does the same for an upgrade that reaches Hypercorn.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from bridge.agent import events as ag
from bridge.agent.builtin_tools import call_control_definitions
from bridge.agent.connection import AgentEndpoint, open_agent_socket
from bridge.agent.tools import ToolRegistry, load_tools
from bridge.call.admission import Gate, Refused, StreamRequest, admit
from bridge.call.context import CallContext
from bridge.call.persona import SessionHook, load_session_hook, resolve_session
from bridge.call.registry import CallRegistry
from bridge.call.session import AgentConnector, CallControl, CallSession, CallSetup, MessageSocket
from bridge.call.state import CallPolicy
from bridge.config import Settings
from bridge.fleet.shared import InProcessState, SharedState, SharedStateUnavailable
from bridge.observe import Metrics, release_free_memory
from bridge.phone.security import SignatureChecker, StreamGrant
from bridge.phone.stream import STREAM_PREFIX, AsgiPhoneSocket, Receive, Scope, Send, header, reject
from bridge.web.api import register_api
from bridge.web.webhooks import CallOutcomeRecord, build_quart

log = logging.getLogger("bridge.web")

_RELEASE_S = 3.0  # at a call's end: time to tell the shared state (its own deadline is shorter)


@dataclass
class Collaborators:
    """What the app talks to; tests swap these without monkeypatching."""

    connect_agent: AgentConnector
    control: CallControl | None = None
    tools: ToolRegistry = field(default_factory=ToolRegistry)
    session_hook: SessionHook | None = None
    wall_clock: Callable[[], float] = time.time
    # Single-use tokens, the call cap, one stream per CallSid: None is this process alone
    # (InProcessState); a WORKERS worker gets its parent's (bridge/fleet/parent.py).
    shared: SharedState | None = None


class BridgeApp:
    """The ASGI application: the media-stream WebSocket goes to the raw handler, the rest to Quart."""

    def __init__(self, settings: Settings, collaborators: Collaborators, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.deps = collaborators
        self.calls = CallRegistry[CallSession]()
        self.metrics = metrics or Metrics(live_stats=self._live_stats)
        clock = collaborators.wall_clock
        self.shared = collaborators.shared or InProcessState(settings.max_concurrent_calls, clock=clock)
        self.signatures = SignatureChecker(settings.twilio_auth_token) if settings.twilio_auth_token else None
        self.gate = Gate(settings.stream_token_secret, self.signatures, self.shared, clock)
        self.call_outcomes: dict[str, CallOutcomeRecord] = {}
        self.quart = build_quart(self)
        register_api(self.quart, self)
        self.idle = trio.Event()
        self.idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith(STREAM_PREFIX):
            await self.media_stream(scope, receive, send)
        else:
            await self.quart(scope, receive, send)  # type: ignore[arg-type]

    def _live_stats(self) -> list[object]:
        return [s.stats for s in self.calls.live()]

    @property
    def _sessions(self) -> Mapping[str, CallSession]:
        return self.calls.by_id

    @property
    def active_calls(self) -> int:
        return len(self.calls)

    def start_drain(self) -> None:
        """Stop taking calls: /healthz turns 503, webhooks answer busy, streams are refused."""
        self.calls.start_drain()

    def end_all_calls(self, reason: str) -> None:
        self.calls.end_all(reason)

    async def keep_shared_state(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The shared state's background work, for the life of the server (started by serve()
        before the first connection is accepted). The authority may end a call of ours that a
        newer stream for its CallSid replaced on another process."""
        await self.shared.run(self._end_replaced, task_status=task_status)

    def _end_replaced(self, call_id: str, reason: str) -> None:
        if self.calls.end(call_id, reason):
            log.info("ending call %s: %s", call_id, reason)

    async def reserve_call(self, token: str, *, expires_at: float) -> str | None:
        """For the webhook that minted ``token``: hold a slot for its stream until it expires.
        None when held, else why not ("draining", "at capacity", "shared state unavailable":
        the webhook then answers the busy TwiML)."""
        if self.calls.draining:
            return "draining"
        try:
            return None if await self.shared.reserve(token, expires_at=expires_at) else "at capacity"
        except SharedStateUnavailable as exc:
            log.error("cannot reserve a call slot: %s", exc)
            return "shared state unavailable"

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
        admitted = await self.admit_stream(raw_path + (f"?{query}" if query else ""), scope.get("headers", ()), phone)
        if isinstance(admitted, int):
            await reject(send, admitted)
            return
        await send({"type": "websocket.accept"})
        await self.run_call(admitted)

    async def admit_stream(
        self, target: str, headers: Iterable[tuple[bytes, bytes]], phone: MessageSocket
    ) -> CallSession | int:
        """Check a Media Streams upgrade before it is accepted (``bridge/call/admission.py``:
        signature, token, drain, then replay, capacity and the CallSid's live stream with the
        shared state). Returns the admitted call, or the HTTP status to refuse it with (403 or
        503). An admitted call's slot is released when :meth:`run_call` ends."""
        raw_path = target.partition("?")[0]
        request = StreamRequest(
            token=raw_path[len(STREAM_PREFIX) :],
            signature=header(headers, b"x-twilio-signature"),
            signed_url=self.settings.public.ws_url(target),
        )
        call_id = "c-" + secrets.token_hex(4)
        decision = await admit(self.gate, request, call_id=call_id, draining=self.calls.draining)
        if isinstance(decision, Refused):
            self.metrics.rejected_streams.labels(decision.reason).inc()
            why = decision.detail or decision.reason
            log.warning("refused a Media Stream before accept (%d): %s", decision.status, why)
            return decision.status
        if decision.replaces is not None:
            self._end_replaced(decision.replaces, "a newer stream for its CallSid was admitted")
        return CallSession(self._call_setup(call_id, decision.grant), phone, self.deps.connect_agent)

    async def run_call(self, session: CallSession) -> None:
        """Run an admitted call to its end (the socket is accepted by now)."""
        call_id = session.setup.call_id
        self.calls.add(call_id, session)
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        try:
            await session.run()
        finally:
            self.calls.remove(call_id)
            with trio.move_on_after(_RELEASE_S, shield=True):
                await self.shared.release(call_id)
            if not self.calls:
                self.idle.set()
                release_free_memory()

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
