"""EXPERIMENT, not product: the Media Streams WebSocket served by trio-websocket instead of Hypercorn.

Measures the card-compliant option that BENCHMARKS.md ("Session 2") reports: one accept loop on
the public port reads each request head; a ``/media-stream/`` upgrade is handed to trio-websocket
(``wrap_server_stream``) and runs the normal ``CallSession``; every other connection is spliced
to Hypercorn + Quart-Trio, which serve the webhooks on a private unix socket. Same checks as the
product (signature, token, replay, capacity), but none of the product's hardening (no drain,
no head-size/slowloris policy beyond a 10 s deadline, no WORKERS), so never deploy it.

    python -m tools.loadtest --levels 75,100 --vs ".venv/bin/python -m tools.experiments.twilio_front"

``EXPERIMENT_DIRECT_TWILIO=1`` also puts the Twilio leg on ``DirectSocketStream``;
``EXPERIMENT_PLAIN_TCP=1`` takes it off the upstream (trio's ``SocketStream``, as before 74af280).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import tempfile
from typing import Any

import trio
import trio_websocket
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import ConnectionClosed

import bridge.agent.connection as connection
from bridge.agent.connection import SocketClosed
from bridge.agent.tcp import DirectSocketStream
from bridge.call.session import CallSession
from bridge.config import from_env, load_environment
from bridge.phone.stream import STREAM_PREFIX
from bridge.server import hypercorn_config
from bridge.web import BridgeApp, create_app

HEAD_LIMIT = 65536
_GONE = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


class Prefixed(trio.abc.Stream):
    """A stream that first replays the bytes already read from it (the request head)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner, self.prefix = inner, prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class TwilioSocket:
    """The session's message socket over a trio-websocket server connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.stream = stream

    async def receive(self) -> str | bytes | None:
        assert self.ws is not None
        try:
            return await self.ws.get_message()
        except ConnectionClosed:
            return None

    async def send(self, text: str) -> None:
        assert self.ws is not None
        try:
            await self.ws.send_message(text)
        except _GONE as exc:
            raise SocketClosed(str(exc)) from exc

    async def aclose(self, code: int = 1000) -> None:
        if self.ws is not None:
            with trio.move_on_after(0.5), contextlib.suppress(*_GONE):
                await self.ws.aclose(code)
        await trio.aclose_forcefully(self.stream)

    async def abort(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def run_media_stream(app: BridgeApp, stream: trio.abc.Stream, head: bytes) -> None:
    settings = app.settings
    async with trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(
            nursery, Prefixed(stream, head), max_message_size=settings.max_twilio_frame_bytes
        )
        token = request.path[len(STREAM_PREFIX) :]
        scope: dict[str, Any] = {"headers": request.headers}
        grant = app._check_stream(scope, token, settings.public.ws_url(request.path))
        if isinstance(grant, str):
            await request.reject(403)
            return
        call_id = "c-" + secrets.token_hex(4)
        phone = TwilioSocket(stream)
        session = CallSession(app._call_setup(call_id, grant), phone, app.deps.connect_agent)
        if not app.calls.admit(grant.token, call_id, session, now=app.deps.wall_clock()):
            await request.reject(503)
            return
        phone.ws = await request.accept()
        app._sessions[call_id] = session
        try:
            await session.run()
        finally:
            app._sessions.pop(call_id, None)
            app.calls.release(call_id)
            nursery.cancel_scope.cancel()


async def splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(HEAD_LIMIT):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, nursery.cancel_scope)
        nursery.start_soon(pump, b, a, nursery.cancel_scope)


async def main() -> None:
    if os.environ.get("EXPERIMENT_PLAIN_TCP"):
        connection.DirectSocketStream = lambda stream: stream  # type: ignore[assignment,misc,return-value]
    direct_twilio = bool(os.environ.get("EXPERIMENT_DIRECT_TWILIO"))
    settings = from_env(load_environment(os.environ))
    app = create_app(settings)
    hypercorn_socket = os.path.join(tempfile.mkdtemp(prefix="twilio-front-"), "hypercorn.sock")
    config = hypercorn_config(settings, bind=[f"unix:{hypercorn_socket}"])

    async def handle(raw: trio.SocketStream) -> None:
        stream: trio.abc.Stream = DirectSocketStream(raw) if direct_twilio else raw
        head = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                data = await stream.receive_some(HEAD_LIMIT)
                if not data:
                    break
                head += data
        lines = head.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
        target = lines[0].split(b" ")[1] if len(lines[0].split(b" ")) > 1 else b""
        try:
            if target.startswith(STREAM_PREFIX.encode()) and b"upgrade: websocket" in lines:
                await run_media_stream(app, stream, head)
            else:
                upstream = await trio.open_unix_socket(hypercorn_socket)
                async with upstream:
                    await upstream.send_all(head)
                    await splice(stream, upstream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(hypercorn_serve, app, config, mode="asgi"))  # type: ignore[arg-type]
        print(f"Server running on http://localhost:{settings.port} (experiment: trio-websocket front)", flush=True)
        await trio.serve_tcp(handle, settings.port, host=settings.bind_host)


if __name__ == "__main__":
    trio.run(main)
