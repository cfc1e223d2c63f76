"""Micro-benchmark: what the shared state costs per call set-up, in process vs via the WORKERS parent.

A call set-up here is what the bridge asks the shared state for one call: ``reserve`` (the
webhook), ``admit`` (the stream upgrade) and ``release`` (teardown) — three round trips with
the parent. The parent side runs in its own process (``--serve-fd``, as ``bridge/workers.py``
runs it), over a socketpair, so the figure includes the context switches of the real thing.
Not a load test: one process asking, sequentially and with some set-ups in flight at once.

    .venv/bin/python tools/bench_admission.py --runs 5 --calls 3000
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.fleet.parent import Authority, ParentState
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


async def _measure(kind: str, calls: int, concurrency: int, runs: int) -> list[float]:
    """Microseconds per set-up, one figure per run."""
    results: list[float] = []
    if kind == "in-process":
        state: SharedState = InProcessState(max(concurrency, 1) * 2)
        await _setups(state, min(calls, 500), concurrency, "warm")
        for run in range(runs):
            results.append(await _setups(state, calls, concurrency, f"r{run}") / calls * 1e6)
        return results
    ours, theirs = socket.socketpair()
    parent = await trio.lowlevel.open_process([sys.executable, __file__, "--serve-fd", str(theirs.fileno())],
                                              pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        client = ParentState(ours)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run, lambda call_id, reason: None)
            await _setups(client, min(calls, 500), concurrency, "warm")
            for run in range(runs):
                results.append(await _setups(client, calls, concurrency, f"r{run}") / calls * 1e6)
            nursery.cancel_scope.cancel()
    finally:
        parent.terminate()
        with trio.move_on_after(5):
            await parent.wait()
    return results


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
    print(f"{args.calls} call set-ups (reserve + admit + release) per run, median of {args.runs} runs")
    print("| shared state | in flight | us per set-up (median) | min-max | set-ups/s |")
    print("|---|---|---|---|---|")
    for kind in ("in-process", "WORKERS parent"):
        for concurrency in (1, 8):
            figures = trio.run(_measure, kind, args.calls, concurrency, args.runs)
            median = statistics.median(figures)
            print(f"| {kind} | {concurrency} | {median:.1f} | {min(figures):.1f}-{max(figures):.1f} |"
                  f" {1e6 / median:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
