"""Every request's reply and every error that applies, against a real server on port 0."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid

import msgspec
import pytest

from client import ScriptClient
from protocol.messages import MAX_LISTED_SESSIONS
from server import __version__

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def assert_uuid4(value: str) -> None:
    assert uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value


async def test_welcome(connect):
    """The server speaks first, naming the connection, the user and the limits."""
    async with connect("alice") as alice:
        welcome = alice.welcome
    assert set(welcome) == {"type", "connection_id", "user", "protocol", "server", "limits", "roles"}
    assert welcome["roles"] == []  # open mode has no moderators
    assert welcome["type"] == "welcome"
    assert welcome["user"] == "alice"
    assert welcome["protocol"] == 1
    assert welcome["server"] == f"sectionchat/{__version__}"
    assert welcome["limits"] == {
        "max_frame_bytes": 65536,
        "max_text_chars": 8000,
        "messages_per_s": 0,
        "max_subscriptions": 100,
    }
    assert isinstance(welcome["connection_id"], str) and welcome["connection_id"]


async def test_anonymous_user(connect):
    """Without a name the user is anon- plus six hex digits."""
    async with connect() as anonymous:
        assert re.fullmatch(r"anon-[0-9a-f]{6}", anonymous.user)


async def test_create_session(connect):
    """create_session replies with the whole new session."""
    async with connect("alice") as alice:
        reply = await alice.request(
            "create_session", id="c1", document_id="spec-7", section_id="intro", title="Wording"
        )
    assert set(reply) == {"type", "reply_to", "session"}
    assert reply["type"] == "session_created"
    assert reply["reply_to"] == "c1"
    session = reply["session"]
    assert set(session) == {
        "session_id",
        "document_id",
        "section_id",
        "title",
        "created_by",
        "created_at",
        "closed",
        "last_seq",
        "last_activity_at",
        "metadata",
    }
    assert_uuid4(session["session_id"])
    assert session["document_id"] == "spec-7"
    assert session["section_id"] == "intro"
    assert session["title"] == "Wording"
    assert session["created_by"] == "alice"
    assert RFC3339_MS.match(session["created_at"])
    assert session["closed"] is False
    assert session["last_seq"] == 0
    assert session["last_activity_at"] == session["created_at"] and session["metadata"] is None


async def test_create_session_without_title(connect):
    """A session may have no title: null on the wire."""
    async with connect("alice") as alice:
        reply = await alice.call("create_session", document_id="d", section_id="s")
    assert reply["session"]["title"] is None


async def test_request_without_id_gets_reply_without_reply_to(connect):
    """reply_to is absent when the request had no id."""
    async with connect("alice") as alice:
        await alice.send({"type": "ping"})
        assert await alice.next_event() == {"type": "pong"}


async def test_idempotent_create_session(connect):
    """The same idempotency_key from the same user in the same section returns the same session."""
    async with connect("alice") as alice, connect("bob") as bob:
        first = await alice.call("create_session", document_id="d", section_id="s", idempotency_key="k1")
        again = await alice.call("create_session", document_id="d", section_id="s", idempotency_key="k1")
        other_user = await bob.call("create_session", document_id="d", section_id="s", idempotency_key="k1")
        other_section = await alice.call("create_session", document_id="d", section_id="s2", idempotency_key="k1")
        listed = await alice.call("list_sessions", document_id="d", section_id="s")
    assert again["session"] == first["session"]
    assert other_user["session"]["session_id"] != first["session"]["session_id"]
    assert other_section["session"]["session_id"] != first["session"]["session_id"]
    assert [s["session_id"] for s in listed["sessions"]] == [
        first["session"]["session_id"],
        other_user["session"]["session_id"],
    ]


async def test_get_session(connect):
    """get_session returns the session as it is now."""
    async with connect("alice") as alice:
        created = await alice.call("create_session", document_id="d", section_id="s", title="t")
        sid = created["session"]["session_id"]
        await alice.call("send_message", session_id=sid, text="one")
        reply = await alice.request("get_session", id=5, session_id=sid)
    sent_at = reply["session"]["last_activity_at"]
    assert sent_at >= created["session"]["created_at"]
    assert reply == {
        "type": "session",
        "reply_to": 5,
        "session": {**created["session"], "last_seq": 1, "last_activity_at": sent_at},
    }


async def test_unknown_session_is_not_found(connect):
    """Requests naming an unknown session get not_found, temporary false."""
    async with connect("alice") as alice:
        for request in ("get_session", "history", "close_session", "typing"):
            reply = await alice.request(request, id=request, session_id="no-such-session")
            assert reply["type"] == "error"
            assert reply["reply_to"] == request
            assert reply["code"] == "not_found"
            assert reply["temporary"] is False
            assert reply["message"]
        reply = await alice.request("send_message", session_id=str(uuid.uuid4()), text="hi")
        assert reply["code"] == "not_found"


async def test_list_sessions(connect):
    """list_sessions covers a document or one section of it, oldest first."""
    async with connect("alice") as alice:
        ids = []
        for section in ("a", "b", "a", "c"):
            reply = await alice.call("create_session", document_id="doc", section_id=section)
            ids.append(reply["session"]["session_id"])
        await alice.call("create_session", document_id="other-doc", section_id="a")
        whole = await alice.request("list_sessions", id=1, document_id="doc")
        section_a = await alice.call("list_sessions", document_id="doc", section_id="a")
        empty = await alice.call("list_sessions", document_id="nothing-here")
    assert whole["type"] == "sessions" and whole["reply_to"] == 1
    # Oldest first; sessions created in the same millisecond may come in either order.
    assert sorted(s["session_id"] for s in whole["sessions"]) == sorted(ids)
    created = [s["created_at"] for s in whole["sessions"]]
    assert created == sorted(created)
    assert [s["session_id"] for s in section_a["sessions"]] == [ids[0], ids[2]]
    assert empty["sessions"] == []


async def test_send_message(connect):
    """send_message is acknowledged with the stored message; seqs count 1, 2, 3."""
    async with connect("alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        acks = [await alice.request("send_message", id=n, session_id=sid, text=f"m{n}") for n in range(3)]
    for n, ack in enumerate(acks):
        assert set(ack) == {"type", "reply_to", "message"}
        assert ack["type"] == "message_ack" and ack["reply_to"] == n
        message = ack["message"]
        assert set(message) == {
            "session_id", "seq", "message_id", "author", "text", "client_msg_id", "sent_at",
            "mentions", "edited_at", "deleted_at", "reactions",
        }  # fmt: skip
        assert (message["mentions"], message["edited_at"], message["deleted_at"], message["reactions"]) == (
            [], None, None, {},
        )  # fmt: skip
        assert message["session_id"] == sid
        assert message["seq"] == n + 1
        assert_uuid4(message["message_id"])
        assert message["author"] == "alice"
        assert message["text"] == f"m{n}"
        assert message["client_msg_id"] is None
        assert RFC3339_MS.match(message["sent_at"])


async def test_client_msg_id_deduplicates(connect):
    """A repeated client_msg_id returns the original message and stores nothing new."""
    async with connect("alice") as alice, connect("bob") as bob:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        await bob.call("subscribe", document_id="d", section_id="s")
        first = await alice.call("send_message", session_id=sid, text="hello", client_msg_id="cm-1")
        again = await alice.call("send_message", session_id=sid, text="hello (retry)", client_msg_id="cm-1")
        marker = await alice.call("send_message", session_id=sid, text="after")
        events = await bob.next_events("message", 2)
        history = await alice.call("history", session_id=sid)
    assert again["message"] == first["message"]
    assert first["message"]["client_msg_id"] == "cm-1"
    assert [e["message"]["seq"] for e in events] == [1, 2]
    assert events[1]["message"] == marker["message"]
    assert [m["text"] for m in history["messages"]] == ["hello", "after"]


async def test_text_limits(connect):
    """Text over max_text_chars is too_large; empty text is bad_request."""
    async with connect("alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        exact = await alice.request("send_message", session_id=sid, text="x" * 8000)
        over = await alice.request("send_message", id="big", session_id=sid, text="x" * 8001)
        empty = await alice.request("send_message", session_id=sid, text="")
    assert exact["type"] == "message_ack"
    assert over["type"] == "error" and over["code"] == "too_large" and over["reply_to"] == "big"
    assert over["temporary"] is False
    assert empty["code"] == "bad_request"


async def test_close_session(connect):
    """close_session closes for good: later sends are conflict, closing again too."""
    async with connect("alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        await alice.call("send_message", session_id=sid, text="last words")
        closed = await alice.request("close_session", id="x", session_id=sid)
        send = await alice.request("send_message", session_id=sid, text="too late")
        again = await alice.request("close_session", session_id=sid)
        typing = await alice.request("typing", session_id=sid)
        fetched = await alice.call("get_session", session_id=sid)
    assert closed["type"] == "session_closed" and closed["reply_to"] == "x"
    assert set(closed) == {"type", "reply_to", "session"}
    assert closed["session"]["closed"] is True and closed["session"]["last_seq"] == 1
    for error in (send, again, typing):
        assert error["type"] == "error" and error["code"] == "conflict" and error["temporary"] is False
    assert fetched["session"] == closed["session"]


async def test_history_pages(connect):
    """history: newest page by default, after_seq and before_seq cursors, has_more both ways."""
    async with connect("alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        for n in range(1, 8):
            await alice.call("send_message", session_id=sid, text=str(n))

        async def page(**cursor):
            reply = await alice.call("history", session_id=sid, **cursor)
            assert reply["type"] == "history" and reply["session_id"] == sid
            return [m["seq"] for m in reply["messages"]], reply["has_more"]

        assert await page() == ([1, 2, 3, 4, 5, 6, 7], False)
        assert await page(limit=3) == ([5, 6, 7], True)
        assert await page(limit=7) == ([1, 2, 3, 4, 5, 6, 7], False)
        assert await page(before_seq=5, limit=3) == ([2, 3, 4], True)
        assert await page(before_seq=4, limit=3) == ([1, 2, 3], False)
        assert await page(before_seq=1) == ([], False)
        assert await page(after_seq=0, limit=3) == ([1, 2, 3], True)
        assert await page(after_seq=4, limit=3) == ([5, 6, 7], False)
        assert await page(after_seq=7) == ([], False)
        assert await page(after_seq=100) == ([], False)
        both = await alice.request("history", session_id=sid, after_seq=1, before_seq=3)
        assert both["code"] == "bad_request"


async def test_history_of_empty_session(connect):
    """A session with no messages has an empty history."""
    async with connect("alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        reply = await alice.request("history", id=9, session_id=sid)
    assert reply == {"type": "history", "reply_to": 9, "session_id": sid, "messages": [], "has_more": False}


async def test_ping(connect):
    """ping is answered with pong."""
    async with connect("alice") as alice:
        assert await alice.request("ping", id="p") == {"type": "pong", "reply_to": "p"}


async def test_bad_input_keeps_the_connection(connect):
    """Errors never close the connection: after each, the next request works."""
    async with connect("alice") as alice:
        await alice.send_raw("this is not json")
        assert (await alice.next_event("error"))["code"] == "bad_request"
        await alice.send_raw(b"\x00binary")
        binary = await alice.next_event("error")
        assert binary["code"] == "bad_request" and "binary" in binary["message"]
        await alice.send_raw('{"type":"create_session","id":4,"document_id":"d"}')
        missing = await alice.next_event("error")
        assert missing["reply_to"] == 4 and "section_id" in missing["message"]
        reply = await alice.request("warp_drive", id="w")
        assert reply == {
            "type": "error",
            "reply_to": "w",
            "code": "unknown_type",
            "message": "unknown request type 'warp_drive'",
            "temporary": False,
        }
        assert (await alice.request("ping"))["type"] == "pong"


async def test_oversized_frame_closes_with_1009(connect):
    """A frame over max_frame_bytes closes that connection with 1009, and nobody else's."""
    async with connect("alice") as alice, connect("bob") as bob:
        await alice.send_raw('{"type":"ping","pad":"' + "x" * 70_000 + '"}')
        assert await alice.wait_closed() == 1009
        assert (await bob.request("ping"))["type"] == "pong"


