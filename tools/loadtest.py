"""Load benchmark: the real server, N concurrent simulated calls, echo fake agent, all on loopback.

    python -m tools.loadtest                      # levels 25 50 100 150 200 300, 3 runs, 10 s each
    python -m tools.loadtest --quick              # levels 25 100, 1 run, 4 s
    python -m tools.loadtest --levels 100 --profile   # + py-spy profile of the server at 100 calls
    python -m tools.loadtest --vs "node tools/loadgen/refbridge.js"   # a second server, same run

For every level it starts one load-generator process (``tools/loadgen/loadgen.js``, Node + ``ws``:
the fake Twilio clients *and* the echo fake agent, so both ends share one clock) against one
long-lived server process (``python -m bridge serve`` with env vars), pins the server and the
generator to different cores when there are two, and measures:

- frames sent / received / lost each way (every payload is unique; frames dropped before
  ``session.ready`` and echoes of an interrupted reply flushed by a ``clear`` are exact and
  reported apart, not as loss);
- added latency p50 / p99 / max each way over the steady window, and ``clear`` latency after
  ``input.speech.started``;
- server CPU % over the steady window (``/proc/PID/stat``), peak RSS, RSS per call, RSS after the
  calls ended; the generator's own CPU and event-loop delay (a saturated generator is flagged);
- the highest level held with zero loss and p99 <= 20 ms both ways.

Writes ``bench-results/bench-<stamp>.json`` (+ ``.md`` with the table, + ``.svg``: CPU and p99
against calls, every server on the same axes, see ``tools/benchplot.py``) and prints the table.
See BENCHMARKS.md for the method and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools import benchplot

ROOT = Path(__file__).resolve().parent.parent
LOADGEN_DIR = ROOT / "tools" / "loadgen"
LOADGEN = LOADGEN_DIR / "loadgen.js"
RESULTS_DIR = ROOT / "bench-results"
SCHEMA_VERSION = 1
DEFAULT_LEVELS = (25, 50, 100, 150, 200, 300)
P99_LIMIT_MS = 20.0
GEN_SATURATED_PCT = 85.0  # generator CPU (of one core) above this: its numbers are suspect
NOISY_OTHER_PCT = 10.0  # other processes used more than this much of the server's core: noisy level
TARGETS = {
    "calls_held": 150,  # zero loss, p99 <= 20 ms each way, one core
    "p99_at_50_ms": 5.0,
    "rss_per_call_kb": 100.0,
    "clear_p99_at_100_ms": 5.0,
}
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- pure helpers (tested in tests/test_loadtest.py) --------------------------------------------


def percentile_from_hist(bins: Sequence[Sequence[float]], q: float, bin_ms: float = 0.01) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of a histogram ``[[bin, count], ...]`` (bin * bin_ms = ms).

    Returns ``None`` for an empty histogram. Bins need not be sorted.
    """
    ordered = sorted((float(b), int(c)) for b, c in bins if c > 0)
    total = sum(c for _, c in ordered)
    if total == 0:
        return None
    rank = max(1, -(-q * total // 100))  # ceil(q/100 * n), at least 1
    seen = 0
    for b, c in ordered:
        seen += c
        if seen >= rank:
            return round(b * bin_ms, 3)
    return round(ordered[-1][0] * bin_ms, 3)


def latency_summary(hist: dict[str, Any]) -> dict[str, float | int | None]:
    """p50 / p99 / max (ms) and n of a generator histogram."""
    bins = hist.get("bins") or []
    bin_ms = float(hist.get("bin_ms") or 0.01)
    n = int(hist.get("n") or 0)
    return {
        "n": n,
        "p50": percentile_from_hist(bins, 50, bin_ms),
        "p99": percentile_from_hist(bins, 99, bin_ms),
        "max": round(float(hist["max_ms"]), 3) if n else None,
    }


def median(values: Iterable[float | int | None]) -> float | None:
    """Median of the non-``None`` values, ``None`` if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def cpu_percent(ticks_before: int, ticks_after: int, wall_s: float, clk_tck: int = CLK_TCK) -> float:
    """CPU use (% of one core) from two ``utime+stime`` readings ``wall_s`` seconds apart."""
    if wall_s <= 0:
        return 0.0
    return 100.0 * (ticks_after - ticks_before) / clk_tck / wall_s


def level_ok(level: dict[str, Any], p99_limit_ms: float = P99_LIMIT_MS) -> bool:
    """Held: every call up, zero loss both ways, p99 within the limit both ways."""
    if level.get("calls_failed") or level.get("calls_closed_early"):
        return False
    if level["to_agent"]["lost"] or level["to_twilio"]["lost"]:
        return False
    for way in ("to_agent", "to_twilio"):
        p99 = level[way]["p99"]
        if p99 is None or p99 > p99_limit_ms:
            return False
    return True


def highest_held(levels: Sequence[dict[str, Any]], p99_limit_ms: float = P99_LIMIT_MS) -> int:
    """Highest level (calls) held; 0 if none. Levels above a failed one still count if they held
    (noise can fail a lower level); the table shows each level's verdict."""
    held = [lv["calls"] for lv in levels if level_ok(lv, p99_limit_ms)]
    return max(held) if held else 0


def summarise_level(raw: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """One level's record: the generator's raw result reduced to numbers, plus server measurements."""
    ta, tt, clr = raw["to_agent"], raw["to_twilio"], raw["clear"]
    calls = int(raw["calls"])
    counters = raw.get("counters", {})
    rec: dict[str, Any] = {
        "calls": calls,
        "duration_s": raw["duration_s"],
        "calls_failed": counters.get("calls_failed", 0),
        "calls_closed_early": counters.get("calls_closed_early", 0),
        "to_agent": {
            "sent": ta["sent"],
            "received": ta["received"],
            "lost": ta["lost"],
            "pre_ready": ta["pre_ready"],
            "duplicate": ta["duplicate"],
            "corrupt": ta["corrupt"],
            **latency_summary(ta["lat"]),
            "max_incl_ramp": round(float(ta["max_all_ms"]), 3),
        },
        "to_twilio": {
            "sent": tt["sent"],
            "received": tt["received"],
            "lost": tt["lost"],
            "cleared": tt["cleared"],
            "duplicate": tt["duplicate"],
            "corrupt": tt["corrupt"],
            **latency_summary(tt["lat"]),
            "max_incl_ramp": round(float(tt["max_all_ms"]), 3),
        },
        "clear": {
            "speech_started": clr["speech_sent"],
            "clears": clr["clears"],
            "unmatched": clr["unmatched"],
            "missing": clr["missing"],
            **latency_summary(clr["lat"]),
        },
        "setup_ms": latency_summary(raw["setup"]),
        "gen_loop_delay_ms": {k: round(float(v), 3) for k, v in raw.get("gen_loop_delay_ms", {}).items()},
        "hangup_ms": round(float(raw.get("hangup_ms", 0.0)), 1),
        "failures": raw.get("failures", []),
        **server,
    }
    rec["cpu_per_call_pct"] = round(rec["server_cpu_pct"] / calls, 4) if calls else None
    base = rec.get("rss_before_kb")
    peak = rec.get("rss_peak_kb")
    rec["rss_per_call_kb"] = round((peak - base) / calls, 1) if calls and base and peak else None
    rec["gen_saturated"] = bool(rec.get("gen_cpu_pct", 0.0) > GEN_SATURATED_PCT)
    rec["noisy"] = bool((rec.get("server_core_other_pct") or 0.0) > NOISY_OTHER_PCT)
    rec["held"] = level_ok(rec)
    return rec


_MEDIAN_PATHS = (
    ("to_agent", "lost"),
    ("to_agent", "pre_ready"),
    ("to_agent", "p50"),
    ("to_agent", "p99"),
    ("to_agent", "max"),
    ("to_twilio", "lost"),
    ("to_twilio", "cleared"),
    ("to_twilio", "p50"),
    ("to_twilio", "p99"),
    ("to_twilio", "max"),
    ("clear", "p50"),
    ("clear", "p99"),
    ("clear", "max"),
    ("server_cpu_pct",),
    ("cpu_per_call_pct",),
    ("gen_cpu_pct",),
    ("server_core_other_pct",),
    ("rss_peak_kb",),
    ("rss_per_call_kb",),
    ("rss_after_kb",),
    ("rss_settled_kb",),
    ("rss_before_kb",),
    ("calls_failed",),
    ("calls_closed_early",),
)


def _get(rec: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = rec
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def median_levels(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per level (by call count), the median of each headline metric over the runs; ``held`` is
    recomputed from the medians, and ``runs_held`` counts the runs that held on their own."""
    by_calls: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        for rec in run:
            by_calls.setdefault(int(rec["calls"]), []).append(rec)
    out = []
    for calls in sorted(by_calls):
        recs = by_calls[calls]
        merged: dict[str, Any] = {"calls": calls, "runs": len(recs)}
        for path in _MEDIAN_PATHS:
            value = median(_get(r, path) for r in recs)
            target = merged
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = round(value, 4) if isinstance(value, float) else value
        merged["runs_held"] = sum(1 for r in recs if r.get("held"))
        merged["gen_saturated"] = any(r.get("gen_saturated") for r in recs)
        merged["noisy_runs"] = sum(1 for r in recs if r.get("noisy"))
        merged["held"] = level_ok(merged)
        out.append(merged)
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_HEADER = (
    "server",
    "calls",
    "lost tw>ag",
    "lost ag>tw",
    "pre-ready",
    "cleared",
    "tw>ag p50/p99/max ms",
    "ag>tw p50/p99/max ms",
    "clear p99 ms",
    "srv CPU %",
    "CPU %/call",
    "gen CPU %",
    "other on srv core %",
    "RSS peak MB",
    "RSS KB/call",
    "RSS after MB",
    "RSS settled MB",
    "held",
)


def table_rows(label: str, levels: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for lv in levels:
        ta, tt, clr = lv["to_agent"], lv["to_twilio"], lv["clear"]
        verdict = "yes" if lv.get("held") else "NO"
        if "runs_held" in lv and lv.get("runs", 1) > 1:
            verdict += f" ({lv['runs_held']}/{lv['runs']})"
        if lv.get("gen_saturated"):
            verdict += " GEN-SAT"
        if lv.get("noisy"):
            verdict += " NOISY"
        elif lv.get("noisy_runs"):
            verdict += f" noisy={lv['noisy_runs']}"
        if lv.get("calls_failed") or lv.get("calls_closed_early"):
            verdict += f" fail={lv.get('calls_failed', 0)}+{lv.get('calls_closed_early', 0)}"
        rows.append(
            [
                label,
                str(lv["calls"]),
                _fmt(ta["lost"], 0),
                _fmt(tt["lost"], 0),
                _fmt(ta.get("pre_ready"), 0),
                _fmt(tt.get("cleared"), 0),
                f"{_fmt(ta['p50'], 2)}/{_fmt(ta['p99'], 2)}/{_fmt(ta['max'])}",
                f"{_fmt(tt['p50'], 2)}/{_fmt(tt['p99'], 2)}/{_fmt(tt['max'])}",
                _fmt(clr["p99"], 2),
                _fmt(lv.get("server_cpu_pct")),
                _fmt(lv.get("cpu_per_call_pct"), 3),
                _fmt(lv.get("gen_cpu_pct")),
                _fmt(lv.get("server_core_other_pct")),
                _fmt(None if lv.get("rss_peak_kb") is None else lv["rss_peak_kb"] / 1024),
                _fmt(lv.get("rss_per_call_kb")),
                _fmt(None if lv.get("rss_after_kb") is None else lv["rss_after_kb"] / 1024),
                _fmt(None if lv.get("rss_settled_kb") is None else lv["rss_settled_kb"] / 1024),
                verdict,
            ]
        )
    return rows


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = TABLE_HEADER, markdown: bool = False) -> str:
    """Aligned plain-text table, or a Markdown table with ``markdown=True``."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


REQUIRED_LEVEL_KEYS = (
    "calls",
    "to_agent",
    "to_twilio",
    "clear",
    "server_cpu_pct",
    "cpu_per_call_pct",
    "gen_cpu_pct",
    "rss_peak_kb",
    "rss_per_call_kb",
    "rss_after_kb",
    "held",
)


def validate_results(doc: dict[str, Any]) -> list[str]:
    """Problems with a results document (empty list = valid). The JSON schema, in code."""
    problems = []
    for key in ("schema", "command", "machine", "config", "servers"):
        if key not in doc:
            problems.append(f"missing top-level {key!r}")
    if doc.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA_VERSION}")
    for label, server in (doc.get("servers") or {}).items():
        for key in ("command", "runs", "median", "highest_held", "highest_held_per_run", "targets"):
            if key not in server:
                problems.append(f"server {label!r}: missing {key!r}")
        for i, run in enumerate(server.get("runs", [])):
            for lv in run:
                for key in REQUIRED_LEVEL_KEYS:
                    if key not in lv:
                        problems.append(f"server {label!r} run {i} level {lv.get('calls')}: missing {key!r}")
                for way in ("to_agent", "to_twilio"):
                    for key in ("sent", "received", "lost", "p50", "p99", "max"):
                        if key not in lv.get(way, {}):
                            problems.append(f"server {label!r} run {i} level {lv.get('calls')}: missing {way}.{key}")
    return problems


def target_report(median_levels_: Sequence[dict[str, Any]], held: int) -> dict[str, Any]:
    """The issue's targets against the median figures (``None`` where a level was not run)."""
    by_calls = {lv["calls"]: lv for lv in median_levels_}
    at50, at100 = by_calls.get(50), by_calls.get(100)
    p99_50 = max(at50["to_agent"]["p99"] or 0, at50["to_twilio"]["p99"] or 0) if at50 else None
    per_call = [lv["rss_per_call_kb"] for lv in median_levels_ if lv.get("rss_per_call_kb") is not None]
    clear100 = at100["clear"]["p99"] if at100 else None
    return {
        "calls_held": {"target": TARGETS["calls_held"], "value": held, "met": held >= TARGETS["calls_held"]},
        "p99_at_50_ms": {
            "target": TARGETS["p99_at_50_ms"],
            "value": p99_50,
            "met": None if p99_50 is None else p99_50 <= TARGETS["p99_at_50_ms"],
        },
        "rss_per_call_kb": {
            "target": TARGETS["rss_per_call_kb"],
            "value": max(per_call) if per_call else None,
            "met": None if not per_call else max(per_call) <= TARGETS["rss_per_call_kb"],
        },
        "clear_p99_at_100_ms": {
            "target": TARGETS["clear_p99_at_100_ms"],
            "value": clear100,
            "met": None if clear100 is None else clear100 <= TARGETS["clear_p99_at_100_ms"],
        },
    }


_LINE_NO = re.compile(r":\d+\)$")
_PACKAGES = (
    ("trio_websocket/", "trio-websocket"),
    ("trio/", "trio (scheduler, sockets, channels, cancel scopes)"),
    ("hypercorn/", "hypercorn"),
    ("wsproto/", "wsproto"),
    ("h11/", "h11"),
    ("bridge/", "bridge"),
    ("quart", "quart"),
    ("contextlib.py", "contextlib (fail_after/move_on_after wrappers)"),
    ("logging/", "logging"),
    ("orjson", "orjson"),
)


def frame_function(frame: str) -> str:
    """``'send (a/b.py:12)'`` -> ``'send (a/b.py)'``: one entry per function, not per line."""
    return _LINE_NO.sub(")", frame)


def frame_package(frame: str) -> str:
    inside = frame[frame.rfind("(") + 1 :]
    for needle, name in _PACKAGES:
        if needle in inside:
            return name
    return "other (stdlib, attrs, ...)"


def collapse_profile(lines: Iterable[str], top: int = 25) -> dict[str, Any]:
    """Top functions of a py-spy ``--format raw`` (collapsed stacks) profile, by function (line
    numbers folded).

    Returns ``{"samples": n, "self": [...], "total": [...], "packages": [...]}``; the lists hold
    ``(name, samples, percent)``. ``total`` counts a function once per stack it appears in;
    ``packages`` is self time by library.
    """
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    package_counts: dict[str, int] = {}
    n = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [frame_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        n += count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        package = frame_package(frames[-1])
        package_counts[package] = package_counts.get(package, 0) + count
        for frame in set(frames):
            total_counts[frame] = total_counts.get(frame, 0) + count

    def ranked(counts: dict[str, int], limit: int) -> list[tuple[str, int, float]]:
        items = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return [(frame, c, round(100.0 * c / n, 1) if n else 0.0) for frame, c in items]

    return {
        "samples": n,
        "self": ranked(self_counts, top),
        "total": ranked(total_counts, top),
        "packages": ranked(package_counts, len(package_counts)),
    }


# --- process measurements -----------------------------------------------------------------------


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (clock ticks), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def core_ticks(cpu: int) -> tuple[int, int] | None:
    """(busy, total) jiffies of one CPU core from /proc/stat."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
                return busy, busy + v[3] + v[4]  # + idle iowait
    except (OSError, ValueError):
        return None
    return None


def core_other_pct(before: tuple[int, int] | None, after: tuple[int, int] | None, own_pct: float) -> float | None:
    """How busy a core was with *other* work (% of the core) while a process used ``own_pct``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy_pct = 100.0 * (after[0] - before[0]) / (after[1] - before[1])
    return round(max(0.0, busy_pct - own_pct), 1)


def proc_rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread; ``peak`` since the last reset."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = proc_rss_kb(self.pid)
            if rss is not None and rss > self.peak:
                self.peak = rss


def pin(pid: int, cpus: set[int] | None) -> bool:
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(pid, cpus)
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = shutil.which("node")
    node_version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip() if node else None
    git = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "bridge"], cwd=ROOT, capture_output=True, text=True)
        git = {"rev": rev.stdout.strip(), "bridge_dirty": bool(dirty.stdout.strip())}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "node": node_version,
        "kernel": platform.release(),
        "git": git,
        "loadavg_at_start": load,
    }


# --- orchestration --------------------------------------------------------------------------------


def ensure_loadgen() -> str:
    """The node binary, with ``tools/loadgen/node_modules`` installed (``npm ci``) if missing."""
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node (>= 18) is needed for the load generator: install Node.js")
    if not (LOADGEN_DIR / "node_modules" / "ws" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("npm is needed once to install tools/loadgen's dependencies (npm ci)")
        print("installing the load generator's dependencies: npm ci --prefix tools/loadgen", flush=True)
        subprocess.run([npm, "ci", "--prefix", str(LOADGEN_DIR), "--no-audit", "--no-fund"], check=True)
    return node


@dataclass
class ServerSpec:
    label: str
    command: list[str]


@dataclass
class Server:
    spec: ServerSpec
    port: int
    agent_port: int
    cpus: set[int] | None
    proc: subprocess.Popen[bytes] | None = None
    pinned: bool = False
    log_path: Path | None = None
    _log: Any = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ASSEMBLYAI_", "BRIDGE_"))}
        base = f"http://127.0.0.1:{self.port}"
        env.update(
            {
                "ASSEMBLYAI_API_KEY": "bench-key",
                "HOSTNAME": base,
                "PUBLIC_HOSTNAME": base,
                "PORT": str(self.port),
                "BIND_HOST": "127.0.0.1",
                "VOICE_AGENT_URL": f"ws://127.0.0.1:{self.agent_port}/v1/ws",
                "MAX_CONCURRENT_CALLS": "1000",
                "LOG_LEVEL": "WARNING",
                "STREAM_TOKEN_SECRET": secrets.token_hex(24),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"server-{self.spec.label}-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.spec.command, cwd=ROOT, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pinned = pin(self.proc.pid, self.cpus)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.spec.label!r} exited at start-up: see {self.log_path}")
            if self.health() is not None:
                return
            time.sleep(0.1)
        raise SystemExit(f"server {self.spec.label!r} did not answer /healthz within 30 s: see {self.log_path}")

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                body = resp.read().decode()
        except (OSError, ValueError):
            return None
        try:
            parsed = json.loads(body)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            h = self.health()
            if h is not None and int(h.get("active_calls", 0) or 0) == 0:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


def run_level(
    server: Server,
    node: str,
    calls: int,
    *,
    duration_s: float,
    gen_cpus: set[int] | None,
    speech_every_s: float,
    ramp_rate: float,
    profile: dict[str, Any] | None = None,
    settle_s: float = 0.0,
) -> dict[str, Any]:
    """One level against a running server: returns the level record. With ``settle_s``, RSS is
    read again that long after the calls ended (deadlines of finished calls have passed)."""
    assert server.proc is not None
    pid = server.proc.pid
    server.wait_idle()
    time.sleep(0.5)
    rss_before = proc_rss_kb(pid)
    ramp_s = max(1.0, calls / ramp_rate)
    cmd = [
        node,
        str(LOADGEN),
        "--server",
        f"http://127.0.0.1:{server.port}",
        "--agent-port",
        str(server.agent_port),
        "--calls",
        str(calls),
        "--duration",
        str(duration_s),
        "--ramp",
        str(ramp_s),
        "--speech-every",
        str(speech_every_s),
    ]
    gen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pin(gen.pid, gen_cpus)
    marks: dict[str, tuple[float, int | None, int | None, tuple[int, int] | None]] = {}
    server_core = min(server.cpus) if server.cpus else None
    raw: dict[str, Any] | None = None
    spy: subprocess.Popen[bytes] | None = None
    assert gen.stdout is not None
    with RssSampler(pid) as rss:
        for line in gen.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            event = msg.get("event")
            if event in ("steady_start", "steady_end"):
                core = core_ticks(server_core) if server_core is not None else None
                marks[event] = (time.monotonic(), proc_cpu_ticks(pid), proc_cpu_ticks(gen.pid), core)
                if event == "steady_start" and profile is not None:
                    spy = start_profiler(profile, pid, duration_s, gen_cpus)
            elif event == "result":
                raw = msg
            elif event == "error":
                print(f"load generator failed: {msg.get('message')}", file=sys.stderr)
        gen.wait()
    if spy is not None:
        try:
            spy.wait(timeout=duration_s + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
    if raw is None:
        err = gen.stderr.read() if gen.stderr else ""
        raise SystemExit(f"the load generator produced no result (exit {gen.returncode}): {err[-2000:]}")
    idle = server.wait_idle()
    time.sleep(1.0)
    rss_after = proc_rss_kb(pid)
    rss_settled = None
    if settle_s > 0:
        time.sleep(settle_s)
        rss_settled = proc_rss_kb(pid)
    server_cpu = gen_cpu = 0.0
    other: float | None = None
    if "steady_start" in marks and "steady_end" in marks:
        (t0, s0, g0, c0), (t1, s1, g1, c1) = marks["steady_start"], marks["steady_end"]
        if s0 is not None and s1 is not None:
            server_cpu = cpu_percent(s0, s1, t1 - t0)
        if g0 is not None and g1 is not None:
            gen_cpu = cpu_percent(g0, g1, t1 - t0)
        other = core_other_pct(c0, c1, server_cpu)
    measured = {
        "server_cpu_pct": round(server_cpu, 2),
        "gen_cpu_pct": round(gen_cpu, 2),
        "server_core_other_pct": other,
        "rss_before_kb": rss_before,
        "rss_peak_kb": max(rss.peak, rss_before or 0) or None,
        "rss_after_kb": rss_after,
        "rss_settled_kb": rss_settled,
        "server_idle_after": idle,
    }
    return summarise_level(raw, measured)


def start_profiler(
    profile: dict[str, Any], pid: int, duration_s: float, cpus: set[int] | None
) -> subprocess.Popen[bytes]:
    spy = profile["py_spy"]
    out = profile["raw_path"]
    # Blocking sampling (py-spy pauses the process ~100x/s): --nonblocking tears trio's stacks apart.
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))), "--rate", "100"]
    cmd += ["--format", "raw", "--output", str(out)]
    if profile.get("idle"):
        cmd.append("--idle")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pin(proc.pid, cpus)
    return proc


def warm_up(server: Server, node: str, gen_cpus: set[int] | None) -> None:
    """A few calls once, so lazy imports and first-call allocations are not billed to level 1."""
    run_level(server, node, 3, duration_s=1.0, gen_cpus=gen_cpus, speech_every_s=0.5, ramp_rate=100)


def print_profile_summary(raw_path: Path, top: int = 25) -> str:
    ranked = collapse_profile(raw_path.read_text().splitlines(), top=top)
    lines = [f"py-spy profile: {ranked['samples']} samples ({raw_path.name})", "", "self time by library:"]
    lines += [f"  {pct:5.1f}%  {name}" for name, _, pct in ranked["packages"]]
    lines += ["", "top self time (by function):"]
    lines += [f"  {pct:5.1f}%  {frame}" for frame, _, pct in ranked["self"]]
    lines += ["", "top total (inclusive) time:"]
    lines += [f"  {pct:5.1f}%  {frame}" for frame, _, pct in ranked["total"]]
    text = "\n".join(lines)
    print(text)
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.replace(",", " ").split()],
        default=None,
        help="concurrent call levels, e.g. '25,50,100' (default 25 50 100 150 200 300)",
    )
    p.add_argument("--duration", type=float, default=None, help="steady seconds per level (default 10)")
    p.add_argument("--runs", type=int, default=None, help="runs per server; headline = median (default 3)")
    p.add_argument("--quick", action="store_true", help="levels 25 100, 4 s, 1 run")
    p.add_argument(
        "--vs",
        action="append",
        default=[],
        metavar="CMD",
        help="another server command to measure in the same run (repeatable), e.g. 'node tools/loadgen/refbridge.js'",
    )
    p.add_argument(
        "--server-cmd", default=None, help="the main server command (default: this venv's python -m bridge serve)"
    )
    p.add_argument("--speech-every", type=float, default=2.0, help="seconds between input.speech.started per call")
    p.add_argument("--ramp-rate", type=float, default=100.0, help="new calls per second while ramping up")
    p.add_argument("--no-warmup", action="store_true", help="skip the 3-call warm-up before the first level")
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="after each level, read RSS again this many seconds after the calls ended (default: off)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin server and generator to separate cores")
    p.add_argument(
        "--profile", action="store_true", help="py-spy the main server during the level nearest 100 calls (first run)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON path (default bench-results/bench-<stamp>.json)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.levels = args.levels or [25, 100]
        args.duration = args.duration or 4.0
        args.runs = args.runs or 1
    args.levels = args.levels or list(DEFAULT_LEVELS)
    args.duration = args.duration or 10.0
    args.runs = args.runs or 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    node = ensure_loadgen()
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS_DIR / f"bench-{stamp}.json"
    log_dir = RESULTS_DIR / "logs"
    log_dir.mkdir(exist_ok=True)

    main_cmd = shlex.split(args.server_cmd) if args.server_cmd else [sys.executable, "-m", "bridge", "serve"]
    specs = [ServerSpec("bridge", main_cmd)]
    for i, cmd in enumerate(args.vs):
        specs.append(ServerSpec(f"vs{i + 1}" if len(args.vs) > 1 else "vs", shlex.split(cmd)))

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpus: set[int] | None
    gen_cpus: set[int] | None
    if len(cpus) >= 2 and not args.no_pin:
        server_cpus, gen_cpus = {cpus[0]}, {cpus[1]}
        pin(os.getpid(), gen_cpus)
        pinning = f"server on CPU {cpus[0]}, generator (and this script) on CPU {cpus[1]}"
    else:
        server_cpus = gen_cpus = None
        pinning = "not pinned" + (" (--no-pin)" if args.no_pin else f" (only {len(cpus)} CPU)")
    machine = machine_info()
    print(
        f"machine: {machine['nproc']} CPU {machine['cpu_model']}, Python {machine['python']}, node {machine['node']}; "
        f"{pinning}; load average {machine['loadavg_at_start']}",
        flush=True,
    )

    py_spy = shutil.which("py-spy") or (
        str(Path(sys.executable).parent / "py-spy") if (Path(sys.executable).parent / "py-spy").exists() else None
    )
    if args.profile and py_spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    profile_level = min(args.levels, key=lambda c: abs(c - 100)) if args.profile else None

    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "command": "python -m tools.loadtest "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": {
            "levels": args.levels,
            "duration_s": args.duration,
            "runs": args.runs,
            "speech_every_s": args.speech_every,
            "ramp_rate_calls_per_s": args.ramp_rate,
            "pinning": pinning,
            "p99_limit_ms": P99_LIMIT_MS,
            "generator": "node tools/loadgen/loadgen.js (ws)",
        },
        "servers": {s.label: {"command": s.command, "runs": []} for s in specs},
    }
    profile_text = None
    try:
        for run in range(args.runs):
            servers = [Server(s, free_port(), free_port(), server_cpus) for s in specs]
            try:
                for srv in servers:
                    srv.start(log_dir)
                    if not args.no_warmup:
                        warm_up(srv, node, gen_cpus)
                    results["servers"][srv.spec.label]["runs"].append([])
                    results["servers"][srv.spec.label].setdefault("rss_baseline_kb", []).append(
                        proc_rss_kb(srv.proc.pid) if srv.proc else None
                    )
                # Interleave the servers level by level so they see the same background noise.
                for calls in args.levels:
                    for srv in servers:
                        profile: dict[str, Any] | None = None
                        if run == 0 and calls == profile_level and srv.spec.label == "bridge":
                            profile = {"py_spy": py_spy, "raw_path": RESULTS_DIR / f"profile-{calls}-{stamp}.txt"}
                        print(
                            f"run {run + 1}/{args.runs} {srv.spec.label}: {calls} calls x {args.duration:g} s"
                            + (" (profiling)" if profile else "")
                            + " ...",
                            flush=True,
                        )
                        rec = run_level(
                            srv,
                            node,
                            calls,
                            duration_s=args.duration,
                            gen_cpus=gen_cpus,
                            speech_every_s=args.speech_every,
                            ramp_rate=args.ramp_rate,
                            profile=profile,
                            settle_s=args.settle,
                        )
                        results["servers"][srv.spec.label]["runs"][-1].append(rec)
                        print(format_table(table_rows(srv.spec.label, [rec])), flush=True)
                        if rec["failures"]:
                            print("  failures: " + "; ".join(rec["failures"][:3]), flush=True)
                        raw_path = Path(profile["raw_path"]) if profile is not None else None
                        if raw_path is not None and raw_path.exists():
                            profile_text = print_profile_summary(raw_path)
                            results["profile"] = {
                                "calls": calls,
                                "raw": str(raw_path),
                                **collapse_profile(raw_path.read_text().splitlines()),
                            }
            finally:
                for srv in servers:
                    srv.stop()
    finally:
        rows: list[list[str]] = []
        for label, server_doc in results["servers"].items():
            runs = [r for r in server_doc["runs"] if r]
            med = median_levels(runs)
            server_doc["median"] = med
            per_run = [highest_held(r) for r in runs]
            server_doc["highest_held_per_run"] = per_run
            server_doc["highest_held"] = statistics.median_low(per_run) if per_run else 0
            server_doc["targets"] = (
                target_report(med, int(server_doc["highest_held"] or 0)) if label == "bridge" else None
            )
            rows += table_rows(label, med)
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        out.write_text(json.dumps(results, indent=1))
        md = format_table(rows, markdown=True)
        held_line = ", ".join(
            f"{k}: {v['highest_held']} (runs: {v['highest_held_per_run']})" for k, v in results["servers"].items()
        )
        md_text = (
            f"Command: `{results['command']}`  \nMachine: {machine['nproc']} CPU {machine['cpu_model']}, "
            f"Python {machine['python']}, node {machine['node']}, {pinning}  \n"
            f"Median of {args.runs} run(s), {args.duration:g} s steady per level.\n\n{md}\n\n"
            f"Highest level held (zero loss, p99 <= {P99_LIMIT_MS:g} ms both ways): {held_line}\n"
        )
        if profile_text:
            md_text += "\n```\n" + profile_text + "\n```\n"
        out.with_suffix(".md").write_text(md_text)
        out.with_suffix(".svg").write_text(benchplot.render_svg(results))
        print()
        print(f"median of {args.runs} run(s):")
        print(format_table(rows))
        print(f"highest level held: {held_line}")
        targets = results["servers"].get("bridge", {}).get("targets")
        if targets:
            for name, t in targets.items():
                verdict = "-" if t["met"] is None else ("met" if t["met"] else "NOT met")
                print(f"  target {name}: {t['value']} (target {t['target']}): {verdict}")
        print(f"results: {out} (+ {out.with_suffix('.md').name}, {out.with_suffix('.svg').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
