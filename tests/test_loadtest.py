"""The load benchmark's pure helpers, and (when node is there) a tiny real run."""

from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tools import loadtest as lt

SVG = "{http://www.w3.org/2000/svg}"


def test_percentile_nearest_rank() -> None:
    bins = [[100, 50], [200, 49], [5000, 1]]  # 1.00 ms x50, 2.00 ms x49, 50 ms x1 (bin_ms 0.01)
    assert lt.percentile_from_hist(bins, 50) == 1.0
    assert lt.percentile_from_hist(bins, 51) == 2.0
    assert lt.percentile_from_hist(bins, 99) == 2.0
    assert lt.percentile_from_hist(bins, 100) == 50.0
    assert lt.percentile_from_hist(list(reversed(bins)), 99) == 2.0  # order does not matter
    assert lt.percentile_from_hist([], 99) is None
    assert lt.percentile_from_hist([[7, 1]], 0) == 0.07  # rank is at least 1


def test_latency_summary_and_median() -> None:
    hist = {"n": 3, "max_ms": 4.567, "bin_ms": 0.01, "bins": [[100, 2], [457, 1]]}
    assert lt.latency_summary(hist) == {"n": 3, "p50": 1.0, "p99": 4.57, "max": 4.567}
    assert lt.latency_summary({"n": 0, "max_ms": 0, "bins": []})["p99"] is None
    assert lt.median([3, None, 1, 2]) == 2
    assert lt.median([None]) is None


def test_cpu_percent() -> None:
    assert lt.cpu_percent(100, 150, 1.0, clk_tck=100) == pytest.approx(50.0)
    assert lt.cpu_percent(0, 10, 0.0) == 0.0
    # the core was 80 % busy, 50 % of it our process: 30 % was someone else
    assert lt.core_other_pct((100, 1000), (180, 1100), 50.0) == 30.0
    assert lt.core_other_pct((100, 1000), (140, 1100), 50.0) == 0.0  # never negative
    assert lt.core_other_pct(None, (1, 2), 5.0) is None


def _raw(calls: int = 10, p99_bin: int = 300, lost: int = 0) -> dict:
    hist = {"n": 100, "max_ms": p99_bin / 100, "bin_ms": 0.01, "bins": [[50, 98], [p99_bin, 2]]}
    return {
        "calls": calls,
        "duration_s": 5,
        "counters": {"calls_failed": 0, "calls_closed_early": 0},
        "to_agent": {
            "sent": 100,
            "received": 100 - lost,
            "lost": lost,
            "pre_ready": 3,
            "duplicate": 0,
            "corrupt": 0,
            "max_all_ms": 9.0,
            "lat": hist,
        },
        "to_twilio": {
            "sent": 100,
            "received": 100,
            "lost": 0,
            "cleared": 1,
            "duplicate": 0,
            "corrupt": 0,
            "max_all_ms": 9.0,
            "lat": hist,
        },
        "clear": {"speech_sent": 5, "clears": 10, "unmatched": 5, "missing": 0, "lat": hist},
        "setup": hist,
        "gen_loop_delay_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0},
        "hangup_ms": 12.0,
        "failures": [],
    }


_SERVER = {
    "server_cpu_pct": 20.0,
    "gen_cpu_pct": 10.0,
    "rss_before_kb": 50_000,
    "rss_peak_kb": 51_000,
    "rss_after_kb": 50_100,
    "server_idle_after": True,
}


def test_summarise_level_and_verdicts() -> None:
    rec = lt.summarise_level(_raw(), _SERVER)
    assert rec["to_agent"]["p99"] == 3.0
    assert rec["cpu_per_call_pct"] == 2.0
    assert rec["rss_per_call_kb"] == 100.0
    assert rec["held"] and not rec["gen_saturated"]
    assert not lt.summarise_level(_raw(lost=1), _SERVER)["held"]
    assert not lt.summarise_level(_raw(p99_bin=2500), _SERVER)["held"]  # p99 25 ms > 20 ms
    levels = [lt.summarise_level(_raw(calls=c, p99_bin=b), _SERVER) for c, b in ((25, 300), (50, 2500), (100, 300))]
    assert lt.highest_held(levels) == 100
    assert lt.highest_held([]) == 0


