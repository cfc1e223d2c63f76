"""trio-websocket connections for both legs of a call, with two scheduler trips per message less.

trio-websocket yields to the scheduler twice per message even when nothing has to wait: its
reader task hands each message to ``get_message`` with ``await channel.send()`` (a checkpoint
after the hand-over), and ``send_message`` takes the stream lock with ``async with`` (a
checkpoint after an uncontended acquire). :class:`LeanWebSocketConnection` takes the direct path
in those two places when nothing waits and runs trio-websocket's own code otherwise (a full
queue, a held lock, a message in parts or too big). Every task still yields where it blocks: the
reader at each socket read, a writer on its empty channel. Its framing is
:class:`bridge.net.framing.FastFraming` over wsproto. BENCHMARKS.md has what each bought.

The connection is built as ``wrap_client_stream``/``wrap_server_stream`` build theirs
(trio-websocket 0.12, pinned; ``tests/test_websocket.py`` runs both against trio-websocket's own).
"""

from __future__ import annotations

from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, Event, Pong, TextMessage

from bridge.net.framing import FastFraming


class LeanWebSocketConnection(trio_websocket.WebSocketConnection):
    """A ``trio_websocket.WebSocketConnection`` that does not yield when nothing has to wait."""

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        data = event.data
        if isinstance(data, bytearray):
            data = bytes(data)  # as trio-websocket's join makes it
        if event.message_finished and not self._message_parts and len(data) <= self._max_message_size:
            try:
                self._send_channel.send_nowait(data)
                return
            except trio.WouldBlock:
                pass  # the queue is full: trio-websocket's own path waits for room
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return  # nobody reads any more (as trio-websocket)
        await super()._handle_message_event(event)

    async def _send(self, event: Event) -> None:
        if type(event) is Pong and self._wsproto.state is not ConnectionState.OPEN:
            # A ping that crossed our Close: wsproto refuses the pong (nothing may follow a
            # Close, RFC 6455 5.5.1), and trio-websocket's reader, which answers every ping,
            # raised out of the call's nursery. Not answering it is all the protocol allows.
            return
        lock = self._stream_lock
        if lock.locked():
            await super()._send(event)  # another task is sending: queue behind it, in order
            return
        data = self._wsproto.send(event)
        lock.acquire_nowait()
        try:
            await self._stream.send_all(data)  # checks for cancellation itself (DirectSocketStream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort_web_socket()
            assert self._close_reason is not None
            raise ConnectionClosed(self._close_reason) from None
        finally:
            lock.release()


def _start(
    nursery: trio.Nursery, stream: trio.abc.Stream, role: ConnectionType, *, max_message_size: int, **options: Any
) -> LeanWebSocketConnection:
    """A lean connection over ``stream`` with its reader task running (as ``wrap_*_stream`` do)."""
    framing = FastFraming(WSConnection(role), max_message_bytes=max_message_size)
    connection = LeanWebSocketConnection(stream, framing, max_message_size=max_message_size, **options)  # type: ignore[arg-type]
    nursery.start_soon(connection._reader_task)
    return connection


async def wrap_client(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    extra_headers: list[tuple[bytes, bytes]],
    message_queue_size: int,
    max_message_size: int,
) -> trio_websocket.WebSocketConnection:
    """``trio_websocket.wrap_client_stream`` with the lean connection; returns once open."""
    connection = _start(
        nursery,
        stream,
        ConnectionType.CLIENT,
        max_message_size=max_message_size,
        host=host,
        path=resource,
        client_extra_headers=extra_headers,
        message_queue_size=message_queue_size,
    )
    await connection._open_handshake.wait()
    return connection


async def wrap_server(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    message_queue_size: int,
    max_message_size: int,
) -> trio_websocket.WebSocketRequest:
    """``trio_websocket.wrap_server_stream`` with the lean connection; returns the request."""
    connection = _start(
        nursery, stream, ConnectionType.SERVER, max_message_size=max_message_size, message_queue_size=message_queue_size
    )
    return await connection._get_request()
