"""WORKERS=N: several bridge processes share one listening socket on one machine.

The parent binds the port once and starts N ``python -m bridge serve`` workers that inherit the
socket; the kernel spreads new connections across them. Stream tokens are stateless, so a webhook
answered by one worker and a stream accepted by another is fine — the parent hands every worker
the same token secret. Signals are forwarded: SIGTERM (or a first Ctrl-C) drains every worker, a
second Ctrl-C stops them at once. Each worker applies MAX_CONCURRENT_CALLS on its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from types import FrameType

import trio

from bridge.config import Settings
from bridge.errors import ConfigError

WORKER_FD_ENV = "BRIDGE_WORKER_FD"  # set by the parent for its workers only
PARENT_PID_ENV = "BRIDGE_WORKER_PARENT"
_PARENT_CHECK_S = 1.0


async def drain_when_orphaned(parent_pid: int, shutdown: trio.Event) -> None:
    """A worker whose parent died (even by SIGKILL) drains and exits instead of living on."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - no event exists for "my parent died"
        await trio.sleep(_PARENT_CHECK_S)
    shutdown.set()


def bind_public_socket(settings: Settings) -> socket.socket:
    """Bind BIND_HOST:PORT before anything else starts. Raises ConfigError (one line) if it can't."""
    family = socket.AF_INET6 if ":" in settings.bind_host else socket.AF_INET
    try:
        return socket.create_server((settings.bind_host, settings.port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.bind_host}:{settings.port} ({os.strerror(exc.errno) if exc.errno else exc}): "
            f"stop what uses PORT {settings.port}, or set PORT (and BIND_HOST) to a free address"
        ) from exc


def run_workers(settings: Settings, environ: Mapping[str, str]) -> int:
    """Bind, start the workers, forward signals, wait. Returns the workers' worst exit code."""
    listener = bind_public_socket(settings)
    listener.set_inheritable(True)
    env = dict(environ) | {WORKER_FD_ENV: str(listener.fileno()), PARENT_PID_ENV: str(os.getpid()), "WORKERS": "1"}
    # Every worker must accept every other worker's tokens.
    env["STREAM_TOKEN_SECRET"] = env.get("STREAM_TOKEN_SECRET") or settings.stream_token_secret.hex()
    workers = [
        # A new session each: a terminal's Ctrl-C reaches only this parent, which forwards it once.
        subprocess.Popen([sys.executable, "-m", "bridge", "serve"], env=env, pass_fds=(listener.fileno(),),
                         start_new_session=True)
        for _ in range(settings.workers)
    ]
    listener.close()

    def forward(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"Server running on http://localhost:{settings.port} ({settings.workers} workers)", flush=True)
    print("\n".join(settings.describe()), flush=True)
    codes = [worker.wait() for worker in workers]
    return max(codes, key=abs) if any(codes) else 0
