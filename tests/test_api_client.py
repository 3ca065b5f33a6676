"""client.api.ApiClient against a real in-process server with an API key: every path, the errors, odd ids."""

from __future__ import annotations

import pytest
from conftest import API_KEY

from client import ScriptClient
from client.api import ApiClient, Unauthorized
from client.chat import BadRequest, Conflict, NotFound
from protocol.messages import MessageDeleted, MessageEdited, MessageEvent, ReactionEvent, SessionCreated

pytestmark = pytest.mark.timeout(60)

KEY = API_KEY


@pytest.fixture
async def api(api_app):
    async with ApiClient(f"http://127.0.0.1:{api_app.api_port}", KEY) as client:
        yield client


async def test_sessions_create_get_update_list(api: ApiClient):
    created = await api.create_session("bot", "doc", "intro", title="Hi", metadata={"k": 1}, idempotency_key="one")
    assert created.created and created.session.title == "Hi" and created.session.created_by == "bot"
    again = await api.create_session("bot", "doc", "intro", title="Hi", idempotency_key="one")
    assert not again.created and again.session.session_id == created.session.session_id
    sid = created.session.session_id
    assert (await api.get_session(sid)) == created.session

    renamed = await api.update_session(sid, "bot", title="Renamed")
    assert renamed.title == "Renamed" and renamed.metadata == {"k": 1}  # UNSET: metadata untouched
    closed = await api.update_session(sid, "bot", closed=True)
    assert closed.closed and closed.title == "Renamed"
    assert (await api.update_session(sid, "bot", closed=True)).closed  # already closed: not a conflict
    cleared = await api.update_session(sid, "bot", title=None, metadata=None, closed=False)
    assert cleared.title is None and cleared.metadata is None and not cleared.closed

    other = (await api.create_session("bot", "doc", "body")).session
    page = await api.list_sessions("doc")
    assert {s.session_id for s in page.sessions} == {sid, other.session_id}
    assert [s.session_id for s in (await api.list_sessions("doc", section_id="body")).sessions] == [other.session_id]
    await api.update_session(other.session_id, "bot", closed=True)
    assert [s.session_id for s in (await api.list_sessions("doc", closed=True)).sessions] == [other.session_id]
    first = await api.list_sessions("doc", limit=1)
    assert len(first.sessions) == 1 and first.next_cursor is not None
    rest = await api.list_sessions("doc", limit=1, cursor=first.next_cursor)
    assert {first.sessions[0].session_id, rest.sessions[0].session_id} == {sid, other.session_id}


async def test_messages_history_edit_delete_react_read(api: ApiClient):
    sid = (await api.create_session("bot", "doc", "intro")).session.session_id
    sent = await api.send_message(sid, "bot", "hello", client_msg_id="m1", mentions=["alice"])
    assert sent.created and sent.message.seq == 1 and sent.message.mentions == ["alice"]
    repeat = await api.send_message(sid, "bot", "hello", client_msg_id="m1")
    assert not repeat.created and repeat.message.message_id == sent.message.message_id
    await api.send_message(sid, "carol", "second")

    page = await api.history(sid)
    assert [m.text for m in page.messages] == ["hello", "second"] and not page.has_more
    assert [m.seq for m in (await api.history(sid, after_seq=1)).messages] == [2]
    assert [m.seq for m in (await api.history(sid, before_seq=2)).messages] == [1]
    assert (await api.history(sid, limit=1)).has_more

    edited = await api.edit_message(sid, 1, "bot", "hello there")
    assert edited.text == "hello there" and edited.edited_at is not None
    reaction = await api.react(sid, 1, "carol", "👍")
    assert (reaction.reaction, reaction.user, reaction.on) == ("👍", "carol", True)
    assert not (await api.react(sid, 1, "carol", "👍", on=False)).on
    read = await api.mark_read(sid, "carol", 2)
    assert (read.session_id, read.seq) == (sid, 2)
    tombstone = await api.delete_message(sid, 2, "carol")
    assert tombstone.deleted_at is not None and tombstone.seq == 2


