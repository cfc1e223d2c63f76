"""Serving: the front door on the public port, Hypercorn behind it, signal handling and drain.

The front door (``bridge/net/front.py``) accepts every connection on the public port (or the socket
a WORKERS parent passed down). Media Streams upgrades run there; everything else is handed to
Hypercorn + Quart-Trio on a private unix socket in a 0700 temporary directory.

SIGTERM (or a first SIGINT): /readyz turns 503 (/healthz stays 200 until exit), new calls get
the busy TwiML, live calls go on for up to DRAIN_SECONDS and are then ended cleanly
(``session.end`` upstream, stream closed); the server stops when the last call is gone. A second
SIGINT stops at once (calls still get their bounded, shielded goodbye).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from bridge.config import Settings
from bridge.net.front import FrontDoor
from bridge.phone.stream import Receive, Scope, Send
from bridge.web import BridgeApp

log = logging.getLogger("bridge.server")

_FINAL_END_S = 3.0  # after DRAIN_SECONDS: time for the calls we end to say goodbye upstream


def hypercorn_config(settings: Settings, *, bind: Sequence[str]) -> Config:
    config = Config()
    config.bind = list(bind)  # the private unix socket behind the front door (or a test's own)
    # Calls are ended by our drain before shutdown starts; only requests in progress are left,
    # and Hypercorn would hold the exit this long for them.
    config.graceful_timeout = 1.0
    # One request per connection (Hypercorn adds ``Connection: close`` and closes after it): a
    # later request on a kept-alive connection, an upgrade say, would reach Hypercorn unseen by
    # the front door. Every head passes the front door instead, on a fresh connection; webhooks
    # are a few per call and nginx keeps no upstream connections anyway (deploy/nginx.conf).
    config.keep_alive_max_requests = 1
    # How long Hypercorn waits for a request head the front door handed on incomplete (a client
    # slower than HEAD_DEADLINE_S); as before the one-request change.
    config.keep_alive_timeout = 75.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


_RESPONSE_SEND_S = 10.0  # bounds a shielded response send (Hypercorn shields its own writes too)


def close_after_response(app: BridgeApp) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The app as Hypercorn gets it: each HTTP response is sent shielded from cancellation.

    With ``keep_alive_max_requests = 1`` Hypercorn closes the connection inside the send of the
    response's last part; quart-trio cancels that send's task as soon as Hypercorn reports the
    request finished (``http.disconnect``), which stops the close at its first checkpoint and
    leaves the connection open for good (measured: no EOF ever, with or without the client's
    ``Connection: close``). Shielded, the close completes and the client sees EOF.
    """

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_shielded(message: dict[str, Any]) -> None:
            with trio.move_on_after(_RESPONSE_SEND_S, shield=True):
                await send(message)

        await app(scope, receive, send_shielded)

    return asgi


async def drain(app: BridgeApp, settings: Settings) -> None:
    """Stop taking calls, let live ones finish (bounded), then end the rest cleanly."""
    app.start_drain()
    log.info("draining: %d live call(s), up to %g s", app.active_calls, settings.drain_seconds)
    with trio.move_on_after(settings.drain_seconds):
        await app.calls.idle.wait()
    if app.active_calls:
        log.info("drain time is up: ending %d call(s)", app.active_calls)
        app.end_all_calls("server shutting down")
        with trio.move_on_after(_FINAL_END_S):
            await app.calls.idle.wait()
    log.info("drained: stopping the server")


@dataclass
class _Stopping:
    """How serving ends: a drain is requested, the drain finishes (then Hypercorn stops, and with
    it the front door), or a second SIGINT cancels everything (exit code 130)."""

    requested: trio.Event
    drained: trio.Event = field(default_factory=trio.Event)
    exit_code: int = 0


