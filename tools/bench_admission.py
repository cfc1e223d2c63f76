"""Micro-benchmark: what the shared state costs per call set-up: in process, via the WORKERS
parent, and in Redis (REDIS_URL).

A call set-up here is what the bridge asks the shared state for one call: ``reserve`` (the
webhook), ``admit`` (the stream upgrade) and ``release`` (teardown) — three round trips with
the parent, or three Lua scripts in Redis. The parent side runs in its own process
(``--serve-fd``, as ``bridge/workers.py`` runs it), over a socketpair; Redis is a throw-away
local ``redis-server`` (no persistence) on loopback TCP, with a cluster cap, so both figures
include the context switches of the real thing.
Not a load test: one process asking, sequentially and with some set-ups in flight at once. Wall
time per set-up depends on what else the machine runs; CPU per set-up (the asking process's and
the parent's or redis-server's, from ``/proc``: Linux only) is what every set-up costs the machine.

    .venv/bin/python tools/bench_admission.py --runs 5 --calls 3000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.fleet.parent import Authority, ParentState
from bridge.fleet.redis_state import RedisState
from bridge.fleet.shared import InProcessState, SharedState, Verdict


async def _setups(state: SharedState, calls: int, concurrency: int, prefix: str) -> float:
    """Seconds for ``calls`` set-ups, ``concurrency`` at a time."""
    expires_at = time.time() + 3600
    per_task = calls // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            token = f"{prefix}-{w}-{i}"
            assert await state.reserve(token, expires_at=expires_at)
            admitted = await state.admit(token, call_id=f"c{w}-{i}", call_sid=f"CA{w}-{i}", expires_at=expires_at)
            assert admitted.verdict is Verdict.ADMITTED
            await state.release(f"c{w}-{i}")

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    return time.perf_counter() - started


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of this process, plus of ``pid`` (Linux ``/proc``) if given."""
    total = time.process_time()
    if pid is not None:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _runs(
    state: SharedState, calls: int, concurrency: int, runs: int, pid: int | None
) -> list[tuple[float, float]]:
    """(wall, CPU) microseconds per set-up, one pair per run; CPU counts both processes."""
    await _setups(state, min(calls, 500), concurrency, "warm")
    results: list[tuple[float, float]] = []
    for run in range(runs):
        cpu = _cpu_s(pid)
        wall = await _setups(state, calls, concurrency, f"r{run}")
        results.append((wall / calls * 1e6, (_cpu_s(pid) - cpu) / calls * 1e6))
    return results


async def _measure(kind: str, calls: int, concurrency: int, runs: int) -> list[tuple[float, float]]:
    """(wall, CPU) microseconds per set-up, one pair per run."""
    if kind == "in-process":
        return await _runs(InProcessState(max(concurrency, 1) * 2), calls, concurrency, runs, None)
    if kind == "Redis":
        return await _measure_redis(calls, concurrency, runs)
    ours, theirs = socket.socketpair()
    parent = await trio.lowlevel.open_process([sys.executable, __file__, "--serve-fd", str(theirs.fileno())],
                                              pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        client = ParentState(ours)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run, lambda call_id, reason: None)
            results = await _runs(client, calls, concurrency, runs, parent.pid)
            nursery.cancel_scope.cancel()
        return results
    finally:
        parent.terminate()
        with trio.move_on_after(5):
            await parent.wait()


async def _measure_redis(calls: int, concurrency: int, runs: int) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = await trio.lowlevel.open_process(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with trio.fail_after(10):
                while True:
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.01)
            state = RedisState.from_url(f"redis://127.0.0.1:{port}/0", max_calls=concurrency * 2,
                                        cluster_max_calls=100_000, lease_s=15.0)  # fmt: skip
            async with trio.open_nursery() as nursery:
                await nursery.start(state.run, lambda call_id, reason: None)
                assert state.up, "redis-server did not answer"
                results = await _runs(state, calls, concurrency, runs, server.pid)
                nursery.cancel_scope.cancel()
            return results
        finally:
            server.kill()
            with trio.move_on_after(5):
                await server.wait()


def _serve(fd: int) -> None:
    async def main() -> None:
        sock = socket.socket(fileno=fd)
        await Authority(1000).serve_worker("bench", trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    trio.run(main)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd is not None:
        _serve(args.serve_fd)
        return 0
    print(f"{args.calls} call set-ups (reserve + admit + release) per run, median of {args.runs} runs;"
          " CPU is both processes' (the asking one and the parent or redis-server)")
    print("| shared state | in flight | wall us per set-up (median) | min-max | set-ups/s | CPU us per set-up |")
    print("|---|---|---|---|---|---|")
    for kind in ("in-process", "WORKERS parent", "Redis"):
        for concurrency in (1, 8):
            figures = trio.run(_measure, kind, args.calls, concurrency, args.runs)
            walls = [wall for wall, _ in figures]
            median = statistics.median(walls)
            cpu = statistics.median(c for _, c in figures)
            print(f"| {kind} | {concurrency} | {median:.1f} | {min(walls):.1f}-{max(walls):.1f} |"
                  f" {1e6 / median:,.0f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
