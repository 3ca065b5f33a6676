# A section's stored state and the rules that decide writes against it.
#
# No asyncio, no I/O, no sockets: records in, decisions out, as websockets'
# protocol.py and h11's _state.py are. The writer (server/writer.py) stores
# what is decided here and hands each record back once it is durable.
#
# Rules kept here:
# - A stored record changes state in one place, `apply`: just stored, replayed
#   from storage, or in a batch still being decided (a Draft). A new record
#   kind is one case there, one rule in `Rules`, one event in `event_of`.
# - The writes of a batch are decided in order against a Draft, so the second
#   sees the first (its seq, its idempotency key), while the Stream, which
#   readers see, changes only once the batch is durable.
# - A Stream holds where each message is (its offset), not the message: only
#   the recovery window of events is in memory.

from __future__ import annotations

import bisect
import heapq
import os
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import msgspec

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
    ServerFrame,
    Session,
    SessionClosed,
    SessionCreated,
    SessionList,
    StoredEvent,
)

from .limits import PerUserQuota
from .storage.base import MessageRecord, SectionKey, SessionClosedRecord, SessionCreatedRecord, StoredRecord


class Plan(NamedTuple):
    """What a write decides: the records to store (none: nothing to write) and the reply."""

    records: list[StoredRecord]
    reply: ServerFrame


def event_of(record: StoredRecord) -> StoredEvent:
    """The event that announces a stored record."""
    match record:
        case SessionCreatedRecord(session=session):
            return SessionCreated(session=session, offset=record.offset)
        case MessageRecord(message=message):
            return MessageEvent(message=message, offset=record.offset)
        case SessionClosedRecord(session=session):
            return SessionClosed(session=session, offset=record.offset)
    raise TypeError(record)


# Applying a stored record -------------------------------------------------------


class Target(Protocol):
    """What `apply` changes: a Stream, or a Draft of one."""

    def session(self, session_id: str) -> Session: ...

    def put_session(self, session: Session) -> None: ...

    def put_message(self, offset: int, message: Message) -> None: ...

    def put_idempotency_key(self, user: str, key: str, session_id: str) -> None: ...


def apply(target: Target, record: StoredRecord) -> None:
    """Make a stored record part of the state. The one place that knows what each record kind changes."""
    match record:
        case SessionCreatedRecord(session=session, idempotency_key=key):
            target.put_session(session)
            if key is not None:
                target.put_idempotency_key(session.created_by, key, session.session_id)
        case MessageRecord(message=message):
            session = target.session(message.session_id)
            target.put_session(msgspec.structs.replace(session, last_seq=message.seq))
            target.put_message(record.offset, message)
        case SessionClosedRecord(session=session):
            target.put_session(session)
        case _:
            raise TypeError(record)


# A section's stored stream ----------------------------------------------------------


class SessionState:
    """A session as a section holds it: its messages are not in memory, only where they are."""

    __slots__ = ("session", "offsets", "by_client_msg_id", "last_sent_at")

    def __init__(self, session: Session):
        self.session = session  # replaced, never changed in place: events sent earlier share it
        self.offsets = array("I")  # the section offset of each message: seq N at index N - 1
        self.by_client_msg_id: dict[str, int] = {}  # -> seq
        self.last_sent_at: str | None = None


class SessionSnapshot(msgspec.Struct, array_like=True, gc=False):
    session: Session
    offsets: bytes  # SessionState.offsets
    client_msg_ids: list[str]
    client_msg_seqs: bytes  # array("I"), the seq of each of client_msg_ids
    last_sent_at: str | None


class SectionSnapshot(msgspec.Struct, array_like=True, gc=False):
    """A Stream as `apply` left it, kept by the storage so that a load need not replay every record."""

    sessions: list[SessionSnapshot]
    idempotency: list[tuple[str, str, str]]  # (user, idempotency key, session id)


_encode_snapshot = msgspec.msgpack.Encoder().encode
_decode_snapshot = msgspec.msgpack.Decoder(SectionSnapshot).decode


