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
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import ScriptClient
from client.process import ListeningProcess
from server.app import running
from server.config import Config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def app(data_dir: Path) -> AsyncIterator:
    """A server in this event loop, on a free port, with a fresh data dir."""
    async with running(Config(port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0)) as app:
        yield app


API_KEY = "the-backend-key"


def api_config(data_dir: Path, **fields) -> Config:
    """A server with its HTTP API on a free port (key API_KEY), rate limits off."""
    return Config(
        port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0, api_keys=(API_KEY,), api_port=0, **fields
    )


@pytest.fixture
async def api_app(data_dir: Path) -> AsyncIterator:
    """`app` with the HTTP API on (`api_config`)."""
    async with running(api_config(data_dir)) as app:
        yield app


@pytest.fixture
def connect(app):
    """connect(name) -> an async context manager for a ScriptClient to `app`."""

    def connect(name: str | None = None, **options) -> ScriptClient:
        return ScriptClient.connect(app.url, name=name, **options)

    return connect


class ServerProcess(ListeningProcess):
    """`python -m server serve` as a child process, as operators run it; `output` in bytes."""

    def __init__(self, data_dir: Path, *args: str, prefix: Sequence[str] = ()):
        super().__init__([], cwd=ROOT)
        self.data_dir = data_dir
        self.args = args
        self.prefix = list(prefix)  # e.g. a tracer that runs the server as its child

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, port: int = 0, timeout: float = 20.0) -> ServerProcess:
        """Start the server and wait for its "listening on" line."""
        serve = ["-m", "server", "serve", "--port", str(port), "--data-dir", str(self.data_dir), *self.args]
        self.command = [*self.prefix, sys.executable, *serve]
        super().start(timeout)
        return self

    @property
    def output(self) -> bytes:  # type: ignore[override]
        return self.output_bytes()

    async def api_port(self, timeout: float = 10.0) -> int:
        """The HTTP API's port, from its `api listening on` line (logged right after the WebSocket one)."""
        marker = b"api listening on 127.0.0.1:"
        async with asyncio.timeout(timeout):
            while marker not in self.output:
                await asyncio.sleep(0.05)
        return int(self.output.split(marker)[1].split()[0])

    def read_rest(self) -> str:
        """Everything the process printed, once it has exited."""
        return self.output_bytes().decode(errors="replace")

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


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
        server.close()


class RedisServer(ListeningProcess):
    """A real redis-server on a free loopback port, durable like production (AOF, fsync always)."""

    def __init__(self, directory: Path):
        super().__init__([], name="redis-server", ready=re.compile(rb"Ready to accept connections"))
        self.directory = directory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
        ]  # fmt: skip
        super().start(timeout)
        return self


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for this test (stop() and start() it again to simulate an outage)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (Debian package redis-server; make test installs it)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.close()


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


@pytest.fixture
async def browser() -> AsyncIterator:
    """Debian's Chromium under Playwright, headless, for the browser tests."""
    from browser_helpers import CHROMIUM, CHROMIUM_ARGS
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def redis_values(url: str) -> bytes:
    """Every value sectionchat keeps in a Redis (lists, hashes, sets, sorted sets), as bytes."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    values: list[bytes] = []
    try:
        async for name in client.scan_iter("sc:*"):
            kind = (await client.type(name)).decode()
            if kind == "list":
                values += await client.lrange(name, 0, -1)
            elif kind == "hash":
                values += [v for pair in (await client.hgetall(name)).items() for v in pair]
            elif kind == "zset":
                values += await client.zrange(name, 0, -1)
            elif kind == "set":
                values += list(await client.smembers(name))
    finally:
        await client.aclose()
    return b"\n".join(values)


async def until(predicate, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll a condition that no event signals (e.g. a file appearing)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)
