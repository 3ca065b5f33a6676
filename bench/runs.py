# What the newer benchmarks (fanout, memory, scaling) share beyond bench/harness.py:
# the "was the machine busy" rule of bench/requests.py, generalised to a run
# with several processes of our own, and a few formatting helpers.

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence

from bench.harness import ROOT, fmt_rate, median, process_cpu_seconds

BUSY_CORES = 0.25  # other work above this during a window makes a run "busy" (as bench/requests.py)


class Window:
    """CPU accounting over one measured window: our processes vs the whole machine (/proc)."""

    def __init__(self, pids: Sequence[int]):
        from bench.harness import machine_cpu_seconds

        self._machine = machine_cpu_seconds
        self.pids = list(pids)
        self.start_cpu = [process_cpu_seconds(pid) for pid in self.pids]
        self.start_machine = machine_cpu_seconds()
        self.end_cpu: list[float | None] = []
        self.end_machine: tuple[float, float] | None = None

    def stop(self) -> Window:
        self.end_cpu = [process_cpu_seconds(pid) for pid in self.pids]
        self.end_machine = self._machine()
        return self

    def cpu_seconds(self) -> list[float | None]:
        """CPU seconds each of `pids` used during the window (None where /proc had nothing)."""
        return [
            None if a is None or b is None else max(0.0, b - a)
            for a, b in zip(self.start_cpu, self.end_cpu, strict=True)
        ]

    def machine(self, seconds: float, ours_cpu_s: float) -> tuple[float | None, float | None]:
        """(other, steal): cores other work and the hypervisor took during the window."""
        if self.start_machine is None or self.end_machine is None or seconds <= 0:
            return None, None
        busy = (self.end_machine[0] - self.start_machine[0]) / seconds
        steal = (self.end_machine[1] - self.start_machine[1]) / seconds
        return max(0.0, busy - ours_cpu_s / seconds), steal


def disturbance(other: float | None, steal: float | None) -> float:
    return (other or 0.0) + (steal or 0.0)


def is_busy(other: float | None, steal: float | None) -> bool:
    return disturbance(other, steal) > BUSY_CORES


def fmt_load(other: float | None, steal: float | None, busy: bool) -> str:
    """The end of a run's line: what else the machine was doing while it ran."""
    if other is None:
        return ""
    text = f"  other {other:.2f} cores"
    if steal and steal >= 0.005:
        text += f", steal {steal:.2f}"
    return text + ("  (machine busy)" if busy else "")


def abort_quietly(barrier) -> None:
    """Break a multiprocessing barrier so that the others stop waiting (a worker failed)."""
    try:
        barrier.abort()
    except Exception:  # noqa: BLE001 - already broken, or the manager has gone
        pass


def retry_quietest(run_once: Callable[[], object], busy_of: Callable[[object], float], retries: int, say) -> tuple:
    """Run, and repeat up to `retries` times while the run was disturbed; keep the quietest attempt.

    Returns (kept, discarded attempts).
    """
    attempts = []
    while True:
        run = run_once()
        attempts.append(run)
        retry = busy_of(run) > BUSY_CORES and len(attempts) <= retries
        say(run, len(attempts), retry)
        if not retry:
            break
    kept = min(attempts, key=busy_of)
    return kept, [a for a in attempts if a is not kept]


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}"


def fmt_ms(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def fmt_bytes(value: float) -> str:
    if abs(value) >= 1024 * 1024:
        return f"{value / 1024 / 1024:.1f} MiB"
    if abs(value) >= 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value:.0f} B"


def spread(values: Sequence[float], fmt: Callable[[float], str] = fmt_rate) -> str:
    """'median (min–max)', or just the value for one run; 'n/a' for none."""
    values = [v for v in values if _number(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def _number(value: float | None) -> bool:
    return value is not None and value == value  # not None, not NaN


def ratio_spread(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> tuple[float, list[float]]:
    """(ratio of medians, per-pair ratios) — pairs are (run i, run i); None and NaN are left out."""
    nums = [v for v in numerators if _number(v)]
    dens = [v for v in denominators if _number(v)]
    if not nums or not dens or median(dens) == 0:
        return float("nan"), []
    pairs = [a / b for a, b in zip(numerators, denominators, strict=False) if _number(a) and _number(b) and b]
    return median(nums) / median(dens), pairs


def fmt_ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> str:
    value, pairs = ratio_spread(numerators, denominators)
    if value != value:
        return "n/a"
    if len(pairs) <= 1:
        return fmt_ratio(value)
    return f"{fmt_ratio(value)} ({fmt_ratio(min(pairs))}–{fmt_ratio(max(pairs))})"


def parse_counts(text: str, low: int = 1, high: int = 20000) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, not {text!r}") from None
    if not counts or any(c < low or c > high for c in counts):
        raise argparse.ArgumentTypeError(f"counts must be between {low} and {high}")
    return counts


def parse_names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; not {', '.join(unknown) or text!r}")
        return names

    return parse


def describe_machine() -> dict[str, object]:
    import msgspec
    import websockets

    source = source_state()
    commit = source["commit"]
    if commit is not None and source["status"]:
        commit = f"{commit} + uncommitted server changes"
    return {
        "commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "websockets": websockets.__version__,
        "msgspec": msgspec.__version__,
    }


def source_state() -> dict[str, object]:
    """The commit and the uncommitted changes under server/ and protocol/ (`git status --short`), now.

    Other people edit the server while benchmarks run: each run records what its
    server process was started from (the files as they were just before it started).
    `--no-optional-locks`: git status never takes the index lock from someone committing.
    """
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--short", "--", "server", "protocol"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "status": None}
    return {"commit": head.stdout.strip() or None, "status": status.stdout.splitlines()}


def fmt_source(source: dict[str, object]) -> str:
    """'f94a6d7' or 'f94a6d7 + M server/chat.py, …'."""
    text = str(source.get("commit"))
    changed = source.get("status") or []
    if changed:
        text += " + " + ", ".join(str(line).strip() for line in changed)  # type: ignore[union-attr]
    return text


@functools.cache
def sectionchat_serve_options() -> frozenset[str]:
    """The options this version of `sectionchat serve` knows (from its --help)."""
    usage = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", usage))


# Event loops -------------------------------------------------------------------
#
# sectionchat runs on uvloop when it is installed (`--event-loop auto`, its
# default). The baselines take the same option with the same meaning, so a
# comparison never pits one event loop against another; the benchmarks pass the
# same --event-loop to every server they start.

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_in_use(event_loop: str) -> str:
    """What `event_loop` resolves to here: "uvloop" or "asyncio"."""
    if event_loop == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if event_loop == "uvloop":
            raise SystemExit("--event-loop uvloop: uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def run_with_loop(main, event_loop: str):
    """asyncio.run(main) on the chosen event loop; returns main's result."""
    import asyncio

    if loop_in_use(event_loop) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
