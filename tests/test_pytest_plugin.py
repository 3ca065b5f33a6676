"""The pytest plugin, used as a user would: a fresh project that only installs sectionchat."""

from __future__ import annotations

import os

pytest_plugins = ["pytester"]

USER_TESTS = """
import json
import os
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect


def test_sync_client(sectionchat_server):
    with connect(sectionchat_server.url + "?name=alice") as ws:
        welcome = json.loads(ws.recv())
        assert welcome["type"] == "welcome" and welcome["user"] == "alice"
        ws.send(json.dumps({"type": "create_session", "id": 1, "document_id": "d", "section_id": "s", "title": "T"}))
        reply = json.loads(ws.recv())
        assert reply["type"] == "session_created" and reply["reply_to"] == 1
    with urllib.request.urlopen(sectionchat_server.http_url + "/healthz") as response:
        assert response.status == 200
    assert sectionchat_server.url == f"ws://127.0.0.1:{sectionchat_server.port}/ws"
    assert sectionchat_server.data_dir.is_dir()
    Path("server.pid").write_text(str(sectionchat_server.process.pid))


@pytest.mark.asyncio
async def test_async_client(sectionchat_server):
    async with sectionchat_server.connect("bob") as bob, sectionchat_server.connect("carol") as carol:
        await carol.call("subscribe", document_id="d", section_id="s")
        created = await bob.call("create_session", document_id="d", section_id="s")
        event = await carol.next_event("session_created")
        assert event["session"]["session_id"] == created["session"]["session_id"]


def test_each_test_gets_a_fresh_server(sectionchat_server):
    assert Path("server.pid").read_text() != str(sectionchat_server.process.pid)
    with connect(sectionchat_server.url) as ws:
        ws.recv()
        ws.send(json.dumps({"type": "list_sessions", "id": 1, "document_id": "d"}))
        assert json.loads(ws.recv())["sessions"] == []  # nothing from test_sync_client


@pytest.mark.sectionchat_server("--max-text-chars", "5")
@pytest.mark.asyncio
async def test_marker_passes_server_options(sectionchat_server):
    async with sectionchat_server.connect("dave") as dave:
        assert dave.welcome["limits"]["max_text_chars"] == 5


def test_restart_keeps_port_and_data(sectionchat_server):
    port = sectionchat_server.port
    sectionchat_server.restart()
    assert sectionchat_server.port == port and sectionchat_server.running
    with connect(sectionchat_server.url) as ws:
        assert json.loads(ws.recv())["user"].startswith("anon-")


def test_failure_shows_the_server_log(sectionchat_server):
    assert False, "failing on purpose"
"""

OVERRIDE_TESTS = """
import json

import pytest
from websockets.sync.client import connect


@pytest.fixture
def sectionchat_server_args():
    return ["--rate-limit", "2"]


def test_fixture_override(sectionchat_server):
    with connect(sectionchat_server.url) as ws:
        assert json.loads(ws.recv())["limits"]["messages_per_s"] == 2
"""


def test_the_fixture_works_in_a_users_project(pytester):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_user=USER_TESTS, test_override=OVERRIDE_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=50)
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*sectionchat server log*", "*listening on 127.0.0.1:*"])
    # Every server was stopped at teardown: the first one's process is gone.
    pid = int((pytester.path / "server.pid").read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"server process {pid} is still running")
