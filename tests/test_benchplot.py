"""tools/benchplot.py: the results document -> SVG, pure (no server, no files but the CLI's)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tools import benchplot as bp

SVG = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parent.parent


def _level(calls: int, cpu: float | None, p99_ag: float | None, p99_tw: float | None, held: bool) -> dict[str, Any]:
    return {
        "calls": calls,
        "server_cpu_pct": cpu,
        "to_agent": {"lost": 0, "p50": 1.0, "p99": p99_ag, "max": 9.0},
        "to_twilio": {"lost": 0, "p50": 1.0, "p99": p99_tw, "max": 9.0},
        "held": held,
    }


def _doc(servers: dict[str, list[dict[str, Any]]], commands: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """A results document shaped like tools.loadtest's (only what the plot reads, plus context)."""
    return {
        "schema": 1,
        "command": "python -m tools.loadtest --levels 50,100,150,175 --vs X",
        "started": "2026-11-25T10:00:00+0000",
        "machine": {"nproc": 2, "cpu_model": "Test CPU", "git": {"rev": "8447407"}},
        "config": {"runs": 3, "duration_s": 8.0, "p99_limit_ms": 20.0, "pinning": "server on CPU 0"},
        "servers": {
            label: {
                "command": (commands or {}).get(label, [".venv/bin/python", "-m", "bridge", "serve"]),
                "runs": [levels],
                "median": levels,
                "highest_held": max((lv["calls"] for lv in levels if lv["held"]), default=0),
                "highest_held_per_run": [0],
                "targets": None,
            }
            for label, levels in servers.items()
        },
    }


# Session 3's headline medians (BENCHMARKS.md): HEAD against de206eb, same run.
FIXTURE = _doc(
    {
        "bridge": [
            _level(50, 31.0, 2.97, 3.08, True),
            _level(100, 64.8, 2.85, 2.82, True),
            _level(150, 92.4, 4.61, 4.62, True),
            _level(175, 100.0, 144.2, 212.1, False),
        ],
        "vs": [
            _level(50, 43.1, 4.33, 4.42, True),
            _level(100, 89.8, 4.21, 4.07, True),
            _level(150, 99.9, 2291.0, 499.0, False),
            _level(175, 99.9, 4280.0, 709.0, False),
        ],
    },
    {"vs": ["sh", "-c", "cd /tmp/head-s3 && exec /work/main/.venv/bin/python -m bridge serve"]},
)


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on anything that is not well-formed XML


def _polylines(root: ET.Element, metric: str) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for el in root.iter(f"{SVG}polyline"):
        if el.get("class") == metric:
            pairs = [p.split(",") for p in (el.get("points") or "").split()]
            out[el.get("data-server") or ""] = [(float(x), float(y)) for x, y in pairs]
    return out


def _texts(root: ET.Element) -> str:
    return "\n".join("".join(el.itertext()) for el in root.iter(f"{SVG}text"))


def test_valid_svg_with_one_polyline_per_server_per_metric() -> None:
    root = _parse(bp.render_svg(FIXTURE))
    assert root.tag == f"{SVG}svg"
    for metric in ("cpu", "p99"):
        lines = [el for el in root.iter(f"{SVG}polyline") if el.get("class") == metric]
        assert sorted(el.get("data-server") for el in lines) == ["bridge", "vs"]
        assert all(len(pts) == 4 for pts in _polylines(root, metric).values())
    assert len({el.get("stroke") for el in root.iter(f"{SVG}polyline")}) == 2  # one colour per server
    text = _texts(root)
    for needed in ("concurrent calls", "% of one core", "p99", "ms", "worse of the two directions", "bridge", "vs"):
        assert needed in text, needed
    assert "p99 target 20 ms" in text
    assert "highest held: 150 calls" in text and "highest held: 100 calls" in text


