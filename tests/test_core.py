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

import pytest

from protocol import errors
from protocol.errors import ChatError
from protocol.messages import (
    MAX_LISTED_SESSIONS,
    CloseSession,
    CreateSession,
    History,
    ListSessions,
    Message,
    MessageAck,
    MessageEvent,
    SendMessage,
    Session,
    SessionClosed,
    SessionCreated,
)
from server.core import (
    Draft,
    Plan,
    Rules,
    Stream,
    apply,
    decide,
    history_window,
    session_page,
    snapshot_sessions,
)
from server.storage.base import (
    MessageRecord,
    SectionKey,
    SessionClosedRecord,
    SessionCreatedRecord,
    StoredRecord,
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
    session = Session("s", "doc", "sec", None, "alice", "t", False, 0)
    message = Message("s", 1, "m", "alice", "hi", None, "t")
    examples: dict[type, StoredRecord] = {
        SessionCreatedRecord: SessionCreatedRecord(offset=1, session=session),
        MessageRecord: MessageRecord(offset=2, message=message),
        SessionClosedRecord: SessionClosedRecord(offset=3, session=session),
    }
    assert set(examples) == set(get_args(StoredRecord))
    stream = Stream(KEY, 10)
    for record in examples.values():
        assert stream.apply(record).offset == record.offset
        assert session_id_of(record) == "s"
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
    assert window(limit=2) == (stream.state_of(session.session_id).offsets[3:5], True)
    assert list(window(limit=2)[0]) == [5, 6]
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
