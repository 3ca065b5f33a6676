"""Fixtures: real servers on port 0 with real data dirs, in-process or as a process."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import ScriptClient
from server.app import running
from server.config import Config

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb"listening on (\S+):(\d+)")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def app(data_dir: Path) -> AsyncIterator:
    """A server in this event loop, on a free port, with a fresh data dir."""
    async with running(Config(port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0)) as app:
        yield app


@pytest.fixture
def connect(app):
    """connect(name) -> an async context manager for a ScriptClient to `app`."""

    def connect(name: str | None = None, **options) -> ScriptClient:
        return ScriptClient.connect(app.url, name=name, **options)

    return connect


class ServerProcess:
    """`python -m server serve` as a child process, as operators run it."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.output = b""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, port: int = 0, timeout: float = 20.0) -> ServerProcess:
        """Start the server and wait for its "listening on" line."""
        command = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = b""
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), True)
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"server exited before listening:\n{self.output.decode(errors='replace')}")
            self.output += line
            found = LISTENING.search(line)
            if found:
                self.port = int(found.group(2))
                return self

    def read_rest(self) -> str:
        """Everything the process printed, once it has exited."""
        assert self.process is not None and self.process.stdout is not None
        self.output += self.process.stdout.read()
        return self.output.decode(errors="replace")

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.read_rest()

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.read_rest()
        return code

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            if self.process.stdout is not None:
                self.process.stdout.close()


# Load tests must not trip the abuse limits; tests of the limits pass their own values after these.
NO_RATE_LIMITS = ("--rate-limit", "0", "--sessions-per-minute", "0")


@pytest.fixture
def server_process(data_dir: Path) -> Iterator:
    """server_process(*extra_args) -> a started ServerProcess on this test's data dir, rate limits off."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(data_dir, *NO_RATE_LIMITS, *args).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class RedisServer:
    """A real redis-server on a free loopback port, durable like production (AOF, fsync always)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process.stdout is not None
        output = b""
        while b"Ready to accept connections" not in output:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"redis-server did not start:\n{output.decode(errors='replace')}")
            output += line
        return self

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                self.process.wait(10)
            if self.process.stdout is not None:
                self.process.stdout.close()
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for this test (stop() and start() it again to simulate an outage)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (Debian package redis-server; make test installs it)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def resolved_config(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> dict[str, str]:
    """What `sectionchat config ARGS` resolves, as option -> TOML value."""
    result = subprocess.run(
        [sys.executable, "-m", "server", "config", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", ""), **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await raw_http(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as given and read the answer to EOF (the server closes after one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def until(predicate, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll a condition that no event signals (e.g. a file appearing)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)