async def test_invalid_name_is_refused(app):
    """A name that is not 1-64 printable characters is refused at the handshake."""
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        async with ScriptClient.connect(app.url, name="x" * 65):
            pass
    assert refused.value.response.status_code == 400


async def test_msgpack_subprotocol(app):
    """With sectionchat.v1.msgpack every frame is a MessagePack map with the same fields."""
    async with ScriptClient.connect(app.url, name="mp", subprotocol="sectionchat.v1.msgpack") as client:
        assert client.websocket.subprotocol == "sectionchat.v1.msgpack"
        assert client.welcome["user"] == "mp"
        reply = await client.call("create_session", document_id="d", section_id="s")
        assert reply["session"]["created_by"] == "mp"
        await client.send_raw('{"type":"ping"}')
        assert "text frames" in (await client.next_event("error"))["message"]


async def test_json_subprotocol_is_selected(app):
    """A client offering sectionchat.v1 gets it."""
    async with ScriptClient.connect(app.url, subprotocol="sectionchat.v1") as client:
        assert client.websocket.subprotocol == "sectionchat.v1"
        assert (await client.request("ping"))["type"] == "pong"


async def test_ids_are_data_not_paths(connect, data_dir):
    """Ids with .., slashes, Unicode and 128 characters are stored inside the data dir only."""
    nasty = ["../../etc/passwd", "/absolute/path", "..", "a/../../b", "ünïcødé ✓ 文档", "x" * 128, "C:\\windows", " "]
    async with connect("alice") as alice:
        for document_id in nasty:
            for section_id in nasty[:3]:
                reply = await alice.call("create_session", document_id=document_id, section_id=section_id)
                assert reply["session"]["document_id"] == document_id
                assert reply["session"]["section_id"] == section_id
        for document_id in nasty:
            listed = await alice.call("list_sessions", document_id=document_id)
            assert len(listed["sessions"]) == 3
    root = data_dir.resolve()
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root)
    assert not (root.parent / "etc").exists()