class Stream:
    """One section's stored stream as state: its sessions, offsets, idempotency keys and recovery window."""

    def __init__(self, key: SectionKey, recovery_window: int):
        self.key = key
        self.epoch = ""
        self.offset = 0
        self.sessions: dict[str, SessionState] = {}
        self.idempotency: dict[tuple[str, str], str] = {}
        self.recent: deque[StoredEvent] = deque(maxlen=recovery_window)

    def apply(self, record: StoredRecord) -> StoredEvent:
        """Make a durable record part of the stream; return its event."""
        apply(self, record)
        event = event_of(record)
        self.offset = record.offset
        self.recent.append(event)
        return event

    def session(self, session_id: str) -> Session:
        return self.state_of(session_id).session

    def state_of(self, session_id: str) -> SessionState:
        state = self.sessions.get(session_id)
        if state is None:
            raise ChatError(errors.NOT_FOUND, f"no session {session_id!r}")
        return state

    def put_session(self, session: Session) -> None:
        state = self.sessions.get(session.session_id)
        if state is None:
            self.sessions[session.session_id] = SessionState(session)
        else:
            state.session = session

    def put_message(self, offset: int, message: Message) -> None:
        state = self.sessions[message.session_id]
        state.offsets.append(offset)
        state.last_sent_at = message.sent_at
        if message.client_msg_id is not None:
            state.by_client_msg_id[message.client_msg_id] = message.seq

    def put_idempotency_key(self, user: str, key: str, session_id: str) -> None:
        self.idempotency[(user, key)] = session_id

    def offset_of_client_msg(self, session_id: str, client_msg_id: str) -> int | None:
        """Where the message sent with this client_msg_id is stored, if one was."""
        state = self.state_of(session_id)
        seq = state.by_client_msg_id.get(client_msg_id)
        return None if seq is None else state.offsets[seq - 1]

    def recent_messages(self, offsets: Sequence[int]) -> list[Message] | None:
        """The messages at these offsets if all are still in the recovery window, else None."""
        first = self.offset - len(self.recent) + 1
        if not offsets or min(offsets) < first:
            return None
        return [self.recent[offset - first].message for offset in offsets]  # type: ignore[union-attr]

    def events_after(self, offset: int) -> list[StoredEvent] | None:
        """Stored events after `offset`, or None if some have left the recovery window."""
        missed = self.offset - offset
        if missed < 0 or missed > len(self.recent):
            return None
        return list(self.recent)[len(self.recent) - missed :] if missed else []

    def snapshot(self) -> bytes:
        """The state `apply` built, encoded (the recovery window is not part of it: it is read back as records)."""
        sessions = [
            SessionSnapshot(
                state.session,
                state.offsets.tobytes(),
                list(state.by_client_msg_id),
                array("I", state.by_client_msg_id.values()).tobytes(),
                state.last_sent_at,
            )
            for state in self.sessions.values()
        ]
        idempotency = [(user, key, session_id) for (user, key), session_id in self.idempotency.items()]
        return _encode_snapshot(SectionSnapshot(sessions, idempotency))

    def restore(self, offset: int, data: bytes) -> None:
        """Take the state a snapshot of the stream at `offset` holds."""
        snapshot = _decode_snapshot(data)
        for kept in snapshot.sessions:
            state = self.sessions[kept.session.session_id] = SessionState(kept.session)
            state.offsets.frombytes(kept.offsets)
            state.by_client_msg_id = dict(zip(kept.client_msg_ids, array("I", kept.client_msg_seqs), strict=True))
            state.last_sent_at = kept.last_sent_at
        self.idempotency = {(user, key): session_id for user, key, session_id in snapshot.idempotency}
        self.offset = offset


