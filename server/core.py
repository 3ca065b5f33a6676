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
from bisect import bisect_right, insort
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, Union, cast

import msgspec

from protocol import errors
from protocol.errors import ChatError
from protocol.messages import (
    MAX_LISTED_SESSIONS,
    MAX_METADATA_BYTES,
    MAX_MOVED_SESSIONS,
    MAX_REACTIONS,
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
    Metadata,
    MoveSessions,
    React,
    ReactionEvent,
    ReadEvent,
    ReadMarked,
    ReopenSession,
    SectionSummary,
    SendMessage,
    ServerFrame,
    Session,
    SessionClosed,
    SessionCreated,
    SessionList,
    SessionMoved,
    SessionReopened,
    SessionsMoved,
    SessionUpdated,
    StoredEvent,
    UpdateSession,
)

from .limits import PerUserQuota
from .storage.base import (
    Erasure,
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
)


class Plan(NamedTuple):
    """What a write decides: the records to store (none: nothing to write) and the reply.

    `erase`: earlier records (section, offset) whose message text storage must
    drop when it stores these (a delete's earlier versions of the message).
    """

    records: list[StoredRecord]
    reply: ServerFrame
    erase: Sequence[Erasure] = ()


class MovePlan(NamedTuple):
    """What a move decides: records for each section it touches (stored in one atomic write), and the reply."""

    records: dict[SectionKey, list[StoredRecord]]
    reply: SessionsMoved


MAX_MOVED_STATE_BYTES = 16 << 20  # the session states one move carries, in all (a move is one journal entry)
MAX_SESSION_STATE_BYTES = 640 << 10  # one session's (its record stays under the storage's 1 MiB a record)


# What a durable record announces: a section event, or a reader's `read` (to their own connections).
Event = Union[StoredEvent, ReadEvent]


def event_of(record: StoredRecord) -> Event:
    """The event that announces a stored record."""
    offset = record.offset
    match record:
        case SessionCreatedRecord(session=session):
            return SessionCreated(session=session, offset=offset)
        case MessageRecord(message=message):
            return MessageEvent(message=message, offset=offset)
        case SessionClosedRecord(session=session):
            return SessionClosed(session=session, offset=offset)
        case MessageEditedRecord(message=message):
            return MessageEdited(message=message, offset=offset)
        case MessageDeletedRecord(message=message):
            return MessageDeleted(message=message, offset=offset)
        case ReactionRecord(message=message, reaction=reaction, user=user, on=on, at=at):
            return ReactionEvent(
                session_id=message.session_id,
                seq=message.seq,
                reaction=reaction,
                user=user,
                on=on,
                at=at,
                offset=offset,
            )
        case SessionUpdatedRecord(session=session):
            return SessionUpdated(session=session, offset=offset)
        case SessionReopenedRecord(session=session):
            return SessionReopened(session=session, offset=offset)
        case ReadRecord(session_id=session_id, seq=seq):
            return ReadEvent(session_id=session_id, seq=seq)
        case SessionMovedRecord(session=session, from_section_id=source, to_section_id=target):
            return SessionMoved(session=session, from_section_id=source, to_section_id=target, offset=offset)
    raise TypeError(record)


def newly_mentioned(record: StoredRecord) -> list[str]:
    """The users a stored record notifies with a `mentioned` event (never the author)."""
    if isinstance(record, MessageRecord):
        return [user for user in record.message.mentions if user != record.message.author]
    if isinstance(record, MessageEditedRecord):
        return record.mentioned
    return []


def _later(first: str, second: str) -> str:
    """The later of two timestamps (they sort as strings): last_activity_at never decreases."""
    return second if second > first else first


# Applying a stored record -------------------------------------------------------


class Target(Protocol):
    """What `apply` changes: a Stream, or a Draft of one."""

    key: SectionKey

    def session(self, session_id: str) -> Session: ...

    def put_session(self, session: Session) -> None: ...

    def put_message(self, offset: int, message: Message) -> None:
        """A new message (its seq is the session's next)."""

    def change_message(self, offset: int, message: Message) -> None:
        """A message as it is after an edit, a delete or a reaction."""

    def put_idempotency_key(self, user: str, key: str, session_id: str) -> None: ...

    def put_read(self, session_id: str, user: str, seq: int) -> None: ...

    def put_reaction_time(self, session_id: str, seq: int, reaction: str, user: str, at: str | None) -> None:
        """When the user gave the reaction (None: they took it back)."""

    def move_in(self, session: Session, state: bytes) -> None:
        """A session moved here, with its state as the source held it (`moved_state`)."""

    def move_out(self, session_id: str, section_id: str) -> None:
        """A session moved from here to `section_id`."""


