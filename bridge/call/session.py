"""One phone call: a Trio nursery around the pure CallState.

Tasks (each socket has one reader and one writer; nothing else touches a socket)::

    phone_rx  -> CallState.on_phone  -> [agent_out] -> agent_tx  -> Voice Agent
    phone_tx  <- [phone_out] <- CallState.on_agent <- agent_rx  <- Voice Agent
    ticker (deadlines, and outbound silence until the agent speaks: the core's tick output),
    tool / hang-up / transfer tasks, the call's signals (AMD result, outbound calls with AMD)

The agent leg (connect, ``session.update``, agent_rx, agent_tx) runs in a nursery of its own
inside the call's, so a failed upstream handshake is an outcome of the leg, not a crash of the
call. Teardown: the state returns ``EndCall`` once; ``run`` then sends ``session.end`` upstream
and waits (bounded) for ``session.ended``/close, cancels every task, and closes both sockets
under a shielded deadline. Nothing of the call outlives ``run``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import trio

from bridge.agent import events as ag
from bridge.agent.leg import CLOSE_S, AgentConnector, AgentLeg
from bridge.call import state as st
from bridge.call.context import CallContext
from bridge.call.ports import CallRecorderPort, MessageSocket, SocketClosed
from bridge.call.signals import CallSignals
from bridge.errors import BridgeError
from bridge.observe import CallTags, Metrics, call_tags
from bridge.phone import media as tw
from bridge.phone import twiml
from bridge.records import facts

__all__ = ["AgentConnector", "CallControl", "CallSession", "CallSetup", "CallSummary", "MessageSocket", "ToolRunner"]

log = logging.getLogger("bridge.call")

# Caller audio waiting for the upstream writer: 50 frames = 1 s at 20 ms. When that much is
# queued, new caller audio is dropped (and counted): stale audio delays every later turn. Control
# (tool results, session.end) is queued behind it in the same channel, in order, and never dropped;
# the call makes at most one per tool call plus one session.end, so the channel itself is unbounded
# and the audio bound is counted by the session (``_agent_audio_queued``).
AGENT_OUT_FRAMES = 50
# Agent audio and control waiting for the Twilio writer: 1024 chunks ~ 38 s of agent speech at
# 37.5 ms. The agent reader never waits on Twilio; if this fills, Twilio has stopped reading and
# the call is ended as stuck (agent audio is never dropped).
PHONE_OUT_FRAMES = 1024
SEND_DEADLINE_S = 5.0  # a peer that takes longer than this to accept one frame is stuck
GOODBYE_S = 0.75  # session.end -> session.ended; keeps the whole teardown under one second
TICK_S = 0.25  # deadlines are coarse (seconds): 4 wake-ups per call per second are plenty
REST_DEADLINE_S = 10.0




class ToolRunner(Protocol):
    async def run(
        self, name: str, arguments: dict[str, Any], context: CallContext, *, timeout_s: float
    ) -> tuple[str, bool]: ...

    def get(self, name: str) -> object | None: ...


class CallControl(Protocol):
    """Twilio REST operations a call may need (hang up after a goodbye, transfer)."""

    async def hang_up(self, call_sid: str) -> None: ...

    async def update_twiml(self, call_sid: str, twiml: str) -> None: ...


@dataclass
class CallSetup:
    """Everything a call needs besides its sockets; built per call by the web layer."""

    call_id: str
    direction: Literal["inbound", "outbound"]
    policy: st.CallPolicy
    session_config: Callable[[CallContext], Awaitable[ag.SessionConfig]]
    expected_call_sid: str | None = None
    tools: ToolRunner | None = None
    tool_timeout_s: float = 30.0
    control: CallControl | None = None
    metrics: Metrics | None = None
    transfer_announcement: str | None = "Please hold while I transfer your call."
    recorder: CallRecorderPort | None = None  # None: records off (the hot path does no extra work)
    signals: CallSignals | None = None  # out-of-band news per CallSid (the AMD result)


@dataclass
class CallSummary:
    call_id: str
    call_sid: str
    outcome: st.Outcome
    reason: str
    duration_s: float
    stats: st.CallStats = field(repr=False)


class CallSession:
    """Runs one call from the accepted Media Streams socket to the end of both legs."""

    def __init__(
        self,
        setup: CallSetup,
        phone: MessageSocket,
        connect_agent: AgentConnector,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.setup = setup
        self.state = st.CallState(
            setup.policy, expected_call_sid=setup.expected_call_sid, record=setup.recorder is not None
        )
        self._recorder = setup.recorder
        self._phone = phone
        self._clock = clock
        self._leg = AgentLeg(connect_agent, self, metrics=setup.metrics, clock=clock)
        self._end_action: st.EndCall | None = None
        self._ended = trio.Event()
        self._upstream_gone = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._tags = CallTags(setup.call_id)
        self._speech_stopped_at: float | None = None
        # Send watchdogs, checked by the ticker: one cancel scope per frame would cost more.
        self._phone_send_since: float | None = None
        self._agent_send_since: float | None = None
        self._agent_tx_scope: trio.CancelScope | None = None
        self._phone_tx_done = trio.Event()
        self._resume_pending = False  # a resume was started and has not reached session.ready
        # Both ends of both channels are the session's: it closes them in teardown (_close_sockets).
        self._agent_out_send, self._agent_out_recv = trio.open_memory_channel[st.SendAgent](math.inf)
        self._agent_audio_queued = 0  # caller-audio items in agent_out (the AGENT_OUT_FRAMES bound)
        self._unsent_control: st.SendAgent | None = None  # taken from agent_out, its socket then dropped
        self._phone_out_send, self._phone_out_recv = trio.open_memory_channel[tuple[str, int | None]](PHONE_OUT_FRAMES)

    @property
    def stats(self) -> st.CallStats:
        return self.state.stats

    def request_end(self, reason: str, outcome: st.Outcome = st.Outcome.SERVER_SHUTDOWN) -> None:
        """End the call cleanly from outside (e.g. server drain). Safe from any task."""
        self._apply(self.state.end_now(reason, outcome))

    async def run(self) -> CallSummary:
        """Run the call to its end. Cancellation closes both sockets (bounded) and re-raises."""
        call_tags.set(self._tags)
        started = self._clock()
        metrics = self.setup.metrics
        if metrics:
            metrics.active_calls.inc()
        self.state.on_phone_opened(started)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._phone_rx)
                nursery.start_soon(self._phone_tx)
                nursery.start_soon(self._ticker)
                try:
                    await self._ended.wait()
                    await self._goodbye()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._close_sockets()
                except Exception:  # teardown must finish and account for the call, whatever a peer did
                    log.exception("closing the call's sockets failed")
            if metrics:
                metrics.active_calls.dec()
            summary = self._summarise(started)
            self._finish_record(summary)
        return summary

    # --- the Twilio leg ---------------------------------------------------------------------

    async def _phone_rx(self) -> None:
        state, phone, clock, parse, apply = self.state, self._phone, self._clock, tw.parse, self._apply
        if self._recorder is not None:
            return await self._phone_rx_recorded()
        while True:
            frame = await phone.receive()
            if frame is None:
                apply(state.on_phone_closed(clock()))
                return
            apply(state.on_phone(parse(frame), clock()))

    async def _phone_rx_recorded(self) -> None:
        """``_phone_rx`` with records on: the recorder also sees every Twilio event but media,
        and with RECORD_AUDIO=on its audio port gets the media frames (an append each)."""
        state, phone, clock, parse, apply = self.state, self._phone, self._clock, tw.parse, self._apply
        media, invalid = tw.Media, tw.InvalidFrame  # hoisted: tested on every frame
        audio = self._recorder.audio if self._recorder is not None else None
        caller_audio = audio.caller if audio is not None else None  # None: RECORD_AUDIO=off
        while True:
            frame = await phone.receive()
            now = clock()
            if frame is None:
                apply(state.on_phone_closed(now))
                return
            event = parse(frame)
            kind = type(event)
            if kind is media:
                if caller_audio is not None:
                    try:
                        caller_audio(event)  # type: ignore[arg-type]
                    except Exception:  # a recorder bug never costs the call: stop recording audio
                        log.exception("the call's audio recorder failed: its audio is no longer recorded")
                        caller_audio = None
            elif kind is not invalid and (recorder := self._recorder) is not None:
                try:
                    recorder.phone(event, now)  # type: ignore[arg-type]
                except Exception:  # a recorder bug never costs the call: stop recording it
                    self._recorder_failed()
            apply(state.on_phone(event, now))

    async def _phone_tx(self) -> None:
        playback, phone, clock, recv = self.state.playback, self._phone, self._clock, self._phone_out_recv
        audio = self._recorder.audio if self._recorder is not None else None
        played = audio.played if audio is not None else None  # None: RECORD_AUDIO=off
        try:
            while True:
                try:
                    text, epoch = await recv.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                while True:  # then whatever else is queued, without a scheduling pass per frame
                    if epoch is None or epoch == playback.epoch:  # else: queued before a clear, never played
                        self._phone_send_since = now = clock()
                        await phone.send(text)
                        self._phone_send_since = None
                        if played is not None and epoch is not None:  # media: Twilio plays it from now
                            try:
                                played(text, now)
                            except Exception:  # a recorder bug never costs the call: stop recording audio
                                log.exception("the call's audio recorder failed: its audio is no longer recorded")
                                played = None
                    try:
                        text, epoch = recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
        except SocketClosed:
            return
        finally:
            self._phone_tx_done.set()

    # --- the agent leg ----------------------------------------------------------------------

    async def _run_leg(self, action: st.ConnectAgent) -> None:
        """One ``ConnectAgent``: the leg opens (or resumes) the upstream session and serves it."""
        session_id = action.resume_session_id
        if session_id is not None:
            resume = ag.session_resume(session_id)

            async def first_message() -> str:
                return resume

        else:

            async def first_message() -> str:
                config = await self.setup.session_config(self._context())
                record = self._record_snapshot() if action.fresh else None
                return ag.session_update(self.state.session_config(config, record))

        await self._leg.run(first_message, resume_attempt=action.attempt if session_id is not None else 0)

    def _record_snapshot(self) -> dict[str, Any] | None:
        """The call record so far (the conversation as heard), if this call is recorded."""
        recorder = self._recorder
        if recorder is None:
            return None
        try:
            return recorder.snapshot(self._clock())
        except Exception:  # a recorder bug never costs the call: stop recording it
            self._recorder_failed()
            return None

    # The leg's host (agent/leg.py LegHost) -----------------------------------------------------

    @property
    def ending(self) -> bool:
        return self.state.ending

    @property
    def upstream_ended(self) -> bool:
        return self.state.upstream_ended

    def connect_failed(self, detail: str) -> None:
        self._apply(self.state.on_agent_connect_failed(self._clock(), detail))

    async def serve(self, nursery: trio.Nursery, sock: MessageSocket, *, resumed: bool) -> str | None:
        """The pumps over one open upstream socket: the writer in ``nursery``, the reader here."""
        if resumed:
            await self._resend_control(sock)
        elif self.state.phase is st.Phase.RECOVERING:
            self._discard_queued()
        nursery.start_soon(self._agent_tx, sock)
        return await self._agent_rx(sock)

    async def _resend_control(self, sock: MessageSocket) -> None:
        """After a resume: drop caller audio queued before the drop (never burst it upstream),
        keep control messages (tool results) and send them first, in order."""
        unsent, self._unsent_control = self._unsent_control, None
        if unsent is not None:
            await self._send_control(sock, unsent)
        while (item := self._next_queued_control()) is not None:
            await self._send_control(sock, item)

    def _discard_queued(self) -> None:
        """A fresh session replaces a refused one: caller audio queued in the gap is dropped
        (counted), and control meant for the old session (its tool results) is too."""
        if self._unsent_control is not None:
            log.info("dropped a message for the refused session: %.80s", self._unsent_control.text)
            self._unsent_control = None
        while (item := self._next_queued_control()) is not None:
            log.info("dropped a message for the refused session: %.80s", item.text)

    def _next_queued_control(self) -> st.SendAgent | None:
        """The next control message queued for the agent, dropping (and counting) the caller
        audio queued before it; None once the queue is empty."""
        recv = self._agent_out_recv
        while True:
            try:
                item = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return None
            if not item.audio:
                return item
            self._agent_audio_queued -= 1
            self.state.stats.frames_dropped_gap += 1

    async def _send_control(self, sock: MessageSocket, item: st.SendAgent) -> None:
        try:
            await sock.send(item.text)
        except SocketClosed:
            self._unsent_control = item
            raise
        if item is _SESSION_END:
            self._leg.session_end_sent = True

    async def _agent_rx(self, sock: MessageSocket) -> str | None:
        """Read the agent until its socket closes. Returns a reason to retry the connect, or None."""
        state, clock, parse, apply = self.state, self._clock, ag.parse, self._apply
        metrics = self.setup.metrics
        while True:
            frame = await sock.receive()
            if frame is None:
                apply(state.on_agent_closed(clock(), sock.describe_close()))
                self._upstream_gone.set()
                return None
            event = parse(frame)
            kind = type(event)
            if kind is not ag.ReplyAudio and (recorder := self._recorder) is not None and kind is not ag.InvalidEvent:
                try:
                    recorder.agent(event, clock())  # type: ignore[arg-type]
                except Exception:  # a recorder bug never costs the call: stop recording it
                    self._recorder_failed()
            if kind is ag.ReplyAudio:
                if self._speech_stopped_at is not None and metrics and state.phase is st.Phase.LIVE:
                    metrics.reply_latency.observe(clock() - self._speech_stopped_at)
                    self._speech_stopped_at = None
                first = state.stats.first_audio_at is None
                apply(state.on_agent(event, clock()))
                if first and state.stats.first_audio_at is not None and metrics and state.stats.started_at is not None:
                    metrics.first_audio.observe(state.stats.first_audio_at - state.stats.started_at)
                continue
            if isinstance(event, ag.SessionError):
                if metrics:
                    metrics.agent_errors.labels(_metric_code(event.code)).inc()
                if state.connect_refused_for_now(event):
                    return f"session.error {event.code}: {event.message}"
                apply(state.on_agent(event, clock()))
                if state.drop_upstream:  # resume refused: a fresh session is on its way
                    state.drop_upstream = False
                    return None
                continue
            elif isinstance(event, ag.SessionReady):
                self._tags.session_id = event.session_id
                if self._resume_pending:
                    self._resume_pending = False
                    if metrics:
                        metrics.agent_resumes.labels("ok").inc()
            elif kind is ag.SpeechStopped:
                self._speech_stopped_at = clock()
            apply(state.on_agent(event, clock()))
            if state.upstream_ended:
                self._upstream_gone.set()

    async def _agent_tx(self, sock: MessageSocket) -> None:
        recv, clock = self._agent_out_recv, self._clock
        with trio.CancelScope() as stall:  # cancelled by the ticker when one send takes too long
            self._agent_tx_scope = stall
            while True:
                try:
                    item = await recv.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                while True:  # then whatever else is queued, without a scheduling pass per frame
                    if item.audio:
                        self._agent_audio_queued -= 1
                    self._agent_send_since = clock()
                    try:
                        await sock.send(item.text)
                    except SocketClosed:
                        if not item.audio:
                            self._unsent_control = item  # a resume sends it first: control is never lost
                        return  # the reader sees the close and decides
                    finally:
                        self._agent_send_since = None
                    if item is _SESSION_END:
                        self._leg.session_end_sent = True
                    try:
                        item = recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
        if stall.cancelled_caught:
            # An upstream that stops reading is as good as dropped: cut it and let the reader's
            # close start a resume (the session is kept for 30 s), keeping the caller on the line.
            log.warning("the Voice Agent did not accept data for %g s: dropping the connection", SEND_DEADLINE_S)
            await sock.abort()

    # --- side tasks -------------------------------------------------------------------------

    async def _ticker(self) -> None:
        state, clock, apply = self.state, self._clock, self._apply
        while True:
            await trio.sleep(TICK_S)
            now = clock()
            apply(state.on_tick(now))
            since = self._phone_send_since
            if since is not None and now - since >= SEND_DEADLINE_S:
                self._stuck(f"Twilio did not accept audio for {SEND_DEADLINE_S:g} s")
            since = self._agent_send_since
            if since is not None and now - since >= SEND_DEADLINE_S and self._agent_tx_scope is not None:
                self._agent_tx_scope.cancel()

    async def _call_signals(self, signals: CallSignals, call_sid: str) -> None:
        """This call's out-of-band news (the AMD callback) into the state, until the call ends."""
        with signals.subscribe(call_sid) as subscription:
            async for signal in subscription.receive:
                self._apply(self.state.on_amd_result(signal.answered_by, self._clock()))

    async def _say_and_hang_up(self, action: st.SayAndHangUp) -> None:
        """The agent is not up to speak: Twilio says it (``<Say>``) and hangs up."""
        control, call_sid = self.setup.control, self.state.call_sid
        if control is not None and call_sid:
            try:
                with trio.fail_after(REST_DEADLINE_S):
                    await control.update_twiml(call_sid, twiml.say_and_hang_up(action.message))
                log.info("Twilio says the message and hangs up (%s)", action.reason)
            except (BridgeError, trio.TooSlowError) as exc:
                log.warning("REST update for the message failed (%s): closing the stream instead", exc)
        else:
            log.warning("no Twilio credentials to leave the message: closing the stream (fallback TwiML may play)")
        self._apply(self.state.end_now(f"call ended ({action.reason})", st.Outcome.AGENT_ENDED))

    async def _run_tool(self, action: st.RunTool) -> None:
        tools = self.setup.tools
        if tools is None:
            result, is_error = ag.tool_error("no tools are configured"), True
        else:
            result, is_error = await tools.run(
                action.name, action.arguments, self._context(), timeout_s=self.setup.tool_timeout_s
            )
        if self.setup.metrics:
            name = action.name if tools is not None and tools.get(action.name) is not None else "unknown"
            self.setup.metrics.tool_calls.labels(name, "error" if is_error else "ok").inc()
        log.info("tool %s %s: %s", action.name, "failed" if is_error else "returned", result[:200])
        self._apply(self.state.on_tool_done(action.tool_call_id, result, is_error, self._clock()))

    async def _hang_up(self, action: st.HangUp) -> None:
        control, call_sid = self.setup.control, self.state.call_sid
        if control is not None and call_sid:
            try:
                with trio.fail_after(REST_DEADLINE_S):
                    await control.hang_up(call_sid)
                log.info("hung up the call (%s)", action.reason)
            except (BridgeError, trio.TooSlowError) as exc:
                log.warning("REST hang-up failed (%s): closing the stream instead", exc)
        else:
            log.warning("no Twilio credentials for a REST hang-up: closing the stream (fallback TwiML may play)")
        self._apply(self.state.end_now(f"agent ended the call ({action.reason})", st.Outcome.AGENT_ENDED))

    async def _transfer(self, action: st.Transfer) -> None:
        control, call_sid = self.setup.control, self.state.call_sid
        if control is None or not call_sid:
            unavailable = st.TransferOutcome.UNAVAILABLE
            self._apply(self.state.on_transfer_result(action.tool_call_id, unavailable, self._clock()))
            return
        self.state.on_transfer_started()  # before the request: Twilio's stop may beat its answer
        try:
            with trio.fail_after(REST_DEADLINE_S):
                await control.update_twiml(
                    call_sid, twiml.dial(action.number, announcement=self.setup.transfer_announcement)
                )
        except (BridgeError, trio.TooSlowError) as exc:
            log.warning("transfer to %s failed: %s", action.number, exc)
            self._apply(self.state.on_transfer_result(action.tool_call_id, st.TransferOutcome.FAILED, self._clock()))
            return
        log.info("transferring the call to %s", action.number)
        self._apply(self.state.on_transfer_result(action.tool_call_id, st.TransferOutcome.STARTED, self._clock()))

    # --- actions ------------------------------------------------------------------------------

    def _apply(self, actions: list[st.Action]) -> None:
        """Perform the state machine's decisions, in order, without awaiting."""
        for action in actions:
            kind = type(action)
            if kind is st.SendAgent:
                self._send_agent(action)  # type: ignore[arg-type]
            elif kind is st.SendPhone:
                try:
                    self._phone_out_send.send_nowait((action.text, action.epoch))  # type: ignore[union-attr]
                except trio.WouldBlock:
                    if not self._phone_tx_done.is_set():
                        self._stuck("Twilio is not reading: the playback queue is full")
                    # else: the Twilio writer has finished (its socket is gone): nothing more is played
                except trio.ClosedResourceError:
                    pass  # teardown has closed the channel
            elif kind is st.Log:
                log.log(action.level, action.message)  # type: ignore[union-attr]
            elif kind is st.EndCall:
                self._begin_end(action)  # type: ignore[arg-type]
            elif kind is st.Fact:
                self.fact(action.fact)  # type: ignore[union-attr]
            elif self._nursery is not None:
                self._spawn(action)

    def _send_agent(self, action: st.SendAgent) -> None:
        """Queue for the upstream writer, in order. Caller audio beyond AGENT_OUT_FRAMES is dropped
        (counted); control is never dropped (the channel has room for it, see AGENT_OUT_FRAMES)."""
        if action.audio:
            if self._agent_audio_queued >= AGENT_OUT_FRAMES:
                stats = self.state.stats
                stats.frames_to_agent -= 1
                stats.frames_dropped_backpressure += 1
                return
            self._agent_audio_queued += 1
        try:  # noqa: SIM105 (contextlib.suppress costs an object per frame on the hot path)
            self._agent_out_send.send_nowait(action)
        except trio.ClosedResourceError:
            pass  # teardown has closed the channel: the call is over

    def _spawn(self, action: st.Action) -> None:
        assert self._nursery is not None
        if isinstance(action, st.ConnectAgent):
            self._tags.call_sid = self.state.call_sid
            self._nursery.start_soon(self._run_leg, action)
            metrics = self.setup.metrics
            if action.fresh and self._resume_pending and metrics:
                metrics.agent_resumes.labels("failed").inc()
            self._resume_pending = action.resume_session_id is not None
            first = action.resume_session_id is None and not action.fresh
            conv = self.state.conversation
            signals = self.setup.signals
            if first and signals is not None and conv is not None and conv.amd is not None:
                self._nursery.start_soon(self._call_signals, signals, self.state.call_sid)
        elif isinstance(action, st.SayAndHangUp):
            self._nursery.start_soon(self._say_and_hang_up, action)
        elif isinstance(action, st.RunTool):
            self._nursery.start_soon(self._run_tool, action)
        elif isinstance(action, st.HangUp):
            self._nursery.start_soon(self._hang_up, action)
        elif isinstance(action, st.Transfer):
            self._nursery.start_soon(self._transfer, action)

    def _begin_end(self, action: st.EndCall) -> None:
        if self._end_action is not None:
            return
        self._end_action = action
        level = logging.INFO if action.outcome in _NORMAL_OUTCOMES else logging.WARNING
        log.log(level, "call ending: %s", action.reason)
        self._ended.set()

    def fact(self, fact: facts.Fact) -> None:
        """Hand the recorder a fact (records on); a recorder that raises is dropped, never the call."""
        recorder = self._recorder
        if recorder is not None:
            try:
                recorder.fact(fact)
            except Exception:  # a recorder bug never costs the call: stop recording it
                self._recorder_failed()

    def _recorder_failed(self) -> None:
        log.exception("the call recorder failed: this call is no longer recorded")
        self._recorder = None

    def _finish_record(self, summary: CallSummary) -> None:
        """After the call: its end, then the record goes to the store (the recorder's queue)."""
        recorder = self._recorder
        if recorder is None:
            return
        now = self._clock()
        try:
            recorder.fact(facts.CallEnded(summary.outcome.value, summary.reason, now))
            recorder.finish(now)
        except Exception:
            self._recorder_failed()

    def _stuck(self, reason: str) -> None:
        self._apply(self.state.end_now(f"call stuck: {reason}", st.Outcome.STUCK))

    # --- teardown -----------------------------------------------------------------------------

    async def _goodbye(self) -> None:
        """Tell the agent we are done (``session.end``) and wait, bounded, for it to close."""
        end = self._end_action
        if end is None or not end.end_upstream or self._leg.sock is None:
            return
        self._send_agent(_SESSION_END)  # behind whatever control is queued, never before it
        with trio.move_on_after(GOODBYE_S):
            await self._upstream_gone.wait()

    async def _close_sockets(self) -> None:
        """Shielded by the caller. A call cancelled from outside still ends its upstream session."""
        for channel in (self._agent_out_send, self._agent_out_recv, self._phone_out_send, self._phone_out_recv):
            channel.close()
        sock = self._leg.sock
        if sock is not None:  # normally the leg has already retired its socket
            await self._leg.retire(sock, say_goodbye=True)
        with trio.move_on_after(CLOSE_S) as polite:
            await self._phone.aclose(1000)
        if polite.cancelled_caught:  # a Twilio that stopped reading never finishes the handshake
            log.warning("Twilio did not complete the close within %g s: dropping the connection", CLOSE_S)
            await self._phone.abort()

    def _context(self) -> CallContext:
        state = self.state
        params = state.custom_parameters
        return CallContext(
            call_id=self.setup.call_id,
            call_sid=state.call_sid,
            direction=self.setup.direction,
            from_number=params.get("From", ""),
            to_number=params.get("To", ""),
            stream_sid=state.stream_sid,
            custom_parameters=params,
        )

    def _summarise(self, started: float) -> CallSummary:
        state = self.state
        outcome = state.outcome or st.Outcome.CALLER_HUNG_UP
        reason = state.end_reason or "cancelled"
        s = state.stats
        duration = self._clock() - started
        metrics = self.setup.metrics
        if metrics:
            metrics.calls.labels(outcome.value).inc()
            if self._resume_pending:
                metrics.agent_resumes.labels("failed").inc()
            metrics.barge_ins.inc(s.barge_ins)
            metrics.fold_finished(s)
        log.info(
            "call summary: outcome=%s duration=%.1fs turns=%d barge_ins=%d tools=%d "
            "frames twilio->agent=%d/%d agent->twilio=%d/%d dropped(pre_ready=%d flood=%d "
            "backpressure=%d interrupted=%d gap=%d) resumes=%d invalid(twilio=%d agent=%d) reason=%s",
            outcome.value,
            duration,
            s.turns,
            s.barge_ins,
            s.tool_calls,
            s.frames_to_agent,
            s.frames_from_twilio,
            s.frames_to_twilio,
            s.frames_from_agent,
            s.frames_dropped_pre_ready,
            s.frames_dropped_flood,
            s.frames_dropped_backpressure,
            s.frames_dropped_interrupted,
            s.frames_dropped_gap,
            s.resumes,
            s.invalid_twilio,
            s.invalid_agent,
            reason,
        )
        return CallSummary(self.setup.call_id, state.call_sid, outcome, reason, duration, s)


_NORMAL_OUTCOMES = frozenset({st.Outcome.CALLER_HUNG_UP, st.Outcome.AGENT_ENDED, st.Outcome.TRANSFERRED})


def _metric_code(code: str) -> str:
    return code if code in ag.ERROR_CODES else "other"


_SESSION_END = st.SendAgent(ag.SESSION_END)

