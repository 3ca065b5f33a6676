"""Revision 1.1's moves over real sockets: sessions follow the document when its sections change."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ServerProcess

from client import ScriptClient

pytestmark = pytest.mark.timeout(60)

DOC = "spec-7"


async def new_session(client: ScriptClient, section: str, **fields) -> str:
    reply = await client.call("create_session", document_id=DOC, section_id=section, **fields)
    return reply["session"]["session_id"]


async def move(client: ScriptClient, source: str, target: str, **fields) -> dict:
    return await client.request(
        "move_sessions", document_id=DOC, from_section_id=source, to_section_id=target, **fields
    )


async def test_moving_named_sessions_keeps_everything_and_both_streams_say_so(connect):
    async with connect("alice") as alice, connect("bob") as bob, connect("carol") as carol:
        old = await bob.call("subscribe", document_id=DOC, section_id="intro")
        new = await carol.call("subscribe", document_id=DOC, section_id="overview")
        moving = await new_session(alice, "intro", title="moves", metadata={"anchor": 1}, idempotency_key="k1")
        staying = await new_session(alice, "intro", title="stays")
        await alice.call("send_message", session_id=moving, text="one", client_msg_id="c1", mentions=["bob"])
        await alice.call("send_message", session_id=moving, text="two")
        await alice.call("react", session_id=moving, seq=1, reaction="👍")
        await bob.call("mark_read", session_id=moving, seq=1)
        before = (await alice.call("get_session", session_id=moving))["session"]
        history_before = (await alice.call("history", session_id=moving))["messages"]
        bob.take_events()
        carol.take_events()

        moved = await move(alice, "intro", "overview", session_ids=[moving])
        assert moved["type"] == "sessions_moved" and moved["from_section_id"] == "intro"
        [session] = moved["sessions"]
        assert session == {**before, "section_id": "overview"}  # not activity: last_activity_at unchanged

        out = await bob.next_event("session_moved")
        into = await carol.next_event("session_moved")
        assert out["session"] == into["session"] == session
        assert (out["from_section_id"], out["to_section_id"]) == (into["from_section_id"], into["to_section_id"])
        assert out["offset"] == old["offset"] + 6  # each stream's own next offset (read markers are not events)
        assert into["offset"] == new["offset"] + 1
        # Everything came along: messages, seqs, reactions, read markers, the client_msg_id, the idempotency key.
        assert (await bob.call("get_session", session_id=moving))["session"] == session
        assert (await bob.call("history", session_id=moving))["messages"] == history_before
        listed = await bob.call("list_sessions", document_id=DOC, section_id="overview")
        assert [s["session_id"] for s in listed["sessions"]] == [moving] and listed["read"][moving] == 1
        again = await alice.call("send_message", session_id=moving, text="one", client_msg_id="c1")
        assert again["message"] == history_before[0]
        retried = await alice.call("create_session", document_id=DOC, section_id="intro", idempotency_key="k1")
        assert retried["session"]["session_id"] == moving and retried["session"]["section_id"] == "overview"
        remaining = await alice.call("list_sessions", document_id=DOC, section_id="intro")
        assert [s["session_id"] for s in remaining["sessions"]] == [staying]
        # Later messages go to the new section's subscribers only; edits of old messages work there.
        await alice.call("send_message", session_id=moving, text="three")
        await alice.call("edit_message", session_id=moving, seq=1, text="one, edited")
        assert (await carol.next_event("message"))["message"]["seq"] == 3
        assert (await carol.next_event("message_edited"))["message"]["text"] == "one, edited"
        await bob.call("ping")
        assert [e["type"] for e in bob.take_events() if "offset" in e] == []
        # A retried move answers the same and stores nothing.
        same = await move(alice, "intro", "overview", session_ids=[moving])
        assert same["sessions"][0]["session_id"] == moving and same["sessions"][0]["last_seq"] == 3
        await carol.call("ping")
        assert [e for e in carol.take_events() if e["type"] == "session_moved"] == []


async def test_moving_every_session_of_a_section_and_deleting_there_erases_where_it_was_stored(connect, data_dir):
    async with connect("alice") as alice:
        first = await new_session(alice, "a")
        second = await new_session(alice, "a")
        await alice.call("send_message", session_id=first, text="a secret before the move")
        moved = await move(alice, "a", "b")
        assert sorted(s["session_id"] for s in moved["sessions"]) == sorted([first, second])
        assert (await alice.call("list_sessions", document_id=DOC, section_id="a"))["sessions"] == []
        await move(alice, "b", "c", session_ids=[first])  # twice: its messages are two sections back
        tombstone = (await alice.call("delete_message", session_id=first, seq=1))["message"]
        assert (await alice.call("history", session_id=first))["messages"] == [tombstone]
        async with asyncio.timeout(10):
            while any(b"a secret" in p.read_bytes() for p in data_dir.rglob("*") if p.is_file()):
                await asyncio.sleep(0.05)


async def test_refusals_move_nothing(connect):
    async with connect("alice") as alice, connect("bob") as bob:
        sid = await new_session(alice, "a")
        other = await new_session(alice, "elsewhere")
        offset = (await bob.call("subscribe", document_id=DOC, section_id="a"))["offset"]
        assert (await move(alice, "a", "a"))["code"] == "bad_request"  # checked first
        assert (await move(alice, "a", "a", session_ids=["nope"]))["code"] == "bad_request"
        assert (await move(alice, "a", "b", session_ids=[sid, "nope"]))["code"] == "not_found"
        assert (await move(alice, "a", "b", session_ids=[sid, other]))["code"] == "not_found"
        assert (await move(alice, "a", "b", session_ids=[sid, sid]))["code"] == "bad_request"
        assert (await move(alice, "a", "b", session_ids=[]))["code"] == "bad_request"
        assert (await alice.call("get_session", session_id=sid))["session"]["section_id"] == "a"
        again = await bob.call("subscribe", document_id=DOC, section_id="a", since_offset=offset)
        assert again["events"] == []
        # Nothing to move is not an error.
        empty = await move(alice, "empty", "b")
        assert empty["type"] == "sessions_moved" and empty["sessions"] == []


async def test_a_watched_section_whose_last_session_leaves_gets_a_last_summary(connect):
    async with connect("alice") as alice, connect("bob") as bob:
        sid = await new_session(alice, "a")
        watched = await bob.call("watch_document", document_id=DOC)
        assert [s["section_id"] for s in watched["sections"]] == ["a"]
        await move(alice, "a", "b")
        summaries = {}
        async with asyncio.timeout(10):
            while set(summaries) != {"a", "b"}:
                event = await bob.next_event("section_summary")
                summaries[event["summary"]["section_id"]] = event["summary"]
        assert summaries["a"]["sessions"] == 0 and summaries["b"]["sessions"] == 1
        rewatched = await bob.call("watch_document", document_id=DOC)
        assert [s["section_id"] for s in rewatched["sections"]] == ["b"]
        assert (await alice.call("get_session", session_id=sid))["session"]["section_id"] == "b"


async def test_concurrent_moves_both_ways_and_writes_lose_nothing(connect):
    """A→B and B→A at once never deadlock; writes to moving sessions land before or after, once, in order."""
    async with connect("alice") as alice, connect("bob") as bob:
        sessions = {
            "a": [await new_session(alice, "a") for _ in range(3)],
            "b": [await new_session(bob, "b") for _ in range(3)],
        }

        async def shuffle(client: ScriptClient, source: str, target: str) -> None:
            for _ in range(10):
                await move(client, source, target)
                source, target = target, source

        async def write(client: ScriptClient, sid: str) -> None:
            for n in range(20):
                await client.call("send_message", session_id=sid, text=f"{sid} {n}", client_msg_id=f"{sid}-{n}")

        writers = [write(alice, sid) for sid in sessions["a"]] + [write(bob, sid) for sid in sessions["b"]]
        await asyncio.gather(shuffle(alice, "a", "b"), shuffle(bob, "b", "a"), *writers)
        everywhere = []
        for section in ("a", "b"):
            listed = await alice.call("list_sessions", document_id=DOC, section_id=section)
            everywhere += [s["session_id"] for s in listed["sessions"]]
        assert sorted(everywhere) == sorted(sessions["a"] + sessions["b"])  # each in exactly one section
        for sid in everywhere:
            messages = (await alice.call("history", session_id=sid, limit=200))["messages"]
            assert [m["text"] for m in messages] == [f"{sid} {n}" for n in range(20)]


async def test_moves_survive_kill_9_and_a_restart(server_process, data_dir):
    server = server_process()
    async with ScriptClient.connect(server.url, name="alice") as alice:
        sid = await new_session(alice, "a")
        await alice.call("send_message", session_id=sid, text="hello", client_msg_id="c1")
        await alice.call("mark_read", session_id=sid, seq=1)
        epochs = {s: (await alice.call("subscribe", document_id=DOC, section_id=s))["epoch"] for s in ("a", "b")}
        await move(alice, "a", "b")
        history = (await alice.call("history", session_id=sid))["messages"]
    server.kill()
    restarted = ServerProcess(data_dir).start(server.port)
    try:
        async with ScriptClient.connect(restarted.url, name="alice") as alice:
            assert (await alice.call("get_session", session_id=sid))["session"]["section_id"] == "b"
            assert (await alice.call("history", session_id=sid))["messages"] == history
            listed = await alice.call("list_sessions", document_id=DOC, section_id="b")
            assert [s["session_id"] for s in listed["sessions"]] == [sid] and listed["read"][sid] == 1
            for section, types in (("a", ["session_created", "message", "session_moved"]), ("b", ["session_moved"])):
                recovered = await alice.call(
                    "subscribe", document_id=DOC, section_id=section, since_offset=0, epoch=epochs[section]
                )
                assert [e["type"] for e in recovered["events"]] == types
            again = await alice.call("send_message", session_id=sid, text="hello", client_msg_id="c1")
            assert again["message"] == history[0]
    finally:
        restarted.close()
