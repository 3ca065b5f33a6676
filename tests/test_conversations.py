"""Revision 1.1's conversations over real sockets: edits, deletes, reactions, mentions, session changes."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ServerProcess, redis_values

from client import ScriptClient
from server.app import running
from server.auth import mint_token
from server.config import Config

pytestmark = pytest.mark.timeout(60)

DOC, SECTION = "spec-7", "intro"
SECRET = "a-test-secret-long-enough-for-every-hmac-algorithm-0123456789abcdef"


async def new_session(client: ScriptClient, **fields) -> str:
    reply = await client.call("create_session", document_id=DOC, section_id=SECTION, **fields)
    return reply["session"]["session_id"]


async def test_edits_deletes_and_reactions_reach_subscribers_in_offset_order(connect):
    async with connect("alice") as alice, connect("bob") as bob:
        snapshot = await bob.call("subscribe", document_id=DOC, section_id=SECTION)
        sid = await new_session(alice)
        sent = (await alice.call("send_message", session_id=sid, text="helo"))["message"]
        assert (sent["mentions"], sent["edited_at"], sent["deleted_at"], sent["reactions"]) == ([], None, None, {})
        edited = (await alice.call("edit_message", session_id=sid, seq=1, text="hello"))["message"]
        reaction = await bob.call("react", session_id=sid, seq=1, reaction="👍")
        assert {k: reaction[k] for k in ("session_id", "seq", "reaction", "user", "on")} == {
            "session_id": sid, "seq": 1, "reaction": "👍", "user": "bob", "on": True,
        }  # fmt: skip
        assert "offset" not in reaction  # the reply form
        deleted = (await alice.call("delete_message", session_id=sid, seq=1))["message"]
        last = await bob.next_event("message_deleted")
        events = [e for e in bob.take_events() if "offset" in e] + [last]  # bob's own reaction came as his reply
        start = snapshot["offset"]
        assert [(e["type"], e["offset"]) for e in events] == [
            ("session_created", start + 1), ("message", start + 2), ("message_edited", start + 3),
            ("message_deleted", start + 5),
        ]  # fmt: skip
        assert events[2]["message"] == edited and events[3]["message"] == deleted
        assert deleted["text"] == "" and deleted["reactions"] == {} and deleted["deleted_at"] >= edited["edited_at"]
        history = await bob.call("history", session_id=sid)
        assert history["messages"] == [deleted]  # the tombstone, in its place


async def test_recovery_serves_tombstones_in_place_of_the_deleted_message(connect):
    async with connect("alice") as alice:
        sid = await new_session(alice)
        subscribed = await alice.call("subscribe", document_id=DOC, section_id=SECTION)
        await alice.call("send_message", session_id=sid, text="a secret")
        await alice.call("edit_message", session_id=sid, seq=1, text="a worse secret")
        await alice.call("send_message", session_id=sid, text="kept")
        await alice.call("delete_message", session_id=sid, seq=1)
    async with connect("alice") as again:
        recovered = await again.call(
            "subscribe", document_id=DOC, section_id=SECTION, since_offset=0, epoch=subscribed["epoch"]
        )
        events = recovered["events"]
        assert [e["type"] for e in events] == [
            "session_created",
            "message",
            "message_edited",
            "message",
            "message_deleted",
        ]
        assert [e["offset"] for e in events] == [1, 2, 3, 4, 5]
        assert events[1]["message"]["text"] == events[2]["message"]["text"] == ""
        assert "secret" not in str(recovered) and events[3]["message"]["text"] == "kept"


async def test_the_order_of_checks_for_edits(connect):
    """shape → session → seq → author → a no-op → closed or deleted."""
    async with connect("alice") as alice, connect("bob") as bob:
        sid = await new_session(alice)
        await alice.call("send_message", session_id=sid, text="mine")

        async def code(client, **fields) -> str:
            return (await client.request("edit_message", **fields))["code"]

        assert await code(alice, session_id=sid, seq=0, text="x") == "bad_request"
        assert await code(alice, session_id=sid, seq=1, text="x" * 8001) == "too_large"
        assert await code(alice, session_id="nope", seq=1, text="x") == "not_found"
        assert await code(bob, session_id=sid, seq=2, text="x") == "not_found"
        assert await code(bob, session_id=sid, seq=1, text="x") == "forbidden"
        await alice.call("close_session", session_id=sid)
        same = await alice.request("edit_message", session_id=sid, seq=1, text="mine")
        assert same["type"] == "message_edited" and same["message"]["edited_at"] is None  # changed nothing
        assert await code(alice, session_id=sid, seq=1, text="changed") == "conflict"
        assert (await alice.request("delete_message", session_id=sid, seq=1))["type"] == "message_deleted"


async def test_moderators_edit_and_delete_anyones_messages_in_token_mode(data_dir):
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0, auth_secret=SECRET)
    async with running(config) as app:
        alice_token, bob_token = mint_token(SECRET, "alice"), mint_token(SECRET, "bob")
        moderator_token = mint_token(SECRET, "mia", roles=["moderator"])
        async with (
            ScriptClient.connect(f"{app.url}?token={alice_token}") as alice,
            ScriptClient.connect(f"{app.url}?token={bob_token}") as bob,
            ScriptClient.connect(f"{app.url}?token={moderator_token}") as mia,
        ):
            assert (alice.welcome["roles"], mia.welcome["roles"]) == ([], ["moderator"])
            sid = await new_session(alice, title="Alice's")
            await alice.call("send_message", session_id=sid, text="rude word")
            assert (await bob.request("edit_message", session_id=sid, seq=1, text="x"))["code"] == "forbidden"
            assert (await bob.request("update_session", session_id=sid, title="Bob's"))["code"] == "forbidden"
            edited = await mia.call("edit_message", session_id=sid, seq=1, text="[removed]")
            assert edited["message"]["author"] == "alice" and edited["message"]["text"] == "[removed]"
            assert (await mia.call("update_session", session_id=sid, title="Moderated"))["session"][
                "title"
            ] == "Moderated"
            assert (await mia.call("delete_message", session_id=sid, seq=1))["message"]["deleted_at"] is not None


async def test_mentions_reach_every_connection_of_the_user_once_and_edits_only_new_ones(connect):
    async with connect("alice") as alice, connect("bob") as bob, connect("bob") as bob_tab, connect("carol") as carol:
        sid = await new_session(alice)
        sent = await alice.call("send_message", session_id=sid, text="@bob look", mentions=["bob", "bob", "alice"])
        assert sent["message"]["mentions"] == ["bob", "alice"]
        for tab in (bob, bob_tab):  # not subscribed, notified all the same
            mentioned = await tab.next_event("mentioned")
            assert mentioned == {
                "type": "mentioned",
                "document_id": DOC,
                "section_id": SECTION,
                "message": sent["message"],
            }
        await alice.call("edit_message", session_id=sid, seq=1, text="@bob @carol look", mentions=["bob", "carol"])
        assert (await carol.next_event("mentioned"))["message"]["mentions"] == ["bob", "carol"]
        await alice.call("ping")
        assert [e for e in bob.take_events() if e["type"] == "mentioned"] == []  # bob was named before
        assert [e for e in alice.take_events() if e["type"] == "mentioned"] == []  # naming yourself notifies nobody


async def test_reactions_toggle_and_a_repeat_announces_nothing(connect):
    async with connect("alice") as alice, connect("bob") as bob:
        sid = await new_session(alice)
        await alice.call("send_message", session_id=sid, text="vote")
        await alice.call("subscribe", document_id=DOC, section_id=SECTION)
        first = await bob.call("react", session_id=sid, seq=1, reaction="🎉")
        again = await bob.call("react", session_id=sid, seq=1, reaction="🎉")
        assert {k: v for k, v in again.items() if k != "reply_to"} == {
            k: v for k, v in first.items() if k != "reply_to"
        }
        event = await alice.next_event("reaction")
        assert (event["user"], event["on"], event["at"]) == ("bob", True, first["at"])
        await bob.call("react", session_id=sid, seq=1, reaction="🎉", on=False)
        assert (await alice.next_event("reaction"))["on"] is False
        await alice.call("ping")
        assert alice.take_events() == []  # the repeat stored and announced nothing
        assert (await alice.call("history", session_id=sid))["messages"][0]["reactions"] == {}


async def test_sessions_update_reopen_and_list_by_activity(connect):
    async with connect("alice") as alice:
        first = await new_session(alice, title="first", metadata={"anchor": {"from": 10, "to": 20}, "quote": "naïve"})
        second = await new_session(alice, title="second")
        listed = await alice.call("list_sessions", document_id=DOC, order="activity")
        assert [s["session_id"] for s in listed["sessions"]] == [second, first]
        await alice.call("send_message", session_id=first, text="bump")
        listed = await alice.call("list_sessions", document_id=DOC, order="activity")
        assert [s["session_id"] for s in listed["sessions"]] == [first, second]
        assert listed["sessions"][0]["metadata"] == {"anchor": {"from": 10, "to": 20}, "quote": "naïve"}
        updated = await alice.call("update_session", session_id=first, metadata=None)
        assert updated["session"]["title"] == "first" and updated["session"]["metadata"] is None
        await alice.call("close_session", session_id=second)
        assert (await alice.request("reopen_session", session_id=first))["code"] == "conflict"
        open_ones = await alice.call("list_sessions", document_id=DOC, closed=False)
        assert [s["session_id"] for s in open_ones["sessions"]] == [first]
        reopened = await alice.call("reopen_session", session_id=second)
        assert reopened["session"]["closed"] is False
        assert reopened["session"]["last_activity_at"] >= updated["session"]["last_activity_at"]
        assert (await alice.request("create_session", document_id=DOC, section_id="s", metadata={"x": "y" * 5000}))[
            "code"
        ] == "too_large"


async def test_everything_of_a_conversation_survives_kill_9(server_process, data_dir):
    """Every 1.1 write is durable before its reply: a kill -9 and restart keeps each one, offsets and all."""
    server = server_process()
    async with ScriptClient.connect(server.url, name="alice") as alice:
        sid = await new_session(alice, metadata={"k": 1})
        await alice.call("send_message", session_id=sid, text="one", mentions=["bob"])
        await alice.call("send_message", session_id=sid, text="two")
        await alice.call("edit_message", session_id=sid, seq=1, text="one, edited")
        await alice.call("react", session_id=sid, seq=1, reaction="👍")
        await alice.call("delete_message", session_id=sid, seq=2)
        await alice.call("update_session", session_id=sid, title="renamed")
        await alice.call("close_session", session_id=sid)
        await alice.call("reopen_session", session_id=sid)
        before = await alice.call("history", session_id=sid)
        session_before = (await alice.call("get_session", session_id=sid))["session"]
        epoch = (await alice.call("subscribe", document_id=DOC, section_id=SECTION))["epoch"]
    server.kill()
    restarted = ServerProcess(data_dir).start(server.port)
    try:
        async with ScriptClient.connect(restarted.url, name="bob") as bob:
            assert (await bob.call("history", session_id=sid))["messages"] == before["messages"]
            assert (await bob.call("get_session", session_id=sid))["session"] == session_before
            recovered = await bob.call("subscribe", document_id=DOC, section_id=SECTION, since_offset=0, epoch=epoch)
            assert [e["type"] for e in recovered["events"]] == [
                "session_created", "message", "message", "message_edited", "reaction", "message_deleted",
                "session_updated", "session_closed", "session_reopened",
            ]  # fmt: skip
            assert [e["offset"] for e in recovered["events"]] == list(range(1, 10))
            # The edit is found after the restart too (read from storage, not memory): edit it again.
            again = await bob.call("react", session_id=sid, seq=1, reaction="🎉")
            assert again["seq"] == 1
            assert (await bob.call("history", session_id=sid))["messages"][0]["reactions"] == {
                "👍": ["alice"],
                "🎉": ["bob"],
            }
    finally:
        restarted.close()


async def test_read_markers_unread_counts_and_every_tab_clears_its_badge(connect):
    async with connect("alice") as alice, connect("bob") as bob, connect("bob") as bob_tab:
        sid = await new_session(alice)
        for n in range(3):
            await alice.call("send_message", session_id=sid, text=f"m{n}")
        await alice.call("send_message", session_id=sid, text="gone")
        await alice.call("delete_message", session_id=sid, seq=4)
        subscribed = await bob_tab.call("subscribe", document_id=DOC, section_id=SECTION)
        assert (subscribed["read"], subscribed["unread"]) == ({sid: 0}, {sid: 3})  # the deleted one is not unread
        listed = await bob.call("list_sessions", document_id=DOC)
        assert (listed["read"], listed["unread"]) == ({sid: 0}, {sid: 3})
        marked = await bob.request("mark_read", id=7, session_id=sid, seq=2)
        assert marked == {"type": "read_marked", "reply_to": 7, "session_id": sid, "seq": 2}
        assert await bob_tab.next_event("read") == {"type": "read", "session_id": sid, "seq": 2}
        assert (await bob.call("mark_read", session_id=sid, seq=1))["seq"] == 2  # never back
        assert (await bob.request("mark_read", session_id=sid, seq=5))["code"] == "bad_request"
        assert (await bob.call("list_sessions", document_id=DOC))["unread"] == {sid: 1}
        await bob.call("send_message", session_id=sid, text="my reply")  # sending marks it read
        assert (await bob.call("list_sessions", document_id=DOC))["read"] == {sid: 5}
        alice_view = await alice.call("list_sessions", document_id=DOC)
        assert (alice_view["read"], alice_view["unread"]) == ({sid: 4}, {sid: 1})
        await alice.call("ping")
        assert [e for e in alice.take_events() if e["type"] == "read"] == []  # only the reader's own tabs hear of it


async def test_read_markers_survive_kill_9(server_process, data_dir):
    server = server_process()
    async with (
        ScriptClient.connect(server.url, name="alice") as alice,
        ScriptClient.connect(server.url, name="bob") as bob,
    ):
        sid = await new_session(alice)
        for n in range(4):
            await alice.call("send_message", session_id=sid, text=f"m{n}")
        await bob.call("mark_read", session_id=sid, seq=3)
    server.kill()
    restarted = ServerProcess(data_dir).start(server.port)
    try:
        async with ScriptClient.connect(restarted.url, name="bob") as bob:
            listed = await bob.call("list_sessions", document_id=DOC)
            assert (listed["read"], listed["unread"]) == ({sid: 3}, {sid: 1})
    finally:
        restarted.close()


async def test_watching_a_document_sends_personal_summaries_when_they_change(connect):
    async with connect("alice") as alice, connect("bob") as bob, connect("carol") as carol:
        intro = await new_session(alice)
        await alice.call("send_message", session_id=intro, text="hi")
        empty = await bob.call("watch_document", document_id="other-doc")
        assert empty["type"] == "document" and empty["sections"] == []
        watched = await bob.request("watch_document", id="w", document_id=DOC)
        assert watched["reply_to"] == "w" and [s["section_id"] for s in watched["sections"]] == [SECTION]
        summary = watched["sections"][0]
        assert {k: summary[k] for k in ("sessions", "open_sessions", "messages", "unread", "mentions")} == {
            "sessions": 1, "open_sessions": 1, "messages": 1, "unread": 1, "mentions": 0,
        }  # fmt: skip
        await carol.call("watch_document", document_id=DOC)
        # A burst of writes in a new section and the old one: one summary per section per watcher.
        other = (await alice.call("create_session", document_id=DOC, section_id="outline"))["session"]["session_id"]
        for n in range(5):
            await alice.call("send_message", session_id=other, text=f"m{n}", mentions=["bob"] if n == 0 else [])
        await alice.call("send_message", session_id=intro, text="more")
        got = {e["summary"]["section_id"]: e["summary"] for e in await bob.next_events("section_summary", 2, timeout=5)}
        assert (got["outline"]["messages"], got["outline"]["unread"], got["outline"]["mentions"]) == (5, 5, 1)
        assert (got[SECTION]["messages"], got[SECTION]["unread"]) == (2, 2)
        carols = await carol.next_events("section_summary", 2, timeout=5)
        assert {e["summary"]["section_id"]: e["summary"]["mentions"] for e in carols} == {"outline": 0, SECTION: 0}
        # Bob reads: only his summary changes; carol gets nothing.
        await bob.call("mark_read", session_id=other, seq=5)
        assert (await bob.next_event("section_summary", timeout=5))["summary"]["unread"] == 0
        await carol.call("unwatch_document", document_id=DOC)
        await alice.call("send_message", session_id=other, text="after carol left")
        assert (await bob.next_event("section_summary", timeout=5))["summary"]["unread"] == 1
        await carol.call("ping")
        assert [e for e in carol.take_events() if e["type"] == "section_summary"] == []


async def test_watched_documents_count_against_the_subscription_limit(data_dir):
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0, max_subscriptions=2)
    async with running(config) as app, ScriptClient.connect(app.url, name="bob") as bob:
        await bob.call("subscribe", document_id=DOC, section_id=SECTION)
        await bob.call("watch_document", document_id=DOC)
        assert (await bob.call("watch_document", document_id=DOC))["type"] == "document"  # again: no new room
        refused = await bob.request("watch_document", document_id="another")
        assert refused["code"] == "bad_request" and "limit" in refused["message"]
        await bob.call("unwatch_document", document_id=DOC)
        assert (await bob.call("subscribe", document_id=DOC, section_id="outline"))["type"] == "subscribed"


async def test_paging_by_activity_while_others_write_never_repeats_or_skips(connect):
    """Sessions created or bumped while a client pages by activity: none twice, none that stayed unchanged left out."""
    async with connect("alice") as alice, connect("pager") as pager:
        ids = [await new_session(alice) for _ in range(30)]
        bumped: set[str] = set()

        async def write_meanwhile() -> None:
            for n in range(20):
                bumped.add(ids[n])
                await alice.call("send_message", session_id=ids[n], text="bump")
                bumped.add(await new_session(alice))

        writer = asyncio.create_task(write_meanwhile())
        seen, cursor = [], None
        while True:
            fields = {"cursor": cursor} if cursor else {}
            page = await pager.call("list_sessions", document_id=DOC, order="activity", limit=4, **fields)
            seen += [s["session_id"] for s in page["sessions"]]
            if (cursor := page["next_cursor"]) is None:
                break
        await writer
        assert len(seen) == len(set(seen)), "a session was listed twice"
        unchanged = set(ids) - bumped
        assert unchanged <= set(seen), f"unchanged sessions skipped: {unchanged - set(seen)}"


@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_a_deleted_text_leaves_storage_and_stays_gone_after_kill_9(server_process, data_dir, request, backend):
    """PROTOCOL.md: deleting redacts, and the text is gone from storage. Every version's, on both backends."""
    storage_args = ("--storage", request.getfixturevalue("redis_server").url) if backend == "redis" else ()
    server = server_process(*storage_args)

    async def stored() -> bytes:
        if backend == "file":
            return b"".join(path.read_bytes() for path in data_dir.rglob("*") if path.is_file())
        return await redis_values(request.getfixturevalue("redis_server").url)

    async with ScriptClient.connect(server.url, name="alice") as alice:
        sid = await new_session(alice)
        await alice.call("send_message", session_id=sid, text="the code is 0000", mentions=["bob"])
        await alice.call("edit_message", session_id=sid, seq=1, text="the code is 1234")
        await alice.call("react", session_id=sid, seq=1, reaction="👍")
        await alice.call("send_message", session_id=sid, text="nothing to hide")
        tombstone = (await alice.call("delete_message", session_id=sid, seq=1))["message"]
        # Files: the journal that still held the text is checkpointed within about a second.
        async with asyncio.timeout(10):
            while b"the code is" in await stored():
                await asyncio.sleep(0.05)
        assert b"nothing to hide" in await stored()
    server.kill()
    restarted = ServerProcess(data_dir, *storage_args).start(server.port)
    try:
        async with ScriptClient.connect(restarted.url, name="bob") as bob:
            history = (await bob.call("history", session_id=sid))["messages"]
            assert history[0] == tombstone and history[1]["text"] == "nothing to hide"
            recovered = await bob.call("subscribe", document_id=DOC, section_id=SECTION, since_offset=0)
            assert [e["type"] for e in recovered["events"]] == [
                "session_created", "message", "message_edited", "reaction", "message", "message_deleted"
            ]  # fmt: skip
            assert b"the code is" not in await stored() and "the code is" not in str(recovered)
    finally:
        restarted.close()
