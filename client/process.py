# A child process that prints "listening on HOST:PORT" once it serves: started,
# waited for, stopped. The one such helper, shared by the pytest plugin, the
# tests and the benchmarks (servers under test and baselines alike).
#
# Rule kept here: the process's output goes to a file, never to a pipe that
# somebody must keep reading: a chatty server blocks once a pipe fills, and an
# unread pipe is a file descriptor left to the garbage collector.

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["ListeningProcess", "NotListening", "LISTENING"]

LISTENING = re.compile(rb"listening on (\S+):(\d+)")


class NotListening(RuntimeError):
    """The process exited, or did not say it listens in time (the message carries its output)."""


class ListeningProcess:
    """`command` as a child process; `start()` returns once it has said where it listens (`ready`).

    Its output (stdout and stderr) goes to `log_path`, appended, or to an
    unnamed temporary file; `output` is what it printed since the last start.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        name: str = "server",
        ready: re.Pattern[bytes] = LISTENING,
    ):
        self.command = list(command)
        self.cwd = cwd
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.log_path = None if log_path is None else Path(log_path)
        self.name = name
        self.ready = ready  # what it prints once it serves; groups 1 and 2, if any: host and port
        self.process: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0
        self.spawned_at = 0.0  # time.time() at spawn
        self.ready_s = float("nan")  # seconds from spawn until the "listening on" line was seen
        self.listening_line = b""  # that line, as printed
        self._log: IO[bytes] | None = None
        self._log_start = 0

    def start(self, timeout: float = 30.0) -> ListeningProcess:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._close_log()
        if self.log_path is None:
            self._log = tempfile.TemporaryFile()
        else:
            self._log = open(self.log_path, "a+b")  # noqa: SIM115 (kept open while the process runs)
        self._log_start = self._log.tell()
        self.spawned_at, spawned = time.time(), time.monotonic()
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = spawned + timeout
        while True:
            output = self.output_bytes()
            found = self.ready.search(output)
            if found:
                self.ready_s = time.monotonic() - spawned
                break
            if self.process.poll() is not None:
                raise NotListening(
                    f"{self.name} exited with {self.process.returncode} before listening:\n{self.output}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise NotListening(f"{self.name} was not ready within {timeout:g} s:\n{self.output}")
            time.sleep(0.005)
        if self.ready.groups >= 2:
            self.host, self.port = found.group(1).decode(), int(found.group(2))
        self.listening_line = output[output.rfind(b"\n", 0, found.start()) + 1 : output.find(b"\n", found.end())]
        return self

    def output_bytes(self) -> bytes:
        """What the process printed since it was last started."""
        if self._log is None:
            return b""
        return os.pread(self._log.fileno(), 1 << 30, self._log_start)

    @property
    def output(self) -> str:
        return self.output_bytes().decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it has not exited within `timeout`. Returns the exit code."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.returncode

    def kill(self) -> None:
        """kill -9 (no shutdown code runs), and reap it."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(30)

    def close(self) -> None:
        """Kill it if it still runs, and let go of its log."""
        self.kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
