"""The front door: where every connection to the public port enters.

It reads the request head, bounded in size and time and in how many connections may be waiting
for theirs (``preauth.py``: ``MAX_PENDING_CONNECTIONS``, ``MAX_PENDING_PER_IP``). A Media Streams
upgrade (``GET /media-stream/<token>`` with ``Upgrade: websocket``) is served by trio-websocket and runs
the call (``phone/stream.py`` :class:`WsPhoneSocket`). Anything else, including a head that is
incomplete, malformed or too big, is handed byte for byte to Hypercorn + Quart-Trio, which serve
the webhooks on a private unix socket and answer bad requests as before. Hypercorn's
per-message layers are thereby off the path of every audio frame (BENCHMARKS.md: -16 to -24 %
CPU per call).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import trio
from trio_websocket import ConnectionClosed

from bridge.net.preauth import PendingConnections, Refused
from bridge.net.tcp import DirectSocketStream
from bridge.net.websocket import wrap_server
from bridge.observe import release_free_memory
from bridge.phone.stream import STREAM_PREFIX, WsPhoneSocket, refusal
from bridge.web import BridgeApp

log = logging.getLogger("bridge.net.front")

HEAD_LIMIT = 16 * 1024  # as h11's default: Twilio's upgrade head is about 1 KB
HEAD_DEADLINE_S = 10.0  # for the whole request head; a slower client goes to Hypercorn as is
HANDSHAKE_DEADLINE_S = 10.0
LINGER_S = 1.0  # after a call: time for the peer to finish sending and read our close frame
TWILIO_QUEUE = 16  # trio-websocket's unread messages before its reader stops reading (TCP pushes back)
_SPLICE_BYTES = 65536
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed)


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: bytes
    target: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased


def parse_head(data: bytes) -> RequestHead | None:
    """The request head at the start of ``data``; ``None`` while it is incomplete or malformed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    request_line, *lines = data[:end].split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            return None  # no colon, or whitespace before it, or an obsolete folded line
        headers.append((name.lower(), value.strip()))
    return RequestHead(parts[0], parts[1].decode("latin-1"), headers)


def wants_media_stream(head: RequestHead) -> bool:
    """A WebSocket upgrade to the Media Streams route (everything else goes to Hypercorn)."""
    if head.method != b"GET" or not head.target.startswith(STREAM_PREFIX):
        return False
    upgrade = b",".join(v for k, v in head.headers if k == b"upgrade").lower()
    connection = b",".join(v for k, v in head.headers if k == b"connection").lower()
    return b"websocket" in _tokens(upgrade) and b"upgrade" in _tokens(connection)


def _tokens(value: bytes) -> set[bytes]:
    return {token.strip() for token in value.split(b",")}