async def test_a_crashing_request_is_internal_with_trace_id(connect, app, monkeypatch):
    """Our own bug becomes `internal` naming a trace id; the connection carries on."""

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("server.chat.session_page", broken)
    async with connect("alice") as alice:
        reply = await alice.request("list_sessions", id=1, document_id="d")
        assert reply["code"] == "internal" and reply["temporary"] is False
        assert re.search(r"trace id [0-9a-f]{12}", reply["message"])
        assert (await alice.request("ping"))["type"] == "pong"


def test_frames_are_objects():
    """The wire format is one JSON object per frame (sanity check of the encoder)."""
    assert isinstance(msgspec.json.decode(b'{"type":"pong"}'), dict)


async def list_all(client, limit: int | None = None, **fields) -> tuple[list[dict], list[dict]]:
    """Every page of a listing: (the sessions in page order, the replies)."""
    sessions, replies, cursor = [], [], None
    while True:
        extra = {"limit": limit} if limit is not None else {}
        if cursor is not None:
            extra["cursor"] = cursor
        reply = await client.call("list_sessions", **fields, **extra)
        replies.append(reply)
        sessions += reply["sessions"]
        cursor = reply["next_cursor"]
        if cursor is None:
            return sessions, replies


async def create_many(url: str, document_id: str, sections: list[str], writers: int = 4) -> list[dict]:
    """Sessions in several sections at once, over several connections (many share a millisecond)."""

    async def write(n: int) -> list[dict]:
        async with ScriptClient.connect(url, name=f"w{n}") as writer:
            return [
                (await writer.call("create_session", document_id=document_id, section_id=section))["session"]
                for section in sections[n::writers]
            ]

    return [session for batch in await asyncio.gather(*(write(n) for n in range(writers))) for session in batch]