def test_points_are_mapped_to_the_axes() -> None:
    root = _parse(bp.render_svg(FIXTURE))
    lay = bp.layout_of(bp.series_of(FIXTURE))
    # the axes the data asks for: 0-200 calls, 0-120 % CPU (headroom over one core), 1-10000 ms on a log scale
    assert (lay.x_max, lay.cpu_max, lay.p99_lo, lay.p99_hi) == (200, 120, 1, 10_000)
    cpu, p99 = _polylines(root, "cpu"), _polylines(root, "p99")
    left, right, width = bp.LEFT, bp.WIDTH - bp.RIGHT, bp.WIDTH - bp.RIGHT - bp.LEFT
    x150 = left + width * 150 / 200
    # independent of Layout's own methods: the panels' pixel boxes and the scales' formulas
    assert cpu["bridge"][2] == pytest.approx((x150, lay.cpu_bottom - bp.PANEL_H * 92.4 / 120), abs=0.06)
    assert cpu["vs"][0] == pytest.approx((left + width * 50 / 200, lay.cpu_bottom - bp.PANEL_H * 43.1 / 120), abs=0.06)
    # worse direction: 4.62 (ag>tw) for bridge at 150, 2291 (tw>ag) for vs
    assert p99["bridge"][2][1] == pytest.approx(lay.p99_bottom - bp.PANEL_H * math.log10(4.62) / 4, abs=0.06)
    assert p99["vs"][2][1] == pytest.approx(lay.p99_bottom - bp.PANEL_H * math.log10(2291) / 4, abs=0.06)
    assert p99["vs"][3][0] == pytest.approx(left + width * 175 / 200, abs=0.06)
    assert lay.x(200) == pytest.approx(right)  # the axis ends on its last tick
    # the 20 ms target and the one-core line sit where the scale puts them
    (target,) = [el for el in root.iter(f"{SVG}line") if el.get("class") == "target"]
    assert float(target.get("y1") or 0) == pytest.approx(lay.p99_bottom - bp.PANEL_H * math.log10(20) / 4, abs=0.06)
    (core,) = [el for el in root.iter(f"{SVG}line") if el.get("class") == "core"]
    assert float(core.get("y1") or 0) == pytest.approx(lay.cpu_bottom - bp.PANEL_H * 100 / 120, abs=0.06)
    # lines run left to right; the saturated level is drawn above the held ones in both panels
    assert [x for x, _ in cpu["bridge"]] == sorted(x for x, _ in cpu["bridge"])
    assert p99["bridge"][3][1] < p99["bridge"][2][1] and cpu["bridge"][3][1] < cpu["bridge"][2][1]


def test_held_levels_are_filled_and_the_others_hollow() -> None:
    root = _parse(bp.render_svg(FIXTURE))
    fills = [el.get("fill") for el in root.iter(f"{SVG}circle") if el.get("class") == "p99-point"]
    assert fills.count("#ffffff") == 3  # bridge 175, vs 150 and 175
    assert len(fills) == 8


def test_missing_values_are_skipped() -> None:
    doc = _doc(
        {
            "bridge": [
                _level(25, 10.0, 1.0, 1.5, True),
                _level(50, None, None, None, False),  # nothing measured
                _level(100, 40.0, None, 3.0, True),  # one direction without a figure: the other counts
            ]
        }
    )
    root = _parse(bp.render_svg(doc))
    lay = bp.layout_of(bp.series_of(doc))
    cpu, p99 = _polylines(root, "cpu")["bridge"], _polylines(root, "p99")["bridge"]
    assert [round(x, 1) for x, _ in cpu] == [round(lay.x(25), 1), round(lay.x(100), 1)]
    assert [round(x, 1) for x, _ in p99] == [round(lay.x(25), 1), round(lay.x(100), 1)]
    assert p99[1][1] == pytest.approx(lay.y_p99(3.0), abs=0.06)
    assert bp.worse_p99({"to_agent": {"p99": None}, "to_twilio": {"p99": None}}) is None
    assert bp.worse_p99({"to_agent": {"p99": 7.5}, "to_twilio": {"p99": 2.0}}) == 7.5
    assert bp.worse_p99({}) is None


