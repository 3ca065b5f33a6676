"""The section core without sockets and without an event loop: records in, decisions out.

Every rule of every write kind is tested here first; a new record kind gets its
case in `apply`, its rule in `Rules` and its tests in this file.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import get_args

import msgspec
import pytest

from protocol import errors
from protocol.errors import ChatError
from protocol.messages import (
    MAX_LISTED_SESSIONS,
    MAX_MOVED_SESSIONS,
    CloseSession,
    CreateSession,
    DeleteMessage,
    EditMessage,
    History,
    ListSessions,
    MarkRead,
    Message,
    MessageAck,
    MessageDeleted,
    MessageEdited,
    MessageEvent,
    MoveSessions,
    React,
    ReactionEvent,
    ReadEvent,
    ReopenSession,
    SectionSummary,
    SendMessage,
    Session,
    SessionClosed,
    SessionCreated,
    StoredEvent,
    UpdateSession,
)
from server.core import (
    Draft,
    MovePlan,
    OutdatedState,
    Plan,
    Rules,
    SessionElsewhere,
    Stream,
    apply,
    decide,
    history_window,
    newly_mentioned,
    read_state,
    section_summary,
    session_page,
    snapshot_sessions,
)
from server.storage.base import (
    MessageDeletedRecord,
    MessageEditedRecord,
    MessageRecord,
    ReactionRecord,
    ReadRecord,
    SectionKey,
    SessionClosedRecord,
    SessionCreatedRecord,
    SessionMovedRecord,
    SessionReopenedRecord,
    SessionUpdatedRecord,
    StoredRecord,
    erase_deleted,
    reads_key,
    session_id_of,
)

KEY = SectionKey("doc", "sec")


class FixedClock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_rules(**options) -> Rules:
    """Rules whose ids count up and whose clock moves one second per timestamp taken."""
    ids, seconds = itertools.count(1), itertools.count(0)

    def now() -> str:
        n = next(seconds)
        return f"2026-01-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000Z"

    return Rules(now=now, new_id=lambda: f"id-{next(ids)}", **options)


def store(stream: Stream, plans) -> list[Plan | ChatError]:
    """Decide a batch against a draft of the stream, then apply its records as the writer does once they are durable."""
    decided, records = decide(Draft(stream), plans)
    for record in records:
        stream.apply(record)
    return decided


def created(rules: Rules, stream: Stream, user: str = "alice", **fields) -> Session:
    [plan] = store(
        stream, [lambda d: rules.create_session(user, CreateSession(document_id="doc", section_id="sec", **fields), d)]
    )
    assert isinstance(plan, Plan)
    return plan.reply.session


def send(rules: Rules, session_id: str, text: str = "hi", user: str = "alice", **fields):
    return lambda draft: rules.send_message(user, SendMessage(session_id=session_id, text=text, **fields), draft)


def close(rules: Rules, session_id: str, user: str = "alice"):
    return lambda draft: rules.close_session(user, CloseSession(session_id=session_id), draft)


def refusal(decided: Plan | ChatError) -> str:
    assert isinstance(decided, ChatError), decided
    return decided.code


# Offsets, seqs, and the draft -----------------------------------------------------


def test_a_batch_takes_the_next_offsets_and_seqs_in_order():
    rules, stream = make_rules(), Stream(KEY, 100)
    a, b = created(rules, stream), created(rules, stream)
    decided, records = decide(
        Draft(stream), [send(rules, a.session_id), send(rules, b.session_id), send(rules, a.session_id)]
    )
    assert [r.offset for r in records] == [3, 4, 5]
    assert [(p.reply.message.session_id, p.reply.message.seq) for p in decided] == [
        (a.session_id, 1),
        (b.session_id, 1),
        (a.session_id, 2),
    ]
    assert [r.message for r in records] == [p.reply.message for p in decided]


def test_deciding_changes_nothing_until_the_records_are_applied():
    """Readers see the stream; only durable records change it."""
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    draft = Draft(stream)
    decide(draft, [send(rules, session.session_id), close(rules, session.session_id)])
    assert draft.offset == 3 and draft.session(session.session_id).closed
    assert stream.offset == 1 and stream.session(session.session_id) == session
    assert len(stream.state_of(session.session_id).offsets) == 0


def test_a_refusal_takes_no_offset_and_the_batch_goes_on():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    decided = store(stream, [send(rules, "nobody"), send(rules, session.session_id), send(rules, session.session_id)])
    assert refusal(decided[0]) == errors.NOT_FOUND
    assert [r.offset for p in decided[1:] for r in p.records] == [2, 3]
    assert stream.offset == 3 and stream.session(session.session_id).last_seq == 2


def test_events_announce_what_was_stored_with_its_offset():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    store(stream, [send(rules, session.session_id, "one"), close(rules, session.session_id)])
    events = stream.events_after(0)
    assert [type(e) for e in events] == [SessionCreated, MessageEvent, SessionClosed]
    assert [e.offset for e in events] == [1, 2, 3]
    assert events[1].message.text == "one" and events[2].session.closed and events[2].session.last_seq == 1
    assert stream.events_after(3) == [] and stream.events_after(4) is None


def test_every_record_kind_has_one_case_in_apply_and_an_event():
    """A new kind of record fails here until `apply`, `event_of` and `session_id_of` know it."""
    session = Session("s", "doc", "sec", None, "alice", "t1", False, 0)
    message = Message("s", 1, "m", "alice", "hi", None, "t2")
    edited = msgspec.structs.replace(message, text="hey", edited_at="t3")
    deleted = msgspec.structs.replace(message, text="", deleted_at="t5")
    closed = msgspec.structs.replace(session, closed=True, last_seq=1, last_activity_at="t6")
    examples: dict[type, StoredRecord] = {
        SessionCreatedRecord: SessionCreatedRecord(offset=1, session=session),
        MessageRecord: MessageRecord(offset=2, message=message),
        MessageEditedRecord: MessageEditedRecord(offset=3, message=edited),
        ReactionRecord: ReactionRecord(offset=4, message=edited, reaction="+1", user="bob", on=True, at="t4"),
        MessageDeletedRecord: MessageDeletedRecord(offset=5, message=deleted),
        SessionClosedRecord: SessionClosedRecord(offset=6, session=closed),
        SessionReopenedRecord: SessionReopenedRecord(offset=7, session=msgspec.structs.replace(closed, closed=False)),
        SessionUpdatedRecord: SessionUpdatedRecord(offset=8, session=msgspec.structs.replace(closed, title="T")),
        ReadRecord: ReadRecord(offset=9, session_id="s", user="bob", seq=1),
        SessionMovedRecord: SessionMovedRecord(
            offset=10,
            session=msgspec.structs.replace(session, section_id="elsewhere"),
            from_section_id="sec",
            to_section_id="elsewhere",
        ),  # fmt: skip
    }
    assert set(examples) == set(get_args(StoredRecord))
    stream = Stream(KEY, 10)
    for record in list(examples.values())[:-1]:
        event = stream.apply(record)
        assert event.offset == record.offset if type(event) in get_args(StoredEvent) else type(event) is ReadEvent
        assert session_id_of(record) == "s"
    assert stream.session("s").last_activity_at == "t6" and stream.session("s").title == "T"
    moved = examples[SessionMovedRecord]
    assert stream.apply(moved).offset == 10 and session_id_of(moved) == "s" and "s" not in stream.sessions
    with pytest.raises(TypeError):
        apply(stream, "not a record")  # type: ignore[arg-type]


# create_session -----------------------------------------------------------------------


def test_a_session_is_made_from_the_request_the_user_and_the_clock():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream, user="bob", title="Intro")
    assert session == Session("id-1", "doc", "sec", "Intro", "bob", "2026-01-01T00:00:00.000Z", False, 0)
    assert stream.events_after(0)[0].session == session


def test_an_idempotency_key_makes_one_session_within_a_batch_and_across_batches():
    rules, stream = make_rules(), Stream(KEY, 100)
    request = CreateSession(document_id="doc", section_id="sec", idempotency_key="k")
    twice = [lambda d: rules.create_session("alice", request, d)] * 2
    first, again = store(stream, twice)
    assert len(first.records) == 1 and again.records == [] and again.reply.session == first.reply.session
    [later] = store(stream, twice[:1])
    assert later.records == [] and later.reply.session == first.reply.session
    [other_user] = store(stream, [lambda d: rules.create_session("bob", request, d)])
    assert len(other_user.records) == 1 and other_user.reply.session != first.reply.session
    assert stream.offset == 2


def test_the_retry_of_a_session_reports_it_as_it_is_now():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream, idempotency_key="k")
    store(stream, [send(rules, session.session_id)])
    [retry] = store(
        stream,
        [
            lambda d: rules.create_session(
                "alice", CreateSession(document_id="doc", section_id="sec", idempotency_key="k"), d
            )
        ],
    )
    assert retry.reply.session.last_seq == 1


def test_the_session_quota_counts_per_user_on_the_injected_clock():
    clock = FixedClock()
    rules, stream = make_rules(sessions_per_minute=2, clock=clock), Stream(KEY, 100)
    create = lambda user, key=None: lambda d: rules.create_session(  # noqa: E731
        user, CreateSession(document_id="doc", section_id="sec", idempotency_key=key), d
    )
    decided = store(stream, [create("alice", "k"), create("alice"), create("alice"), create("bob")])
    assert [type(d) for d in decided] == [Plan, Plan, ChatError, Plan]
    assert refusal(decided[2]) == errors.RATE_LIMITED and decided[2].temporary
    [retry] = store(stream, [create("alice", "k")])
    assert isinstance(retry, Plan) and retry.records == []  # a retry is not a new session: never refused by the quota
    clock.now += 29
    assert refusal(store(stream, [create("alice")])[0]) == errors.RATE_LIMITED
    clock.now += 2  # 31 s: one of the two per minute is back
    assert [type(d) for d in store(stream, [create("alice"), create("alice")])] == [Plan, ChatError]


# send_message -------------------------------------------------------------------------


def test_a_client_msg_id_stores_one_message_within_a_batch_and_across_batches():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    first, again = store(stream, [send(rules, session.session_id, client_msg_id="c")] * 2)
    assert len(first.records) == 1 and again.records == []
    assert isinstance(again.reply, MessageAck) and again.reply.message == first.reply.message
    [later] = store(stream, [send(rules, session.session_id, "different text", client_msg_id="c")])
    assert later.records == [] and later.reply.message == first.reply.message
    [elsewhere] = store(stream, [send(rules, created(rules, stream).session_id, client_msg_id="c")])
    assert len(elsewhere.records) == 1  # client_msg_ids are per session


def test_an_original_outside_the_recovery_window_is_found_by_offset_not_guessed():
    """The chat reads such an original from storage before it queues; a draft never invents one."""
    rules, stream = make_rules(), Stream(KEY, recovery_window=2)
    session = created(rules, stream)
    store(stream, [send(rules, session.session_id, client_msg_id="old")])
    store(stream, [send(rules, session.session_id), send(rules, session.session_id)])
    assert stream.offset_of_client_msg(session.session_id, "old") == 2
    assert stream.offset_of_client_msg(session.session_id, "never") is None
    [retry] = store(stream, [send(rules, session.session_id, client_msg_id="old")])
    assert refusal(retry) == errors.UNAVAILABLE and retry.temporary


def test_a_closed_session_takes_no_message_but_answers_retries():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    sent, closed, refused = store(
        stream,
        [
            send(rules, session.session_id, client_msg_id="c"),
            close(rules, session.session_id),
            send(rules, session.session_id),
        ],
    )
    assert closed.reply.session.closed and closed.reply.session.last_seq == 1
    assert refusal(refused) == errors.CONFLICT
    [retry] = store(stream, [send(rules, session.session_id, client_msg_id="c")])
    assert retry.reply.message == sent.reply.message


def test_message_text_over_the_limit_is_too_large():
    rules = make_rules(max_text_chars=5)
    rules.check_text("12345")
    with pytest.raises(ChatError) as refused:
        rules.check_text("123456")
    assert refused.value.code == errors.TOO_LARGE and "limit is 5" in refused.value.message


# close_session --------------------------------------------------------------------------


def test_a_session_closes_once():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    first, second = store(stream, [close(rules, session.session_id)] * 2)
    assert len(first.records) == 1 and refusal(second) == errors.CONFLICT
    assert refusal(store(stream, [close(rules, session.session_id)])[0]) == errors.CONFLICT
    assert refusal(store(stream, [close(rules, "nobody")])[0]) == errors.NOT_FOUND


# Kept states ------------------------------------------------------------------------------


def test_a_restored_snapshot_is_the_stream_replay_builds():
    rules, stream = make_rules(), Stream(KEY, 100)
    a = created(rules, stream, idempotency_key="k")
    b = created(rules, stream, user="bob")
    store(
        stream, [send(rules, a.session_id, client_msg_id="c1"), send(rules, b.session_id), close(rules, b.session_id)]
    )
    restored = Stream(KEY, 100)
    restored.restore(stream.offset, stream.snapshot())
    assert restored.snapshot() == stream.snapshot() and restored.offset == stream.offset == 5
    # and decides the same: the key, the client_msg_id (by offset), the closed session, the next seq
    assert restored.idempotency == {("alice", "k"): a.session_id}
    assert restored.offset_of_client_msg(a.session_id, "c1") == 3
    assert refusal(decide(Draft(restored), [send(rules, b.session_id)])[0][0]) == errors.CONFLICT
    assert decide(Draft(restored), [send(rules, a.session_id)])[0][0].reply.message.seq == 2


# Reads ----------------------------------------------------------------------------------------


def test_history_pages_by_seq():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    store(stream, [send(rules, session.session_id)] * 5)  # offsets 2..6
    state = stream.state_of(session.session_id)
    window = lambda **fields: history_window(state, History(session_id=session.session_id, **fields))  # noqa: E731
    assert window(limit=2) == ([5, 6], True)
    assert (list(window(before_seq=3, limit=5)[0]), window(before_seq=3)[1]) == ([2, 3], False)
    assert (list(window(after_seq=3)[0]), window(after_seq=3)[1]) == ([5, 6], False)
    assert (list(window(after_seq=0, limit=4)[0]), window(after_seq=0, limit=4)[1]) == ([2, 3, 4, 5], True)
    assert list(window(after_seq=9)[0]) == []


def test_session_pages_follow_their_cursor():
    sessions = [
        Session(f"s{n}", "doc", "sec", None, "a", f"2026-01-01T00:00:0{n // 2}.000Z", False, 0) for n in range(7)
    ]
    request = ListSessions(document_id="doc", limit=3)
    seen = []
    while True:
        page = session_page(list(sessions), request)
        seen += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            break
        request = ListSessions(document_id="doc", limit=3, cursor=page.next_cursor)
    assert seen == [s.session_id for s in sessions]


def test_a_subscribed_snapshot_is_bounded_to_the_most_recently_active():
    rules, stream = make_rules(), Stream(KEY, 10)
    ids = [created(rules, stream).session_id for _ in range(MAX_LISTED_SESSIONS + 1)]
    store(stream, [send(rules, ids[0])])  # the oldest is now the most recently active
    sessions, complete = snapshot_sessions(stream)
    assert not complete and len(sessions) == MAX_LISTED_SESSIONS
    assert sessions[0].session_id == ids[0] and ids[1] not in {s.session_id for s in sessions}
    assert snapshot_sessions(Stream(KEY, 10)) == ([], True)


def test_the_core_needs_no_event_loop():
    """Importing the core pulls in no asyncio: its rules can be run and tested anywhere."""
    code = "import sys, server.core; assert 'asyncio' not in sys.modules, 'server.core imports asyncio'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=30)


# Revision 1.1: edits, deletes, reactions, session updates, reopening ---------------------


def edit(rules: Rules, session_id: str, seq: int, text: str, user: str = "alice", moderator: bool = False, **fields):
    request = EditMessage(session_id=session_id, seq=seq, text=text, **fields)
    return lambda draft: rules.edit_message(user, request, draft, moderator=moderator)


def delete(rules: Rules, session_id: str, seq: int, user: str = "alice", moderator: bool = False):
    request = DeleteMessage(session_id=session_id, seq=seq)
    return lambda draft: rules.delete_message(user, request, draft, moderator=moderator)


def react(rules: Rules, session_id: str, seq: int, reaction: str = "👍", user: str = "alice", on: bool = True):
    return lambda draft: rules.react(user, React(session_id=session_id, seq=seq, reaction=reaction, on=on), draft)


def with_message(text: str = "hello", **fields) -> tuple[Rules, Stream, Session, Message]:
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream)
    [sent] = store(stream, [send(rules, session.session_id, text, **fields)])
    return rules, stream, session, sent.reply.message


def test_an_edit_replaces_text_sets_edited_at_and_is_what_history_reads():
    rules, stream, session, message = with_message()
    [edited] = store(stream, [edit(rules, session.session_id, 1, "hello, world")])
    new = edited.reply.message
    assert (new.text, new.seq, new.message_id, new.sent_at) == ("hello, world", 1, message.message_id, message.sent_at)
    assert new.edited_at is not None and new.edited_at > message.sent_at
    state = stream.state_of(session.session_id)
    offsets, _ = history_window(state, History(session_id=session.session_id))
    assert offsets == [3] and stream.recent_messages(offsets) == [new]  # the latest version, not the original
    assert stream.session(session.session_id).last_activity_at == new.edited_at


def test_only_the_author_or_a_moderator_edits_or_deletes():
    rules, stream, session, _ = with_message()
    sid = session.session_id
    decided = store(stream, [edit(rules, sid, 1, "mine now", user="bob"), delete(rules, sid, 1, user="bob")])
    assert [refusal(d) for d in decided] == [errors.FORBIDDEN, errors.FORBIDDEN]
    decided = store(
        stream,
        [edit(rules, sid, 1, "tidied", user="mod", moderator=True), delete(rules, sid, 1, user="mod", moderator=True)],
    )
    assert all(isinstance(d, Plan) and d.records for d in decided)


def test_an_edit_that_changes_nothing_stores_nothing():
    rules, stream, session, message = with_message("same", mentions=["bob"])
    for unchanged in (
        edit(rules, session.session_id, 1, "same"),
        edit(rules, session.session_id, 1, "same", mentions=["bob", "bob"]),
    ):
        [plan] = store(stream, [unchanged])
        assert plan.records == [] and plan.reply.message == message
    [changed] = store(stream, [edit(rules, session.session_id, 1, "same", mentions=[])])
    assert changed.reply.message.mentions == [] and stream.offset == 3


def test_an_edit_notifies_only_users_it_mentions_for_the_first_time():
    rules, stream, session, _ = with_message("hi @bob", mentions=["bob", "alice"])
    assert newly_mentioned(stream.recent[-1]) == ["bob"]  # never the author
    [edited] = store(stream, [edit(rules, session.session_id, 1, "hi @bob @carol", mentions=["bob", "carol"])])
    assert edited.records[0].mentioned == ["carol"] and newly_mentioned(edited.records[0]) == ["carol"]
    [again] = store(stream, [edit(rules, session.session_id, 1, "hi @carol", mentions=["carol"])])
    assert newly_mentioned(again.records[0]) == []


def test_a_seq_that_does_not_exist_is_not_found_and_comes_before_permissions():
    rules, stream, session, _ = with_message()
    for plan in (
        edit(rules, session.session_id, 2, "x", user="bob"),
        delete(rules, session.session_id, 2),
        react(rules, session.session_id, 9),
    ):
        assert refusal(store(stream, [plan])[0]) == errors.NOT_FOUND


def test_a_deleted_message_is_a_tombstone_everywhere_and_deleting_again_changes_nothing():
    rules, stream, session, message = with_message("secret", mentions=["bob"])
    sid = session.session_id
    store(stream, [edit(rules, sid, 1, "secret, edited"), react(rules, sid, 1)])
    [deleted] = store(stream, [delete(rules, sid, 1)])
    tombstone = deleted.reply.message
    assert (tombstone.text, tombstone.mentions, tombstone.reactions) == ("", [], {})
    assert (tombstone.seq, tombstone.message_id, tombstone.author, tombstone.sent_at) == (
        1,
        message.message_id,
        "alice",
        message.sent_at,
    )
    # Every earlier event that carried the message now carries the tombstone; offsets and types stay.
    events = stream.events_after(1)
    assert [type(e) for e in events] == [MessageEvent, MessageEdited, ReactionEvent, MessageDeleted]
    assert [e.offset for e in events] == [2, 3, 4, 5]
    assert events[0].message == events[1].message == tombstone
    [again] = store(stream, [delete(rules, sid, 1)])
    assert again.records == [] and again.reply.message == tombstone
    assert [refusal(d) for d in store(stream, [edit(rules, sid, 1, "back"), react(rules, sid, 1, "🎉")])] == [
        errors.CONFLICT
    ] * 2


def test_a_delete_erases_every_stored_version_of_the_message_within_a_batch_and_across_batches():
    rules, stream, session, _ = with_message("secret", mentions=["bob"])  # offsets 1 (session), 2
    sid = session.session_id
    store(stream, [edit(rules, sid, 1, "secret, edited"), react(rules, sid, 1), send(rules, sid, "kept")])  # 3, 4, 5
    restored = Stream(KEY, 10)  # the versions survive a snapshot (a state kept before a restart)
    restored.restore(stream.offset, stream.snapshot())
    restored.remember(4, stream.current_message(sid, 1))  # as the chat reads it for a write
    for state in (stream, restored):
        [deleted] = decide(Draft(state), [delete(rules, sid, 1)])[0]
        assert list(deleted.erase) == [("sec", 2), ("sec", 3), ("sec", 4)]
    # A message sent, edited and deleted while the first two are still being stored (one batch, or two pipelined).
    draft = Draft(stream)
    decided, records = decide(draft, [send(rules, sid, "brief"), edit(rules, sid, 3, "briefer")])
    [late] = decide(draft, [delete(rules, sid, 3)])[0]
    assert [r.offset for r in records] == [6, 7] and list(late.erase) == [("sec", 6), ("sec", 7)]
    for record in [*records, *late.records]:
        stream.apply(record)
    [again] = decide(Draft(stream), [delete(rules, sid, 3)])[0]
    assert list(again.erase) == [] and list(stream.state_of(sid).versions[3]) == [
        8
    ]  # one home: places are offsets  # erased: forgotten


def test_replaying_erased_records_builds_the_state_the_originals_did():
    """A section read back after deletes erased its text restores to the same state (snapshots, tallies)."""
    rules, stream, session, _ = with_message("@bob look", mentions=["bob"])
    sid = session.session_id
    store(stream, [edit(rules, sid, 1, "@carol look", mentions=["carol"]), react(rules, sid, 1, user="bob")])
    store(stream, [send(rules, sid, "@bob again", mentions=["bob"]), send(rules, sid, "b", user="bob")])
    store(stream, [delete(rules, sid, 1), delete(rules, sid, 2)])
    records: list[StoredRecord] = list(stream.recent)
    original, erased_replay = Stream(KEY, 100), Stream(KEY, 100)
    for record in records:
        original.apply(record)
    for record in erase_deleted(records):
        erased_replay.apply(record)
    assert erase_deleted(records) != records and erased_replay.snapshot() == original.snapshot()
    assert [e.message.text for e in erased_replay.events_after(1) if isinstance(e, MessageEvent)] == ["", "", "b"]


def test_deleting_works_in_a_closed_session_but_editing_and_reacting_do_not():
    rules, stream, session, _ = with_message()
    sid = session.session_id
    store(stream, [send(rules, sid, "two"), close(rules, sid)])
    assert [refusal(d) for d in store(stream, [edit(rules, sid, 1, "x"), react(rules, sid, 1)])] == [
        errors.CONFLICT
    ] * 2
    [deleted] = store(stream, [delete(rules, sid, 2)])
    assert deleted.reply.message.deleted_at is not None


def test_reactions_toggle_per_user_in_order_and_repeats_store_nothing():
    rules, stream, session, _ = with_message()
    sid = session.session_id
    decided = store(
        stream, [react(rules, sid, 1, user="bob"), react(rules, sid, 1, user="carol"), react(rules, sid, 1, user="bob")]
    )
    assert [len(d.records) for d in decided] == [1, 1, 0]
    assert decided[2].reply == decided[0].reply  # the same reply as the first, its `at` too
    [later] = store(stream, [react(rules, sid, 1, user="bob")])
    assert later.records == [] and later.reply.at == decided[0].reply.at
    assert stream.current_message(sid, 1).reactions == {"👍": ["bob", "carol"]}
    store(stream, [react(rules, sid, 1, user="bob", on=False), react(rules, sid, 1, user="carol", on=False)])
    assert stream.current_message(sid, 1).reactions == {}  # a reaction nobody gives is absent
    [taken_back] = store(stream, [react(rules, sid, 1, user="carol", on=False)])
    assert taken_back.records == []


def test_a_twenty_first_distinct_reaction_is_too_large():
    rules, stream, session, _ = with_message()
    sid = session.session_id
    assert all(d.records for d in store(stream, [react(rules, sid, 1, str(n)) for n in range(20)]))
    [extra, more_of_one] = store(stream, [react(rules, sid, 1, "21st"), react(rules, sid, 1, "0", user="bob")])
    assert refusal(extra) == errors.TOO_LARGE and more_of_one.records


def test_update_session_by_creator_or_moderator_with_absent_unchanged_and_null_cleared():
    rules, stream = make_rules(), Stream(KEY, 100)
    session = created(rules, stream, title="T", metadata={"anchor": [1, 2]})
    sid = session.session_id
    update = lambda user="alice", moderator=False, **fields: lambda d: rules.update_session(  # noqa: E731
        user, UpdateSession(session_id=sid, **fields), d, moderator=moderator
    )
    assert refusal(store(stream, [update("bob", title="mine")])[0]) == errors.FORBIDDEN
    [same] = store(stream, [update(title="T")])
    assert same.records == [] and same.reply.session == session
    [cleared] = store(stream, [update(metadata=None)])
    assert (cleared.reply.session.title, cleared.reply.session.metadata) == ("T", None)
    [by_mod] = store(stream, [update("mod", moderator=True, title=None)])
    assert by_mod.reply.session.title is None and by_mod.records
    store(stream, [close(rules, sid)])
    [while_closed] = store(stream, [update(title="closed but renamed")])
    assert while_closed.records and while_closed.reply.session.closed


def test_metadata_over_four_kilobytes_is_too_large():
    Rules.check_metadata({"x": "y" * 4080})
    with pytest.raises(ChatError) as refused:
        Rules.check_metadata({"x": "é" * 2100})  # counted in UTF-8 bytes, not characters
    assert refused.value.code == errors.TOO_LARGE


def test_reopen_only_a_closed_session_and_activity_never_goes_back():
    rules, stream = make_rules(), Stream(KEY, 100)
    sid = created(rules, stream).session_id
    assert (
        refusal(store(stream, [lambda d: rules.reopen_session("a", ReopenSession(session_id=sid), d)])[0])
        == errors.CONFLICT
    )
    store(stream, [close(rules, sid)])
    closed_at = stream.session(sid).last_activity_at
    [reopened] = store(stream, [lambda d: rules.reopen_session("a", ReopenSession(session_id=sid), d)])
    assert reopened.reply.session.closed is False and reopened.reply.session.last_activity_at > closed_at
    late = Message(sid, 1, "m", "a", "t", None, "2000-01-01T00:00:00.000Z")  # a clock that went back
    stream.apply(MessageRecord(offset=stream.offset + 1, message=late))
    assert stream.session(sid).last_activity_at == reopened.reply.session.last_activity_at


def test_mentions_are_kept_without_repeats():
    _, _, _, message = with_message("hi", mentions=["bob", "carol", "bob"])
    assert message.mentions == ["bob", "carol"]


def test_a_snapshot_keeps_versions_and_tombstones():
    rules, stream, session, _ = with_message()
    sid = session.session_id
    store(stream, [send(rules, sid, "two"), edit(rules, sid, 1, "one, edited"), delete(rules, sid, 2)])
    restored = Stream(KEY, 100)
    restored.restore(stream.offset, stream.snapshot())
    assert restored.snapshot() == stream.snapshot()
    state = restored.state_of(sid)
    assert state.latest_offset(1) == 4 and state.tombstones[2].text == ""


def test_sessions_by_activity_latest_first_and_filtered_by_closed():
    rules, stream = make_rules(), Stream(KEY, 100)
    a, b, c = (created(rules, stream).session_id for _ in range(3))
    store(stream, [send(rules, a), close(rules, b)])
    sessions = [state.session for state in stream.sessions.values()]
    page = session_page(list(sessions), ListSessions(document_id="doc", order="activity", limit=2))
    assert [s.session_id for s in page.sessions] == [b, a]
    rest = session_page(
        list(sessions), ListSessions(document_id="doc", order="activity", limit=2, cursor=page.next_cursor)
    )
    assert [s.session_id for s in rest.sessions] == [c] and rest.next_cursor is None
    assert [
        s.session_id for s in session_page(list(sessions), ListSessions(document_id="doc", closed=True)).sessions
    ] == [b]
    assert [
        s.session_id for s in session_page(list(sessions), ListSessions(document_id="doc", closed=False)).sessions
    ] == [a, c]


def test_paging_by_activity_never_repeats_a_session_that_becomes_active_meanwhile():
    rules, stream = make_rules(), Stream(KEY, 100)
    ids = [created(rules, stream).session_id for _ in range(6)]
    first = session_page(
        [s.session for s in stream.sessions.values()], ListSessions(document_id="doc", order="activity", limit=3)
    )
    store(stream, [send(rules, ids[0])])  # the oldest, not yet listed, becomes the most active
    second = session_page(
        [s.session for s in stream.sessions.values()],
        ListSessions(document_id="doc", order="activity", limit=3, cursor=first.next_cursor),
    )
    listed = [s.session_id for s in first.sessions + second.sessions]
    assert len(listed) == len(set(listed)) and set(ids[1:]) <= set(listed)


def test_a_retry_of_a_deleted_message_answers_the_tombstone_not_the_text():
    rules, stream, session, _ = with_message("regret", client_msg_id="c")
    store(stream, [delete(rules, session.session_id, 1)])
    [retry] = store(stream, [send(rules, session.session_id, "regret", client_msg_id="c")])
    assert retry.records == [] and retry.reply.message.text == "" and retry.reply.message.deleted_at is not None


# Read state --------------------------------------------------------------------------------


def mark(rules: Rules, section: Stream, session_id: str, seq: int, user: str = "bob"):
    return lambda draft: rules.mark_read(user, MarkRead(session_id=session_id, seq=seq), section, draft)


def test_unread_counts_leave_out_own_and_deleted_messages():
    rules, stream = make_rules(), Stream(KEY, 100)
    sid = created(rules, stream).session_id
    store(
        stream,
        [send(rules, sid, "a1"), send(rules, sid, "b1", user="bob"), send(rules, sid, "a2"), send(rules, sid, "a3")],
    )
    state = stream.state_of(sid)
    assert state.read_marker("bob", 0) == 2  # his own message marks what he read
    assert (state.unread("bob", 2), state.unread("carol", 0), state.unread("alice", 0)) == (2, 4, 1)
    store(stream, [delete(rules, sid, 3), delete(rules, sid, 2, user="bob")])
    assert (state.unread("bob", 2), state.unread("carol", 0), state.unread("alice", 0)) == (1, 2, 0)
    assert state.unread("carol", 4) == 0


def test_mentions_count_while_unread_and_follow_edits_and_deletes():
    rules, stream = make_rules(), Stream(KEY, 100)
    sid = created(rules, stream).session_id
    store(stream, [send(rules, sid, "@bob", mentions=["bob"]), send(rules, sid, "@carol", mentions=["carol", "alice"])])
    state = stream.state_of(sid)
    assert (state.unread_mentions("bob", 0), state.unread_mentions("carol", 0), state.unread_mentions("alice", 0)) == (
        1,
        1,
        0,
    )
    assert state.unread_mentions("bob", 1) == 0
    store(stream, [edit(rules, sid, 1, "@carol now", mentions=["carol"])])
    assert (state.unread_mentions("bob", 0), state.unread_mentions("carol", 0)) == (0, 2)
    store(stream, [delete(rules, sid, 2)])
    assert state.unread_mentions("carol", 0) == 1


def test_a_read_marker_only_moves_forward_and_is_bounded_by_the_last_seq():
    rules, section, reads = make_rules(), Stream(KEY, 100), Stream(reads_key(KEY), 100)
    sid = created(rules, section).session_id
    store(section, [send(rules, sid, str(n)) for n in range(5)])
    first, back, same = store(
        reads, [mark(rules, section, sid, 3), mark(rules, section, sid, 1), mark(rules, section, sid, 3)]
    )
    assert [len(p.records) for p in (first, back, same)] == [1, 0, 0]
    assert back.reply.seq == 3 and same.reply.seq == 3  # at or below the marker: the current marker
    assert reads.reads == {sid: {"bob": 3}}
    assert refusal(store(reads, [mark(rules, section, sid, 6)])[0]) == errors.BAD_REQUEST
    store(section, [send(rules, sid, "mine", user="bob")])
    [below_own] = store(reads, [mark(rules, section, sid, 5)])
    assert below_own.records == [] and below_own.reply.seq == 6  # sending moved his marker to his message
    assert read_state("bob", [(section.state_of(sid), reads.reads)]) == ({sid: 6}, {sid: 0})
    assert read_state("carol", [(section.state_of(sid), reads.reads)]) == ({sid: 0}, {sid: 6})


def test_tallies_and_markers_survive_a_snapshot_and_an_old_one_is_refused():
    rules, stream, session, _ = with_message("@bob", mentions=["bob"])
    sid = session.session_id
    store(stream, [send(rules, sid, "b", user="bob"), delete(rules, sid, 1)])
    reads = Stream(reads_key(KEY), 10)
    store(reads, [mark(rules, stream, sid, 1, user="carol")])
    [given] = store(stream, [react(rules, sid, 2, user="carol")])
    for original in (stream, reads):
        restored = Stream(original.key, 10)
        restored.restore(original.offset, original.snapshot())
        assert restored.snapshot() == original.snapshot()
    state = Stream(KEY, 10)
    state.restore(stream.offset, stream.snapshot())
    kept = state.state_of(sid)
    assert (kept.unread("carol", 0), kept.unread_mentions("bob", 0), kept.read_marker("bob", 0)) == (1, 0, 2)
    state.remember(given.records[0].offset, given.records[0].message)  # as the chat reads it for a write
    [repeat] = decide(Draft(state), [react(rules, sid, 2, user="carol")])[0]
    assert repeat.records == [] and repeat.reply.at == given.reply.at
    old = msgspec.msgpack.encode([[], [], [], 1])
    with pytest.raises(OutdatedState):
        Stream(KEY, 10).restore(3, old)


def test_a_section_summary_counts_sessions_messages_and_the_users_unread():
    rules, stream, reads = make_rules(), Stream(KEY, 100), Stream(reads_key(KEY), 100)
    assert section_summary(stream, reads.reads, "bob") == SectionSummary("sec", 0, 0, 0, None, 0, 0)
    a, b = created(rules, stream).session_id, created(rules, stream).session_id
    store(stream, [send(rules, a, "1"), send(rules, a, "@bob", mentions=["bob"]), send(rules, b, "x"), close(rules, b)])
    store(stream, [delete(rules, b, 1)])
    summary = section_summary(stream, reads.reads, "bob")
    assert (summary.sessions, summary.open_sessions, summary.messages, summary.unread, summary.mentions) == (
        2,
        1,
        2,
        2,
        1,
    )
    assert summary.last_activity_at == stream.session(b).last_activity_at
    store(reads, [mark(rules, stream, a, 2)])
    assert section_summary(stream, reads.reads, "bob").unread == 0
    assert section_summary(stream, reads.reads, "alice").unread == 0  # all her own
    assert section_summary(stream, reads.reads, "carol").mentions == 0


# move_sessions --------------------------------------------------------------------------

OTHER = SectionKey("doc", "other")


def moved(rules: Rules, streams: tuple[Stream, Stream, Stream, Stream], **fields) -> MovePlan:
    """Decide a move from KEY to OTHER and apply its records to the four streams, as the writer does."""
    request = MoveSessions(document_id="doc", from_section_id="sec", to_section_id="other", **fields)
    plan = rules.move_sessions(request, *streams)
    by_key = {stream.key: stream for stream in streams}
    for key, records in plan.records.items():
        for record in records:
            by_key[key].apply(record)
    return plan


def four_streams() -> tuple[Stream, Stream, Stream, Stream]:
    return Stream(KEY, 100), Stream(OTHER, 100), Stream(reads_key(KEY), 100), Stream(reads_key(OTHER), 100)


def test_a_moved_session_takes_its_state_and_its_read_markers_and_leaves_a_forwarding_note():
    rules = make_rules()
    streams = source, target, source_reads, target_reads = four_streams()
    session = created(rules, source, idempotency_key="k")
    sid = session.session_id
    store(source, [send(rules, sid, "@bob", mentions=["bob"], client_msg_id="c1"), send(rules, sid, "b", user="bob")])
    store(source, [edit(rules, sid, 1, "@bob!"), react(rules, sid, 2)])
    store(source_reads, [mark(rules, source, sid, 1, user="carol")])
    before = source.state_of(sid)
    plan = moved(rules, streams, session_ids=[sid])
    assert plan.reply.sessions == [msgspec.structs.replace(session, section_id="other", last_seq=2,
                                                           last_activity_at=before.session.last_activity_at)]  # fmt: skip
    assert [type(r) for r in plan.records[KEY]] == [SessionMovedRecord]
    assert [r.offset for r in plan.records[OTHER]] == [1] and plan.records[reads_key(OTHER)][0].seq == 1
    # The target holds it as the source did; its records are still where they were stored.
    state = target.state_of(sid)
    assert state.homes == ["sec", "other"] and state.here == 1
    assert [state.place(p) for p in state.offsets] == [("sec", 2), ("sec", 3)]
    assert state.place(state.latest_offset(1)) == ("sec", 4) and state.local(state.latest_offset(1)) is None
    assert state.unread("carol", target_reads.reads[sid]["carol"]) == 1 and state.unread_mentions("bob", 0) == 1
    assert state.by_client_msg_id == {"c1": 1}
    # The source forwards: writes and retries raise SessionElsewhere, and the key stays with the source.
    [refused] = decide(Draft(source), [send(rules, sid, "late")])[0]
    assert isinstance(refused, SessionElsewhere) and refused.section_id == "other"
    [retry] = decide(Draft(source), [lambda d: rules.create_session("alice", CreateSession(
        document_id="doc", section_id="sec", idempotency_key="k"), d)])[0]  # fmt: skip
    assert isinstance(retry, SessionElsewhere)
    # New messages and changes are stored in the target, by its own offsets.
    for seq, offset in ((1, 4), (2, 5)):  # as the chat reads them for a write
        target.remember(state.latest_offset(seq), source.recent[offset - 1].message)
    store(target, [send(rules, sid, "three"), delete(rules, sid, 1)])
    [erasing] = decide(Draft(target), [delete(rules, sid, 2, user="bob")])[0]
    assert list(erasing.erase) == [("sec", 3), ("sec", 5)]  # the message, its reaction: both in the source
    # And it all survives a snapshot (a kept state), moving back included.
    for stream in (source, target):
        restored = Stream(stream.key, 100)
        restored.restore(stream.offset, stream.snapshot())
        assert restored.snapshot() == stream.snapshot() and restored.moved == stream.moved


def test_moving_all_some_or_none_and_refusals_that_move_nothing():
    rules = make_rules()
    streams = source, target, _, _ = four_streams()
    sessions = [created(rules, source).session_id for _ in range(3)]
    elsewhere = created(rules, target).session_id

    def refused(**fields) -> str:
        request = MoveSessions(document_id="doc", from_section_id="sec", to_section_id="other", **fields)
        with pytest.raises(ChatError) as error:
            rules.move_sessions(request, *streams)
        return error.value.code

    assert refused(session_ids=[sessions[0], "nope"]) == errors.NOT_FOUND
    assert refused(session_ids=[sessions[0], sessions[0]]) == errors.BAD_REQUEST
    same = MoveSessions(document_id="doc", from_section_id="sec", to_section_id="sec")
    with pytest.raises(ChatError):
        rules.move_sessions(same, source, source, streams[2], streams[2])
    assert len(source.sessions) == 3
    some = moved(rules, streams, session_ids=[sessions[0], elsewhere])  # one already there: listed, nothing stored
    assert [s.session_id for s in some.reply.sessions] == [sessions[0], elsewhere]
    assert [r.session.session_id for r in some.records[OTHER]] == [sessions[0]]
    rest = moved(rules, streams)
    assert sorted(s.session_id for s in rest.reply.sessions) == sorted(sessions[1:])
    assert source.sessions == {} and set(target.sessions) == {*sessions, elsewhere}
    assert moved(rules, streams).records == {}  # none left: nothing to store
    for _ in range(MAX_MOVED_SESSIONS + 1):
        created(rules, source)
    assert refused() == errors.TOO_LARGE
