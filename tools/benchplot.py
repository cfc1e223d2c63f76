"""SVG plot of a load-benchmark results document (``tools/loadtest.py``'s JSON), hand-written.

    python -m tools.benchplot bench-results/bench-X.json            # writes bench-results/bench-X.svg
    python -m tools.benchplot bench-results/bench-X.json -o out.svg

Two panels over one x axis (concurrent calls), every server of the run on the same axes, one
colour each:

- top: server CPU over the steady window, % of one core (linear; a dashed line at 100 % = one
  core full);
- bottom: p99 added latency in ms, the **worse of the two directions** (Twilio -> agent and
  agent -> Twilio) at each level, on a log scale (held levels sit at 1-5 ms, saturated ones at
  hundreds or thousands of ms, and both must stay readable), with the 20 ms target as a dashed
  line.

Points are the per-level medians (``servers.<label>.median``). A filled marker is a level that
held (zero loss, p99 within the target both ways), a hollow one a level that did not. A missing
value (``None``) is skipped: the line joins the neighbouring points. Only the standard library:
the plot is a pure function of the document (``render_svg``), so it is table-tested and can
re-plot any old result.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

P99_TARGET_MS = 20.0  # fallback when the document's config does not say (loadtest.P99_LIMIT_MS)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
TARGET_COLOUR = "#c00000"

WIDTH = 760
LEFT = 72  # room for the y tick labels and the rotated axis title
RIGHT = 24
TOP = 66  # title, subtitle and the command line
LEGEND_ROW = 18
PANEL_H = 200
PANEL_GAP = 56  # the top panel's x tick labels and the bottom panel's title
BOTTOM = 56  # x tick labels and the x axis title
LEGEND_COMMAND_CHARS = 72  # a --vs command can be a whole shell line; the JSON keeps it in full


@dataclass(frozen=True, slots=True)
class Point:
    calls: int
    cpu_pct: float | None
    p99_ms: float | None  # the worse of the two directions
    held: bool


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    command: str
    highest_held: int | None
    points: tuple[Point, ...]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def worse_p99(level: dict[str, Any]) -> float | None:
    """The larger p99 of the two directions; one direction's figure if only one has one."""
    values = [_number((level.get(way) or {}).get("p99")) for way in ("to_agent", "to_twilio")]
    present = [v for v in values if v is not None]
    return max(present) if present else None


def series_of(doc: dict[str, Any]) -> list[Series]:
    """One series per server, in the document's order, from its per-level medians."""
    out = []
    for label, server in (doc.get("servers") or {}).items():
        command = server.get("command") or []
        text = shlex.join(str(c) for c in command) if isinstance(command, list) else str(command)
        points = []
        for level in server.get("median") or []:
            calls = _number(level.get("calls"))
            if calls is None:
                continue
            points.append(
                Point(int(calls), _number(level.get("server_cpu_pct")), worse_p99(level), bool(level.get("held")))
            )
        held = _number(server.get("highest_held"))
        out.append(Series(str(label), text, None if held is None else int(held), tuple(sorted(points, key=_calls))))
    return out


def _calls(p: Point) -> int:
    return p.calls


