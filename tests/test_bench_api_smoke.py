"""Issue 14's benchmarks run end to end, tiny: no timing assertions, only that they work and produce numbers.

- `bench.api`: HTTP API writes against the same server's WebSocket path, a row per write, a JSON file;
- `bench.webhooks`: paced messages over WebSocket, every one delivered to the verifying receiver.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def run_bench(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished


def table_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("| ")]


def test_api_benchmark_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "api.json"
    finished = run_bench(
        "bench.api", "--runs", "1", "--clients", "3", "--seconds", "0.5", "--warmup", "0.1", "--busy-retries", "0",
        "--data-root", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    rows = table_rows(finished.stdout)
    assert rows[0].startswith("| write | clients | HTTP API /s"), finished.stdout
    assert any(row.startswith("| send_message | 3 |") for row in rows), finished.stdout
    assert any(row.startswith("| create_session | 3 |") for row in rows), finished.stdout
    document = json.loads(out.read_text())
    summaries = {s["operation"]: s for s in document["summaries"]}
    assert set(summaries) == {"send_message", "create_session"}
    for summary in summaries.values():
        assert sorted(run["target"] for run in summary["runs"]) == ["api", "websocket"]
        assert all(run["completed"] > 0 and run["p99_ms"] > 0 for run in summary["runs"])
        assert summary["ratio"] > 0 and not math.isnan(summary["ratio"])
    assert not list(tmp_path.glob("sectionchat-bench-*"))


def test_webhooks_benchmark_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "webhooks.json"
    finished = run_bench(
        "bench.webhooks", "--runs", "1", "--rate", "100", "--seconds", "1", "--clients", "4", "--sections", "2",
        "--busy-retries", "0", "--data-root", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    rows = table_rows(finished.stdout)
    assert rows[0].startswith("| load | sent msg/s"), finished.stdout
    assert rows[1].startswith("| 100 msg/s × 1 s, 4 clients, 2 sections |"), finished.stdout
    [run] = json.loads(out.read_text())["runs"]
    assert run["sent"] == 100 and run["delivered"] == 100 and run["missing"] == 0, run
    assert run["delivered_rate"] > 0 and not math.isnan(run["lag_p99_ms"]), run
    assert not list(tmp_path.glob("sectionchat-bench-*"))


def test_webhooks_benchmark_without_verification(tmp_path: Path) -> None:
    finished = run_bench(
        "bench.webhooks", "--runs", "1", "--rate", "50", "--seconds", "0.5", "--clients", "2", "--sections", "1",
        "--no-verify", "--busy-retries", "0", "--data-root", str(tmp_path), "--quiet",
    )  # fmt: skip
    assert "unverified" in table_rows(finished.stdout)[1], finished.stdout


def test_both_have_help_as_module_and_script() -> None:
    for name in ("api", "webhooks"):
        for command in (
            [sys.executable, "-m", f"bench.{name}", "--help"],
            [sys.executable, f"bench/{name}.py", "--help"],
        ):
            finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert finished.returncode == 0, finished.stderr
            assert "--runs" in finished.stdout and "--json" in finished.stdout
