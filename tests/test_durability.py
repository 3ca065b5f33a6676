"""Durability and concurrency against real server processes and real files."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

from client import ScriptClient
from client.process import ListeningProcess
from server.app import running
from server.config import Config


async def test_concurrent_clients_never_lose_or_duplicate(app):
    """50 clients x (5 sessions, 20 messages): all unique, seqs gapless, list_sessions complete."""
    clients, sessions_each, messages_each = 50, 5, 20

    async def worker(n: int) -> list[tuple[str, list[int], list[str]]]:
        async with ScriptClient.connect(app.url, name=f"user-{n}") as client:
            made = []
            for s in range(sessions_each):
                # Several clients share each section, so the section lock is contended.
                reply = await client.call("create_session", document_id="load", section_id=f"sec-{(n + s) % 7}")
                sid = reply["session"]["session_id"]
                seqs, ids = [], []
                for m in range(messages_each):
                    ack = await client.call("send_message", session_id=sid, text=f"{n}/{s}/{m}")
                    seqs.append(ack["message"]["seq"])
                    ids.append(ack["message"]["message_id"])
                made.append((sid, seqs, ids))
            return made

    results = [item for made in await asyncio.gather(*(worker(n) for n in range(clients))) for item in made]
    session_ids = [sid for sid, _, _ in results]
    message_ids = [mid for _, _, ids in results for mid in ids]
    assert len(set(session_ids)) == clients * sessions_each
    assert len(set(message_ids)) == clients * sessions_each * messages_each
    assert all(seqs == list(range(1, messages_each + 1)) for _, seqs, _ in results)

    async with ScriptClient.connect(app.url, name="checker") as checker:
        listed = await checker.call("list_sessions", document_id="load")
        assert sorted(s["session_id"] for s in listed["sessions"]) == sorted(session_ids)
        offsets = []
        for section in range(7):
            reply = await checker.call("subscribe", document_id="load", section_id=f"sec-{section}", since_offset=0)
            assert reply["recovered"] is True
            offsets.append([e["offset"] for e in reply["events"]])
            assert offsets[-1] == list(range(1, reply["offset"] + 1))
        assert sum(len(o) for o in offsets) == clients * sessions_each * (1 + messages_each)
        sid, _, ids = results[0]
        history = await checker.call("history", session_id=sid, limit=200)
        assert [m["message_id"] for m in history["messages"]] == ids


async def write_until_killed(url: str, writers: int, acknowledged: dict, stop: asyncio.Event) -> None:
    """Writers create sessions and send messages, recording every acknowledgement, until the server dies."""

    async def writer(n: int) -> None:
        try:
            async with ScriptClient.connect(url, name=f"w{n}") as client:
                while not stop.is_set():
                    reply = await client.call("create_session", document_id="crash", section_id=f"s{n % 3}")
                    sid = reply["session"]["session_id"]
                    acknowledged[sid] = []
                    for m in range(5):
                        ack = await client.call(
                            "send_message", session_id=sid, text=f"{n}:{m}", client_msg_id=f"{n}:{m}"
                        )
                        acknowledged[sid].append(ack["message"])
        except Exception:
            return  # the server was killed under us; what was acknowledged is recorded

    await asyncio.gather(*(writer(n) for n in range(writers)))


@pytest.mark.timeout(90)
async def test_kill_9_loses_nothing_acknowledged(server_process, data_dir):
    """kill -9 during concurrent writes, restart on the same data dir: every ack is there, offsets continue."""
    server = server_process()
    acknowledged: dict[str, list[dict]] = {}
    stop = asyncio.Event()
    load = asyncio.create_task(write_until_killed(server.url, 8, acknowledged, stop))

    async def enough_writes() -> None:
        while sum(len(m) for m in acknowledged.values()) < 150:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(enough_writes(), 30)
    server.kill()
    stop.set()
    await asyncio.wait_for(load, 30)

    restarted = server_process()
    async with ScriptClient.connect(restarted.url, name="checker") as checker:
        stored_sessions = {
            s["session_id"] for s in (await checker.call("list_sessions", document_id="crash"))["sessions"]
        }
        assert set(acknowledged) <= stored_sessions
        for sid, messages in acknowledged.items():
            history = await checker.call("history", session_id=sid, limit=200)
            stored = history["messages"]
            assert stored[: len(messages)] == messages
            assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
        offsets = {}
        for section in range(3):
            reply = await checker.call("subscribe", document_id="crash", section_id=f"s{section}", since_offset=0)
            assert [e["offset"] for e in reply["events"]] == list(range(1, reply["offset"] + 1))
            offsets[section] = reply["offset"]
        # Writing goes on where it stopped.
        async with ScriptClient.connect(restarted.url, name="writer") as writer:
            await writer.call("create_session", document_id="crash", section_id="s0")
        event = await checker.next_event("session_created")
        assert event["offset"] == offsets[0] + 1


async def test_garbage_tail_does_not_stop_a_restart(data_dir):
    """A torn last record (or any garbage tail) is cut off with a warning; the rest loads and writing continues."""
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0)
    async with running(config) as app, ScriptClient.connect(app.url, name="a") as client:
        sid = (await client.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        await client.call("send_message", session_id=sid, text="kept")
    [section_file] = (data_dir / "sections").rglob("*.log")
    with open(section_file, "ab") as file:
        file.write(b'{"kind":"message","message":{"session_id":"' + sid.encode() + b'","seq":2,"mess')
    with open(data_dir / "sessions.idx", "ab") as file:
        file.write(b"\x00\xff garbage without newline")
    async with running(config) as app, ScriptClient.connect(app.url, name="a") as client:
        history = await client.call("history", session_id=sid)
        assert [m["text"] for m in history["messages"]] == ["kept"]
        ack = await client.call("send_message", session_id=sid, text="after repair")
        assert ack["message"]["seq"] == 2
    async with running(config) as app, ScriptClient.connect(app.url, name="a") as client:
        history = await client.call("history", session_id=sid)
        assert [m["text"] for m in history["messages"]] == ["kept", "after repair"]
        assert (await client.call("subscribe", document_id="d", section_id="s"))["offset"] == 3


async def test_garbage_line_in_the_middle_is_skipped(data_dir):
    """An unreadable complete line is skipped with a warning; later records still load."""
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0)
    async with running(config) as app, ScriptClient.connect(app.url, name="a") as client:
        sid = (await client.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
    [section_file] = (data_dir / "sections").rglob("*.log")
    with open(section_file, "ab") as file:
        file.write(b"not a record at all\n")
    async with running(config) as app, ScriptClient.connect(app.url, name="a") as client:
        ack = await client.call("send_message", session_id=sid, text="fine")
        assert ack["message"]["seq"] == 1
    async with running(config) as app, ScriptClient.connect(app.url, name="a") as client:
        history = await client.call("history", session_id=sid)
        assert [m["text"] for m in history["messages"]] == ["fine"]


@pytest.mark.timeout(60)
async def test_sigterm_closes_clients_with_1001_and_exits_0(server_process):
    """SIGTERM: clients are closed with 1001 (reconnect), the process exits 0."""
    server = server_process()
    async with ScriptClient.connect(server.url, name="a") as a, ScriptClient.connect(server.url, name="b") as b:
        await a.call("subscribe", document_id="d", section_id="s")
        server.process.send_signal(15)
        codes = await asyncio.gather(a.wait_closed(), b.wait_closed())
    assert codes == [1001, 1001]
    assert server.process.wait(20) == 0
    output = server.read_rest()
    assert "shutting down" in output and "stopped" in output


@pytest.mark.timeout(60)
async def test_sigint_stops_cleanly_too(server_process):
    """Ctrl+C (SIGINT) stops the server cleanly with exit code 0."""
    server = server_process()
    server.process.send_signal(2)
    assert server.process.wait(20) == 0


@pytest.mark.timeout(60)
def test_port_in_use_is_a_one_line_error(data_dir):
    """A taken port: one clear line on stderr, non-zero exit."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--port", str(port), "--data-dir", str(data_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"sectionchat: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


@pytest.mark.timeout(60)
def test_unwritable_data_dir_is_a_one_line_error(tmp_path):
    """A data dir that cannot be written: one clear line, non-zero exit."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--data-dir", str(blocker / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("sectionchat: data dir ") and "not writable" in line


@pytest.mark.timeout(60)
def test_data_dir_in_use_is_refused(server_process, data_dir):
    """Two servers on one data dir would corrupt it: the second refuses to start."""
    server_process()
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "in use by another sectionchat server" in result.stderr


@pytest.mark.timeout(60)
async def test_environment_configures_the_server(data_dir, tmp_path):
    """SECTIONCHAT_* variables set options; the command line wins over them."""
    env = {
        **os.environ,
        "SECTIONCHAT_PORT": "0",
        "SECTIONCHAT_DATA_DIR": str(data_dir),
        "SECTIONCHAT_MAX_TEXT_CHARS": "10",
    }
    server = ListeningProcess(
        [sys.executable, "-m", "server", "serve", "--max-text-chars", "12"], cwd=tmp_path, env=env
    )
    try:
        server.start()
        async with ScriptClient.connect(f"ws://127.0.0.1:{server.port}/ws") as client:
            assert client.welcome["limits"]["max_text_chars"] == 12
        assert (data_dir / "LOCK").exists()
    finally:
        server.close()
