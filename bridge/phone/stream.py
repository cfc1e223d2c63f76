"""Where a Twilio frame enters and leaves: the ``/media-stream/<token>`` WebSocket.

The only way in is the front door (``bridge/net/front.py``), which hands a ``/media-stream/``
upgrade to trio-websocket: :class:`WsPhoneSocket`. Hypercorn's per-message layers (read timeout
scope, h11/wsproto wrappers, the app queue, a shielded send under a lock) are off the path of
every frame (BENCHMARKS.md), and Hypercorn serves one request per connection, so no upgrade
reaches it on a kept-alive connection. Everything is checked *before* the handshake is accepted
(signature, token, replay, capacity), so a refused stream never opens an upstream session.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from bridge.call.ports import SocketClosed

log = logging.getLogger("bridge.phone")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STREAM_PREFIX = "/media-stream/"
# What a write to a socket that is going away raises. BusyResourceError: the front door's
# half-close after the call (send_eof) is the stream's other writer.
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

    async def ping(self) -> None:
        """Ping Twilio and wait for the pong (the caller owns the deadline)."""
        if self._ws is None:
            raise SocketClosed("Twilio socket not accepted")
        try:
            await self._ws.ping()
        except (ConnectionClosed, *_GONE) as exc:
            raise SocketClosed(str(exc)) from exc

    def describe_close(self) -> str:
        """``close <code> [reason]`` once closed, else ``connection lost``."""
        reason = self._ws.closed if self._ws is not None else None
        if reason is None:
            return "connection lost"
        return f"close {reason.code}" + (f" {reason.reason}" if reason.reason else "")


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A request header by lower-case name (of a parsed request head)."""
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
