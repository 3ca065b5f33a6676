"""Section subscriptions: live events, offsets, recovery, presence and typing."""

from __future__ import annotations

import asyncio

import pytest

from client import ScriptClient
from protocol.messages import MAX_LISTED_SESSIONS
from server.app import running
from server.config import Config


async def subscribe(client, document_id="d", section_id="s", **fields):
    return await client.call("subscribe", document_id=document_id, section_id=section_id, **fields)


async def test_subscribed_reply(connect):
    """subscribe replies with the section's snapshot: epoch, offset, sessions, presence."""
    async with connect("alice") as alice, connect("bob") as bob:
        created = await alice.call("create_session", document_id="d", section_id="s", title="t")
        await subscribe(alice)
        reply = await bob.request("subscribe", id="s1", document_id="d", section_id="s")
    assert set(reply) == {
        "type",
        "reply_to",
        "document_id",
        "section_id",
        "epoch",
        "offset",
        "sessions",
        "presence",
        "recovered",
        "events",
        "sessions_complete",
        "read",
        "unread",
    }
    assert reply["type"] == "subscribed" and reply["reply_to"] == "s1"
    assert reply["document_id"] == "d" and reply["section_id"] == "s"
    assert isinstance(reply["epoch"], str) and reply["epoch"]
    assert reply["offset"] == 1
    assert reply["sessions"] == [created["session"]]
    assert reply["presence"] == ["alice", "bob"]
    assert reply["recovered"] is False and reply["events"] == []
    assert reply["sessions_complete"] is True
    sid = created["session"]["session_id"]
    assert (reply["read"], reply["unread"]) == ({sid: 0}, {sid: 0})


async def test_two_subscribers_see_each_others_events(connect):
    """Each subscriber gets the other's sessions and messages, never its own, with gapless offsets."""
    async with connect("alice") as alice, connect("bob") as bob:
        await subscribe(alice)
        await subscribe(bob)
        a_session = (await alice.call("create_session", document_id="d", section_id="s", title="A"))["session"]
        b_session = (await bob.call("create_session", document_id="d", section_id="s", title="B"))["session"]
        a_msg = (await alice.call("send_message", session_id=b_session["session_id"], text="hi bob"))["message"]
        b_msg = (await bob.call("send_message", session_id=a_session["session_id"], text="hi alice"))["message"]
        closed = (await alice.call("close_session", session_id=a_session["session_id"]))["session"]

        bob_saw = [await bob.next_event(t) for t in ("session_created", "message", "session_closed")]
        alice_saw = [await alice.next_event(t) for t in ("session_created", "message")]
        assert bob_saw == [
            {"type": "session_created", "session": a_session, "offset": 1},
            {"type": "message", "message": a_msg, "offset": 3},
            {"type": "session_closed", "session": closed, "offset": 5},
        ]
        assert alice_saw == [
            {"type": "session_created", "session": b_session, "offset": 2},
            {"type": "message", "message": b_msg, "offset": 4},
        ]
        # Nobody got an event for their own action.
        await alice.call("ping")
        await bob.call("ping")
        assert [e["type"] for e in alice.take_events() + bob.take_events()] == []


async def test_events_only_reach_the_section(connect):
    """A subscriber of one section hears nothing of another."""
    async with connect("alice") as alice, connect("bob") as bob:
        await subscribe(bob, "d", "other")
        await subscribe(bob, "d2", "s")
        await alice.call("create_session", document_id="d", section_id="s")
        marker = await alice.call("create_session", document_id="d", section_id="other")
        event = await bob.next_event()
        assert event["session"] == marker["session"]


