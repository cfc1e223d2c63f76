"""Command line: ``python -m bridge [serve|check|call]`` (serve is the default)."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.web import BridgeApp, Collaborators

USAGE = """usage: python -m bridge [serve|check|call] [options]
  serve   run the bridge server (default)
  check   validate the configuration and print it (secrets masked)
  call    place an outbound call: call [--to NUMBER] [--from NUMBER]"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and not args[0].startswith("-") else "serve"
    if command in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if command == "call":
        from bridge.phone.outbound import main as dial

        return dial(args)
    if command not in ("serve", "check"):
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return _serve(check_only=command == "check")


def _serve(*, check_only: bool) -> int:
    """Load the configuration, then check it, or run as a WORKERS parent, or serve."""
    loaded = _load_configuration()
    if isinstance(loaded, int):
        return loaded
    settings, collaborators = loaded
    if check_only:
        print("Configuration OK:")
        print("\n".join(settings.describe()))
        return 0
    from bridge.errors import ConfigError
    from bridge.web import create_app
    from bridge.workers import WORKER_FD_ENV, bind_public_socket, run_workers, worker_shared_state

    worker_fd = os.environ.get(WORKER_FD_ENV)
    try:
        if settings.workers > 1 and worker_fd is None:
            return run_workers(settings, os.environ)
        # Bound here, before Trio starts: a port in use is one line, not a traceback.
        fd = int(worker_fd) if worker_fd else bind_public_socket(settings).detach()
    except ConfigError as exc:
        return _configuration_error(exc)
    if not settings.redis_url:  # with REDIS_URL, Redis is the authority and the parent steps aside
        collaborators.shared = worker_shared_state(os.environ)  # a WORKERS worker asks its parent
    app = create_app(settings, collaborators)
    # Everything imported and built so far lives as long as the process: keep the collector from
    # scanning it again on every full collection.
    gc.collect()
    gc.freeze()
    import trio

    return trio.run(_run_server, app, settings, fd, worker_fd is None)


def _load_configuration() -> tuple[Settings, Collaborators] | int:
    """Settings and production collaborators, logging set up and warnings logged; or exit code 2
    (after one line on stderr) when the configuration is wrong."""
    from bridge.config import from_env, load_environment
    from bridge.errors import ConfigError
    from bridge.observe import setup_logging
    from bridge.web import default_collaborators

    try:
        settings = from_env(load_environment(os.environ))
        collaborators = default_collaborators(settings)
    except ConfigError as exc:
        return _configuration_error(exc)
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    log = logging.getLogger("bridge")
    for warning in settings.warnings:
        log.warning(warning)
    return settings, collaborators


def _configuration_error(exc: Exception) -> int:
    print(f"Configuration error: {exc}", file=sys.stderr)
    return 2


async def _run_server(app: BridgeApp, settings: Settings, fd: int, banner: bool) -> int:
    """Serve on the inherited or bound socket ``fd`` until drained; a WORKERS worker also drains
    when its parent is gone. Prints the banner unless a parent prints it."""
    import trio

    from bridge.server import serve
    from bridge.workers import PARENT_PID_ENV, drain_when_orphaned

    exit_code = 0
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        parent = os.environ.get(PARENT_PID_ENV)
        if parent:
            nursery.start_soon(drain_when_orphaned, int(parent), shutdown)

        async def serving(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal exit_code
            exit_code = await serve(app, settings, bind=[f"fd://{fd}"], shutdown=shutdown, task_status=task_status)
            nursery.cancel_scope.cancel()  # the orphan watcher has nothing left to watch

        await nursery.start(serving)
        if banner:
            print(f"Server running on http://localhost:{settings.port}", flush=True)
            print("\n".join(settings.describe()), flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