def test_labels_are_escaped() -> None:
    nasty = '<vs> & "x"'
    doc = _doc({nasty: [_level(10, 5.0, 1.0, 1.0, True)]}, {nasty: ["sh", "-c", 'echo "<a>" && b']})
    doc["command"] = 'python -m tools.loadtest --vs "a<b & c"'
    svg = bp.render_svg(doc)
    root = _parse(svg)
    assert nasty in _texts(root)
    assert 'echo "<a>" && b' in _texts(root)
    assert set(_polylines(root, "cpu")) == {nasty}  # the attribute round-trips too
    assert "<vs>" not in svg and "&lt;vs&gt; &amp; &quot;x&quot;" in svg


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"servers": {}},
        {"servers": {"bridge": {"command": ["x"], "runs": []}}},  # stopped before the first level
        _doc({"bridge": [_level(2, 1.5, 0.0, 0.0, True)]}),  # one point, zero latency (below the log axis)
        _doc({"bridge": [_level(300, 250.0, 9000.0, 30.0, False)]}),  # WORKERS: more than one core
        FIXTURE,
    ],
)
def test_partial_or_odd_documents_still_plot(doc: dict[str, Any]) -> None:
    root = _parse(bp.render_svg(doc))
    lay = bp.layout_of(bp.series_of(doc))
    for el in root.iter():
        for attr in ("x", "y", "x1", "y1", "cx", "cy"):
            if el.get(attr) is not None:
                assert math.isfinite(float(el.get(attr) or 0))
    grid = [el for el in root.iter(f"{SVG}line") if el.get("class") == "grid"]
    assert grid
    for el in grid:  # every tick of both axes inside a panel (a tick list that overshoots its axis fails)
        for y in (float(el.get("y1") or 0), float(el.get("y2") or 0)):
            assert lay.cpu_top - 0.06 <= y <= lay.cpu_bottom + 0.06 or lay.p99_top - 0.06 <= y <= lay.p99_bottom + 0.06
    for pts in list(_polylines(root, "cpu").values()) + list(_polylines(root, "p99").values()):
        for x, y in pts:  # every point inside its panel
            assert lay.plot_left <= x <= lay.plot_right
            assert lay.cpu_top <= y <= lay.cpu_bottom or lay.p99_top <= y <= lay.p99_bottom


def test_axis_helpers() -> None:
    assert bp.linear_ticks(175) == [0, 50, 100, 150, 200]
    assert bp.linear_ticks(100) == [0, 20, 40, 60, 80, 100]
    assert bp.linear_ticks(2) == [0, 0.5, 1, 1.5, 2]
    assert bp.linear_ticks(2, min_step=1) == [0, 1, 2]
    assert bp.layout_of(bp.series_of(_doc({"b": [_level(2, 1.0, 1.0, 1.0, True)]}))).x_ticks == (0, 1, 2)  # whole calls
    assert bp.log_bounds([3.0, 4.6], 20.0) == (1, 100)
    assert bp.log_bounds([0.04], 20.0) == (0.1, 100)  # never below 0.1 ms
    assert bp.log_ticks(1, 100) == [1, 2, 5, 10, 20, 50, 100]
    assert bp.log_ticks(0.1, 10_000) == [0.1, 1, 10, 100, 1000, 10_000]


def test_cli_replots_a_results_file(tmp_path: Path) -> None:
    src = tmp_path / "bench-x.json"
    src.write_text(json.dumps(FIXTURE))
    done = subprocess.run(
        [sys.executable, "-m", "tools.benchplot", str(src)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert _polylines(_parse((tmp_path / "bench-x.svg").read_text()), "cpu").keys() == {"bridge", "vs"}
    out = tmp_path / "other.svg"
    assert bp.main([str(src), "-o", str(out)]) == 0 and out.exists()
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert bp.main([str(tmp_path / "bad.json")]) == 2
    assert bp.main([str(tmp_path / "missing.json")]) == 2


def test_plots_embedded_in_benchmarks_md_exist_and_are_benchplot_svgs() -> None:
    """An image BENCHMARKS.md embeds is tracked, well-formed, and has both panels' lines."""
    text = re.sub(r"<!--.*?-->", "", (ROOT / "BENCHMARKS.md").read_text(), flags=re.S)  # not rendered
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+\.svg)\)", text)
    for path in embedded:
        root = _parse((ROOT / path).read_text())
        assert _polylines(root, "cpu") and _polylines(root, "p99"), path
