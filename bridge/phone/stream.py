"""Where a Twilio frame enters and leaves: the ``/media-stream/<token>`` WebSocket.

New connections reach it through the front door (``bridge/net/front.py``), which hands a
``/media-stream/`` upgrade to trio-websocket: :class:`WsPhoneSocket`. Hypercorn's per-message
layers (read timeout scope, h11/wsproto wrappers, the app queue, a shielded send under a lock)
are then off the path of every frame (BENCHMARKS.md). An upgrade that reaches Hypercorn anyway
(a reused keep-alive connection) is served by the raw ASGI handler: :class:`AsgiPhoneSocket`.
Either way everything is checked *before* the handshake is accepted (signature, token, replay,
capacity), so a refused stream never opens an upstream session.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from bridge.agent.connection import SocketClosed

log = logging.getLogger("bridge.phone")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STREAM_PREFIX = "/media-stream/"
# What a write to a socket that is going away raises. BusyResourceError: Hypercorn's own close
# path (send_eof) runs outside its send lock and can race our last frame.
_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)


class WsPhoneSocket:
    """The Twilio Media Streams socket served by trio-websocket, as the session's message socket.

    Built before the handshake is accepted (the session needs its socket to be admitted);
    :meth:`accepted` attaches the connection. The front door owns the TCP stream: it closes it
    after the call, or at once through :meth:`abort`.
    """

    __slots__ = ("_stream", "_ws")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._ws: trio_websocket.WebSocketConnection | None = None

    def accepted(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def receive(self) -> str | bytes | None:
        """Next message from Twilio; ``None`` once the socket is closed (or was never accepted)."""
        if self._ws is None:
            return None
        try:
            return await self._ws.get_message()
        except ConnectionClosed:
            return None

    async def send(self, text: str) -> None:
        """Send one frame to Twilio; raises :class:`SocketClosed` once the socket is gone."""
        if self._ws is None:
            raise SocketClosed("Twilio socket not accepted")
        try:
            await self._ws.send_message(text)
        except (ConnectionClosed, *_GONE) as exc:
            raise SocketClosed(str(exc)) from exc

    async def aclose(self, code: int = 1000) -> None:
        """Close the stream (Twilio then runs the TwiML after ``</Connect>``); the caller bounds
        the close handshake. The TCP stream is the front door's to close. Idempotent."""
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed, *_GONE):
                await self._ws.aclose(code)

    async def abort(self) -> None:
        """Drop the TCP connection at once (a Twilio that stopped reading)."""
        await trio.aclose_forcefully(self._stream)


class AsgiPhoneSocket:
    """The Twilio Media Streams socket, as the session's message socket."""

    __slots__ = ("_closed", "_disconnected", "_receive", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False  # we closed (or aborted): nothing more is sent
        self._disconnected = False  # Hypercorn delivered websocket.disconnect: nothing more arrives

    async def receive(self) -> str | bytes | None:
        """Next message from Twilio; ``None`` once Twilio has disconnected."""
        if self._disconnected:
            return None
        message = await self._receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        self._closed = self._disconnected = True  # websocket.disconnect
        return None

    async def send(self, text: str) -> None:
        """Send one frame to Twilio; raises :class:`SocketClosed` once the socket is gone."""
        if self._closed:
            raise SocketClosed("Twilio socket closed")
        try:
            await self._send({"type": "websocket.send", "text": text})
        except _GONE as exc:
            self._closed = True
            raise SocketClosed(str(exc)) from exc

    async def aclose(self, code: int = 1000) -> None:
        """Close the stream (Twilio then runs the TwiML after ``</Connect>``). Idempotent."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(*_GONE):
                await self._send({"type": "websocket.close", "code": code})
        # Hypercorn hands frames to the app through a small queue and, once the app returns, puts
        # websocket.disconnect into that same queue: if Twilio kept sending while nobody read,
        # the queue is full and Hypercorn's connection task blocks for ever (a leaked socket).
        # Drain it until the disconnect arrives, also after an abort (the caller bounds this wait).
        while not self._disconnected:
            if (await self._receive())["type"] == "websocket.disconnect":
                self._disconnected = True

    async def abort(self) -> None:
        """Drop the TCP connection under the WebSocket at once.

        Hypercorn shields its socket writes from cancellation, so a Twilio that stops reading
        would pin our writer (and the call) forever; closing the socket wakes that write with an
        error. The stream is found through the ASGI ``send`` callable (Hypercorn 0.18, pinned;
        ``tests/test_stack_smoke.py`` guards it). Idempotent; a no-op if it cannot be found.
        """
        self._closed = True
        stream = _hypercorn_stream(self._send)
        if stream is not None:
            await trio.aclose_forcefully(stream)


def _hypercorn_stream(send: object) -> trio.abc.Stream | None:
    # app_send (WSStream) -> protocol.send -> TCPServer.protocol_send -> TCPServer.stream
    owner: object = send
    for _ in range(4):
        owner = getattr(owner, "__self__", None)
        if owner is None:
            return None
        stream = getattr(owner, "stream", None)
        if isinstance(stream, trio.abc.Stream):
            return stream
        owner = getattr(owner, "send", None)
    return None


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A request header by lower-case name (ASGI scope headers, or a parsed request head)."""
    for key, value in headers:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def refusal(status: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body for refusing a Media Streams handshake with ``status``.

    403: not Twilio, or not a call we answered. 503: full or draining, which a reverse proxy may
    retry on another instance (``proxy_next_upstream http_503``).
    """
    body = b"Forbidden\n" if status == 403 else b"Service Unavailable\n"
    return [(b"content-type", b"text/plain")], body  # the sender adds Content-Length


async def reject(send: Send, status: int = 403) -> None:
    """Refuse the WebSocket handshake with an HTTP status (ASGI websocket denial response)."""
    headers, body = refusal(status)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})