def apply(target: Target, record: StoredRecord) -> None:
    """Make a stored record part of the state. The one place that knows what each record kind changes."""
    match record:
        case SessionCreatedRecord(session=session, idempotency_key=key):
            target.put_session(session)
            if key is not None:
                target.put_idempotency_key(session.created_by, key, session.session_id)
        case MessageRecord(message=message):
            session = target.session(message.session_id)
            active = _later(session.last_activity_at, message.sent_at)
            target.put_session(msgspec.structs.replace(session, last_seq=message.seq, last_activity_at=active))
            target.put_message(record.offset, message)
        case (
            MessageEditedRecord(message=message)
            | MessageDeletedRecord(message=message)
            | ReactionRecord(message=message)
        ):
            session = target.session(message.session_id)
            at = record.at if isinstance(record, ReactionRecord) else message.deleted_at or message.edited_at
            assert at is not None, record
            target.put_session(msgspec.structs.replace(session, last_activity_at=_later(session.last_activity_at, at)))
            target.change_message(record.offset, message)
            if isinstance(record, ReactionRecord):
                given = record.at if record.on else None
                target.put_reaction_time(message.session_id, message.seq, record.reaction, record.user, given)
        case (
            SessionClosedRecord(session=session)
            | SessionUpdatedRecord(session=session)
            | SessionReopenedRecord(session=session)
        ):
            target.put_session(session)
        case ReadRecord(session_id=session_id, user=user, seq=seq):
            target.put_read(session_id, user, seq)
        case SessionMovedRecord(session=session, to_section_id=to, state=state):
            if to == target.key.section_id:
                target.move_in(session, state)
            else:
                target.move_out(session.session_id, to)
        case _:
            raise TypeError(record)


# A section's stored stream ----------------------------------------------------------


class SessionState:
    """A session as a section holds it: its messages are not in memory, only where they are.

    And the tallies that unread counts need, so that none scans a history:
    each user's own messages and the messages that name them, the deleted ones.
    """

    __slots__ = (
        "session", "offsets", "by_client_msg_id", "versions", "tombstones", "own", "naming", "deleted", "last_sent_by",
        "reacted_at", "homes", "here",
    )  # fmt: skip

    def __init__(self, session: Session):
        self.session = session  # replaced, never changed in place: events sent earlier share it
        # Where each message's record is, seq N at index N - 1, as a place: a section of
        # `homes` and an offset in it (see `place`). A session that never moved has one home.
        self.offsets = array("Q")
        self.homes = [session.section_id]  # the sections its records are in, the one it was created in first
        self.here = 0  # the index in `homes` of the section that holds the session now
        self.by_client_msg_id: dict[str, int] = {}  # -> seq
        # seq -> offsets of the records that changed the message (edits, reactions), the latest last;
        # once it is deleted, only the delete's (the earlier ones were erased with it).
        self.versions: dict[int, array[int]] = {}  # places, as `offsets`
        self.tombstones: dict[int, Message] = {}  # seq -> the deleted message, as served in place of its versions
        self.own: dict[str, array[int]] = {}  # user -> seqs of their messages not deleted, ascending
        self.naming: dict[str, array[int]] = {}  # user -> seqs of others' messages not deleted that mention them
        self.deleted = array("I")  # seqs of deleted messages, ascending
        self.last_sent_by: dict[str, int] = {}  # user -> seq of their latest message (it marks what they read)
        self.reacted_at: dict[tuple[int, str, str], str] = {}  # (seq, reaction, user) -> when it was given

    def stored_here(self, offset: int) -> int:
        """The place of a record at `offset` of the section that holds the session now."""
        return self.here << HOME_SHIFT | offset

    def place(self, stored: int) -> Erasure:
        """(section_id, offset) of a place in `offsets` or `versions`."""
        return self.homes[stored >> HOME_SHIFT], stored & OFFSET_MASK

    def local(self, stored: int) -> int | None:
        """The offset of a place if it is in the section that holds the session now."""
        return stored & OFFSET_MASK if stored >> HOME_SHIFT == self.here else None

    def latest_offset(self, seq: int) -> int:
        """The place of the record with the message as it is now."""
        changes = self.versions.get(seq)
        return changes[-1] if changes else self.offsets[seq - 1]

    def stored_versions(self, seq: int) -> list[Erasure]:
        """Every record that carries the message's text, by section and offset: what deleting it erases."""
        if seq > len(self.offsets) or seq in self.tombstones:
            return []
        return [self.place(stored) for stored in (self.offsets[seq - 1], *self.versions.get(seq, ()))]

    def read_marker(self, user: str, marked: int) -> int:
        """The user's read marker: what they marked, or their own latest message if later."""
        return max(marked, self.last_sent_by.get(user, 0))

    def unread(self, user: str, marker: int) -> int:
        """Messages after the marker that are neither the user's own nor deleted."""
        after = self.session.last_seq - marker
        if after <= 0:
            return 0
        return after - _count_after(self.deleted, marker) - _count_after(self.own.get(user), marker)

    def unread_mentions(self, user: str, marker: int) -> int:
        """Unread messages that mention the user."""
        return _count_after(self.naming.get(user), marker)

    def count(self, message: Message) -> None:
        """A new message in the tallies."""
        self.own.setdefault(message.author, array("I")).append(message.seq)
        self.last_sent_by[message.author] = message.seq
        for user in message.mentions:
            if user != message.author:
                self.naming.setdefault(user, array("I")).append(message.seq)

    def recount(self, message: Message) -> None:
        """A changed message in the tallies: its mentions may differ; a deleted one counts for nobody."""
        seq = message.seq
        if message.deleted_at is not None and not _contains(self.deleted, seq):
            insort(self.deleted, seq)
            _discard(self.own.get(message.author), seq)
        named = set() if message.deleted_at is not None else set(message.mentions) - {message.author}
        for user, seqs in list(self.naming.items()):
            if user not in named:
                _discard(seqs, seq)
                if not seqs:  # as if never named: a replay of erased records builds the same state
                    del self.naming[user]
        for user in named:
            seqs = self.naming.setdefault(user, array("I"))
            if not _contains(seqs, seq):
                insort(seqs, seq)


