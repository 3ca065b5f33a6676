"""The growth benchmarks run end to end, tiny: no timing assertions, only that every curve works."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CURVES = ("start", "history", "subscribe", "write", "restart")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the `bench` extra


@pytest.mark.timeout(60)
def test_growth_quick_runs_tiny_and_writes_every_curve(tmp_path: Path) -> None:
    """Every curve at one or two tiny sizes, one run each: a table per curve, JSON, PNGs, no cache left in the repo."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "bench.growth", "--quick", "--runs", "1",
        "--sessions", "200,1000", "--messages", "500", "--sections", "40", "--subscribe-block", "10",
        "--write-sections", "2,5", "--write-seconds", "0.4", "--write-warmup", "0.1", "--write-clients", "4",
        "--journal-messages", "60", "--restart-base", "2x300",
        "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(out), "--plots-dir", str(out),
    ]  # fmt: skip
    if not HAVE_MATPLOTLIB:
        command.append("--no-plots")
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=55)
    assert finished.returncode == 0, finished.stderr[-4000:]
    for heading in ("### start", "### history", "### subscribe", "### write", "### restart"):
        assert heading in finished.stdout, finished.stdout

    documents = {curve: json.loads((out / f"growth-{curve}-quick.json").read_text()) for curve in CURVES}
    start = documents["start"]["points"]
    assert [p["sessions"] for p in start] == [0, 200, 1000]
    assert all(p["start_s_median"] > 0 and p["rss_bytes_median"] > 0 for p in start)
    (history,) = documents["history"]["points"]
    assert history["messages"] == 500 and history["cold_ms_median"] > 0 and history["warm_ms_median"] > 0
    assert history["runs"][0]["ping_cold"]["count"] > 0  # the other client's pings were measured
    subscribe = documents["subscribe"]
    assert [p["sections_loaded"] for p in subscribe["points"]] == [40] and not subscribe["skipped"]
    assert [p["sections"] for p in documents["write"]["points"]] == [2, 5]
    assert all(p["runs"][0]["acks"] > 0 for p in documents["write"]["points"])
    restart = documents["restart"]["points"]
    assert sorted((p["series"], p["messages"]) for p in restart) == [("loaded", 60), ("new", 60)]
    assert all(p["restart_s_median"] > 0 for p in restart)
    # Generated data dirs were made through `sectionchat import`, in the cache dir.
    assert any(m["key"] == "history-500" for m in documents["history"]["generated"])
    if HAVE_MATPLOTLIB:
        assert sorted(p.name for p in out.glob("*.png")) == sorted(f"growth-{c}-quick.png" for c in CURVES)


@pytest.mark.timeout(60)
def test_growth_help_lists_the_curves() -> None:
    finished = subprocess.run(
        [sys.executable, "bench/growth.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert finished.returncode == 0, finished.stderr
    assert "--curve" in finished.stdout and "--quick" in finished.stdout
