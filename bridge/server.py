"""Serving: Hypercorn's trio worker, signal handling and graceful drain.

SIGTERM (or a first SIGINT): /healthz turns 503, new calls get the busy TwiML, live calls go on
for up to DRAIN_SECONDS and are then ended cleanly (``session.end`` upstream, stream closed);
the server stops when the last call is gone. A second SIGINT stops at once (calls still get
their bounded, shielded goodbye).
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Sequence

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from bridge.config import Settings
from bridge.web import BridgeApp

log = logging.getLogger("bridge.server")

_FINAL_END_S = 3.0  # after DRAIN_SECONDS: time for the calls we end to say goodbye upstream


def hypercorn_config(settings: Settings, *, bind: Sequence[str] | None = None) -> Config:
    config = Config()
    config.bind = list(bind or [f"{settings.bind_host}:{settings.port}"])
    # A Twilio frame is ~300 bytes: anything far bigger is hostile and closes with 1009.
    config.websocket_max_message_size = settings.max_twilio_frame_bytes
    # Calls are ended by our drain before shutdown starts; only idle keep-alive connections are
    # left, and Hypercorn would hold the exit this long for them.
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 75.0  # longer than typical reverse-proxy idle timeouts
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


async def drain(app: BridgeApp, settings: Settings) -> None:
    """Stop taking calls, let live ones finish (bounded), then end the rest cleanly."""
    app.start_drain()
    log.info("draining: %d live call(s), up to %g s", app.active_calls, settings.drain_seconds)
    with trio.move_on_after(settings.drain_seconds):
        await app.idle.wait()
    if app.active_calls:
        log.info("drain time is up: ending %d call(s)", app.active_calls)
        app.end_all_calls("server shutting down")
        with trio.move_on_after(_FINAL_END_S):
            await app.idle.wait()
    log.info("drained: stopping the server")


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
    config = hypercorn_config(settings, bind=bind)
    stop_serving = trio.Event()
    exit_code = 0
    requested = shutdown if shutdown is not None else trio.Event()

    async with trio.open_nursery() as watchers:

        async def drain_then_stop() -> None:
            await requested.wait()
            await drain(app, settings)
            stop_serving.set()

        async def watch_signals() -> None:
            nonlocal exit_code
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if not requested.is_set():
                        log.info("received %s: draining", signal.Signals(signum).name)
                        requested.set()
                    elif signum == signal.SIGINT:
                        log.warning("second SIGINT: stopping now")
                        exit_code = 130
                        watchers.cancel_scope.cancel()
                        return

        watchers.start_soon(drain_then_stop)
        if handle_signals:
            watchers.start_soon(watch_signals)
        async with trio.open_nursery() as serving:
            binds = await serving.start(
                functools.partial(hypercorn_serve, app, config, shutdown_trigger=stop_serving.wait, mode="asgi")  # type: ignore[arg-type]
            )
            task_status.started(list(binds))
        # Hypercorn has stopped (drained, or cancelled by a second SIGINT): stop the watchers too.
        watchers.cancel_scope.cancel()
    return exit_code