HOME_SHIFT = 32  # a place in SessionState.offsets: home index << HOME_SHIFT | offset in that section
OFFSET_MASK = (1 << HOME_SHIFT) - 1


def _count_after(seqs: array[int] | None, marker: int) -> int:
    return 0 if not seqs else len(seqs) - bisect_right(seqs, marker)


def _contains(seqs: array[int], seq: int) -> bool:
    index = bisect_right(seqs, seq)
    return index > 0 and seqs[index - 1] == seq


def _discard(seqs: array[int] | None, seq: int) -> None:
    if seqs is not None and _contains(seqs, seq):
        del seqs[bisect_right(seqs, seq) - 1]


class SessionSnapshot(msgspec.Struct, array_like=True, gc=False):
    session: Session
    offsets: bytes  # SessionState.offsets
    client_msg_ids: list[str]
    client_msg_seqs: bytes  # array("I"), the seq of each of client_msg_ids
    last_sent_at: str | None  # used by version 1 only (now session.last_activity_at); its place is kept
    # New in 1.1 (trailing defaults: a state kept before then still decodes).
    changed_seqs: bytes = b""  # array("I"): SessionState.versions, one (seq, offset) pair per change, in order
    changed_offsets: bytes = b""
    tombstones: list[Message] = []
    own: list[tuple[str, bytes]] = []  # SessionState.own, each array("I") as bytes
    naming: list[tuple[str, bytes]] = []
    last_sent_by: list[tuple[str, int]] = []
    reacted_at: list[tuple[int, str, str, str]] = []  # (seq, reaction, user, at)
    homes: list[str] = []  # SessionState.homes ([] : the session's own section only)
    here: int = 0


class SectionSnapshot(msgspec.Struct, array_like=True, gc=False):
    """A Stream as `apply` left it, kept by the storage so that a load need not replay every record."""

    sessions: list[SessionSnapshot]
    idempotency: list[tuple[str, str, str]]  # (user, idempotency key, session id)
    reads: list[tuple[str, str, int]] = []  # (session id, user, seq): a read stream's markers
    version: int = 1  # SNAPSHOT_VERSION when it was kept
    moved: list[tuple[str, str]] = []  # Stream.moved


# A state kept by an earlier version lacks what a load needs now (3: the unread
# tallies; 4: every version of a changed message, which a delete erases, and
# places in other sections): it is passed over, and the section is replayed.
SNAPSHOT_VERSION = 4


class OutdatedState(Exception):
    """A kept state from before SNAPSHOT_VERSION."""


_encode_snapshot = msgspec.msgpack.Encoder().encode
_decode_snapshot = msgspec.msgpack.Decoder(SectionSnapshot).decode
_decode_session_snapshot = msgspec.msgpack.Decoder(SessionSnapshot).decode


class SessionElsewhere(ChatError):
    """The session moved out of the section it was looked for in: look in `section_id`."""

    def __init__(self, session_id: str, section_id: str):
        super().__init__(errors.NOT_FOUND, f"session {session_id!r} moved to section {section_id!r}")
        self.session_id, self.section_id = session_id, section_id


def _session_snapshot(state: SessionState) -> SessionSnapshot:
    return SessionSnapshot(
        state.session,
        state.offsets.tobytes(),
        list(state.by_client_msg_id),
        array("I", state.by_client_msg_id.values()).tobytes(),
        None,
        array("I", (seq for seq, places in state.versions.items() for _ in places)).tobytes(),
        b"".join(places.tobytes() for places in state.versions.values()),
        list(state.tombstones.values()),
        [(user, seqs.tobytes()) for user, seqs in state.own.items()],
        [(user, seqs.tobytes()) for user, seqs in state.naming.items()],
        list(state.last_sent_by.items()),
        [(*key, at) for key, at in state.reacted_at.items()],
        state.homes if state.homes != [state.session.section_id] else [],
        state.here,
    )


def _session_state(kept: SessionSnapshot) -> SessionState:
    state = SessionState(kept.session)
    state.offsets.frombytes(kept.offsets)
    state.by_client_msg_id = dict(zip(kept.client_msg_ids, array("I", kept.client_msg_seqs), strict=True))
    for seq, place in zip(array("I", kept.changed_seqs), array("Q", kept.changed_offsets), strict=True):
        state.versions.setdefault(seq, array("Q")).append(place)
    state.tombstones = {message.seq: message for message in kept.tombstones}
    state.deleted = array("I", sorted(state.tombstones))
    state.own = {user: array("I", seqs) for user, seqs in kept.own}
    state.naming = {user: array("I", seqs) for user, seqs in kept.naming}
    state.last_sent_by = dict(kept.last_sent_by)
    state.reacted_at = {(seq, reaction, user): at for seq, reaction, user, at in kept.reacted_at}
    if kept.homes:
        state.homes, state.here = list(kept.homes), kept.here
    return state