def nice_step(span: float, target_ticks: int = 5) -> float:
    """A 1/2/5 x 10^k step giving about ``target_ticks`` intervals over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return float(m * mag)
    return float(10 * mag)


def linear_ticks(hi: float, target_ticks: int = 5, min_step: float = 0.0) -> list[float]:
    """Ticks from 0 to the first step at or above ``hi`` (the axis ends on a tick)."""
    step = max(nice_step(hi, target_ticks), min_step)
    n = max(1, math.ceil(hi / step - 1e-9))
    return [round(i * step, 10) for i in range(n + 1)]


def log_bounds(values: Sequence[float], target: float) -> tuple[float, float]:
    """Whole decades around the positive values and the target line, at least 0.1 ms below."""
    present = [v for v in values if v > 0] + [target]
    lo = 10 ** math.floor(math.log10(max(0.1, min(present))))
    hi = 10 ** math.ceil(math.log10(max(present)))
    if hi <= lo:
        hi = lo * 10
    return float(lo), float(hi)


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 per decade; only the decades when there are more than three of them."""
    decades = round(math.log10(hi / lo))
    ticks = []
    for k in range(decades + 1):
        base = lo * 10**k
        for m in (1, 2, 5) if decades <= 3 else (1,):
            if base * m <= hi * (1 + 1e-9):
                ticks.append(float(f"{base * m:.6g}"))
    return ticks


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things go: the two panels' pixel boxes and the data ranges they show."""

    legend_rows: int
    x_ticks: tuple[float, ...]  # from 0; the last one is the axis end
    cpu_ticks: tuple[float, ...]
    p99_lo: float
    p99_hi: float

    @property
    def x_max(self) -> float:
        return self.x_ticks[-1]

    @property
    def cpu_max(self) -> float:
        return self.cpu_ticks[-1]

    @property
    def plot_left(self) -> float:
        return float(LEFT)

    @property
    def plot_right(self) -> float:
        return float(WIDTH - RIGHT)

    @property
    def cpu_top(self) -> float:
        return float(TOP + LEGEND_ROW * self.legend_rows + 26)

    @property
    def cpu_bottom(self) -> float:
        return self.cpu_top + PANEL_H

    @property
    def p99_top(self) -> float:
        return self.cpu_bottom + PANEL_GAP

    @property
    def p99_bottom(self) -> float:
        return self.p99_top + PANEL_H

    @property
    def height(self) -> int:
        return int(self.p99_bottom + BOTTOM)

    def x(self, calls: float) -> float:
        return self.plot_left + (self.plot_right - self.plot_left) * calls / self.x_max

    def y_cpu(self, pct: float) -> float:
        return self.cpu_bottom - PANEL_H * pct / self.cpu_max

    def y_p99(self, ms: float) -> float:
        """Log scale; values below the axis are drawn on it."""
        frac = math.log10(max(ms, self.p99_lo) / self.p99_lo) / math.log10(self.p99_hi / self.p99_lo)
        return self.p99_bottom - PANEL_H * frac


def layout_of(series: Sequence[Series], target_ms: float = P99_TARGET_MS) -> Layout:
    points = [p for s in series for p in s.points]
    x_ticks = linear_ticks(max([p.calls for p in points if p.calls > 0], default=100), min_step=1)  # whole calls
    cpu_values = [p.cpu_pct for p in points if p.cpu_pct is not None]
    # always show the full core, with headroom so the one-core line is not the panel's border
    cpu_ticks = linear_ticks(1.1 * max([100.0, *cpu_values]), target_ticks=6)
    lo, hi = log_bounds([p.p99_ms for p in points if p.p99_ms is not None], target_ms)
    return Layout(
        legend_rows=max(1, len(series)) + 1,
        x_ticks=tuple(x_ticks),
        cpu_ticks=tuple(cpu_ticks),
        p99_lo=lo,
        p99_hi=hi,
    )


def _esc(text: str) -> str:
    """Safe in element text and in double-quoted attributes."""
    return escape(text, {'"': "&quot;"})


def _fmt(value: float) -> str:
    return f"{value:.6g}" if value < 1 else (f"{value:.0f}" if value == int(value) else f"{value:.1f}")


def _f(value: float) -> str:
    return f"{value:.1f}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _subtitle(doc: dict[str, Any]) -> str:
    machine = doc.get("machine") or {}
    config = doc.get("config") or {}
    parts = []
    if doc.get("started"):
        parts.append(str(doc["started"]))
    if machine.get("nproc"):
        parts.append(f"{machine['nproc']} CPU {machine.get('cpu_model') or ''}".strip())
    rev = (machine.get("git") or {}).get("rev")
    if rev:
        parts.append(f"git {rev}")
    if config.get("runs") and config.get("duration_s"):
        parts.append(f"median of {config['runs']} run(s) x {config['duration_s']:g} s steady per level")
    if config.get("pinning"):
        parts.append(str(config["pinning"]))
    return " \u00b7 ".join(parts)


