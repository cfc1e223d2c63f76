"""The application object: its collaborators, admission of Media Streams calls, the live calls.

The webhooks are in ``bridge/web/webhooks.py``. A stream arrives only through the front door
(``bridge/net/front.py``), which calls :meth:`BridgeApp.admit_stream` and :meth:`BridgeApp.run_call`;
the ASGI app behind Hypercorn serves HTTP only (Quart refuses a WebSocket scope).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import Gauge

from bridge.agent import events as ag
from bridge.agent.builtin_tools import call_control_definitions
from bridge.agent.connection import AgentEndpoint, open_agent_socket
from bridge.agent.tools import ToolRegistry, load_tools
from bridge.call.admission import Gate, Refused, StreamRequest, admit
from bridge.call.context import CallContext
from bridge.call.persona import SessionHook, load_session_hook, resolve_session
from bridge.call.registry import CallRegistry
from bridge.call.session import AgentConnector, CallControl, CallSession, CallSetup, MessageSocket
from bridge.call.signals import AmdResult, CallSignals
from bridge.call.state import CallPolicy
from bridge.config import Settings
from bridge.errors import TwilioRestError
from bridge.fleet.shared import InProcessState, SharedState, SharedStateUnavailable, SignalRoute
from bridge.observe import Metrics
from bridge.phone.security import SignatureChecker, StreamGrant
from bridge.phone.stream import STREAM_PREFIX, Receive, Scope, Send, header
from bridge.records.recorder import CallRecorder
from bridge.records.runtime import open_records
from bridge.web.api import register_api
from bridge.web.webhooks import build_quart

log = logging.getLogger("bridge.web")

_RELEASE_S = 3.0  # at a call's end: time to tell the shared state (its own deadline is shorter)
HANGUP_DEADLINE_S = 10.0  # Twilio's REST API answers in well under a second; past this we say so


@dataclass
class Collaborators:
    """What the app talks to; tests swap these without monkeypatching."""

    connect_agent: AgentConnector
    control: CallControl | None = None
    tools: ToolRegistry = field(default_factory=ToolRegistry)
    session_hook: SessionHook | None = None
    wall_clock: Callable[[], float] = time.time
    # Single-use tokens, the call cap, one stream per CallSid: None is chosen from the settings
    # (shared_state_for: Redis with REDIS_URL, else this process alone); a WORKERS worker without
    # REDIS_URL gets its parent's (bridge/fleet/parent.py).
    shared: SharedState | None = None


class BridgeApp:
    """The ASGI application (Quart's routes) and the Media Streams calls the front door admits."""

    def __init__(self, settings: Settings, collaborators: Collaborators, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.deps = collaborators
        self.calls = CallRegistry[CallSession, trio.Event](trio.Event)
        self.metrics = metrics or Metrics(live_stats=self._live_stats)
        clock = collaborators.wall_clock
        self.shared = collaborators.shared or shared_state_for(settings, clock)
        Gauge(
            "bridge_shared_state_up",
            "1 while the shared state answers; 0: Redis is down (local limits apply) or the parent is gone",
            registry=self.metrics.registry,
        ).set_function(lambda: 1.0 if self.shared.up else 0.0)
        self.signatures = SignatureChecker(settings.twilio_auth_token) if settings.twilio_auth_token else None
        self.gate = Gate(settings.stream_token_secret, self.signatures, self.shared, clock)
        self.call_signals = CallSignals()  # out-of-band news per CallSid (the AMD result)
        # Call records (RECORDS=on): a recorder per call; the store's writer runs in the server.
        self.records_runtime = open_records(settings, self.metrics, collaborators.wall_clock)
        self.records = self.records_runtime.records if self.records_runtime else None
        self.record_store = self.records_runtime.store if self.records_runtime else None
        self.quart = build_quart(self)
        register_api(self.quart, self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.quart(scope, receive, send)  # type: ignore[arg-type]

    async def run_records(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The records' writer tasks (store, webhook) until cancelled; nothing with RECORDS=off."""
        if self.records_runtime is None:
            task_status.started()
            return
        await self.records_runtime.run(task_status)

    def _live_stats(self) -> list[object]:
        return [s.stats for s in self.calls.by_id.values()]

    @property
    def active_calls(self) -> int:
        return len(self.calls)

    def start_drain(self) -> None:
        """Stop taking calls: /readyz turns 503, webhooks answer busy, streams are refused."""
        self.calls.start_drain()

    def end_all_calls(self, reason: str) -> None:
        self.calls.end_all(reason)

    async def keep_shared_state(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The shared state's background work, for the life of the server (started by serve()
        before the first connection is accepted). The authority may end a call of ours that a
        newer stream for its CallSid replaced on another process, or ask us to hang up one of
        ours (the console's End call, received by another process), or hand us an AMD result
        for a call of ours (received by another process, or kept until our stream's admission)."""
        async with trio.open_nursery() as hang_ups:

            def hang_up(call_sid: str) -> None:
                hang_ups.start_soon(self.hang_up_here, call_sid)

            await self.shared.run(self._end_replaced, hang_up, self._amd_arrived, task_status=task_status)
            hang_ups.cancel_scope.cancel()

    async def hang_up_here(self, call_sid: str) -> str | None:
        """Hang up this process's call ``call_sid`` through Twilio's REST API (bounded by
        :data:`HANGUP_DEADLINE_S`). None when Twilio accepted it, else why not (logged)."""
        control = self.deps.control
        if control is None:
            why = "Twilio REST is not configured (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN)"
        else:
            try:
                with trio.fail_after(HANGUP_DEADLINE_S):
                    await control.hang_up(call_sid)
                log.info("call %s hung up through Twilio's REST API", call_sid)
                return None
            except TwilioRestError as exc:
                why = str(exc)
            except trio.TooSlowError:
                why = f"Twilio did not answer within {HANGUP_DEADLINE_S:g} s"
        log.warning("could not hang up call %s: %s", call_sid, why)
        return why

    async def deliver_amd(self, result: AmdResult) -> str:
        """Hand Twilio's AMD result to its call, on whichever process holds (or will hold) the
        stream (the shared state routes it). Says where it went, for the webhook's log line."""
        try:
            route = await self.shared.deliver_amd(result)
        except SharedStateUnavailable as exc:
            # No authority to ask: here is the best guess (right with one process, or when the
            # stream lands here); the process's CallSignals keeps it for a stream not open yet.
            log.warning("call %s: cannot route its AMD result (%s): kept here", result.call_sid, exc)
            route = SignalRoute.HERE
        if route is not SignalRoute.HERE:
            return "sent to the process holding its stream" if route is SignalRoute.SENT else "kept for its stream"
        return "delivered" if self.call_signals.publish(result) else "no live stream for it yet: kept"

    def _amd_arrived(self, result: AmdResult) -> None:
        delivered = self.call_signals.publish(result)
        log.info("call %s: AMD result %s from the shared state%s", result.call_sid, result.answered_by,
                 "" if delivered else " (kept for its stream)")

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
            # The pid tells WORKERS apart in their shared log.
            log.warning("refused a Media Stream before accept (%d, pid %d): %s", decision.status, os.getpid(), why)
            return decision.status
        if decision.replaces is not None:
            self._end_replaced(decision.replaces, "a newer stream for its CallSid was admitted")
        session = CallSession(self._call_setup(call_id, decision.grant), phone, self.deps.connect_agent)
        if isinstance(session.setup.recorder, CallRecorder):
            session.setup.recorder.attach_stats(session.stats)  # the record's ``frames``
        return session

    async def run_call(self, session: CallSession) -> None:
        """Run an admitted call to its end (the socket is accepted by now). The call stays in
        :attr:`calls` until its slot is given back, so a drain waits for that too."""
        call_id = session.setup.call_id
        self.calls.add(call_id, session)
        try:
            await session.run()
        finally:
            try:
                with trio.move_on_after(_RELEASE_S, shield=True):
                    await self.shared.release(call_id)
            finally:
                self.calls.remove(call_id)  # whatever release did: the drain must not wait for it

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
            keypad_tool=s.keypad_tool,
            dtmf_to_agent=s.dtmf_to_agent,
            idle_reprompt_s=s.idle_reprompt_s,
            idle_hangup_s=s.idle_hangup_s,
            amd=s.amd,
            amd_wait_s=s.amd_wait_s,
            voicemail_message=s.voicemail_message,
            recovery_s=s.recovery_s if s.recovery else 0.0,
            recovery_context_chars=s.recovery_context_chars,
        )
        control_tools = call_control_definitions(s.end_call_tool, transfer_numbers, keypad=s.keypad_tool)
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
            recorder=self.records.new_call(call_id, grant.direction) if self.records is not None else None,
            signals=self.call_signals,
        )


def shared_state_for(settings: Settings, clock: Callable[[], float] = time.time) -> SharedState:
    """REDIS_URL set: a :class:`~bridge.fleet.redis_state.RedisState` (the cluster's authority,
    also over a WORKERS parent, which then steps aside); else this process alone."""
    if settings.redis_url:
        from bridge.fleet.redis_state import RedisState

        return RedisState.from_url(
            settings.redis_url,
            max_calls=settings.max_concurrent_calls,
            cluster_max_calls=settings.cluster_max_calls,
            lease_s=settings.lease_s,
            clock=clock,
        )
    return InProcessState(settings.max_concurrent_calls, clock=clock)


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

        control = TwilioRest(settings.twilio_account_sid, settings.twilio_auth_token, api=settings.twilio_api)
    return Collaborators(
        connect_agent=connect,
        control=control,
        tools=load_tools(settings.tools_module),
        session_hook=load_session_hook(settings.session_hook),
    )


def create_app(settings: Settings, collaborators: Collaborators | None = None) -> BridgeApp:
    """Build the ASGI app with its collaborators injected (tests pass fakes)."""
    return BridgeApp(settings, collaborators or default_collaborators(settings))


__all__ = ["BridgeApp", "Collaborators", "create_app", "default_collaborators", "shared_state_for"]
