# What every benchmark shares: server processes, CPU accounting, statistics, tables.
#
# Rule kept here: a server under test is always its own process, started the way
# operators start it, on 127.0.0.1 and port 0 (client/process.py: its output goes
# to a log file, never an unread pipe, which would stall a chatty server once it fills).

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from client.process import ListeningProcess, NotListening

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(Exception):
    """A benchmark could not run (a server did not start, a client got an error)."""


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with what a benchmark's main returns: 1 with its message on BenchError, 130 on ^C."""
    try:
        code = main()
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


class ServerProcess(ListeningProcess):
    """One server under test, as a child process with its log in its scratch directory."""

    def __init__(self, name: str, command: Sequence[str], scratch: Path, *, cwd: Path = ROOT, env=None):
        super().__init__(command, cwd=cwd, env=env, log_path=scratch / f"{name}.log", name=name)
        self.scratch = scratch

    @classmethod
    def sectionchat(cls, scratch: Path, *extra: str, profile: Path | None = None) -> ServerProcess:
        """The real server: durable file storage in a fresh data dir, abuse limits off.

        `profile`: where to write a profile of the run, written when the server stops: .prof is
        cProfile's (in the server's process: exact call counts, every call slower), .txt py-spy's
        collapsed stacks, anything else a py-spy flame graph (SVG; py-spy samples from outside).
        """
        data_dir = scratch / "data"
        arguments = [
            "serve",
            "--host",
            HOST,
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--storage",
            "file",
            *sectionchat_limits_off(),
            *extra,
        ]
        command = [sys.executable, "-m", "server", *arguments]
        if profile is not None and profile.suffix == ".prof":
            command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "server", *arguments]
        elif profile is not None:
            spy = Path(sys.executable).with_name("py-spy")
            fmt = "raw" if profile.suffix == ".txt" else "flamegraph"
            command = [str(spy), "record", "--nonblocking", "--rate", "250", "--format", fmt, "-o", str(profile), "--"]
            command += [sys.executable, "-m", "server", *arguments]
        server = cls("sectionchat", command, scratch)
        server.profiled = profile is not None and profile.suffix != ".prof"
        return server

    @classmethod
    def echo(cls, scratch: Path, *extra: str) -> ServerProcess:
        """The baseline: raw websockets + msgspec, decode and encode, nothing else."""
        return cls("echo", [sys.executable, "-m", "bench.echo_server", "--host", HOST, "--port", "0", *extra], scratch)

    @classmethod
    def durable_echo(cls, scratch: Path) -> ServerProcess:
        """The physical limit of an acknowledged write: the echo, each request group-committed to one file."""
        command = [sys.executable, "-m", "bench.echo_server", "--host", HOST, "--port", "0"]
        return cls("durable", [*command, "--durable", str(scratch / "echo.log")], scratch)

    profiled = False  # run under py-spy: stopping it stops the server, and py-spy then writes its file

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.profiled and self.running:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            for child in children:
                os.kill(int(child), signal.SIGTERM)
            try:
                self.wait(timeout + 30)  # py-spy writes the flame graph once the server is gone
            except subprocess.TimeoutExpired:
                pass
        return super().stop(timeout)

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the process and wait for its "listening on" line."""
        try:
            super().start(timeout)
        except NotListening as error:
            raise BenchError(str(error)) from None
        return self

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def log(self, tail: int = 4000) -> str:
        return self.output[-tail:]

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the process has used so far (Linux /proc), or None."""
        return process_cpu_seconds(self.pid)

    def status(self, field: str) -> int | None:
        """A `kB` field of /proc/PID/status (VmRSS, VmHWM) in bytes, or None."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def rss_bytes(self) -> int | None:
        return self.status("VmRSS")

    def errors_in_log(self) -> list[str]:
        """Lines the server logged at ERROR or worse (a benchmark run should have none)."""
        return [line for line in self.log(tail=10_000_000).splitlines() if " ERROR " in line or " CRITICAL " in line]

    def first_error(self, context: int = 40) -> str:
        """The first ERROR line and what follows it (a traceback), else the log's tail."""
        lines = self.log(tail=10_000_000).splitlines()
        for number, line in enumerate(lines):
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                return "\n".join(lines[number : number + context])
        return "\n".join(lines[-context:])


# Per-user and per-connection abuse limits that a benchmark turns off (0 = no
# limit), passed only where this version of the server has the option.
LIMITS_OFF = {
    "--rate-limit": "0",
    "--sessions-per-minute": "0",
    "--max-connections-per-user": "0",
}


@functools.cache
def sectionchat_limits_off() -> tuple[str, ...]:
    usage = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    known = set(re.findall(r"--[a-z][a-z0-9-]*", usage))
    return tuple(part for option, value in LIMITS_OFF.items() if option in known for part in (option, value))


def process_cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are plain.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far, summed over cores (Linux /proc/stat).

    busy counts user, nice, system, irq and softirq time; steal is time the
    hypervisor gave our virtual CPUs to someone else. Over a window, busy minus
    what the benchmark's own processes used is the other work on the machine.
    """
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if first[0] != "cpu":
        return None
    ticks = [int(value) for value in first[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks + [0] * (8 - len(ticks))
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS, steal / _CLOCK_TICKS


def scratch_dir(root: str | None) -> Path:
    """A fresh directory for one run's data and logs."""
    return Path(tempfile.mkdtemp(prefix="sectionchat-bench-", dir=root))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding `path` ("ext4", "tmpfs"…), from /proc/mounts."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, parts[2]
    return kind


# Statistics ------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_spread(values: Sequence[float], fmt=fmt_rate) -> str:
    """'median (min–max)'."""
    return f"{fmt(median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