def moved_state(state: SessionState) -> bytes:
    """The session's state as a move carries it to another section (SessionMovedRecord.state)."""
    return _encode_snapshot(_session_snapshot(state))


FETCHED_MESSAGES = 1024  # messages read from storage for a write, kept until the write is decided


class Stream:
    """One section's stored stream as state: its sessions, offsets, idempotency keys and recovery window."""

    def __init__(self, key: SectionKey, recovery_window: int):
        self.key = key
        self.epoch = ""
        self.offset = 0
        self.sessions: dict[str, SessionState] = {}
        self.idempotency: dict[tuple[str, str], str] = {}
        self.recent: deque[StoredRecord] = deque(maxlen=recovery_window)
        self.reads: dict[str, dict[str, int]] = {}  # a read stream's markers: session id -> user -> seq
        self.moved: dict[str, str] = {}  # session id -> the section it moved to from here (and is not back)
        # Messages outside the recovery window that a write needs (edit, delete, react), read
        # from storage by the chat before it queues the write: (session_id, seq) -> (offset, message).
        self._fetched: dict[tuple[str, int], tuple[int, Message]] = {}

    def apply(self, record: StoredRecord) -> Event:
        """Make a durable record part of the stream; return its event."""
        apply(self, record)
        self.offset = record.offset
        self.recent.append(record)
        return event_of(record)

    def session(self, session_id: str) -> Session:
        return self.state_of(session_id).session

    def state_of(self, session_id: str) -> SessionState:
        state = self.sessions.get(session_id)
        if state is None:
            moved_to = self.moved.get(session_id)
            if moved_to is not None:
                raise SessionElsewhere(session_id, moved_to)
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
        state.offsets.append(state.stored_here(offset))
        if message.client_msg_id is not None:
            state.by_client_msg_id[message.client_msg_id] = message.seq
        state.count(message)

    def change_message(self, offset: int, message: Message) -> None:
        state = self.sessions[message.session_id]
        place = state.stored_here(offset)
        if message.deleted_at is not None:
            state.tombstones[message.seq] = message
            state.versions[message.seq] = array("Q", [place])
        else:
            state.versions.setdefault(message.seq, array("Q")).append(place)
        state.recount(message)
        key = (message.session_id, message.seq)
        if key in self._fetched:
            self._fetched[key] = (place, message)

    def move_in(self, session: Session, state: bytes) -> None:
        taken = _session_state(_decode_session_snapshot(state))
        taken.session = session
        if session.section_id not in taken.homes:
            taken.homes.append(session.section_id)
        taken.here = taken.homes.index(session.section_id)
        self.sessions[session.session_id] = taken
        self.moved.pop(session.session_id, None)

    def move_out(self, session_id: str, section_id: str) -> None:
        del self.sessions[session_id]
        self.moved[session_id] = section_id
        self._fetched = {key: found for key, found in self._fetched.items() if key[0] != session_id}

    def put_idempotency_key(self, user: str, key: str, session_id: str) -> None:
        self.idempotency[(user, key)] = session_id

    def put_read(self, session_id: str, user: str, seq: int) -> None:
        markers = self.reads.setdefault(session_id, {})
        markers[user] = max(markers.get(user, 0), seq)

    def put_reaction_time(self, session_id: str, seq: int, reaction: str, user: str, at: str | None) -> None:
        reacted = self.sessions[session_id].reacted_at
        if at is None:
            reacted.pop((seq, reaction, user), None)
        else:
            reacted[(seq, reaction, user)] = at

    def offset_of_client_msg(self, session_id: str, client_msg_id: str) -> int | None:
        """The place of the message sent with this client_msg_id as it is now (edited, deleted), if one was."""
        state = self.state_of(session_id)
        seq = state.by_client_msg_id.get(client_msg_id)
        return None if seq is None else state.latest_offset(seq)

    def current_message(self, session_id: str, seq: int) -> Message | None:
        """The message as it is now, if it is in memory (the recovery window, or fetched for a write)."""
        state = self.state_of(session_id)
        place = state.latest_offset(seq)
        offset = state.local(place)
        found = None if offset is None else self.recent_messages([offset])
        if found is not None:
            return found[0]
        fetched = self._fetched.get((session_id, seq))
        return fetched[1] if fetched is not None and fetched[0] == place else None

    def remember(self, place: int, message: Message) -> None:
        """A message read from storage at `place` (SessionState.offsets) for a write that is about to be queued."""
        if len(self._fetched) >= FETCHED_MESSAGES:
            self._fetched.clear()
        self._fetched[(message.session_id, message.seq)] = (place, message)

    def recent_messages(self, offsets: Sequence[int]) -> list[Message] | None:
        """The messages the records at these offsets carry, if all are still in the recovery window, else None."""
        first = self.offset - len(self.recent) + 1
        if not offsets or min(offsets) < first:
            return None
        return [self.recent[offset - first].message for offset in offsets]  # type: ignore[union-attr]

    def redacted(self, record: StoredRecord) -> StoredRecord:
        """The record as it is served now: a deleted message's earlier versions carry its tombstone."""
        if isinstance(record, MessageRecord | MessageEditedRecord):
            state = self.sessions.get(record.message.session_id)
            tombstone = None if state is None else state.tombstones.get(record.message.seq)
            if tombstone is not None:
                return msgspec.structs.replace(record, message=tombstone)
        return record

    def events_after(self, offset: int) -> list[StoredEvent] | None:
        """Stored events after `offset`, or None if some have left the recovery window."""
        missed = self.offset - offset
        if missed < 0 or missed > len(self.recent):
            return None
        records = list(self.recent)[len(self.recent) - missed :] if missed else []
        # A section's own stream holds no read records (they have their own: reads_key).
        return cast(list[StoredEvent], [event_of(self.redacted(record)) for record in records])

    def snapshot(self) -> bytes:
        """The state `apply` built, encoded (the recovery window is not part of it: it is read back as records)."""
        sessions = [_session_snapshot(state) for state in self.sessions.values()]
        idempotency = [(user, key, session_id) for (user, key), session_id in self.idempotency.items()]
        reads = [(session_id, user, seq) for session_id, markers in self.reads.items() for user, seq in markers.items()]
        moved = list(self.moved.items())
        return _encode_snapshot(SectionSnapshot(sessions, idempotency, reads, SNAPSHOT_VERSION, moved))

    def restore(self, offset: int, data: bytes) -> None:
        """Take the state a snapshot of the stream at `offset` holds."""
        snapshot = _decode_snapshot(data)
        if snapshot.version < SNAPSHOT_VERSION:
            raise OutdatedState(f"a state of version {snapshot.version}, not {SNAPSHOT_VERSION}")
        for kept in snapshot.sessions:
            self.sessions[kept.session.session_id] = _session_state(kept)
        self.moved = dict(snapshot.moved)
        for session_id, user, seq in snapshot.reads:
            self.reads.setdefault(session_id, {})[user] = seq
        self.idempotency = {(user, key): session_id for user, key, session_id in snapshot.idempotency}
        self.offset = offset


