"""A real, throw-away redis-server for tests (Debian's /usr/bin/redis-server).

``async with redis_server(tmp_path) as server:`` starts one on a free loopback port with no
persistence (``--save "" --appendonly no``) in its own directory; it is killed on exit. A test may
``await server.stop()`` and ``await server.start()`` again on the same port (a restart: Redis
comes back empty, as an unpersisted one does).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

REDIS_SERVER = "/usr/bin/redis-server"
_START_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def redis_available() -> bool:
    return shutil.which(REDIS_SERVER) is not None


@dataclass
class RedisServer:
    directory: Path
    port: int
    password: str | None = None
    proc: trio.Process | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start (or restart) the server on its port; returns once it accepts connections."""
        assert self.proc is None or self.proc.returncode is not None, "already running"
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = await trio.lowlevel.open_process(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(_START_S):
            while True:
                assert self.proc.returncode is None, (self.directory / "redis.log").read_text(errors="replace")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.01)
                    continue
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    answer = await stream.receive_some(64)
                if answer.startswith((b"+PONG", b"-NOAUTH")):
                    return
                await trio.sleep(0.01)

    async def stop(self) -> None:
        """Kill the server (SIGKILL: nothing is saved) and reap it."""
        if self.proc is None:
            return
        with trio.move_on_after(5, shield=True):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()


@asynccontextmanager
async def redis_server(directory: Path, *, password: str | None = None) -> AsyncIterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server is needed (apt-get install redis-server)")
    server = RedisServer(_made(directory), _free_port(), password)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
