"""The agent leg: the single owner of one call's upstream session.

One :class:`AgentLeg` per call. Each :meth:`AgentLeg.run` opens one upstream socket after another
until one is served to its end: connect, the first message (``session.update``, or
``session.resume`` after a drop), then the call's pumps over it (the session's writer and
reader, see ``call/session.py``) with a keepalive beside them, and the socket's retirement. A
connect that fails or is refused with ``at_capacity``/``concurrency_exceeded`` is tried again
with backoff while the call's ready/resume deadline allows (``call/upstream.py`` decides).

Library errors stop here: trio-websocket's and the OS's exceptions become
:class:`bridge.errors.UpstreamError` (whose fault, retryable or not) before any decision is
taken, and every member of an exception group counts. Cancellation (the call ending) still
retires the open socket, shielded and bounded, saying ``session.end`` first when the agent has
not said goodbye: a bare close keeps the session billed for its 30 s grace window.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio
import trio_websocket

from bridge.agent import events as ag
from bridge.call import upstream
from bridge.call.ports import MessageSocket, SocketClosed
from bridge.errors import BridgeError, UpstreamError
from bridge.observe import Metrics
from bridge.records import facts

log = logging.getLogger("bridge.call")

KEEPALIVE_S = 10.0  # ping the upstream this often...
PING_TIMEOUT_S = 5.0  # ...and treat it as dropped when the pong is this late (a read stall)
CLOSE_S = 0.25  # closing one socket: half for session.end, the rest for the close handshake

AgentConnector = Callable[[trio.Nursery], Awaitable[MessageSocket]]


class LegHost(Protocol):
    """What the leg needs from its call (``CallSession``)."""

    @property
    def ending(self) -> bool:
        """The call is ending: no new connect attempt."""

    @property
    def upstream_ended(self) -> bool:
        """The agent has ended the session itself (``session.ended``): no ``session.end`` owed."""

    def connect_failed(self, detail: str) -> None:
        """No upstream session could be opened (or resumed); the call decides what that means."""

    def fact(self, fact: facts.Fact) -> None:
        """For the call's record (upstream socket lifetimes)."""

    async def serve(self, nursery: trio.Nursery, sock: MessageSocket, *, resumed: bool) -> str | None:
        """Run the call's pumps over an open socket (the writer in ``nursery``, the reader here)
        until it closes. Returns a reason to retry the connect, or ``None``."""


class AgentLeg:
    """The upstream side of one call. ``sock`` is the open socket, if any."""

    def __init__(
        self,
        connect: AgentConnector,
        host: LegHost,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._connect = connect
        self._host = host
        self._metrics = metrics
        self._clock = clock
        self.sock: MessageSocket | None = None
        self.session_end_sent = False  # set by whoever sends it (the session's writer, or retire)

    async def run(self, first_message: Callable[[], Awaitable[str]], *, resume_attempt: int = 0) -> None:
        """Open and serve upstream sockets until one ends without asking for a retry.

        ``first_message`` builds ``session.update`` (it may fail with a ``BridgeError``: the call
        is told, nothing is opened) or ``session.resume``; ``resume_attempt`` > 0 waits the
        resume backoff first. Cancellation retires the open socket (shielded, bounded).
        """
        host, metrics = self._host, self._metrics
        resumed = resume_attempt > 0
        if resumed:
            await trio.sleep(upstream.backoff_s(resume_attempt))
        try:
            first = await first_message()
        except BridgeError as exc:
            host.connect_failed(str(exc))
            return
        attempt = 0
        while not host.ending:
            errors: list[UpstreamError] = []
            broken = False
            retry_reason: str | None = None
            sock: MessageSocket | None = None
            served = False  # False in finally: cancelled (or failed) with the socket open
            try:
                async with trio.open_nursery() as nursery:  # the socket's reader task lives here
                    sock = self.sock = await self._connect(nursery)
                    host.fact(facts.UpstreamOpened(self._clock()))  # billing runs from here
                    if metrics:
                        metrics.agent_connects.labels("ok").inc()
                        if resumed:
                            metrics.agent_resumes.labels("attempted").inc()
                    await sock.send(first)
                    nursery.start_soon(self._keepalive, sock)
                    retry_reason = await host.serve(nursery, sock, resumed=resumed)
                    served = True
                    nursery.cancel_scope.cancel()
            except* _LIBRARY_ERRORS as group:
                errors = [translate(exc) for exc in _leaves(group)]
            except* Exception as group:  # a bug of ours: log every member, end the call cleanly
                for member in _leaves(group):
                    log.error("the agent leg failed", exc_info=member)
                broken = True
            finally:
                if sock is not None:
                    with trio.CancelScope(shield=True):
                        await self.retire(sock, say_goodbye=not served)
                    host.fact(facts.UpstreamClosed(self._clock()))
            if broken:
                host.connect_failed("internal error in the agent leg")
                return
            if errors:
                if metrics:
                    metrics.agent_connects.labels("failed").inc()
                detail = "; ".join(error.message for error in errors)
                if not upstream.retry_connect(errors):
                    host.connect_failed(detail)
                    return
                retry_reason = detail
            if retry_reason is None:
                return
            attempt += 1
            wait_s = upstream.backoff_s(attempt)
            log.warning("Voice Agent not available (%s): retrying in %.2f s", retry_reason, wait_s)
            await trio.sleep(wait_s)  # the ready/resume deadline (the call's ticker) bounds the loop

    async def _keepalive(self, sock: MessageSocket) -> None:
        """A silent upstream is normal; one that stops answering pings is dead: drop it (resume)."""
        while True:
            await trio.sleep(KEEPALIVE_S)
            try:
                with trio.fail_after(PING_TIMEOUT_S):
                    await sock.ping()
            except trio.TooSlowError:
                log.warning("Voice Agent did not answer a ping within %g s: dropping the connection", PING_TIMEOUT_S)
                await sock.abort()
                return
            except SocketClosed:
                return

    async def retire(self, sock: MessageSocket, *, say_goodbye: bool) -> None:
        """Close one upstream socket (shield it; bounded here). If the call is ending and the agent
        never said goodbye, send ``session.end`` first."""
        with trio.move_on_after(2 * CLOSE_S):
            if say_goodbye and not self.session_end_sent and not self._host.upstream_ended:
                try:
                    await sock.send(ag.SESSION_END)
                    self.session_end_sent = True
                except SocketClosed:
                    pass
            await sock.aclose()
        if self.sock is sock:
            self.sock = None


# What a connect attempt may raise, library errors included; everything else is a bug of ours.
_LIBRARY_ERRORS = (UpstreamError, trio_websocket.HandshakeError, OSError, trio.BrokenResourceError, SocketClosed)


def translate(exc: BaseException) -> UpstreamError:
    """One connect error in the project's terms (``retryable`` per ``call/upstream.py``)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, trio_websocket.ConnectionRejected):
        status = exc.status_code
        return UpstreamError(
            "rejected", f"handshake rejected with HTTP {status}", retryable=upstream.rejected_is_retryable(status)
        )
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        return UpstreamError("connect_failed", text, retryable=True)
    if isinstance(exc, trio_websocket.HandshakeError):
        return UpstreamError("handshake_failed", text)
    return UpstreamError("connection_lost", text)  # the socket went away during the handshake


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every exception of a (nested) group, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