class Draft:
    """A Stream as it will be once the batch being decided is stored: changes over it, the stream untouched."""

    def __init__(self, stream: Stream):
        self.key = stream.key
        self.offset = stream.offset
        self._stream = stream
        self._sessions: dict[str, Session] = {}  # sessions this batch creates or changes, as they will be
        self._messages: dict[tuple[str, int], Message] = {}  # (session_id, seq) -> message, as it will be
        self._by_client_msg_id: dict[tuple[str, str], Message] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._reads: dict[tuple[str, str], int] = {}
        self._reacted_at: dict[tuple[str, int, str, str], str | None] = {}
        self._versions: dict[tuple[str, int], list[int]] = {}  # offsets of a message's records in this draft
        self._moved_out: dict[str, str] = {}

    def apply(self, record: StoredRecord) -> None:
        apply(self, record)
        self.offset = record.offset

    def session(self, session_id: str) -> Session:
        if session_id in self._moved_out:
            raise SessionElsewhere(session_id, self._moved_out[session_id])
        session = self._sessions.get(session_id)
        return session if session is not None else self._stream.session(session_id)

    def put_session(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    def put_message(self, offset: int, message: Message) -> None:
        self.change_message(offset, message)
        if message.client_msg_id is not None:
            self._by_client_msg_id[(message.session_id, message.client_msg_id)] = message

    def change_message(self, offset: int, message: Message) -> None:
        key = (message.session_id, message.seq)
        self._messages[key] = message
        self._versions.setdefault(key, []).append(offset)

    def stored_versions(self, session_id: str, seq: int) -> list[Erasure]:
        """Every record that will carry the message's text (see SessionState.stored_versions)."""
        state = self._stream.sessions.get(session_id)
        stored = [] if state is None else state.stored_versions(seq)
        return stored + [(self.key.section_id, offset) for offset in self._versions.get((session_id, seq), [])]

    def move_in(self, session: Session, state: bytes) -> None:
        self._sessions[session.session_id] = session

    def move_out(self, session_id: str, section_id: str) -> None:
        self._moved_out[session_id] = section_id

    def put_idempotency_key(self, user: str, key: str, session_id: str) -> None:
        self._idempotency[(user, key)] = session_id

    def put_read(self, session_id: str, user: str, seq: int) -> None:
        self._reads[(session_id, user)] = max(self.marked(session_id, user), seq)

    def put_reaction_time(self, session_id: str, seq: int, reaction: str, user: str, at: str | None) -> None:
        self._reacted_at[(session_id, seq, reaction, user)] = at

    def reacted_at(self, session_id: str, seq: int, reaction: str, user: str) -> str | None:
        """When the user gave this reaction, if they give it."""
        key = (session_id, seq, reaction, user)
        if key in self._reacted_at:
            return self._reacted_at[key]
        return self._stream.state_of(session_id).reacted_at.get((seq, reaction, user))

    def marked(self, session_id: str, user: str) -> int:
        """The seq the user last marked read in the session (a read stream's draft)."""
        marked = self._reads.get((session_id, user))
        return marked if marked is not None else self._stream.reads.get(session_id, {}).get(user, 0)

    def idempotent(self, user: str, key: str) -> Session | None:
        """The session this user created with this idempotency key, if any."""
        session_id = self._idempotency.get((user, key)) or self._stream.idempotency.get((user, key))
        return None if session_id is None else self.session(session_id)

    def message(self, session_id: str, client_msg_id: str) -> Message | None:
        """The message already sent with this client_msg_id, if any."""
        message = self._by_client_msg_id.get((session_id, client_msg_id))
        if message is not None or session_id not in self._stream.sessions:
            return message
        seq = self._stream.state_of(session_id).by_client_msg_id.get(client_msg_id)
        if seq is None:
            return None
        found = self._messages.get((session_id, seq)) or self._stream.current_message(session_id, seq)
        if found is None:
            # Stored long ago, so not in memory; the chat reads such originals from
            # storage before it queues a write, so only a retry racing its original gets here.
            raise ChatError(errors.UNAVAILABLE, "the original message is being read; retry")
        return found

    def message_at(self, session_id: str, seq: int) -> Message:
        """The message with this seq as it will be (not_found past the session's last)."""
        if seq > self.session(session_id).last_seq:
            raise ChatError(errors.NOT_FOUND, f"no message {seq} in session {session_id!r}")
        message = self._messages.get((session_id, seq)) or self._stream.current_message(session_id, seq)
        if message is None:
            # Not in memory: the chat reads it before it queues the write; only a race with eviction gets here.
            raise ChatError(errors.UNAVAILABLE, "the message is being read; retry")
        return message


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

    @staticmethod
    def check_metadata(metadata: Metadata | None | msgspec.UnsetType) -> None:
        """Refuse metadata over MAX_METADATA_BYTES as compact UTF-8 JSON."""
        if isinstance(metadata, dict):
            size = len(msgspec.json.encode(metadata))
            if size > MAX_METADATA_BYTES:
                raise ChatError(
                    errors.TOO_LARGE, f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}"
                )

    def create_session(self, user: str, request: CreateSession, draft: Draft) -> Plan:
        if request.idempotency_key is not None:
            existing = draft.idempotent(user, request.idempotency_key)
            if existing is not None:
                return Plan([], SessionCreated(session=existing, reply_to=request.id))
        if not self.session_quota.allow(user):
            raise ChatError(
                errors.RATE_LIMITED, f"at most {self.session_quota.count} new sessions per minute; try again shortly"
            )
        now = self.now()
        session = Session(
            session_id=self.new_id(),
            document_id=draft.key.document_id,
            section_id=draft.key.section_id,
            title=request.title,
            created_by=user,
            created_at=now,
            closed=False,
            last_seq=0,
            last_activity_at=now,
            metadata=request.metadata,
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
            mentions=_distinct(request.mentions),
        )
        record = MessageRecord(offset=draft.offset + 1, message=message)
        return Plan([record], MessageAck(message=message, reply_to=request.id))

    def edit_message(self, user: str, request: EditMessage, draft: Draft, *, moderator: bool = False) -> Plan:
        session, message = draft.session(request.session_id), draft.message_at(request.session_id, request.seq)
        _check_author(message, user, moderator, "edit")
        mentions = message.mentions if request.mentions is None else _distinct(request.mentions)
        if message.deleted_at is None and (request.text, mentions) == (message.text, message.mentions):
            return Plan([], MessageEdited(message=message, reply_to=request.id))  # changes nothing
        _check_open(session, message)
        edited = msgspec.structs.replace(message, text=request.text, mentions=mentions, edited_at=self.now())
        # Only those this version names for the first time are notified (an edit never re-notifies).
        mentioned = [name for name in mentions if name not in message.mentions and name != message.author]
        record = MessageEditedRecord(offset=draft.offset + 1, message=edited, mentioned=mentioned)
        return Plan([record], MessageEdited(message=edited, reply_to=request.id))

    def delete_message(self, user: str, request: DeleteMessage, draft: Draft, *, moderator: bool = False) -> Plan:
        message = draft.message_at(request.session_id, request.seq)
        _check_author(message, user, moderator, "delete")
        if message.deleted_at is not None:
            return Plan([], MessageDeleted(message=message, reply_to=request.id))  # the tombstone again
        # Works in a closed session too: deleting is erasure, not new content.
        tombstone = msgspec.structs.replace(message, text="", mentions=[], reactions={}, deleted_at=self.now())
        record = MessageDeletedRecord(offset=draft.offset + 1, message=tombstone)
        erase = draft.stored_versions(request.session_id, request.seq)
        return Plan([record], MessageDeleted(message=tombstone, reply_to=request.id), erase)

    def react(self, user: str, request: React, draft: Draft) -> Plan:
        session, message = draft.session(request.session_id), draft.message_at(request.session_id, request.seq)
        users = message.reactions.get(request.reaction, [])
        repeat = (user in users) == request.on  # reacting as you already are: the reply of the reaction stored
        given = draft.reacted_at(request.session_id, request.seq, request.reaction, user) if repeat else None
        at = given or self.now()
        reply = ReactionEvent(
            session_id=message.session_id,
            seq=message.seq,
            reaction=request.reaction,
            user=user,
            on=request.on,
            at=at,
            reply_to=request.id,
        )
        if repeat:
            return Plan([], reply)
        _check_open(session, message)
        reactions = dict(message.reactions)
        if request.on:
            if request.reaction not in reactions and len(reactions) >= MAX_REACTIONS:
                raise ChatError(errors.TOO_LARGE, f"a message takes at most {MAX_REACTIONS} distinct reactions")
            reactions[request.reaction] = [*users, user]
        else:
            reactions[request.reaction] = [other for other in users if other != user]
            if not reactions[request.reaction]:
                del reactions[request.reaction]
        changed = msgspec.structs.replace(message, reactions=reactions)
        record = ReactionRecord(
            offset=draft.offset + 1, message=changed, reaction=request.reaction, user=user, on=request.on, at=at
        )
        return Plan([record], reply)

    def close_session(self, user: str, request: CloseSession, draft: Draft) -> Plan:
        session = draft.session(request.session_id)
        if session.closed:
            raise ChatError(errors.CONFLICT, "the session is already closed")
        closed = msgspec.structs.replace(
            session, closed=True, last_activity_at=_later(session.last_activity_at, self.now())
        )
        record = SessionClosedRecord(offset=draft.offset + 1, session=closed)
        return Plan([record], SessionClosed(session=closed, reply_to=request.id))

    def reopen_session(self, user: str, request: ReopenSession, draft: Draft) -> Plan:
        session = draft.session(request.session_id)
        if not session.closed:
            raise ChatError(errors.CONFLICT, "the session is not closed")
        reopened = msgspec.structs.replace(
            session, closed=False, last_activity_at=_later(session.last_activity_at, self.now())
        )
        record = SessionReopenedRecord(offset=draft.offset + 1, session=reopened)
        return Plan([record], SessionReopened(session=reopened, reply_to=request.id))

    def update_session(self, user: str, request: UpdateSession, draft: Draft, *, moderator: bool = False) -> Plan:
        session = draft.session(request.session_id)
        if session.created_by != user and not moderator:
            raise ChatError(errors.FORBIDDEN, "only the session's creator or a moderator may update it")
        title = session.title if request.title is msgspec.UNSET else request.title
        metadata = session.metadata if request.metadata is msgspec.UNSET else request.metadata
        if (title, metadata) == (session.title, session.metadata):
            return Plan([], SessionUpdated(session=session, reply_to=request.id))  # changes nothing
        active = _later(session.last_activity_at, self.now())
        updated = msgspec.structs.replace(session, title=title, metadata=metadata, last_activity_at=active)
        record = SessionUpdatedRecord(offset=draft.offset + 1, session=updated)
        return Plan([record], SessionUpdated(session=updated, reply_to=request.id))

    def move_sessions(
        self, request: MoveSessions, source: Stream, target: Stream, source_reads: Stream, target_reads: Stream
    ) -> MovePlan:
        """Move sessions from `source` to `target` with their read markers (from one read stream to the other).

        Decided on the streams themselves: the writer holds all four sections' locks.
        """
        if request.from_section_id == request.to_section_id:
            raise ChatError(errors.BAD_REQUEST, "from_section_id and to_section_id are the same section")
        if request.session_ids is None:
            if len(source.sessions) > MAX_MOVED_SESSIONS:
                raise ChatError(errors.TOO_LARGE, f"the section has more than {MAX_MOVED_SESSIONS} sessions; name them")
            named = list(source.sessions)
        else:
            named = request.session_ids
            if len(set(named)) != len(named):
                raise ChatError(errors.BAD_REQUEST, "session_ids has repeats")
            for session_id in named:
                if session_id not in source.sessions and session_id not in target.sessions:
                    raise ChatError(errors.NOT_FOUND, f"no session {session_id!r} in section {source.key.section_id!r}")
        moving = [source.sessions[session_id] for session_id in named if session_id in source.sessions]
        states = [moved_state(state) for state in moving]
        if (
            any(len(state) > MAX_SESSION_STATE_BYTES for state in states)
            or sum(map(len, states)) > MAX_MOVED_STATE_BYTES
        ):
            raise ChatError(errors.TOO_LARGE, "a session has too many messages to move")
        moved: dict[str, Session] = {}
        out: list[StoredRecord] = []
        into: list[StoredRecord] = []
        marks: list[StoredRecord] = []
        for state, carried in zip(moving, states, strict=True):
            session = moved[state.session.session_id] = msgspec.structs.replace(
                state.session, section_id=request.to_section_id
            )
            moving_out = SessionMovedRecord(
                offset=source.offset + len(out) + 1,
                session=session,
                from_section_id=source.key.section_id,
                to_section_id=target.key.section_id,
            )
            out.append(moving_out)
            into.append(msgspec.structs.replace(moving_out, offset=target.offset + len(into) + 1, state=carried))
            for user, seq in source_reads.reads.get(session.session_id, {}).items():
                offset = target_reads.offset + len(marks) + 1
                marks.append(ReadRecord(offset=offset, session_id=session.session_id, user=user, seq=seq))
        listed = [moved.get(session_id) or target.session(session_id) for session_id in named]
        reply = SessionsMoved(
            document_id=request.document_id,
            from_section_id=request.from_section_id,
            to_section_id=request.to_section_id,
            sessions=listed,
            reply_to=request.id,
        )
        records: dict[SectionKey, list[StoredRecord]] = {source.key: out, target.key: into, target_reads.key: marks}
        return MovePlan({key: part for key, part in records.items() if part}, reply)

    def mark_read(self, user: str, request: MarkRead, section: Stream, draft: Draft) -> Plan:
        """A read marker, decided against the section's read stream (`draft`) and the section itself."""
        state = section.state_of(request.session_id)
        check_read_seq(state, request.seq)
        current = state.read_marker(user, draft.marked(request.session_id, user))
        if request.seq <= current:
            return Plan([], ReadMarked(session_id=request.session_id, seq=current, reply_to=request.id))
        record = ReadRecord(offset=draft.offset + 1, session_id=request.session_id, user=user, seq=request.seq)
        return Plan([record], ReadMarked(session_id=request.session_id, seq=request.seq, reply_to=request.id))


