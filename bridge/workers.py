"""WORKERS=N: several bridge processes share one listening socket on one machine.

The parent binds the port once and starts N ``python -m bridge serve`` workers that inherit the
socket; the kernel spreads new connections across them. Stream tokens and console cookies verify
on every worker (the parent hands them all the same token secret and, with ``CONSOLE_TOKEN``, the
same console session secret), so a webhook answered by one worker and a stream accepted by
another is fine, and so is a console whose requests land on different workers.

What must hold across the workers is decided by the parent, the machine's one authority
(``bridge/fleet/parent.py``): each worker has a socketpair to it and asks at admission only —
single-use stream tokens, ``MAX_CONCURRENT_CALLS`` for the whole machine (webhook reservations
included), one live stream per CallSid. A worker that dies, even by SIGKILL, closes its end; the
parent then frees every slot it held (its spent tokens stay spent). The parent runs a small Trio
loop for this and for its signals; it does nothing per frame.

Signals are forwarded: SIGTERM (or a first Ctrl-C) drains every worker, a second Ctrl-C stops
them at once. A parent that dies takes its workers down (``drain_when_orphaned``).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
from collections.abc import Mapping

import trio

from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.fleet.parent import Authority, ParentState

WORKER_FD_ENV = "BRIDGE_WORKER_FD"  # set by the parent for its workers only
PARENT_PID_ENV = "BRIDGE_WORKER_PARENT"
STATE_FD_ENV = "BRIDGE_WORKER_STATE_FD"  # the worker's end of its socketpair to the parent
_PARENT_CHECK_S = 1.0


async def drain_when_orphaned(parent_pid: int, shutdown: trio.Event) -> None:
    """A worker whose parent died (even by SIGKILL) drains and exits instead of living on."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - no event exists for "my parent died"
        await trio.sleep(_PARENT_CHECK_S)
    shutdown.set()


def worker_shared_state(environ: Mapping[str, str]) -> ParentState | None:
    """In a worker: the shared state that asks the parent. None outside WORKERS."""
    fd = environ.get(STATE_FD_ENV)
    return ParentState(socket.socket(fileno=int(fd))) if fd else None


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
    """Bind, start the workers, answer their admission requests, forward signals, wait.
    Returns the workers' worst exit code."""
    listener = bind_public_socket(settings)
    return trio.run(_supervise, settings, environ, listener)


async def _supervise(settings: Settings, environ: Mapping[str, str], listener: socket.socket) -> int:
    env = dict(environ) | {WORKER_FD_ENV: str(listener.fileno()), PARENT_PID_ENV: str(os.getpid()), "WORKERS": "1"}
    # Every worker must accept every other worker's tokens and console cookies (each process
    # would draw its own random secret: a cookie signed by one worker refused by the next).
    env["STREAM_TOKEN_SECRET"] = env.get("STREAM_TOKEN_SECRET") or settings.stream_token_secret.hex()
    if settings.console_token and not env.get("CONSOLE_SESSION_SECRET"):
        env["CONSOLE_SESSION_SECRET"] = secrets.token_hex(32)
    authority = Authority(settings.max_concurrent_calls)
    workers: list[trio.Process] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for number in range(1, settings.workers + 1):
                ours, theirs = socket.socketpair()
                try:
                    worker = await trio.lowlevel.open_process(
                        [sys.executable, "-m", "bridge", "serve"],
                        env=env | {STATE_FD_ENV: str(theirs.fileno())},
                        pass_fds=(listener.fileno(), theirs.fileno()),
                        # A new session each: a terminal's Ctrl-C reaches only this parent, which
                        # forwards it once.
                        start_new_session=True,
                    )
                finally:
                    theirs.close()  # the worker's own now: its death is our EOF
                workers.append(worker)
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
                nursery.start_soon(authority.serve_worker, f"worker {number} (pid {worker.pid})", stream)
            listener.close()

            async def forward() -> None:
                async for signum in signals:
                    for worker in workers:
                        if worker.poll() is None:
                            worker.send_signal(signum)

            nursery.start_soon(forward)
            print(f"Server running on http://localhost:{settings.port} ({settings.workers} workers)", flush=True)
            print("\n".join(settings.describe()), flush=True)
            codes = [await worker.wait() for worker in workers]
            nursery.cancel_scope.cancel()
    return max(codes, key=abs) if any(codes) else 0
