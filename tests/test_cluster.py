"""Several server processes on one Redis behave as one server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from conftest import ROOT

from client import ScriptClient

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def nodes(server_process, redis_server):
    """nodes(n) -> n server processes sharing one Redis."""

    def start(count: int = 2, *args: str):
        return [server_process("--storage", redis_server.url, "--presence-ttl-s", "1.5", *args) for _ in range(count)]

    return start


async def test_events_cross_nodes_exactly_once(nodes):
    """A subscriber on node A sees what is written on node B, once each, with gapless offsets."""
    a, b = nodes(2)
    async with (
        ScriptClient.connect(a.url, name="reader") as reader,
        ScriptClient.connect(b.url, name="writer") as writer,
    ):
        snapshot = await reader.call("subscribe", document_id="d", section_id="s")
        sid = (await writer.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        acks = [(await writer.call("send_message", session_id=sid, text=str(n)))["message"] for n in range(30)]
        await writer.call("close_session", session_id=sid)
        closed = await reader.next_event("session_closed", timeout=15)
        stored = [e for e in reader.take_events() if "offset" in e] + [closed]
    assert [e["offset"] for e in stored] == list(range(snapshot["offset"] + 1, snapshot["offset"] + 33))
    assert [e["message"] for e in stored if e["type"] == "message"] == acks
    assert stored[0]["session"]["session_id"] == sid


async def test_concurrent_writers_on_both_nodes(nodes):
    """Writers on two nodes into one session: seqs and offsets stay gapless, nothing is lost."""
    a, b = nodes(2)
    async with ScriptClient.connect(a.url, name="setup") as setup:
        sid = (await setup.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]

    async def write(url: str, name: str) -> list[dict]:
        async with ScriptClient.connect(url, name=name) as client:
            return [
                (await client.call("send_message", session_id=sid, text=f"{name} {n}"))["message"] for n in range(30)
            ]

    results = await asyncio.gather(*(write(node.url, f"w{i}-{node.port}") for node in (a, b) for i in range(3)))
    acked = [m for batch in results for m in batch]
    assert sorted(m["seq"] for m in acked) == list(range(1, len(acked) + 1))
    for node in (a, b):
        async with ScriptClient.connect(node.url, name="checker") as checker:
            history = await checker.call("history", session_id=sid, limit=200)
            assert [m["seq"] for m in history["messages"]] == list(range(1, len(acked) + 1))
            assert {m["message_id"] for m in history["messages"]} == {m["message_id"] for m in acked}
            replay = await checker.call("subscribe", document_id="d", section_id="s", since_offset=0)
            assert [e["offset"] for e in replay["events"]] == list(range(1, len(acked) + 2))


async def test_kill_9_of_a_node_loses_nothing_acknowledged(nodes):
    """kill -9 of node B while it writes; after a restart every acknowledgement is there."""
    a, b = nodes(2)
    acknowledged: list[dict] = []
    enough = asyncio.Event()

    async def writer() -> None:
        try:
            async with ScriptClient.connect(b.url, name="writer") as client:
                sid = (await client.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
                while True:
                    acknowledged.append((await client.call("send_message", session_id=sid, text="x"))["message"])
                    if len(acknowledged) >= 50:
                        enough.set()
        except Exception:
            return

    task = asyncio.create_task(writer())
    await asyncio.wait_for(enough.wait(), 30)
    b.kill()
    await asyncio.wait_for(task, 30)
    b.start()
    for node in (a, b):
        async with ScriptClient.connect(node.url, name="checker") as checker:
            history = await checker.call("history", session_id=acknowledged[0]["session_id"], limit=200)
            assert history["messages"][: len(acknowledged)] == acknowledged


async def test_redis_outage(nodes, redis_server):
    """Redis stops: writes are `unavailable` and nothing is acknowledged; when it returns, delivery resumes on both nodes."""
    a, b = nodes(2)
    reader_a = await ScriptClient.open(a.url, name="reader-a")
    reader_b = await ScriptClient.open(b.url, name="reader-b")
    writer = await ScriptClient.open(b.url, name="writer")
    try:
        await reader_a.call("subscribe", document_id="d", section_id="s")
        await reader_b.call("subscribe", document_id="d", section_id="s")
        sid = (await writer.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        before = (await writer.call("send_message", session_id=sid, text="before"))["message"]
        for reader in (reader_a, reader_b):
            assert (await reader.next_event("message", timeout=10))["message"] == before

        redis_server.stop()
        failed = await writer.request("send_message", session_id=sid, text="during", client_msg_id="during")
        assert failed["type"] == "error" and failed["code"] == "unavailable" and failed["temporary"] is True
        assert (await writer.request("create_session", document_id="d", section_id="s2"))["code"] == "unavailable"
        # Reads of what this node holds keep working.
        assert (await writer.call("history", session_id=sid))["messages"] == [before]

        redis_server.start()

        async def retry_until_stored() -> dict:
            while True:
                reply = await writer.request("send_message", session_id=sid, text="during", client_msg_id="during")
                if reply["type"] == "message_ack":
                    return reply["message"]
                assert reply["code"] == "unavailable"
                await asyncio.sleep(0.1)  # a client's retry backoff

        after = await asyncio.wait_for(retry_until_stored(), 30)
        assert after["seq"] == 2
        for reader in (reader_a, reader_b):
            event = await reader.next_event("message", timeout=15)
            assert event["message"] == after
        history = await writer.call("history", session_id=sid)
        assert history["messages"] == [before, after]
    finally:
        for client in (reader_a, reader_b, writer):
            await client.close()


async def test_presence_across_nodes_and_of_a_dead_node(nodes):
    """Presence spans nodes; the users of a node killed without a word leave within the TTL."""
    a, b = nodes(2)
    async with ScriptClient.connect(a.url, name="alice") as alice:
        await alice.call("subscribe", document_id="d", section_id="s")
        bob = await ScriptClient.open(b.url, name="bob")
        reply = await bob.call("subscribe", document_id="d", section_id="s")
        assert reply["presence"] == ["alice", "bob"]
        joined = await alice.next_event("presence", timeout=10)
        assert joined["joined"] == ["bob"]
        b.kill()
        left = await alice.next_event("presence", timeout=10)
        assert left["left"] == ["bob"]
        await bob.close()


async def test_graceful_node_stop_withdraws_presence_at_once(nodes):
    """A node that stops cleanly takes its users' presence with it, without waiting for the TTL."""
    a, b = nodes(2, "--presence-ttl-s", "60")
    async with ScriptClient.connect(a.url, name="alice") as alice:
        await alice.call("subscribe", document_id="d", section_id="s")
        async with ScriptClient.connect(b.url, name="bob") as bob:
            await bob.call("subscribe", document_id="d", section_id="s")
            await alice.next_event("presence", timeout=10)
            b.process.send_signal(15)
            assert await bob.wait_closed() == 1001
        assert b.process.wait(10) == 0
        left = await alice.next_event("presence", timeout=10)
        assert left["left"] == ["bob"]