def check_read_seq(state: SessionState, seq: int) -> None:
    if seq > state.session.last_seq:
        raise ChatError(errors.BAD_REQUEST, f"seq {seq} is past the session's last message ({state.session.last_seq})")


def _distinct(mentions: list[str] | None) -> list[str]:
    """Mentions without repeats, in the order given."""
    return list(dict.fromkeys(mentions)) if mentions else []


def _check_author(message: Message, user: str, moderator: bool, action: str) -> None:
    if message.author != user and not moderator:
        raise ChatError(errors.FORBIDDEN, f"only the message's author or a moderator may {action} it")


def _check_open(session: Session, message: Message) -> None:
    if session.closed:
        raise ChatError(errors.CONFLICT, "the session is closed")
    if message.deleted_at is not None:
        raise ChatError(errors.CONFLICT, "the message is deleted")


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
    return [state.latest_offset(seq) for seq in range(start + 1, end + 1)], has_more


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
    if request.closed is not None:
        sessions = [session for session in sessions if session.closed == request.closed]
    if request.order == "activity":
        return _activity_page(sessions, request)
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
    return _page(sessions, start, request)


def _page(sessions: list[Session], start: int, request: ListSessions) -> SessionList:
    page = sessions[start : start + request.limit]
    more = start + len(page) < len(sessions)
    return SessionList(sessions=page, next_cursor=request.cursor_after(page[-1]) if more else None, reply_to=request.id)


