"""pytest plugin: a real sectionchat server for your tests, in one fixture.

Installed with the `sectionchat` package (entry point `pytest11`), so any test can ask for it:

    def test_my_editor(sectionchat_server):
        editor = MyEditor(sectionchat_server.url)       # ws://127.0.0.1:PORT/ws
        ...

The server is `python -m server serve` in a child process on a free port with a
fresh data dir, rate limits off; it works from sync and async tests and any
event loop, and stops with SIGTERM when the test ends. Extra server options come
from the `sectionchat_server_args` fixture (override it) or a marker:

    @pytest.mark.sectionchat_server("--max-text-chars", "100")
    def test_long_text(sectionchat_server): ...

For a server shared by several tests, use `SectionchatServer` directly in a
fixture of a wider scope (see docs/harness.md).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from client import ScriptClient
from client.process import ListeningProcess, NotListening

__all__ = ["SectionchatServer", "DEFAULT_ARGS"]

# A test server accepts whatever the test throws at it; tests of the limits set their own.
DEFAULT_ARGS = ("--rate-limit", "0", "--sessions-per-minute", "0")


class SectionchatServer:
    """`python -m server serve --port 0` as a child process, with its address and log.

        with SectionchatServer(data_dir) as server:
            ...server.url...

    `start()` waits for the "listening on HOST:PORT" line; `stop()` sends
    SIGTERM and waits (kill -9 after `stop_timeout`); `restart()` brings it back
    on the same port and data dir.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        start_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        python: str = sys.executable,
    ):
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="sectionchat-")
            data_dir = self._tempdir.name
        self.data_dir = Path(data_dir)
        self.args = [*DEFAULT_ARGS, *args]
        self.host = host
        self.port = 0
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.python = python
        self._server: ListeningProcess | None = None

    # -- addresses -----------------------------------------------------------

    @property
    def url(self) -> str:
        """The WebSocket URL: ws://HOST:PORT/ws (add ?name=alice for a user name)."""
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def http_url(self) -> str:
        """The HTTP base URL: http://HOST:PORT (GET /healthz, /metrics, /)."""
        return f"http://{self.host}:{self.port}"

    def ws_url(self, name: str | None = None) -> str:
        """The WebSocket URL for user `name` (open mode)."""
        from urllib.parse import quote

        return self.url if name is None else f"{self.url}?name={quote(name, safe='')}"

    # -- clients -------------------------------------------------------------

    def connect(self, name: str | None = None, **options: Any) -> contextlib.AbstractAsyncContextManager[ScriptClient]:
        """`async with server.connect("alice") as alice:` a ScriptClient (client/__init__.py) to this server."""
        return ScriptClient.connect(self.url, name=name, **options)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> SectionchatServer:
        if self.running:
            raise RuntimeError("the server is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            self.python, "-m", "server", "serve",
            "--host", self.host, "--port", str(self.port), "--data-dir", str(self.data_dir),
            *self.args,
        ]  # fmt: skip
        environment = {key: value for key, value in os.environ.items() if not key.startswith("SECTIONCHAT_")}
        if self._server is not None:
            self._server.close()
        self._server = ListeningProcess(command, env=environment, name="the sectionchat server")
        try:
            self.port = self._server.start(self.start_timeout).port
        except NotListening as error:
            raise RuntimeError(f"{error} ({' '.join(command)})") from None
        return self

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return None if self._server is None else self._server.process

    @property
    def returncode(self) -> int | None:
        return None if self._server is None else self._server.returncode

    @property
    def output(self) -> str:
        """Everything the server has logged since it was last started."""
        return "" if self._server is None else self._server.output

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.running

    def stop(self) -> int | None:
        """SIGTERM and wait; kill if it does not stop in time. Returns the exit code."""
        return None if self._server is None else self._server.stop(self.stop_timeout)

    def kill(self) -> None:
        """kill -9: the server stops without running any shutdown code (crash tests)."""
        if self._server is not None:
            self._server.kill()

    def restart(self) -> SectionchatServer:
        """Stop and start again on the same port and data dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._server is not None:
            self._server.close()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> SectionchatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"on {self.url}" if self.running else "stopped"
        return f"<SectionchatServer {state}, data in {self.data_dir}>"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sectionchat_server(*args): extra command-line options for this test's sectionchat_server "
        '(e.g. "--max-text-chars", "100")',
    )


@pytest.fixture
def sectionchat_server_args() -> list[str]:
    """Extra `sectionchat serve` options for `sectionchat_server`; override this fixture to change them."""
    return []


@pytest.fixture
def sectionchat_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sectionchat_server_args: Sequence[str]
) -> Iterator[SectionchatServer]:
    """A real sectionchat server on a free port with a fresh data dir, stopped (SIGTERM) after the test.

    Attributes: url (ws://…/ws), http_url, host, port, data_dir, output (its log);
    connect(name) -> async context manager for a ScriptClient; restart(), stop(), kill().
    """
    args = list(sectionchat_server_args)
    for marker in reversed(list(request.node.iter_markers("sectionchat_server"))):
        args += [str(arg) for arg in marker.args]
    server = SectionchatServer(tmp_path_factory.mktemp("sectionchat") / "data", args)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that used sectionchat_server shows the server's log in its report."""
    report = yield
    if report.when == "call" and report.failed:
        server = getattr(item, "funcargs", {}).get("sectionchat_server")
        if isinstance(server, SectionchatServer) and server.output:
            report.sections.append(("sectionchat server log", server.output))
    return report
