"""DirectSocketStream (the upstream's TCP stream) on real loopback sockets, and the wss path of
``open_agent_socket`` over it (TLS needs the openssl CLI; skipped cleanly without it)."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket

from bridge.agent.connection import AgentEndpoint, open_agent_socket
from bridge.errors import UpstreamError
from bridge.net.tcp import DirectSocketStream
from bridge.net.websocket import LeanWebSocketConnection
from tests.test_deploy import make_cert


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[DirectSocketStream, trio.SocketStream]]:
    """(our stream, the peer's plain trio stream) over 127.0.0.1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    peer = await listeners[0].accept()
    await listeners[0].aclose()
    ours = DirectSocketStream(client)
    try:
        yield ours, peer
    finally:
        await ours.aclose()
        await peer.aclose()


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "unexpected EOF"
        data += chunk
    return bytes(data)


async def test_round_trip_both_ways_with_every_buffer_type() -> None:
    async with tcp_pair() as (ours, peer):
        for payload in (b"hello", bytearray(b"\x00\xff" * 100), memoryview(b"abc" * 1000)):
            await ours.send_all(payload)
            assert await read_exactly(peer, len(payload)) == bytes(payload)
        await peer.send_all(b"x" * 5000)
        assert await read_exactly(ours, 5000) == b"x" * 5000


async def test_receive_some_respects_max_bytes_and_rejects_zero() -> None:
    async with tcp_pair() as (ours, peer):
        await peer.send_all(b"0123456789")
        await trio.sleep(0.05)
        assert await ours.receive_some(4) == b"0123"
        with pytest.raises(ValueError):
            await ours.receive_some(0)


async def test_a_send_bigger_than_the_kernel_buffers_waits_and_delivers_everything() -> None:
    data = bytes(range(256)) * (32 * 1024)  # 8 MiB: several times what loopback buffers hold
    async with tcp_pair() as (ours, peer):
        received = bytearray()

        async def slow_reader() -> None:
            while len(received) < len(data):
                await trio.sleep(0.001)
                received.extend(await peer.receive_some(256 * 1024))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            with trio.fail_after(30):
                await ours.send_all(data)
        assert bytes(received) == data


async def test_eof_from_the_peer_is_an_empty_read() -> None:
    async with tcp_pair() as (ours, peer):
        await peer.send_all(b"last")
        await peer.send_eof()
        assert await read_exactly(ours, 4) == b"last"
        assert await ours.receive_some() == b""


async def test_send_eof_reaches_the_peer() -> None:
    async with tcp_pair() as (ours, peer):
        await ours.send_eof()
        assert await peer.receive_some() == b""


async def test_use_after_close_is_closed_resource_error() -> None:
    async with tcp_pair() as (ours, _peer):
        await ours.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await ours.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await ours.receive_some()


async def test_closing_while_another_task_waits_to_read_wakes_it() -> None:
    async with tcp_pair() as (ours, _peer):
        errors: list[BaseException] = []

        async def reader() -> None:
            try:
                await ours.receive_some()
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(0.05)
                await ours.aclose()
        assert len(errors) == 1


async def test_a_reset_connection_is_broken_resource_error_for_reads_and_writes() -> None:
    for operation in ("receive", "send"):
        async with tcp_pair() as (ours, peer):
            peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await peer.aclose()  # RST instead of FIN
            await trio.sleep(0.05)
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                if operation == "receive":
                    await ours.receive_some()
                else:
                    for _ in range(100):
                        await ours.send_all(b"x" * 1000)


async def test_receive_is_cancellable_and_a_cancelled_send_writes_nothing() -> None:
    async with tcp_pair() as (ours, peer):
        with trio.move_on_after(0.05) as waited:
            await ours.receive_some()
        assert waited.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await ours.send_all(b"never")
        assert scope.cancelled_caught
        await ours.send_all(b"after")
        assert await read_exactly(peer, 5) == b"after"


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@needs_openssl
async def test_wss_upstream_over_tls_on_the_direct_stream(tmp_path: Path) -> None:
    """``open_agent_socket`` with a wss URL: TLS with SNI/verification on top of DirectSocketStream,
    Bearer auth on the handshake, and messages both ways."""
    cert, key = await make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    seen_auth: list[str] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        seen_auth.extend(v.decode() for k, v in request.headers if k.lower() == b"authorization")
        ws = await request.accept()
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            await ws.send_message(f"echo:{message}")

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, server_ctx)
        port = server.port
        endpoint = AgentEndpoint(url=f"wss://localhost:{port}/v1/ws", api_key="k-123", ssl_context=client_ctx)
        with trio.fail_after(10):
            async with trio.open_nursery() as leg:
                sock = await open_agent_socket(leg, endpoint)
                assert isinstance(sock._ws, LeanWebSocketConnection)  # the upstream runs on the lean connection
                await sock.send('{"type":"session.update"}')
                assert await sock.receive() == 'echo:{"type":"session.update"}'
                big = "a" * 200_000  # several TLS records each way
                await sock.send(big)
                assert await sock.receive() == "echo:" + big
                await sock.aclose()
        assert seen_auth == ["Bearer k-123"]
        nursery.cancel_scope.cancel()


@needs_openssl
async def test_wss_upstream_refuses_a_certificate_it_does_not_trust(tmp_path: Path) -> None:
    cert, key = await make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await request.accept()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, server_ctx)
        endpoint = AgentEndpoint(url=f"wss://localhost:{server.port}/v1/ws", api_key="k", ssl_context=None)
        with trio.fail_after(10):
            async with trio.open_nursery() as leg:
                with pytest.raises(UpstreamError) as info:  # not in the system trust store
                    await open_agent_socket(leg, endpoint)
        assert info.value.code == "tls_failed"
        assert not info.value.retryable
        assert "certificate verify failed" in info.value.message.lower()
        nursery.cancel_scope.cancel()