async def test_list_sessions_pages(connect, app):
    """`limit` and `cursor` page a listing: the pages put together are the whole listing, in order, each session once."""
    created = await create_many(app.url, "doc", [f"s{n % 3}" for n in range(40)])
    async with connect("alice") as alice:
        whole = await alice.request("list_sessions", id="all", document_id="doc")
        assert whole["next_cursor"] is None and "next_cursor" in whole and whole["reply_to"] == "all"
        assert sorted(s["session_id"] for s in whole["sessions"]) == sorted(s["session_id"] for s in created)
        for fields in ({"document_id": "doc"}, {"document_id": "doc", "section_id": "s1"}):
            unpaged = (await alice.call("list_sessions", **fields))["sessions"]
            for limit in (1, 3, 7, len(unpaged), len(unpaged) + 1):
                paged, replies = await list_all(alice, limit, **fields)
                assert paged == unpaged, (fields, limit)
                assert all(len(r["sessions"]) == limit for r in replies[:-1])
                assert 1 <= len(replies[-1]["sessions"]) <= limit
        # The limit may change from page to page; the cursor is the position.
        first = await alice.call("list_sessions", document_id="doc", limit=5)
        second = await alice.call("list_sessions", document_id="doc", limit=30, cursor=first["next_cursor"])
        assert first["sessions"] + second["sessions"] == whole["sessions"][:35]
        # An empty listing is one page.
        empty = await alice.call("list_sessions", document_id="nothing", limit=1)
        assert empty["sessions"] == [] and empty["next_cursor"] is None


