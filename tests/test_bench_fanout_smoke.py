"""The fan-out, memory, scaling and plot benchmarks run end to end, tiny: no timing assertions, only that they work."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# python-socketio, aiohttp and matplotlib are the `bench` extra (pip install -e '.[test,bench]').
HAVE_SOCKETIO = all(importlib.util.find_spec(name) for name in ("socketio", "aiohttp"))
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SERVERS = ("sectionchat", "raw", "socketio") if HAVE_SOCKETIO else ("sectionchat", "raw")


def run_bench(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished


def table_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("| ")]


@pytest.mark.timeout(40)
def test_fanout_runs_tiny_against_all_three_servers(tmp_path: Path) -> None:
    """20 subscribers, one run per server: a row each, the ratio rows, every delivery arrived."""
    out = tmp_path / "fanout.json"
    finished = run_bench(
        "bench.fanout", "--targets", ",".join(SERVERS), "--subscribers", "20", "--runs", "1", "--procs", "2", "--rate", "40",
        "--paced-seconds", "0.25", "--warmup-messages", "1", "--burst-messages", "10", "--settle", "0.1",
        "--gap", "0.05", "--busy-retries", "0", "--data-root", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    rows = table_rows(finished.stdout)
    assert rows[0].startswith("| subscribers | server | deliveries/s"), finished.stdout
    for target in SERVERS:
        assert any(row.startswith(f"| 20 | {target} |") for row in rows), finished.stdout
    for base in SERVERS[1:]:
        assert any(row.startswith(f"| 20 | sectionchat / {base} |") for row in rows), finished.stdout
    runs = json.loads(out.read_text())["summaries"][0]["runs"]
    assert sorted(run["target"] for run in runs) == sorted(SERVERS)
    for run in runs:
        assert run["missing"] == 0 and not run["closed"], run
        assert run["paced_deliveries"] == 20 * run["paced_messages"] > 0, run
        assert run["burst_deliveries"] == 20 * run["burst_messages"] > 0, run
    assert not list(tmp_path.glob("sectionchat-bench-*"))  # every run removes its scratch dir


@pytest.mark.timeout(40)
def test_memory_runs_tiny(tmp_path: Path) -> None:
    """50 idle connections, then subscribed: a row per server and a ratio to raw."""
    finished = run_bench(
        "bench.memory", "--targets", ",".join(SERVERS), "--connections", "50", "--runs", "1", "--procs", "2", "--settle", "0.1",
        "--sections", "5", "--data-root", str(tmp_path),
    )  # fmt: skip
    rows = table_rows(finished.stdout)
    assert rows[0].startswith("| connections | server | RSS before | per idle connection"), finished.stdout
    sectionchat = next(row for row in rows if row.startswith("| 50 | sectionchat |"))
    assert any(row.startswith("| 50 | raw |") for row in rows), finished.stdout
    assert sectionchat.count("|") == 8 and "n/a" not in sectionchat, sectionchat
    assert "memory per idle connection" in finished.stdout


@pytest.mark.timeout(40)
def test_scaling_runs_tiny(tmp_path: Path) -> None:
    """One run each of 1 and 2 nodes on a fresh Redis, both placements, 4 clients."""
    out = tmp_path / "scaling.json"
    finished = run_bench(
        "bench.scaling", "--runs", "1", "--clients", "4", "--seconds", "0.3", "--warmup", "0.1",
        "--busy-retries", "0", "--data-root", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    rows = table_rows(finished.stdout)
    assert rows[0].startswith("| placement | nodes | clients | send_message acks/s"), finished.stdout
    for placement in ("by-section", "mixed"):
        assert any(row.startswith(f"| {placement} | 1 | 4 |") for row in rows), finished.stdout
        assert any(row.startswith(f"| {placement} | 2 | 4 |") for row in rows), finished.stdout
    runs = json.loads(out.read_text())["runs"]
    assert all(run["completed"] > 0 for run in runs)
    assert not list(tmp_path.glob("sectionchat-bench-*"))


@pytest.mark.timeout(40)
@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is in the bench extra: pip install -e '.[test,bench]'")
def test_plots_run_a_tiny_sweep_and_draw_pngs(tmp_path: Path) -> None:
    """A 2-size fan-out sweep of two servers, then three PNG files (the create_session one from the committed JSON)."""
    out_dir = tmp_path / "perf"
    finished = run_bench(
        "bench.plots", "--subscribers", "3,6", "--targets", "sectionchat,raw", "--runs", "1", "--procs", "1",
        "--rate", "40", "--paced-seconds", "0.1", "--warmup-messages", "1", "--burst-messages", "5",
        "--settle", "0.05", "--gap", "0.05", "--busy-retries", "0", "--data-root", str(tmp_path),
        "--fanout-json", str(tmp_path / "sweep.json"), "--out-dir", str(out_dir),
    )  # fmt: skip
    for name in ("fanout-latency.png", "fanout-throughput.png", "create-rate.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"| {name[:-4]} |" in finished.stdout
    # Redrawing from the saved sweep runs nothing.
    again = run_bench(
        "bench.plots", "--from-json", "--fanout-json", str(tmp_path / "sweep.json"), "--out-dir", str(out_dir)
    )
    assert "| fanout-latency |" in again.stdout


@pytest.mark.timeout(40)
@pytest.mark.parametrize("module", ["fanout", "memory", "scaling", "plots", "broadcast_server", "socketio_server"])
def test_every_benchmark_has_help_as_module_and_script(module: str) -> None:
    if module == "socketio_server" and not HAVE_SOCKETIO:
        pytest.skip("python-socketio and aiohttp are in the bench extra: pip install -e '.[test,bench]'")
    for command in (
        [sys.executable, "-m", f"bench.{module}", "--help"],
        [sys.executable, f"bench/{module}.py", "--help"],
    ):
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert finished.returncode == 0, finished.stderr
        assert "usage:" in finished.stdout