async def test_recovery_returns_exactly_the_missed_events(connect):
    """Resubscribing with since_offset and epoch returns every event after it, in order; live ones follow."""
    async with connect("alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        async with connect("bob") as bob:
            first = await subscribe(bob)
            await alice.call("send_message", session_id=sid, text="seen")
            seen = await bob.next_event("message")
        last_offset, epoch = seen["offset"], first["epoch"]
        missed = [(await alice.call("send_message", session_id=sid, text=f"missed {n}"))["message"] for n in range(3)]
        closed = (await alice.call("close_session", session_id=sid))["session"]
        async with connect("bob") as bob:
            again = await subscribe(bob, since_offset=last_offset, epoch=epoch)
            assert again["recovered"] is True
            assert again["epoch"] == epoch
            assert again["offset"] == last_offset + 4
            assert again["events"] == [
                *({"type": "message", "message": m, "offset": last_offset + 1 + n} for n, m in enumerate(missed)),
                {"type": "session_closed", "session": closed, "offset": last_offset + 4},
            ]
            live = await alice.call("create_session", document_id="d", section_id="s")
            assert await bob.next_event("session_created") == {
                "type": "session_created",
                "session": live["session"],
                "offset": last_offset + 5,
            }


async def test_recovery_when_nothing_was_missed(connect):
    """since_offset equal to the current offset recovers an empty list."""
    async with connect("alice") as alice:
        await alice.call("create_session", document_id="d", section_id="s")
        first = await subscribe(alice)
        again = await subscribe(alice, since_offset=first["offset"], epoch=first["epoch"])
    assert again["recovered"] is True and again["events"] == []


async def test_recovery_without_epoch_means_current(connect):
    """A subscribe without epoch is taken to mean the current one."""
    async with connect("alice") as alice:
        await alice.call("create_session", document_id="d", section_id="s")
        await alice.call("create_session", document_id="d", section_id="s")
        reply = await subscribe(alice, since_offset=1)
    assert reply["recovered"] is True and [e["offset"] for e in reply["events"]] == [2]


async def test_recovery_with_another_epoch_fails(connect):
    """Offsets from another epoch are not trusted: recovered false, no events."""
    async with connect("alice") as alice:
        await alice.call("create_session", document_id="d", section_id="s")
        reply = await subscribe(alice, since_offset=1, epoch="not-the-epoch")
    assert reply["recovered"] is False and reply["events"] == []
    assert reply["offset"] == 1 and len(reply["sessions"]) == 1


async def test_recovery_beyond_the_window_fails(data_dir):
    """More missed events than the recovery window: recovered false."""
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, recovery_window=3)
    async with running(config) as app, ScriptClient.connect(app.url, name="alice") as alice:
        first = await subscribe(alice)
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        for n in range(3):
            await alice.call("send_message", session_id=sid, text=str(n))
        too_far = await subscribe(alice, since_offset=0 + 0, epoch=first["epoch"])
        within = await subscribe(alice, since_offset=1, epoch=first["epoch"])
    assert too_far["recovered"] is False and too_far["events"] == []
    assert within["recovered"] is True and [e["offset"] for e in within["events"]] == [2, 3, 4]


async def test_recovery_from_the_future_fails(connect):
    """A since_offset past the section's offset cannot be recovered from."""
    async with connect("alice") as alice:
        await alice.call("create_session", document_id="d", section_id="s")
        reply = await subscribe(alice, since_offset=50)
    assert reply["recovered"] is False


async def test_recovery_after_restart(data_dir):
    """Offsets, epoch and the recovery window survive a restart."""
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0)
    async with running(config) as app, ScriptClient.connect(app.url, name="alice") as alice:
        first = await subscribe(alice)
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        await alice.call("send_message", session_id=sid, text="before restart")
    async with running(config) as app, ScriptClient.connect(app.url, name="alice") as alice:
        reply = await subscribe(alice, since_offset=1, epoch=first["epoch"])
        assert reply["recovered"] is True
        assert reply["epoch"] == first["epoch"]
        assert [e["message"]["text"] for e in reply["events"]] == ["before restart"]
        ack = await alice.call("send_message", session_id=sid, text="after restart")
        assert ack["message"]["seq"] == 2
        assert (await subscribe(alice))["offset"] == 3


async def test_unsubscribe(connect):
    """After unsubscribe no more events arrive; unsubscribing twice is harmless."""
    async with connect("alice") as alice, connect("bob") as bob:
        await subscribe(bob)
        reply = await bob.request("unsubscribe", id=3, document_id="d", section_id="s")
        assert reply == {"type": "unsubscribed", "reply_to": 3, "document_id": "d", "section_id": "s"}
        assert (await bob.call("unsubscribe", document_id="d", section_id="s"))["type"] == "unsubscribed"
        await subscribe(bob, "d", "marker")
        await alice.call("create_session", document_id="d", section_id="s")
        marker = await alice.call("create_session", document_id="d", section_id="marker")
        assert (await bob.next_event("session_created"))["session"] == marker["session"]


async def test_presence_joins_and_leaves(connect):
    """Users join with their first subscribed connection and leave with their last."""
    async with connect("alice") as alice:
        await subscribe(alice)
        async with connect("bob") as bob:
            reply = await subscribe(bob)
            assert reply["presence"] == ["alice", "bob"]
            assert await alice.next_event("presence") == {
                "type": "presence",
                "document_id": "d",
                "section_id": "s",
                "joined": ["bob"],
                "left": [],
            }
            async with connect("bob") as bob_again:
                assert (await subscribe(bob_again))["presence"] == ["alice", "bob"]
            # bob's second connection leaving changes nothing: bob is still here.
            await bob.call("unsubscribe", document_id="d", section_id="s")
            assert await alice.next_event("presence") == {
                "type": "presence",
                "document_id": "d",
                "section_id": "s",
                "joined": [],
                "left": ["bob"],
            }
            assert alice.take_events() == []