def _activity_page(sessions: list[Session], request: ListSessions) -> SessionList:
    """One page of a listing by activity: latest `last_activity_at` first, then by session_id.

    The order is total, so a cursor (last_activity_at, session_id) names a place
    even when its session has changed or gone since: the page starts after it.
    A session active while the client pages moves to the front, which the client
    has passed: it comes again only in a new listing, never twice in one.
    """
    sessions.sort(key=lambda session: session.session_id)
    sessions.sort(key=lambda session: session.last_activity_at, reverse=True)
    start = 0
    position = request.position()
    if position is not None:
        active, session_id = position
        start = next(
            (
                index
                for index, session in enumerate(sessions)
                if session.last_activity_at < active
                or (session.last_activity_at == active and session.session_id > session_id)
            ),
            len(sessions),
        )
    return _page(sessions, start, request)


def read_state(
    user: str, listed: list[tuple[SessionState, dict[str, dict[str, int]]]]
) -> tuple[dict[str, int], dict[str, int]]:
    """The `read` and `unread` of a reply: the user's marker and unread count in each listed session.

    `listed`: each session's state with the markers of its section's read stream.
    """
    read: dict[str, int] = {}
    unread: dict[str, int] = {}
    for state, marked in listed:
        session_id = state.session.session_id
        marker = read[session_id] = state.read_marker(user, marked.get(session_id, {}).get(user, 0))
        unread[session_id] = state.unread(user, marker)
    return read, unread


