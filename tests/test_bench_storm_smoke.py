"""The handshake and reconnect-storm benchmark runs end to end, tiny: no timing assertions, only that it works.

Every storm client must come back, and on sectionchat recover its missed events gaplessly (the benchmark
checks each one and fails otherwise); the JSON has a run per server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_storm_benchmark_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    finished = subprocess.run(
        [
            sys.executable, "-m", "bench.storm", "--runs", "1", "--clients", "60", "--sections", "6",
            "--connectors", "4", "--seconds", "0.3", "--warmup", "0.1", "--data-root", str(tmp_path), "--json", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-4000:]
    rows = [line for line in finished.stdout.splitlines() if line.startswith("| ")]
    assert any(row.startswith("| handshakes/s") for row in rows), finished.stdout
    assert any(row.startswith("| storm: all 60 back") for row in rows), finished.stdout
    runs = json.loads(out.read_text())["runs"]
    assert sorted(run["target"] for run in runs) == ["echo", "sectionchat"]
    by_target = {run["target"]: run for run in runs}
    assert by_target["sectionchat"]["events_recovered"] == 60  # one missed message per client, each checked in order
    assert all(run["handshakes_per_s"] > 0 and run["storm_s"] > 0 for run in runs)
    assert not list(tmp_path.glob("sectionchat-bench-*"))  # scratch dirs removed
