"""The upstream WebSocket to the Voice Agent API (trio-websocket), behind the session's socket
port (``bridge.call.ports.MessageSocket``); trio-websocket's errors are translated here.

We open the TCP (and TLS) stream ourselves and close it ourselves: once the peer has started the
close handshake, trio-websocket's ``aclose()`` can return without closing the TCP stream
(../shared/PITFALLS.md), which would leave an upstream socket open after the call.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from bridge.call.ports import SocketClosed
from bridge.errors import UpstreamError
from bridge.net.tcp import DirectSocketStream
from bridge.net.websocket import wrap_client

log = logging.getLogger("bridge.agent")

# trio-websocket's reader parks after this many unread messages and then stops answering pings
# and close frames; our reader always drains it, so a few messages of slack are enough.
_MESSAGE_QUEUE = 16
_CLOSE_TIMEOUT_S = 0.5  # polite close handshake; the TCP stream is closed regardless afterwards


@dataclass(frozen=True, slots=True)
class AgentEndpoint:
    """Where and how to reach the Voice Agent API."""

    url: str
    api_key: str
    max_message_bytes: int = 1024 * 1024
    ssl_context: ssl.SSLContext | None = None


class AgentSocket:
    """One open upstream WebSocket (a ``MessageSocket``). Owned by the call's agent leg."""

    __slots__ = ("_stream", "_ws", "close_code", "close_reason")

    def __init__(self, ws: trio_websocket.WebSocketConnection, stream: trio.abc.Stream) -> None:
        self._ws = ws
        self._stream = stream
        self.close_code: int | None = None
        self.close_reason: str | None = None

    async def receive(self) -> str | bytes | None:
        """Next message, or ``None`` once the connection is closed (code in ``close_code``)."""
        try:
            return await self._ws.get_message()
        except ConnectionClosed as exc:
            if exc.reason is not None:
                self.close_code = exc.reason.code
                self.close_reason = exc.reason.reason
            return None

    async def send(self, text: str) -> None:
        """Send one text message. Raises :class:`SocketClosed` if the connection is gone."""
        try:
            await self._ws.send_message(text)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SocketClosed(str(exc)) from exc

    async def ping(self) -> None:
        """Send a ping and wait for its pong (no deadline here: the caller owns it)."""
        try:
            await self._ws.ping()
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SocketClosed(str(exc)) from exc

    async def abort(self) -> None:
        """Drop the TCP connection at once (a stalled peer gets no close handshake)."""
        await trio.aclose_forcefully(self._stream)

    async def aclose(self, code: int = 1000) -> None:
        """Close politely (bounded), then close the TCP stream. Safe to call twice.

        On cancellation the TCP stream is still closed (``aclose`` of a Trio stream is
        cancellation-safe: it closes before it checkpoints).
        """
        try:
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                await self._ws.aclose(code)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        finally:
            await trio.aclose_forcefully(self._stream)

    def describe_close(self) -> str:
        """``close <code> [reason]``, or ``connection lost`` when no close frame came."""
        if self.close_code is None:
            return "connection lost"
        return f"close {self.close_code}" + (f" {self.close_reason}" if self.close_reason else "")


async def open_agent_socket(nursery: trio.Nursery, endpoint: AgentEndpoint) -> AgentSocket:
    """Open the upstream WebSocket with ``Authorization: Bearer <key>``.

    ``nursery`` hosts trio-websocket's reader task; a rejected handshake is raised *there* (as
    ``trio_websocket.ConnectionRejected``), so give this a nursery of the agent leg's own, never
    the call's. Has no deadline of its own: the caller owns the deadline. On cancellation or
    failure, the TCP stream is closed. Raises :class:`UpstreamError` for connect failures.
    """
    parts = urlsplit(endpoint.url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise UpstreamError("connect_failed", f"cannot reach {host}:{port}: {exc}", retryable=True) from exc
    stream: trio.abc.Stream = DirectSocketStream(tcp)
    if secure:
        context = endpoint.ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
        stream = tls
        try:
            # Here, not inside trio-websocket: a TLS failure in its reader task leaves its
            # handshake waiting until our deadline, which would hide the reason.
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tls)
            reason = exc.__cause__ or exc
            retryable = not isinstance(reason, ssl.SSLError)  # a reset mid-handshake may pass; a bad certificate won't
            raise UpstreamError("tls_failed", f"TLS with {host}:{port} failed: {reason}", retryable=retryable) from exc
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    try:
        ws = await wrap_client(
            nursery,
            stream,
            host_header,
            resource,
            extra_headers=[(b"Authorization", f"Bearer {endpoint.api_key}".encode())],
            message_queue_size=_MESSAGE_QUEUE,
            max_message_size=endpoint.max_message_bytes,
        )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return AgentSocket(ws, stream)