def test_unreachable_redis_at_startup(redis_server, data_dir):
    """A server whose Redis is down at startup exits with one clear line."""
    redis_server.stop()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            "0",
            "--storage",
            redis_server.url,
            "--data-dir",
            str(data_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("sectionchat: cannot reach Redis at redis://127.0.0.1:")


async def test_conversation_events_cross_nodes_once_and_mentions_reach_other_nodes(nodes):
    """Edits, reactions, deletes and read markers written on node B reach node A's subscribers once, in order;
    a mention reaches the named user's connection on node A, subscribed or not, once."""
    a, b = nodes(2)
    async with (
        ScriptClient.connect(a.url, name="reader") as reader,
        ScriptClient.connect(a.url, name="bob") as bob_elsewhere,
        ScriptClient.connect(b.url, name="writer") as writer,
        ScriptClient.connect(b.url, name="reader") as reader_tab,
    ):
        sid = (await writer.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        snapshot = await reader.call("subscribe", document_id="d", section_id="s")
        sent = await writer.call("send_message", session_id=sid, text="hi @bob", mentions=["bob"])
        mentioned = await bob_elsewhere.next_event("mentioned", timeout=15)
        assert mentioned["message"] == sent["message"]
        await writer.call("edit_message", session_id=sid, seq=1, text="hi @bob!", mentions=["bob"])
        await writer.call("react", session_id=sid, seq=1, reaction="👍")
        await writer.call("send_message", session_id=sid, text="two")
        await writer.call("delete_message", session_id=sid, seq=2)
        last = await reader.next_event("message_deleted", timeout=15)
        stored = [e for e in reader.take_events() if "offset" in e] + [last]
        assert [e["type"] for e in stored] == ["message", "message_edited", "reaction", "message", "message_deleted"]
        assert [e["offset"] for e in stored] == list(range(snapshot["offset"] + 1, snapshot["offset"] + 6))
        # A read marker set on node B reaches the reader's tab on node A.
        await reader_tab.call("mark_read", session_id=sid, seq=1)
        assert await reader.next_event("read", timeout=15) == {"type": "read", "session_id": sid, "seq": 1}
        await bob_elsewhere.call("ping")
        assert [e for e in bob_elsewhere.take_events() if e["type"] == "mentioned"] == []  # the edit named no one new


async def test_a_move_on_one_node_reaches_the_other_nodes_subscribers(nodes):
    a, b = nodes(2)
    async with (
        ScriptClient.connect(a.url, name="editor") as editor,
        ScriptClient.connect(b.url, name="reader") as reader,
    ):
        sid = (await editor.call("create_session", document_id="d", section_id="old"))["session"]["session_id"]
        await editor.call("send_message", session_id=sid, text="before")
        await reader.call("subscribe", document_id="d", section_id="old")
        await reader.call("subscribe", document_id="d", section_id="new")
        await editor.call("move_sessions", document_id="d", from_section_id="old", to_section_id="new")
        moved = [await reader.next_event("session_moved", timeout=15) for _ in range(2)]
        assert sorted(e["offset"] for e in moved) == [1, 3] and {e["to_section_id"] for e in moved} == {"new"}
        # Node B finds it where it went (its index entry, or the section it left), with its history.
        assert (await reader.call("get_session", session_id=sid))["session"]["section_id"] == "new"
        await editor.call("subscribe", document_id="d", section_id="new")
        await reader.call("send_message", session_id=sid, text="after, from the other node")
        await editor.next_event("message", timeout=15)  # node A has caught up with node B's write
        history = (await editor.call("history", session_id=sid))["messages"]
        assert [m["text"] for m in history] == ["before", "after, from the other node"]
