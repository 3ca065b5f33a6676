"""The request-rate benchmark runs end to end, tiny: no timing assertions, only that it works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_requests_benchmark_runs_tiny_and_prints_both_rows(tmp_path: Path) -> None:
    """One run of each server, 2 clients, half a second: a table with both request rows and a JSON file."""
    out = tmp_path / "requests.json"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.requests",
            "--runs",
            "1",
            "--clients",
            "2",
            "--seconds",
            "0.5",
            "--warmup",
            "0.1",
            "--busy-retries",
            "0",
            "--data-root",
            str(tmp_path),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    rows = [line for line in finished.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| request | clients | sectionchat")
    assert any(row.startswith("| create_session | 2 |") for row in rows), finished.stdout
    assert any(row.startswith("| send_message | 2 |") for row in rows), finished.stdout

    document = json.loads(out.read_text())
    summaries = {s["operation"]: s for s in document["summaries"]}
    assert set(summaries) == {"create_session", "send_message"}
    for summary in summaries.values():
        targets = sorted(run["target"] for run in summary["runs"])
        assert targets == ["durable", "echo", "sectionchat"]
        assert all(run["completed"] > 0 for run in summary["runs"])
    # Every sectionchat run cleans up its fresh data dir.
    assert not list(tmp_path.glob("sectionchat-bench-*"))


@pytest.mark.timeout(60)
def test_requests_benchmark_runs_as_a_script() -> None:
    """`python bench/requests.py --help` works as well as `python -m bench.requests`."""
    finished = subprocess.run(
        [sys.executable, "bench/requests.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert finished.returncode == 0, finished.stderr
    assert "--clients" in finished.stdout


@pytest.mark.timeout(60)
def test_requests_benchmark_profiles_the_server_with_cprofile(tmp_path: Path) -> None:
    """--profile-format cprofile leaves one stats file per run, written by the server as it stops, with its write path in it."""
    import pstats

    finished = subprocess.run(
        [
            sys.executable, "-m", "bench.requests", "--runs", "1", "--clients", "2", "--seconds", "0.3",
            "--warmup", "0.1", "--busy-retries", "0", "--operations", "send_message", "--data-root", str(tmp_path),
            "--profile", str(tmp_path / "profiles"), "--profile-format", "cprofile",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-4000:]
    stats = pstats.Stats(str(tmp_path / "profiles" / "send_message-c2-1.prof"))
    functions = {function for _, _, function in stats.stats}  # type: ignore[attr-defined]
    assert {"_finish", "_serve_one", "send_message"} <= functions