async def test_summary_move_events_delete(api: ApiClient):
    sid = (await api.create_session("bot", "doc", "intro")).session.session_id
    await api.send_message(sid, "bot", "one")
    await api.send_message(sid, "bot", "two")
    summary = await api.document_summary("doc", user="carol")
    assert summary.document_id == "doc"
    assert [(s.section_id, s.sessions, s.messages, s.unread) for s in summary.sections] == [("intro", 1, 2, 2)]

    events = await api.events("doc", "intro")
    assert [type(e) for e in events.events] == [SessionCreated, MessageEvent, MessageEvent]
    assert events.offset == 3 and not events.has_more
    later = await api.events("doc", "intro", since_offset=1, epoch=events.epoch, limit=1)
    assert [type(e) for e in later.events] == [MessageEvent] and later.has_more
    with pytest.raises(Conflict) as caught:
        await api.events("doc", "intro", epoch="not-the-epoch")
    assert caught.value.status == 409  # type: ignore[attr-defined]

    await api.edit_message(sid, 1, "bot", "uno")
    await api.react(sid, 1, "bot", "ok")
    await api.delete_message(sid, 2, "bot")
    kinds = [type(e) for e in (await api.events("doc", "intro", since_offset=3)).events]
    assert kinds == [MessageEdited, ReactionEvent, MessageDeleted]

    moved = await api.move_sessions("doc", "bot", "intro", "body", session_ids=[sid])
    assert (moved.from_section_id, moved.to_section_id) == ("intro", "body")
    assert [s.section_id for s in moved.sessions] == ["body"]
    deleted = await api.delete_document("doc")
    assert (deleted.sessions_deleted, deleted.messages_deleted) == (1, 2)
    assert (await api.delete_document("doc")).sessions_deleted == 0
    with pytest.raises(NotFound):
        await api.get_session(sid)


@pytest.mark.parametrize("odd", ["a/b", "100%", "with space", "Grüße/文档 ?#&=+"])
async def test_ids_round_trip(api: ApiClient, odd: str):
    created = await api.create_session(odd, odd, odd, title=odd)
    sid = created.session.session_id
    assert (created.session.document_id, created.session.section_id, created.session.created_by) == (odd, odd, odd)
    assert (await api.send_message(sid, odd, odd)).message.author == odd
    assert [s.session_id for s in (await api.list_sessions(odd, section_id=odd)).sessions] == [sid]
    assert [s.section_id for s in (await api.document_summary(odd, user=odd)).sections] == [odd]
    assert len((await api.events(odd, odd)).events) == 2
    assert (await api.delete_message(sid, 1, odd)).deleted_at is not None
    assert (await api.delete_document(odd)).sessions_deleted == 1


async def test_errors_carry_their_class_code_and_status(api: ApiClient, api_app):
    with pytest.raises(NotFound) as not_found:
        await api.get_session("no-such-session")
    assert not_found.value.code == "not_found" and not_found.value.status == 404  # type: ignore[attr-defined]
    assert not_found.value.request == "GET /api/v1/sessions/no-such-session"

    sid = (await api.create_session("bot", "doc", "intro")).session.session_id
    await api.update_session(sid, "bot", closed=True)
    with pytest.raises(Conflict) as conflict:
        await api.send_message(sid, "bot", "too late")
    assert conflict.value.status == 409 and not conflict.value.temporary  # type: ignore[attr-defined]

    with pytest.raises(BadRequest) as bad:
        await api.create_session("", "doc", "intro")
    assert bad.value.status == 400  # type: ignore[attr-defined]
    with pytest.raises(BadRequest):
        await api.history(sid, limit=0)

    async with ApiClient(f"http://127.0.0.1:{api_app.api_port}", "wrong") as wrong:
        with pytest.raises(Unauthorized) as unauthorized:
            await wrong.get_session(sid)
    assert unauthorized.value.status == 401


async def test_writes_reach_websocket_subscribers(api: ApiClient, api_app):
    async with ScriptClient.connect(api_app.url, name="alice") as alice:
        await alice.call("subscribe", document_id="doc", section_id="intro")
        sid = (await api.create_session("bot", "doc", "intro", title="From the backend")).session.session_id
        assert (await alice.next_event("session_created"))["session"]["session_id"] == sid
        await api.send_message(sid, "bot", "hello, sockets")
        event = await alice.next_event("message")
        assert (event["message"]["author"], event["message"]["text"]) == ("bot", "hello, sockets")