async def test_presence_leave_on_disconnect(connect):
    """A connection that goes away leaves the sections it subscribed to."""
    async with connect("alice") as alice:
        await subscribe(alice)
        async with connect("bob") as bob:
            await subscribe(bob)
            await alice.next_event("presence")
        left = await alice.next_event("presence")
    assert left["left"] == ["bob"] and left["joined"] == []


async def test_presence_is_coalesced(connect, app):
    """Many joins within the window reach a subscriber as one presence frame."""
    async with connect("watcher") as watcher:
        await subscribe(watcher)
        clients = [await ScriptClient.open(app.url, name=f"editor-{n:02d}") for n in range(20)]
        try:
            await asyncio.gather(*(subscribe(client) for client in clients))
            frames = [await watcher.next_event("presence")]
            joined = set(frames[0]["joined"])
            while len(joined) < 20:
                frames.append(await watcher.next_event("presence"))
                joined |= set(frames[-1]["joined"])
        finally:
            await asyncio.gather(*(client.close() for client in clients))
    assert joined == {f"editor-{n:02d}" for n in range(20)}
    assert len(frames) <= 3


async def test_typing(connect):
    """typing goes to the section's other subscribers with the user, and has no reply."""
    async with connect("alice") as alice, connect("bob") as bob:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        await subscribe(alice)
        await subscribe(bob)
        await alice.next_event("presence")
        await alice.send({"type": "typing", "session_id": sid})
        assert await bob.next_event("typing") == {"type": "typing", "session_id": sid, "user": "alice"}
        await alice.call("ping")
        assert [e for e in alice.take_events() if e["type"] == "typing"] == []


async def create_sessions(
    url: str, count: int, document_id: str = "d", section_id: str = "s", writers: int = 8
) -> list[dict]:
    """`count` sessions in one section, created over several connections at once (the server batches their fsyncs)."""

    async def write(n: int) -> list[dict]:
        async with ScriptClient.connect(url, name=f"creator-{n}") as creator:
            mine = range(n, count, writers)
            return [
                (await creator.call("create_session", document_id=document_id, section_id=section_id))["session"]
                for _ in mine
            ]

    return [session for batch in await asyncio.gather(*(write(n) for n in range(writers))) for session in batch]


def stored_order(listed: list[dict]) -> list[str]:
    return [session["session_id"] for session in listed]


@pytest.mark.timeout(120)
async def test_subscribed_snapshot_is_bounded(app, connect):
    """Past 1,000 sessions the snapshot holds the 1,000 most recently active, oldest created first, and says it is partial."""
    await create_sessions(app.url, MAX_LISTED_SESSIONS + 5)
    async with connect("alice") as alice:
        everything = []
        page = await alice.call("list_sessions", document_id="d", section_id="s")
        while True:
            everything += page["sessions"]
            if page["next_cursor"] is None:
                break
            page = await alice.call("list_sessions", document_id="d", section_id="s", cursor=page["next_cursor"])
        assert len(everything) == MAX_LISTED_SESSIONS + 5
        # The three oldest sessions become the most recently active ones.
        for session in everything[:3]:
            await alice.call("send_message", session_id=session["session_id"], text="still going")
        reply = await subscribe(alice)
    assert reply["sessions_complete"] is False
    assert len(reply["sessions"]) == MAX_LISTED_SESSIONS
    listed = {session["session_id"]: session for session in everything}
    # Which ones: the active three, then the newest created; the 5 left out are the oldest idle ones.
    left_out = set(listed) - set(stored_order(reply["sessions"]))
    assert left_out == set(stored_order(everything[3:8]))
    # In what order: oldest created first, as list_sessions has them.
    assert stored_order(reply["sessions"]) == [sid for sid in stored_order(everything) if sid not in left_out]
    created = [session["created_at"] for session in reply["sessions"]]
    assert created == sorted(created)
    # Each session is as it is now (the active ones with their message).
    assert [session["last_seq"] for session in reply["sessions"][:3]] == [1, 1, 1]
    assert all(session == listed[session["session_id"]] for session in reply["sessions"][3:])


@pytest.mark.timeout(60)
async def test_subscribed_snapshot_is_complete_up_to_the_bound(app, connect):
    """A section of exactly 1,000 sessions is sent whole, with sessions_complete true."""
    created = await create_sessions(app.url, MAX_LISTED_SESSIONS)
    async with connect("alice") as alice:
        reply = await subscribe(alice)
    assert reply["sessions_complete"] is True
    assert sorted(stored_order(reply["sessions"])) == sorted(stored_order(created))


async def test_an_empty_section_still_says_read_and_unread(connect):
    """`read` and `unread` are always present, empty when no session is listed."""
    async with connect("alice") as alice:
        reply = await subscribe(alice, section_id="empty")
        listed = await alice.call("list_sessions", document_id="d", section_id="empty")
    assert (reply["read"], reply["unread"], listed["read"], listed["unread"]) == ({}, {}, {}, {})
