"""Storage failures: nothing is acknowledged, reads go on, writing recovers."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import pytest

from client import ScriptClient

FILE_SIZE_LIMIT = 64 * 1024


def set_file_size_limit(pid: int, limit: int) -> None:
    # Only the soft limit: raising a hard limit again needs CAP_SYS_RESOURCE.
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


async def retry_until_stored(client: ScriptClient, request: str, **fields) -> dict:
    """What a client does after `unavailable`: retry (with its key) until the storage has recovered."""
    for attempt in range(200):
        reply = await client.request(request, **fields)
        if reply["type"] != "error":
            return reply
        assert reply["code"] == "unavailable"
        await asyncio.sleep(0.01 * min(attempt, 10))  # client backoff; the storage retries on its own timer too
    raise AssertionError("storage did not recover")


@pytest.mark.timeout(60)
async def test_write_failure_is_unavailable_and_recovers(server_process, data_dir):
    """A write that fails (file size limit) is `unavailable`, leaves no trace, and writing resumes later."""
    server = server_process()
    async with (
        ScriptClient.connect(server.url, name="alice") as alice,
        ScriptClient.connect(server.url, name="bob") as bob,
    ):
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        await bob.call("subscribe", document_id="d", section_id="s")
        set_file_size_limit(server.process.pid, FILE_SIZE_LIMIT)
        acked = []
        while True:
            reply = await alice.request("send_message", session_id=sid, text="x" * 1000, client_msg_id=f"m{len(acked)}")
            if reply["type"] == "error":
                break
            acked.append(reply["message"])
        assert reply["code"] == "unavailable" and reply["temporary"] is True
        assert len(acked) > 10
        # Reads still work and show exactly what was acknowledged.
        history = await alice.call("history", session_id=sid, limit=200)
        assert history["messages"] == acked
        # Subscribers saw every acknowledged message and nothing else.
        seen = await bob.next_events("message", len(acked))
        assert [e["message"] for e in seen] == acked
        # Space returns: the same request now succeeds, with the next seq.
        set_file_size_limit(server.process.pid, resource.RLIM_INFINITY)
        retry = await retry_until_stored(
            alice, "send_message", session_id=sid, text="x" * 1000, client_msg_id=f"m{len(acked)}"
        )
        assert retry["message"]["seq"] == len(acked) + 1
        assert (await bob.next_event("message"))["message"] == retry["message"]
    server.kill()
    leftovers = [
        p.name
        for p in data_dir.rglob("*")
        if p.is_file() and p.suffix not in (".log", ".idx", ".wal") and p.name not in ("LOCK", "FORMAT")
    ]
    assert leftovers == []
    restarted = server_process()
    async with ScriptClient.connect(restarted.url, name="alice") as alice:
        history = await alice.call("history", session_id=sid, limit=200)
        assert history["messages"] == [*acked, retry["message"]]


@pytest.mark.timeout(60)
async def test_create_session_failure_is_unavailable(server_process):
    """A session that cannot be stored is not created, and `list_sessions` does not show it."""
    server = server_process()
    async with ScriptClient.connect(server.url, name="alice") as alice:
        await alice.call("create_session", document_id="d", section_id="s")
        set_file_size_limit(server.process.pid, 1)
        failed = await alice.request("create_session", document_id="d", section_id="s2")
        assert failed["code"] == "unavailable" and failed["temporary"] is True
        assert len((await alice.call("list_sessions", document_id="d"))["sessions"]) == 1
        set_file_size_limit(server.process.pid, resource.RLIM_INFINITY)
        await alice.call("create_session", document_id="d", section_id="s2")
        assert len((await alice.call("list_sessions", document_id="d"))["sessions"]) == 2


@pytest.mark.timeout(60)
async def test_journal_restores_what_the_files_lost(server_process, data_dir):
    """Power loss can drop the unsynced tails of section files and the index: the journal puts them back."""
    server = server_process()
    async with ScriptClient.connect(server.url, name="alice") as alice:
        kept = (await alice.call("create_session", document_id="d", section_id="s"))["session"]
        first = [
            (await alice.call("send_message", session_id=kept["session_id"], text=f"m{n}"))["message"] for n in range(5)
        ]
    server.kill()
    # Simulate what the page cache had not written back: cut the files, not the journal.
    [section_file] = (data_dir / "sections").rglob("*.log")
    lines = section_file.read_bytes().splitlines(keepends=True)
    section_file.write_bytes(b"".join(lines[:3]) + lines[3][:10])  # header, session, one message, a torn line
    (data_dir / "sessions.idx").write_bytes(b"")
    restarted = server_process()
    async with ScriptClient.connect(restarted.url, name="alice") as alice:
        assert (await alice.call("get_session", session_id=kept["session_id"]))["session"]["last_seq"] == 5
        assert (await alice.call("history", session_id=kept["session_id"]))["messages"] == first
        assert (await alice.call("send_message", session_id=kept["session_id"], text="next"))["message"]["seq"] == 6
    assert restarted.terminate() == 0
    assert "rebuilt 2 files from the journal" in restarted.output.decode()


@pytest.mark.timeout(60)
async def test_concurrent_writes_into_a_failing_disk(server_process):
    """Many writers in one section when writes start failing: every ack is stored, nothing else, seqs stay gapless."""
    server = server_process()
    async with ScriptClient.connect(server.url, name="setup") as setup:
        sid = (await setup.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
    acked: list[dict] = []
    refused = 0
    limit_set = asyncio.Event()

    async def writer(n: int) -> None:
        nonlocal refused
        async with ScriptClient.connect(server.url, name=f"w{n}") as client:
            for m in range(60):
                reply = await client.request("send_message", session_id=sid, text="y" * 500, client_msg_id=f"{n}-{m}")
                if reply["type"] == "message_ack":
                    acked.append(reply["message"])
                else:
                    assert reply["code"] == "unavailable"
                    refused += 1
                if len(acked) == 100 and not limit_set.is_set():
                    set_file_size_limit(server.process.pid, FILE_SIZE_LIMIT)
                    limit_set.set()

    await asyncio.gather(*(writer(n) for n in range(10)))
    assert refused > 0
    async with ScriptClient.connect(server.url, name="checker") as checker:
        stored = (await checker.call("history", session_id=sid, limit=200))["messages"]
        assert sorted(m["seq"] for m in acked) == [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
        set_file_size_limit(server.process.pid, resource.RLIM_INFINITY)
        after = await retry_until_stored(
            checker, "send_message", session_id=sid, text="space is back", client_msg_id="back"
        )
        assert after["message"]["seq"] == len(stored) + 1
    server.kill()
    restarted = server_process()
    async with ScriptClient.connect(restarted.url, name="checker") as checker:
        history = (await checker.call("history", session_id=sid, limit=200))["messages"]
        assert history == [*stored, after["message"]]


@pytest.mark.timeout(60)
async def test_an_fd_limit_never_turns_into_failed_writes(server_process):
    """Writing to more sections than descriptors allow: open files stay bounded, every write is stored, handshakes go on."""
    server = server_process()
    resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (200, 200))
    async with ScriptClient.connect(server.url, name="alice") as alice:
        for n in range(400):
            await alice.call("create_session", document_id="d", section_id=f"s{n}")
        async with ScriptClient.connect(server.url, name="bob") as bob:
            assert len((await bob.call("list_sessions", document_id="d"))["sessions"]) == 400
    open_files = len(list(Path(f"/proc/{server.process.pid}/fd").iterdir()))
    assert open_files < 200