class Draft:
    """A Stream as it will be once the batch being decided is stored: changes over it, the stream untouched."""

    def __init__(self, stream: Stream):
        self.key = stream.key
        self.offset = stream.offset
        self._stream = stream
        self._sessions: dict[str, Session] = {}  # sessions this batch creates or changes, as they will be
        self._messages: dict[tuple[str, str], Message] = {}  # (session_id, client_msg_id) -> message
        self._idempotency: dict[tuple[str, str], str] = {}

    def apply(self, record: StoredRecord) -> None:
        apply(self, record)
        self.offset = record.offset

    def session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        return session if session is not None else self._stream.session(session_id)

    def put_session(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    def put_message(self, offset: int, message: Message) -> None:
        if message.client_msg_id is not None:
            self._messages[(message.session_id, message.client_msg_id)] = message

    def put_idempotency_key(self, user: str, key: str, session_id: str) -> None:
        self._idempotency[(user, key)] = session_id

    def idempotent(self, user: str, key: str) -> Session | None:
        """The session this user created with this idempotency key, if any."""
        session_id = self._idempotency.get((user, key)) or self._stream.idempotency.get((user, key))
        return None if session_id is None else self.session(session_id)

    def message(self, session_id: str, client_msg_id: str) -> Message | None:
        """The message already sent with this client_msg_id, if any."""
        message = self._messages.get((session_id, client_msg_id))
        if message is not None or session_id not in self._stream.sessions:
            return message
        offset = self._stream.offset_of_client_msg(session_id, client_msg_id)
        if offset is None:
            return None
        found = self._stream.recent_messages([offset])
        if found is None:
            # Stored long ago, so not in memory; the chat reads such originals from
            # storage before it queues a write, so only a retry racing its original gets here.
            raise ChatError(errors.UNAVAILABLE, "the original message is being read; retry")
        return found[0]


def decide(draft: Draft, plans: Sequence[Callable[[Draft], Plan]]) -> tuple[list[Plan | ChatError], list[StoredRecord]]:
    """Decide writes in order, each against the draft as the ones before it left it; also return all their records."""
    decided: list[Plan | ChatError] = []
    records: list[StoredRecord] = []
    for plan in plans:
        try:
            planned = plan(draft)
        except ChatError as error:
            decided.append(error)
            continue
        for record in planned.records:
            draft.apply(record)
        records.extend(planned.records)
        decided.append(planned)
    return decided, records


# The rules of each write kind ---------------------------------------------------


_second_prefix: tuple[int, str] = (-1, "")


def rfc3339_now() -> str:
    global _second_prefix
    now = time.time()
    second = int(now)
    if second != _second_prefix[0]:
        _second_prefix = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
    return f"{_second_prefix[1]}{int(now * 1000) % 1000:03d}Z"


_random = b""


def new_uuid4() -> str:
    """A random (version 4) UUID string, from randomness read in bulk."""
    global _random
    if len(_random) < 16:
        _random = os.urandom(4096)
    raw, _random = bytearray(_random[:16]), _random[16:]
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Rules:
    """What each write may do, decided against a Draft.

    Time, ids and the quotas' clock are passed in, so that tests fix them.
    """

    def __init__(
        self,
        *,
        max_text_chars: int = 8000,
        sessions_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], str] = rfc3339_now,
        new_id: Callable[[], str] = new_uuid4,
    ):
        self.max_text_chars = max_text_chars
        self.session_quota = PerUserQuota(sessions_per_minute, 60.0, clock)
        self.now = now
        self.new_id = new_id

    def check_text(self, text: str) -> None:
        """Refuse a message text over the limit (checked before the write queues, as it needs no state)."""
        if len(text) > self.max_text_chars:
            raise ChatError(errors.TOO_LARGE, f"text is {len(text)} characters; the limit is {self.max_text_chars}")

    def create_session(self, user: str, request: CreateSession, draft: Draft) -> Plan:
        if request.idempotency_key is not None:
            existing = draft.idempotent(user, request.idempotency_key)
            if existing is not None:
                return Plan([], SessionCreated(session=existing, reply_to=request.id))
        if not self.session_quota.allow(user):
            raise ChatError(
                errors.RATE_LIMITED, f"at most {self.session_quota.count} new sessions per minute; try again shortly"
            )
        session = Session(
            session_id=self.new_id(),
            document_id=draft.key.document_id,
            section_id=draft.key.section_id,
            title=request.title,
            created_by=user,
            created_at=self.now(),
            closed=False,
            last_seq=0,
        )
        record = SessionCreatedRecord(offset=draft.offset + 1, session=session, idempotency_key=request.idempotency_key)
        return Plan([record], SessionCreated(session=session, reply_to=request.id))

    def send_message(self, user: str, request: SendMessage, draft: Draft) -> Plan:
        session = draft.session(request.session_id)
        if request.client_msg_id is not None:
            original = draft.message(request.session_id, request.client_msg_id)
            if original is not None:
                return Plan([], MessageAck(message=original, reply_to=request.id))
        if session.closed:
            raise ChatError(errors.CONFLICT, "the session is closed")
        message = Message(
            session_id=request.session_id,
            seq=session.last_seq + 1,
            message_id=self.new_id(),
            author=user,
            text=request.text,
            client_msg_id=request.client_msg_id,
            sent_at=self.now(),
        )
        record = MessageRecord(offset=draft.offset + 1, message=message)
        return Plan([record], MessageAck(message=message, reply_to=request.id))

    def close_session(self, user: str, request: CloseSession, draft: Draft) -> Plan:
        session = draft.session(request.session_id)
        if session.closed:
            raise ChatError(errors.CONFLICT, "the session is already closed")
        closed = msgspec.structs.replace(session, closed=True)
        record = SessionClosedRecord(offset=draft.offset + 1, session=closed)
        return Plan([record], SessionClosed(session=closed, reply_to=request.id))