async def serve(
    app: BridgeApp,
    settings: Settings,
    *,
    bind: Sequence[str] | None = None,
    handle_signals: bool = True,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve until drained (signal or ``shutdown`` set). Reports the bound addresses via
    ``task_status``. Returns the process exit code: 0 after a drain, 130 after a forced stop.
    """
    stopping = _Stopping(shutdown if shutdown is not None else trio.Event())
    async with trio.open_nursery() as watchers:
        watchers.start_soon(_drain_when_requested, app, settings, stopping)
        if handle_signals:
            watchers.start_soon(_watch_signals, stopping, watchers.cancel_scope)
        await watchers.start(app.keep_shared_state)  # before the first admission (bridge/fleet/shared.py)
        listeners = await open_listeners(bind or [f"{settings.bind_host}:{settings.port}"])
        await _serve_until_drained(app, settings, listeners, stopping, task_status)
        watchers.cancel_scope.cancel()
    return stopping.exit_code


async def _drain_when_requested(app: BridgeApp, settings: Settings, stopping: _Stopping) -> None:
    await stopping.requested.wait()
    await drain(app, settings)
    stopping.drained.set()


async def _watch_signals(stopping: _Stopping, everything: trio.CancelScope) -> None:
    """SIGTERM or a first SIGINT requests the drain; a second SIGINT cancels ``everything``."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if not stopping.requested.is_set():
                log.info("received %s: draining", signal.Signals(signum).name)
                stopping.requested.set()
            elif signum == signal.SIGINT:
                log.warning("second SIGINT: stopping now")
                stopping.exit_code = 130
                everything.cancel()
                return


async def _serve_until_drained(
    app: BridgeApp,
    settings: Settings,
    listeners: list[trio.SocketListener],
    stopping: _Stopping,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """The front door on ``listeners`` and Hypercorn behind it on a private unix socket, until
    Hypercorn has stopped (after the drain, or cancelled); the socket's directory is removed."""
    private_dir = make_private_dir()
    try:
        hypercorn_socket = os.path.join(private_dir, "hypercorn.sock")
        config = hypercorn_config(settings, bind=[f"unix:{hypercorn_socket}"])
        hypercorn_done = trio.Event()
        async with trio.open_nursery() as serving:
            # The records' writer outlives every call (they run in this nursery too) and
            # flushes, bounded, when it is cancelled after the drain.
            await serving.start(app.run_records)
            await serving.start(_run_hypercorn, app, config, stopping.drained, hypercorn_done)
            front = FrontDoor(app, hypercorn_socket)
            serving.start_soon(front.release_memory_when_idle)
            await serving.start(trio.serve_listeners, front.handle, listeners)
            task_status.started([_url(listener) for listener in listeners])
            await hypercorn_done.wait()
            # Hypercorn has stopped (drained, or cancelled by a second SIGINT): stop accepting,
            # and end what is still open (calls were ended by the drain).
            serving.cancel_scope.cancel()
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)


async def _run_hypercorn(
    app: BridgeApp,
    config: Config,
    drained: trio.Event,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn serving ``app`` until ``drained``; ``done`` is set however it stops."""
    try:
        await hypercorn_serve(
            close_after_response(app),  # type: ignore[arg-type]
            config,
            shutdown_trigger=drained.wait,
            mode="asgi",
            task_status=task_status,
        )
    finally:
        done.set()


async def open_listeners(binds: Sequence[str]) -> list[trio.SocketListener]:
    """``host:port`` (port 0 picks one) or ``fd://N`` (a socket inherited from a WORKERS parent)."""
    listeners: list[trio.SocketListener] = []
    for bind in binds:
        if bind.startswith("fd://"):
            inherited = socket.socket(fileno=int(bind[len("fd://") :]))
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(inherited)))
            continue
        host, _, port = bind.rpartition(":")
        listeners.extend(await trio.open_tcp_listeners(int(port), host=host.strip("[]") or None, backlog=2048))
    return listeners


def _url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


PRIVATE_PREFIX = "bridge-hypercorn-"


def make_private_dir(root: str | None = None) -> str:
    """A 0700 directory for Hypercorn's unix socket, named after our pid. Directories that killed
    bridge processes (SIGKILL, OOM) could not remove are removed first."""
    root = root or tempfile.gettempdir()
    remove_stale_private_dirs(root)
    return tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=root)


def remove_stale_private_dirs(root: str) -> None:
    for path in Path(root).glob(f"{PRIVATE_PREFIX}*-*"):
        pid_text = path.name[len(PRIVATE_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) <= 0:
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by a bridge process that no longer runs", path)
        except OSError:
            continue  # alive under another user, or removed meanwhile
