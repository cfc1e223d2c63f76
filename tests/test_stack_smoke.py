"""Catches an incompatible upgrade of the pinned serving stack before it reaches a phone call."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import trio
import trio_websocket
from hypercorn.config import Config
from hypercorn.trio import serve

from bridge.phone.stream import _hypercorn_stream

ROOT = Path(__file__).resolve().parent.parent


def test_installed_versions_match_the_pins() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in deps:
        name, pinned = re.match(r"([\w\-\[\]]+)==([\w.]+)", spec).groups()  # type: ignore[union-attr]
        assert version(name) == pinned, f"{name} is {version(name)}, pinned {pinned}"


def test_trio_websocket_client_api_we_use() -> None:
    params = inspect.signature(trio_websocket.wrap_client_stream).parameters
    assert {"extra_headers", "message_queue_size", "max_message_size"} <= set(params)
    assert hasattr(trio_websocket.WebSocketConnection, "ping")


async def test_hypercorn_trio_worker_exposes_the_stream_under_a_websocket() -> None:
    found: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()
        await send({"type": "websocket.accept"})
        stream = _hypercorn_stream(send)
        found.append(stream)
        assert stream is not None
        await trio.aclose_forcefully(stream)  # what AsgiPhoneSocket.abort does

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config, mode="asgi"))
        port = int(binds[0].rsplit(":", 1)[1])
        with trio.fail_after(5):
            async with trio_websocket.open_websocket("127.0.0.1", port, "/x", use_ssl=False) as ws:
                with contextlib.suppress(trio_websocket.ConnectionClosed):  # the server dropped TCP, as intended
                    await ws.get_message()
        nursery.cancel_scope.cancel()
    assert len(found) == 1 and isinstance(found[0], trio.SocketStream)