# Reads: pages of a stream's state --------------------------------------------------


def history_window(state: SessionState, request: History) -> tuple[Sequence[int], bool]:
    """The offsets of the messages a `history` page holds, and whether there are more."""
    count, limit = len(state.offsets), request.limit
    if request.after_seq is not None:
        start = min(request.after_seq, count)
        end = min(start + limit, count)
        has_more = end < count
    else:
        end = count if request.before_seq is None else min(max(request.before_seq - 1, 0), count)
        start = max(end - limit, 0)
        has_more = start > 0
    return state.offsets[start:end], has_more


def _created_at(session: Session) -> str:
    return session.created_at


def session_page(sessions: list[Session], request: ListSessions) -> SessionList:
    """One page of a listing, oldest created first; sessions of one millisecond keep their stored order.

    `sessions` comes section by section (in the document's order), each in the
    order its sessions were stored, so after a stable sort the order is the
    same on every node and after every restart: a cursor (created_at,
    session_id) finds its place again. Should the session a cursor names have
    left the listing, the page starts at the first session of its millisecond:
    one of those may come again, but none is skipped.
    """
    sessions.sort(key=_created_at)
    start = 0
    position = request.position()
    if position is not None:
        created_at, session_id = position
        start = bisect.bisect_left(sessions, created_at, key=_created_at)
        end = bisect.bisect_right(sessions, created_at, lo=start, key=_created_at)
        for index in range(start, end):
            if sessions[index].session_id == session_id:
                start = index + 1
                break
    page = sessions[start : start + request.limit]
    more = start + len(page) < len(sessions)
    return SessionList(sessions=page, next_cursor=request.cursor_after(page[-1]) if more else None, reply_to=request.id)


def _last_activity(state: SessionState) -> str:
    """When the session last changed: its creation or its latest message (until sessions carry last_activity_at)."""
    return state.last_sent_at or state.session.created_at


def snapshot_sessions(stream: Stream) -> tuple[list[Session], bool]:
    """The sessions of a `subscribed` reply, and whether that is all of them.

    Past MAX_LISTED_SESSIONS, the most recently active ones (the later stored
    first among equals), still oldest created first; `list_sessions` has the rest.
    """
    states = stream.sessions.values()
    if len(states) <= MAX_LISTED_SESSIONS:
        return [state.session for state in states], True
    recent = heapq.nlargest(MAX_LISTED_SESSIONS, enumerate(states), key=lambda item: (_last_activity(item[1]), item[0]))
    recent.sort(key=lambda item: (item[1].session.created_at, item[0]))
    return [state.session for _, state in recent], False