async def test_list_sessions_default_limit_is_1000(connect, app):
    """Without `limit` a page holds at most 1,000 sessions; the rest follow the cursor."""
    created = await create_many(app.url, "big", ["a", "b"] * ((MAX_LISTED_SESSIONS + 2) // 2), writers=8)
    async with connect("alice") as alice:
        first = await alice.call("list_sessions", document_id="big")
        assert len(first["sessions"]) == MAX_LISTED_SESSIONS and isinstance(first["next_cursor"], str)
        rest = await alice.call("list_sessions", document_id="big", cursor=first["next_cursor"])
        assert len(rest["sessions"]) == 2 and rest["next_cursor"] is None
        listed = [s["session_id"] for s in first["sessions"] + rest["sessions"]]
        assert sorted(listed) == sorted(s["session_id"] for s in created)
        assert (await alice.call("list_sessions", document_id="big", limit=MAX_LISTED_SESSIONS))["sessions"] == first[
            "sessions"
        ]


async def test_list_sessions_new_sessions_while_paging(connect):
    """Sessions created while paging appear at most once; none that existed is skipped."""
    async with connect("alice") as alice:
        before = [
            (await alice.call("create_session", document_id="doc", section_id=f"s{n % 2}"))["session"] for n in range(6)
        ]
        page = await alice.call("list_sessions", document_id="doc", limit=2)
        seen = list(page["sessions"])
        added = []
        while page["next_cursor"] is not None:
            added.append((await alice.call("create_session", document_id="doc", section_id="s0"))["session"])
            page = await alice.call("list_sessions", document_id="doc", limit=2, cursor=page["next_cursor"])
            seen += page["sessions"]
    ids = [s["session_id"] for s in seen]
    assert len(ids) == len(set(ids))
    assert {s["session_id"] for s in before} <= set(ids) <= {s["session_id"] for s in before + added}


async def test_list_sessions_bad_cursor_or_limit(connect):
    """A cursor that does not decode, or was handed out for other fields, is bad_request; so is a limit out of 1-1,000."""
    async with connect("alice") as alice:
        for _ in range(3):
            await alice.call("create_session", document_id="doc", section_id="a")
        cursor = (await alice.call("list_sessions", document_id="doc", section_id="a", limit=1))["next_cursor"]
        forged = base64.urlsafe_b64encode(b'["2026-01-01T00:00:00.000Z","x","0000000000000000"]').decode()
        for n, fields in enumerate(
            [
                {"document_id": "doc", "section_id": "a", "cursor": "not a cursor"},
                {"document_id": "doc", "section_id": "a", "cursor": forged},
                {"document_id": "doc", "section_id": "a", "cursor": cursor[:-4]},
                {"document_id": "doc", "section_id": "a", "cursor": ""},
                {"document_id": "doc", "cursor": cursor},  # another listing: the whole document
                {"document_id": "doc", "section_id": "b", "cursor": cursor},
                {"document_id": "other", "section_id": "a", "cursor": cursor},
                {"document_id": "doc", "limit": 0},
                {"document_id": "doc", "limit": MAX_LISTED_SESSIONS + 1},
                {"document_id": "doc", "limit": "10"},
            ]
        ):
            reply = await alice.request("list_sessions", id=n, **fields)
            assert reply["type"] == "error" and reply["code"] == "bad_request", fields
            assert reply["reply_to"] == n and reply["temporary"] is False
        # The same fields again: the cursor works (and the limit may differ).
        rest = await alice.call("list_sessions", document_id="doc", section_id="a", cursor=cursor, limit=5)
        assert len(rest["sessions"]) == 2 and rest["next_cursor"] is None


@pytest.mark.timeout(60)
async def test_list_sessions_cursor_survives_a_restart(server_process):
    """A cursor encodes a position, not server memory: it pages on after a restart (and a kill -9)."""
    server = server_process()
    created = await create_many(server.url, "doc", [f"s{n % 4}" for n in range(30)])
    async with ScriptClient.connect(server.url, name="alice") as alice:
        whole = (await alice.call("list_sessions", document_id="doc"))["sessions"]
        first = await alice.call("list_sessions", document_id="doc", limit=11)
    assert sorted(s["session_id"] for s in whole) == sorted(s["session_id"] for s in created)
    server.kill()
    restarted = server_process()
    async with ScriptClient.connect(restarted.url, name="alice") as alice:
        rest, _ = await list_all(alice, 7, document_id="doc")  # a fresh listing pages the same
        assert rest == whole
        page = await alice.call("list_sessions", document_id="doc", limit=100, cursor=first["next_cursor"])
    assert first["sessions"] + page["sessions"] == whole