class Replay(trio.abc.Stream):
    """A stream that first returns the bytes already read from it (the request head)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


IDLE_RELEASES_AT_S = (0.0, 1.0, 5.0)  # after the last call's connection has closed


class FrontDoor:
    """Routes each accepted connection; one bad connection never hurts another."""

    def __init__(self, app: BridgeApp, hypercorn_socket: str) -> None:
        self._app = app
        self._hypercorn_socket = hypercorn_socket
        s = app.settings
        # Keyed by each pending connection's cancel scope: evicting one is cancelling it.
        self._pending = PendingConnections[trio.CancelScope](
            max_total=s.max_pending_connections, max_per_peer=s.max_pending_per_ip, trusted=s.trusted_proxies
        )
        app.metrics.preauth_pending.set_function(lambda: len(self._pending))
        self._closed_per_ip = app.metrics.preauth_closed.labels("per_ip")
        self._closed_total = app.metrics.preauth_closed.labels("total")
        self._media_streams = 0  # Media Streams connections open (admitted or not)
        self._went_idle = trio.Event()  # the last one has closed: see release_memory_when_idle

    async def handle(self, tcp: trio.SocketStream) -> None:
        stream = DirectSocketStream(tcp)
        media = False
        try:
            buffered = await self._read_pending_head(tcp, stream)
            if not buffered:
                return  # closed, silent for HEAD_DEADLINE_S (a probe, a slow-loris) or over a limit
            head = parse_head(buffered)
            if head is not None and wants_media_stream(head):
                media = True
                self._media_streams += 1
                await self._media_stream(stream, buffered)
            else:
                await self._to_hypercorn(stream, buffered)
        except _GONE:
            pass
        except Exception:
            log.exception("a connection failed")
        finally:
            await trio.aclose_forcefully(stream)
            if media:
                self._media_streams -= 1
                if not self._media_streams and not self._app.active_calls:
                    self._went_idle.set()

    async def _read_pending_head(self, tcp: trio.SocketStream, stream: DirectSocketStream) -> bytes:
        """The request head, read under the pre-auth limits (``preauth.py``); ``b""`` when the
        connection is refused (its address has too many pending), evicted (the oldest pending
        when the total is full) or gives no head."""
        try:
            peer = tcp.socket.getpeername()
        except OSError:  # reset before we got to it
            return b""
        address = peer[0] if isinstance(peer, tuple) else ""  # "" (a unix socket): counted in the total only
        with trio.CancelScope() as pending:
            verdict = self._pending.arrive(pending, address)
            if isinstance(verdict, Refused):
                self._closed_per_ip.inc()
                return b""
            for oldest in verdict.evict:
                oldest.cancel()
                self._closed_total.inc()
            try:
                return await _read_head(stream)
            finally:
                self._pending.done(pending)
        return b""  # evicted to make room for a newer connection

    async def release_memory_when_idle(self) -> None:
        """Each time the last call's connection has closed, hand freed memory back, and again
        while the process stays idle: what the calls held is freed over the next second or so
        (their tasks' last steps, and buffers of connections closing behind them). Measured in
        BENCHMARKS.md ("Memory"). Runs for the life of the server."""
        while True:
            await self._went_idle.wait()
            self._went_idle = trio.Event()
            idle_since = trio.current_time()
            for at_s in IDLE_RELEASES_AT_S:
                await trio.sleep_until(idle_since + at_s)
                if self._media_streams or self._app.active_calls:
                    break  # busy again: the next idle starts over
                release_free_memory()

    async def _media_stream(self, stream: DirectSocketStream, buffered: bytes) -> None:
        app = self._app
        async with trio.open_nursery() as websocket_tasks:  # trio-websocket's reader task
            try:
                # A malformed upgrade is answered 400 by trio-websocket, which then never
                # produces a request: the deadline ends the wait.
                with trio.move_on_after(HANDSHAKE_DEADLINE_S) as handshake:
                    request = await wrap_server(
                        websocket_tasks,
                        Replay(stream, buffered),
                        message_queue_size=TWILIO_QUEUE,
                        max_message_size=app.settings.max_twilio_frame_bytes,
                    )
                if handshake.cancelled_caught:
                    app.metrics.rejected_streams.labels("bad handshake").inc()
                    log.warning("refused a Media Stream: the WebSocket handshake was invalid or incomplete")
                    return
                phone = WsPhoneSocket(stream)
                admitted = await app.admit_stream(request.path, request.headers, phone)
                if isinstance(admitted, int):
                    headers, body = refusal(admitted)
                    with trio.move_on_after(HANDSHAKE_DEADLINE_S):
                        await request.reject(admitted, extra_headers=headers, body=body)
                    return
                try:
                    with trio.fail_after(HANDSHAKE_DEADLINE_S):
                        phone.accepted(await request.accept())
                except (*_GONE, trio.TooSlowError):
                    pass  # not accepted: the call sees a closed socket and ends before any upstream
                await app.run_call(admitted)
            finally:
                websocket_tasks.cancel_scope.cancel()
        await _linger(stream)

    async def _to_hypercorn(self, stream: DirectSocketStream, buffered: bytes) -> None:
        try:
            upstream = await trio.open_unix_socket(self._hypercorn_socket)
        except OSError as exc:  # Hypercorn has stopped: we are shutting down
            log.debug("Hypercorn is not reachable (%s): closing a connection", exc)
            return
        async with upstream:
            if buffered:
                await upstream.send_all(buffered)
            await _splice(stream, upstream)


async def _linger(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close, then read what the peer still sends (bounded) before the socket is closed.
    Closing with unread data sends a reset, which can destroy our close frame (e.g. the 1009
    after an oversized frame) before the peer has read it."""
    with trio.move_on_after(LINGER_S), contextlib.suppress(*_GONE):
        await stream.send_eof()
        while await stream.receive_some(_SPLICE_BYTES):
            pass


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes:
    """Read until the end of the request head, HEAD_LIMIT bytes, EOF or HEAD_DEADLINE_S."""
    data = b""
    with trio.move_on_after(HEAD_DEADLINE_S):
        while b"\r\n\r\n" not in data and len(data) < HEAD_LIMIT:
            chunk = await stream.receive_some(HEAD_LIMIT)
            if not chunk:
                break
            data += chunk
    return data


async def _splice(client: trio.abc.HalfCloseableStream, server: trio.abc.HalfCloseableStream) -> None:
    """Copy both ways. The client may half-close and still get its answer; once the server is
    done (it closes, as on a keep-alive timeout), the whole connection is."""
    async with trio.open_nursery() as nursery:

        async def client_to_server() -> None:
            try:
                while data := await client.receive_some(_SPLICE_BYTES):
                    await server.send_all(data)
                with contextlib.suppress(*_GONE):
                    await server.send_eof()
            except _GONE:
                nursery.cancel_scope.cancel()

        async def server_to_client() -> None:
            with contextlib.suppress(*_GONE):
                while data := await server.receive_some(_SPLICE_BYTES):
                    await client.send_all(data)
            nursery.cancel_scope.cancel()

        nursery.start_soon(client_to_server)
        nursery.start_soon(server_to_client)