def render_svg(doc: dict[str, Any]) -> str:
    """The whole plot as an SVG document (a string). Never raises on a partial document: a run
    stopped early plots what it has, a server without levels gets a legend entry and no line."""
    config = doc.get("config") or {}
    target = _number(config.get("p99_limit_ms")) or P99_TARGET_MS
    series = series_of(doc)
    lay = layout_of(series, target)
    w, h = WIDTH, lay.height
    left, right = lay.plot_left, lay.plot_right
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
        "<title>Load benchmark: server CPU and p99 latency against concurrent calls</title>",
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>',
        f'<text x="{left}" y="20" font-size="15" font-weight="bold">'
        "Load benchmark: server CPU and p99 added latency against concurrent calls</text>",
        f'<text x="{left}" y="37" font-size="10" fill="#555555">{_esc(_shorten(_subtitle(doc), 130))}</text>',
    ]
    if doc.get("command"):
        out.append(
            f'<text x="{left}" y="51" font-size="10" fill="#555555" '
            'font-family="DejaVu Sans Mono, monospace">'
            f"{_esc(_shorten(str(doc['command']), 110))}</text>"
        )

    # legend: one row per server, then the marker key
    y = TOP + 2.0
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        held = "" if s.highest_held is None else f" (highest held: {s.highest_held} calls)"
        out.append(
            f'<line x1="{left}" y1="{_f(y)}" x2="{left + 24}" y2="{_f(y)}" stroke="{colour}" stroke-width="2.5"/>'
        )
        out.append(f'<circle cx="{left + 12}" cy="{_f(y)}" r="3.5" fill="{colour}"/>')
        out.append(
            f'<text x="{left + 32}" y="{_f(y + 4)}"><tspan font-weight="bold">{_esc(s.label)}</tspan>'
            f"{_esc(held)}: "
            f'<tspan fill="#555555" font-family="DejaVu Sans Mono, monospace" font-size="10">'
            f"{_esc(_shorten(s.command, LEGEND_COMMAND_CHARS))}</tspan></text>"
        )
        y += LEGEND_ROW
    if not series:
        out.append(f'<text x="{left}" y="{_f(y + 4)}" fill="#555555">(no servers in this document)</text>')
        y += LEGEND_ROW
    out.append(
        f'<text x="{left}" y="{_f(y + 4)}" font-size="11" fill="#555555">filled marker: level held '
        f"(zero loss, p99 \u2264 {_fmt(target)} ms both ways); hollow: not held</text>"
    )

    # axes, grids and the reference lines of both panels
    for top, bottom, title in (
        (lay.cpu_top, lay.cpu_bottom, "server CPU, % of one core"),
        (lay.p99_top, lay.p99_bottom, "p99 added latency, ms (log scale), worse of the two directions"),
    ):
        out.append(f'<text x="{left}" y="{_f(top - 8)}" font-weight="bold">{_esc(title)}</text>')
        for t in lay.x_ticks:
            x = lay.x(t)
            out.append(
                f'<line x1="{_f(x)}" y1="{_f(top)}" x2="{_f(x)}" y2="{_f(bottom)}" stroke="#e6e6e6" class="grid"/>'
            )
            out.append(f'<text x="{_f(x)}" y="{_f(bottom + 16)}" text-anchor="middle">{_fmt(t)}</text>')
        out.append(
            f'<rect x="{_f(left)}" y="{_f(top)}" width="{_f(right - left)}" height="{PANEL_H}" '
            'fill="none" stroke="#333333"/>'
        )
    for t in lay.cpu_ticks:
        yy = lay.y_cpu(t)
        out.append(
            f'<line x1="{_f(left)}" y1="{_f(yy)}" x2="{_f(right)}" y2="{_f(yy)}" stroke="#e6e6e6" class="grid"/>'
        )
        out.append(f'<text x="{_f(left - 6)}" y="{_f(yy + 4)}" text-anchor="end">{_fmt(t)}</text>')
    y100 = lay.y_cpu(100.0)
    out.append(
        f'<line class="core" x1="{_f(left)}" y1="{_f(y100)}" x2="{_f(right)}" y2="{_f(y100)}" '
        'stroke="#777777" stroke-width="1.2" stroke-dasharray="6 4"/>'
    )
    out.append(f'<text x="{_f(left + 4)}" y="{_f(y100 - 4)}" fill="#555555">one core (100 %)</text>')
    for t in log_ticks(lay.p99_lo, lay.p99_hi):
        yy = lay.y_p99(t)
        out.append(
            f'<line x1="{_f(left)}" y1="{_f(yy)}" x2="{_f(right)}" y2="{_f(yy)}" stroke="#e6e6e6" class="grid"/>'
        )
        out.append(f'<text x="{_f(left - 6)}" y="{_f(yy + 4)}" text-anchor="end">{_fmt(t)}</text>')
    yt = lay.y_p99(target)
    out.append(
        f'<line class="target" x1="{_f(left)}" y1="{_f(yt)}" x2="{_f(right)}" y2="{_f(yt)}" '
        f'stroke="{TARGET_COLOUR}" stroke-width="1.5" stroke-dasharray="6 4"/>'
    )
    out.append(f'<text x="{_f(left + 4)}" y="{_f(yt - 4)}" fill="{TARGET_COLOUR}">p99 target {_fmt(target)} ms</text>')
    for top, bottom, label in (
        (lay.cpu_top, lay.cpu_bottom, "CPU, % of one core"),
        (lay.p99_top, lay.p99_bottom, "p99, ms"),
    ):
        mid = (top + bottom) / 2
        out.append(
            f'<text x="18" y="{_f(mid)}" text-anchor="middle" transform="rotate(-90 18 {_f(mid)})">{label}</text>'
        )
    out.append(
        f'<text x="{_f((left + right) / 2)}" y="{_f(lay.p99_bottom + 40)}" text-anchor="middle">concurrent calls</text>'
    )

    # the data: one polyline per server per metric, a marker per point
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        for metric, unit in (("cpu", "% CPU"), ("p99", "ms p99")):
            pts = []
            for p in s.points:
                value = p.cpu_pct if metric == "cpu" else p.p99_ms
                if value is None:
                    continue
                yy = lay.y_cpu(value) if metric == "cpu" else lay.y_p99(value)
                pts.append((lay.x(p.calls), yy, p, value))
            coords = " ".join(f"{_f(x)},{_f(yy)}" for x, yy, _, _ in pts)
            out.append(
                f'<polyline class="{metric}" data-server="{_esc(s.label)}" fill="none" stroke="{colour}" '
                f'stroke-width="2" stroke-linejoin="round" points="{coords}"/>'
            )
            for x, yy, p, value in pts:
                fill = colour if p.held else "#ffffff"
                tip = f"{s.label}, {p.calls} calls: {value:g} {unit}" + ("" if p.held else " (not held)")
                out.append(
                    f'<circle class="{metric}-point" cx="{_f(x)}" cy="{_f(yy)}" r="3.5" fill="{fill}" '
                    f'stroke="{colour}" stroke-width="1.5"><title>{_esc(tip)}</title></circle>'
                )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.benchplot", description="Plot a tools.loadtest results JSON.")
    p.add_argument("results", type=Path, help="a bench-results/*.json written by python -m tools.loadtest")
    p.add_argument("-o", "--out", type=Path, default=None, help="SVG path (default: the JSON's path with .svg)")
    args = p.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        print(f"benchplot: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict) or not isinstance(doc.get("servers"), dict):
        print(f"benchplot: {args.results} is not a tools.loadtest results document (no 'servers')", file=sys.stderr)
        return 2
    out = args.out or args.results.with_suffix(".svg")
    out.write_text(render_svg(doc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