def test_median_levels_and_targets() -> None:
    runs = [[lt.summarise_level(_raw(calls=50, p99_bin=b), _SERVER)] for b in (300, 400, 2500)]
    (merged,) = lt.median_levels(runs)
    assert merged["calls"] == 50 and merged["runs"] == 3 and merged["runs_held"] == 2
    assert merged["to_agent"]["p99"] == 4.0
    assert merged["held"]
    targets = lt.target_report([merged], held=50)
    assert targets["calls_held"]["met"] is False
    assert targets["p99_at_50_ms"] == {"target": 5.0, "value": 4.0, "met": True}
    assert targets["clear_p99_at_100_ms"]["value"] is None


def test_format_table() -> None:
    rows = lt.table_rows("bridge", [lt.summarise_level(_raw(), _SERVER)])
    text = lt.format_table(rows)
    header, line = text.splitlines()
    assert len(header) == len(line)
    assert "0.50/3.00/3.0" in line and line.rstrip().endswith("yes")
    md = lt.format_table(rows, markdown=True).splitlines()
    assert md[0].startswith("| server |") and md[1].startswith("|---") and md[2].count("|") == len(lt.TABLE_HEADER) + 1


def test_results_schema() -> None:
    rec = lt.summarise_level(_raw(), _SERVER)
    doc = {
        "schema": lt.SCHEMA_VERSION,
        "command": "python -m tools.loadtest",
        "machine": {},
        "config": {},
        "servers": {
            "bridge": {
                "command": ["x"],
                "runs": [[rec]],
                "median": lt.median_levels([[rec]]),
                "highest_held": 10,
                "highest_held_per_run": [10],
                "targets": None,
            }
        },
    }
    assert lt.validate_results(doc) == []
    json.dumps(doc)  # serialisable
    del doc["servers"]["bridge"]["runs"][0][0]["to_twilio"]["p99"]
    assert any("to_twilio.p99" in p for p in lt.validate_results(doc))
    assert lt.validate_results({}) != []


def test_collapse_profile() -> None:
    lines = ["main (a.py:1);loop (a.py:2);parse (b.py:3) 30", "main (a.py:1);loop (a.py:2) 10", "", "junk"]
    lines.append("main (a.py:1);loop (a.py:2);parse (bridge/b.py:9) 10")  # same function, other line
    ranked = lt.collapse_profile(lines)
    assert ranked["samples"] == 50
    assert ranked["self"][0] == ("parse (b.py)", 30, 60.0)
    assert ("main (a.py)", 50, 100.0) in ranked["total"]
    assert ("bridge", 10, 20.0) in ranked["packages"]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.skipif(not (lt.LOADGEN_DIR / "node_modules" / "ws").exists(), reason="run npm ci --prefix tools/loadgen")
def test_quick_real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 calls for 2 s through the real server: zero loss both ways, clears arrive."""
    # The server inherits this process's environment and runs in the repository: its call
    # records go to a temporary file, not ./data/calls.sqlite3.
    monkeypatch.setenv("RECORDS_URL", f"sqlite:///{tmp_path}/calls.sqlite3")
    out = tmp_path / "bench.json"
    assert (
        lt.main(
            [
                "--levels",
                "2",
                "--duration",
                "2",
                "--runs",
                "1",
                "--speech-every",
                "0.7",
                "--no-warmup",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert lt.validate_results(doc) == [], lt.validate_results(doc)
    (run,) = doc["servers"]["bridge"]["runs"]
    level = run[-1]
    assert level["calls"] == 2 and level["calls_failed"] == 0
    assert level["to_agent"]["lost"] == 0 and level["to_twilio"]["lost"] == 0
    assert level["to_agent"]["received"] > 150 and level["to_twilio"]["received"] > 150
    assert level["to_agent"]["corrupt"] == 0 and level["to_twilio"]["corrupt"] == 0
    assert level["clear"]["clears"] >= 1 and level["clear"]["missing"] == 0
    # the plot next to the JSON: well-formed, the run's one server, its one level on both panels
    svg = ET.fromstring(out.with_suffix(".svg").read_text())
    lines = {(el.get("class"), el.get("data-server")): el.get("points") for el in svg.iter(f"{SVG}polyline")}
    assert set(lines) == {("cpu", "bridge"), ("p99", "bridge")}
    assert all(len((points or "").split()) == 1 for points in lines.values())
    assert sys.executable  # the server ran under this interpreter
    assert (tmp_path / "calls.sqlite3").exists()  # records on (the default), in the temporary file