def section_summary(stream: Stream, marked: dict[str, dict[str, int]], user: str) -> SectionSummary:
    """A section as a `watch_document` watcher sees it: counts over its sessions, unread ones for `user`.

    From the tallies the stored events keep: one step per session, none per message.
    """
    sessions = opened = messages = unread = mentions = 0
    latest: str | None = None
    for state in stream.sessions.values():
        session = state.session
        sessions += 1
        opened += not session.closed
        messages += session.last_seq - len(state.deleted)
        if latest is None or session.last_activity_at > latest:
            latest = session.last_activity_at
        marker = state.read_marker(user, marked.get(session.session_id, {}).get(user, 0))
        unread += state.unread(user, marker)
        mentions += state.unread_mentions(user, marker)
    return SectionSummary(
        section_id=stream.key.section_id,
        sessions=sessions,
        open_sessions=opened,
        messages=messages,
        last_activity_at=latest,
        unread=unread,
        mentions=mentions,
    )


def snapshot_sessions(stream: Stream) -> tuple[list[Session], bool]:
    """The sessions of a `subscribed` reply, and whether that is all of them.

    Past MAX_LISTED_SESSIONS, the most recently active ones (the later stored
    first among equals), still oldest created first; `list_sessions` has the rest.
    """
    states = stream.sessions.values()
    if len(states) <= MAX_LISTED_SESSIONS:
        return [state.session for state in states], True
    recent = heapq.nlargest(
        MAX_LISTED_SESSIONS, enumerate(states), key=lambda item: (item[1].session.last_activity_at, item[0])
    )
    recent.sort(key=lambda item: (item[1].session.created_at, item[0]))
    return [state.session for _, state in recent], False
