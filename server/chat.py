# The chat logic: sections, sessions, offsets, presence. No sockets.
#
# Rules kept here:
# - Each section's writes are decided in order by one writer holding the
#   section's asyncio.Lock: offsets and seqs are assigned under it, stored
#   (many writes per batch, one fsync), and only then applied to memory and
#   announced. Nothing awaits a socket: peers' `send` methods queue bytes.
# - Replies and events are sent in the same synchronous step that applies a
#   change, so every peer sees a section's events in offset order and a
#   subscriber's `subscribed` reply comes before any event that follows it.
# - A record is applied the same way whether it was just stored or is being
#   replayed from storage (`Section.apply`).
# - Sections nobody uses leave memory and are loaded back on demand, from the
#   state the storage was asked to keep (`Section.snapshot`) and the records after it.

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import os
import secrets
import time
from array import array
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NamedTuple, Protocol, get_args

import msgspec

from protocol import errors
from protocol.codec import Codec
from protocol.errors import ChatError
from protocol.messages import (
    MAX_LISTED_SESSIONS,
    ClientRequest,
    CloseSession,
    CreateSession,
    Error,
    GetSession,
    History,
    HistoryPage,
    ListSessions,
    Message,
    MessageAck,
    MessageEvent,
    Ping,
    Pong,
    Presence,
    SendMessage,
    ServerFrame,
    Session,
    SessionClosed,
    SessionCreated,
    SessionInfo,
    SessionList,
    StoredEvent,
    Subscribe,
    Subscribed,
    Typing,
    TypingEvent,
    Unsubscribe,
    Unsubscribed,
)

from .limits import PerUserQuota
from .metrics import Metrics
from .storage.base import (
    MessageRecord,
    OutcomeUnknown,
    SectionKey,
    SectionState,
    SessionClosedRecord,
    SessionCreatedRecord,
    StaleSection,
    Storage,
    StorageError,
    StoredRecord,
)

logger = logging.getLogger("sectionchat.chat")

LOAD_CHUNK = 2000  # records applied between yields to the event loop when a section loads
KEEP_STATE_AFTER = 1000  # records replayed or added since the kept state before the storage keeps a new one
KEEP_STATE_EVERY = 50_000  # records added before a section in use has its state kept


class Plan(NamedTuple):
    """What a write decides: the records to store (none: nothing to write) and the reply."""

    records: list[StoredRecord]
    reply: ServerFrame


class Cluster(Protocol):
    """What the chat tells other nodes, and asks them."""

    def local_presence_changed(self, key: SectionKey, users: set[str]) -> None: ...

    async def remote_presence(self, key: SectionKey) -> set[str]: ...


class Peer(Protocol):
    """One client connection as the chat logic sees it."""

    connection_id: str
    user: str
    documents: frozenset[str] | None  # the documents this peer may use; None: all
    codec: Codec

    def send(self, data: bytes) -> None:
        """Queue one encoded frame; never blocks."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection (it reconnects); never blocks."""


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


def reply(peer: Peer, frame: ServerFrame) -> None:
    peer.send(peer.codec.encode(frame))


class SessionState:
    """A session as a section holds it: its messages are not in memory, only where they are."""

    __slots__ = ("session", "offsets", "by_client_msg_id", "last_sent_at")

    def __init__(self, session: Session):
        self.session = session
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
    """A section's state as `Section.apply` left it, kept by the storage so that a load need not replay every record."""

    sessions: list[SessionSnapshot]
    idempotency: list[tuple[str, str, str]]  # (user, idempotency key, session id)


_encode_snapshot = msgspec.msgpack.Encoder().encode
_decode_snapshot = msgspec.msgpack.Decoder(SectionSnapshot).decode


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


class Section:
    """One section of one document: its stored stream in memory, and who listens."""

    def __init__(self, key: SectionKey, recovery_window: int):
        self.key = key
        self.lock = asyncio.Lock()
        self.loaded = False
        self.epoch = ""
        self.offset = 0
        self.sessions: dict[str, SessionState] = {}
        self.idempotency: dict[tuple[str, str], str] = {}
        self.recent: deque[StoredEvent] = deque(maxlen=recovery_window)
        self.subscribers: set[Peer] = set()
        self.presence: Counter[str] = Counter()  # this node's users: subscribed connections each
        self.remote_presence: set[str] = set()  # users present through other nodes
        self.sync_scheduled = False
        # Presence as last announced, and the snapshot each peer that
        # subscribed since then was given (see Chat._flush_presence).
        self.announced: set[str] = set()
        self.snapshots: dict[Peer, set[str]] = {}
        self.presence_flush: asyncio.TimerHandle | None = None
        self.queue: list[QueuedWrite] = []  # writes waiting for the section's writer
        self.writer: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None  # set when a write is queued
        self.pins = 0
        self.last_used = time.monotonic()
        self.kept_offset = 0  # the offset of the state the storage keeps for it

    def apply(self, record: StoredRecord) -> StoredEvent:
        """Make a stored record part of the section's state; return its event."""
        match record:
            case SessionCreatedRecord(session=session, idempotency_key=key):
                self.sessions[session.session_id] = SessionState(msgspec.structs.replace(session))
                if key is not None:
                    self.idempotency[(session.created_by, key)] = session.session_id
            case MessageRecord(message=message):
                state = self.sessions[message.session_id]
                state.offsets.append(record.offset)
                state.session.last_seq = message.seq
                state.last_sent_at = message.sent_at
                if message.client_msg_id is not None:
                    state.by_client_msg_id[message.client_msg_id] = message.seq
            case SessionClosedRecord(session=session):
                self.sessions[session.session_id].session.closed = True
        event = event_of(record)
        self.offset = record.offset
        self.recent.append(event)
        return event

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
        """Take the state a snapshot of the section at `offset` holds."""
        snapshot = _decode_snapshot(data)
        for kept in snapshot.sessions:
            state = self.sessions[kept.session.session_id] = SessionState(kept.session)
            state.offsets.frombytes(kept.offsets)
            state.by_client_msg_id = dict(zip(kept.client_msg_ids, array("I", kept.client_msg_seqs), strict=True))
            state.last_sent_at = kept.last_sent_at
        self.idempotency = {(user, key): session_id for user, key, session_id in snapshot.idempotency}
        self.offset = self.kept_offset = offset

    def present(self) -> set[str]:
        return set(self.presence) | self.remote_presence

    def session(self, session_id: str) -> SessionState:
        state = self.sessions.get(session_id)
        if state is None:
            raise ChatError(errors.NOT_FOUND, f"no session {session_id!r}")
        return state

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

    def evictable(self, now: float, idle_s: float) -> bool:
        return self.pins == 0 and not self.subscribers and not self.lock.locked() and now - self.last_used >= idle_s


class Draft:
    """A section as it will be once the batch being decided is stored.

    Writes are decided in order against it, so the second write of a batch sees
    the first (its seq, its idempotency key), while the Section itself, which
    readers see, changes only once the batch is durable.
    """

    def __init__(self, section: Section):
        self.key = section.key
        self.offset = section.offset
        self._section = section
        self._sessions: dict[str, Session] = {}  # sessions this batch creates or changes, as they will be
        self._messages: dict[tuple[str, str], Message] = {}  # (session_id, client_msg_id) -> message
        self._idempotency: dict[tuple[str, str], str] = {}

    def session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        return session if session is not None else self._section.session(session_id).session

    def idempotent(self, user: str, key: str) -> Session | None:
        session_id = self._idempotency.get((user, key)) or self._section.idempotency.get((user, key))
        return None if session_id is None else self.session(session_id)

    def message(self, session_id: str, client_msg_id: str) -> Message | None:
        """The message already sent with this client_msg_id, if any."""
        message = self._messages.get((session_id, client_msg_id))
        state = self._section.sessions.get(session_id)
        if message is None and state is not None and client_msg_id in state.by_client_msg_id:
            found = self._section.recent_messages([state.offsets[state.by_client_msg_id[client_msg_id] - 1]])
            if found is None:
                # Stored long ago, so not in memory; Chat.handle reads such originals from storage
                # before it queues a write, so only a retry racing its original gets here.
                raise ChatError(errors.UNAVAILABLE, "the original message is being read; retry")
            message = found[0]
        return message

    def add(self, record: StoredRecord) -> None:
        self.offset = record.offset
        match record:
            case SessionCreatedRecord(session=session, idempotency_key=key):
                self._sessions[session.session_id] = session
                if key is not None:
                    self._idempotency[(session.created_by, key)] = session.session_id
            case MessageRecord(message=message):
                session = self.session(message.session_id)
                self._sessions[message.session_id] = msgspec.structs.replace(session, last_seq=message.seq)
                if message.client_msg_id is not None:
                    self._messages[(message.session_id, message.client_msg_id)] = message
            case SessionClosedRecord(session=session):
                self._sessions[session.session_id] = session


class QueuedWrite(NamedTuple):
    """A write waiting for its section's writer."""

    peer: Peer
    plan: Callable[[Draft], Plan]
    outcome: asyncio.Future[None]


class Decision(NamedTuple):
    """A decided write: the reply (or refusal), and the records it stores."""

    peer: Peer
    outcome: asyncio.Future[None]
    response: ServerFrame | ChatError
    records: list[StoredRecord]


class Batch(NamedTuple):
    """Writes decided together and stored with one append."""

    writes: list[QueuedWrite]
    decided: list[Decision]
    records: list[StoredRecord]
    store: asyncio.Future[None] | None  # the append in flight; None when nothing is written


class Chat:
    """Everything the server decides; transports only feed it requests."""

    def __init__(
        self,
        storage: Storage,
        *,
        max_text_chars: int = 8000,
        max_subscriptions: int = 100,
        sessions_per_minute: int = 0,
        recovery_window: int = 1000,
        presence_window_s: float = 0.1,
        section_idle_s: float = 60.0,
        max_cached_sections: int = 10_000,
        metrics: Metrics | None = None,
    ):
        self.storage = storage
        self.metrics = metrics or Metrics()
        self.max_text_chars = max_text_chars
        self.max_subscriptions = max_subscriptions
        self._session_quota = PerUserQuota(sessions_per_minute, 60.0)
        self.recovery_window = recovery_window
        self.keep_state_after = KEEP_STATE_AFTER
        self.presence_window_s = presence_window_s
        self.section_idle_s = section_idle_s
        self.max_cached_sections = max_cached_sections
        self._sections: dict[SectionKey, Section] = {}
        self._subscriptions: dict[Peer, set[SectionKey]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.cluster: Cluster | None = None  # set when other nodes share the storage
        self._handlers: dict[type, Callable[[Peer, Any], Awaitable[None]]] = {
            CreateSession: self._create_session,
            GetSession: self._get_session,
            ListSessions: self._list_sessions_request,
            SendMessage: self._send_message,
            History: self._history_request,
            CloseSession: self._close_session,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe_request,
            Typing: self._typing,
            Ping: self._ping,
        }
        assert set(self._handlers) == set(get_args(ClientRequest)), "every request kind has one handler"
        # Batches a section may have in flight: two when the storage keeps
        # appends in order and fails every later one after a failure.
        self._depth = 2 if storage.pipelined else 1

    # Requests -------------------------------------------------------------------

    async def handle(self, peer: Peer, request: ClientRequest) -> None:
        """Carry out one request; its reply (or error) goes to `peer`."""
        try:
            await self._handlers[type(request)](peer, request)
        except ChatError as error:
            self.metrics.errors.labels(error.code).inc()
            reply(peer, Error(code=error.code, message=error.message, temporary=error.temporary, reply_to=request.id))
        except OutcomeUnknown as error:
            # No reply would be true: the write may be stored. 1011 makes the client retry with its key.
            logger.warning("closing connection %s with 1011: %s", peer.connection_id, error)
            peer.close(1011, "outcome of a write unknown; retry with its key")
        except StorageError as error:
            # The storage reports its outages itself, at a bounded rate; this is per request.
            logger.debug("storage failed: %s", error)
            self.metrics.errors.labels(errors.UNAVAILABLE).inc()
            reply(peer, _unavailable(request.id))

    # One handler per request kind (the table is built in __init__) ----------------

    async def _create_session(self, peer: Peer, request: CreateSession) -> None:
        _check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        await self._write(peer, key, partial(self._plan_create_session, peer, request))

    async def _get_session(self, peer: Peer, request: GetSession) -> None:
        section = await self._section_of(peer, request.session_id)
        reply(peer, SessionInfo(session=section.session(request.session_id).session, reply_to=request.id))

    async def _list_sessions_request(self, peer: Peer, request: ListSessions) -> None:
        _check_access(peer, request.document_id)
        reply(peer, await self._list_sessions(request))

    async def _send_message(self, peer: Peer, request: SendMessage) -> None:
        if len(request.text) > self.max_text_chars:
            raise ChatError(
                errors.TOO_LARGE, f"text is {len(request.text)} characters; the limit is {self.max_text_chars}"
            )
        key = await self._key_of(peer, request.session_id)
        if not await self._repeated(peer, key, request):
            await self._write(peer, key, partial(self._plan_send_message, peer, request))

    async def _history_request(self, peer: Peer, request: History) -> None:
        section = await self._section_of(peer, request.session_id)
        reply(peer, await self._history(section, section.session(request.session_id), request))

    async def _close_session(self, peer: Peer, request: CloseSession) -> None:
        key = await self._key_of(peer, request.session_id)
        await self._write(peer, key, partial(self._plan_close_session, peer, request))

    async def _unsubscribe_request(self, peer: Peer, request: Unsubscribe) -> None:
        _check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        self._unsubscribe(peer, key)
        reply(peer, Unsubscribed(document_id=key.document_id, section_id=key.section_id, reply_to=request.id))

    async def _typing(self, peer: Peer, request: Typing) -> None:
        section = await self._section_of(peer, request.session_id)
        if section.session(request.session_id).session.closed:
            raise ChatError(errors.CONFLICT, "the session is closed")
        self._broadcast(section, TypingEvent(session_id=request.session_id, user=peer.user), peer)

    async def _ping(self, peer: Peer, request: Ping) -> None:
        reply(peer, Pong(reply_to=request.id))

    async def _write(self, peer: Peer, key: SectionKey, plan: Callable[[Draft], Plan]) -> None:
        """Queue a write for its section's writer and wait for its outcome.

        Writes that queue up while a batch is being stored go out together as
        the next batch: one write and one fsync for all of them (group commit).
        A write runs to its end even if the connection that asked for it goes
        away: half an operation would leave memory and disk apart.
        """
        section = self._sections.get(key)
        if section is None:
            section = self._sections[key] = Section(key, self.recovery_window)
        section.pins += 1  # released by the writer once this write is done
        outcome = asyncio.get_running_loop().create_future()
        section.queue.append(QueuedWrite(peer, plan, outcome))
        if section.wakeup is not None and not section.wakeup.done():
            section.wakeup.set_result(None)
        if section.writer is None:
            section.writer = asyncio.create_task(self._run_writer(section))
            self._tasks.add(section.writer)
            section.writer.add_done_callback(_forget_task(self._tasks))
        await outcome  # if this is cancelled, the writer still does the write (see _settle)

    async def _run_writer(self, section: Section) -> None:
        """Store the section's queued writes in batches, in order, with up to `depth` batches in flight.

        A batch is decided on top of those still in flight (the Draft carries
        them), so with a pipelining storage the next batch is on its way while
        the previous one is being synced. A failed batch fails every later one
        (the storage guarantees it); nothing new is decided until they are out.
        """
        in_flight: deque[Batch] = deque()
        try:
            async with self._locked(section.key):
                draft, failed = Draft(section), False
                while section.queue or in_flight:
                    while section.queue and not failed and len(in_flight) < self._depth:
                        writes, section.queue = section.queue, []
                        in_flight.append(self._decide(section, draft, writes))
                    head = in_flight[0]
                    if head.store is not None and not head.store.done():
                        more_allowed = not failed and len(in_flight) < self._depth
                        await self._wait(section, head.store, more_allowed)
                        continue
                    in_flight.popleft()
                    try:
                        if head.store is not None:
                            head.store.result()
                    except StaleSection:
                        # Another node wrote first (one batch in flight at most): learn what it wrote, decide again.
                        await self._catch_up(section)
                        section.queue[:0] = head.writes
                    except StorageError as error:
                        _fail(head.decided, error)
                        section.pins -= len(head.writes)
                        failed = True
                    else:
                        self._finish(section, head)
                    if not in_flight:
                        draft, failed = Draft(section), False
        except Exception as error:
            # Loading failed (StorageError), or a bug: whoever waits must hear of it.
            writes = [write for batch in in_flight for write in batch.writes] + section.queue
            for write in writes:
                _settle(write.outcome, error)
            section.pins -= len(writes)
            section.queue = []
        finally:
            section.writer = None

    def _decide(self, section: Section, draft: Draft, writes: list[QueuedWrite]) -> Batch:
        """Decide writes in order against the draft; start storing their records."""
        decided: list[Decision] = []
        records: list[StoredRecord] = []
        for peer, plan, outcome in writes:
            try:
                planned, response = plan(draft)
            except ChatError as error:
                decided.append(Decision(peer, outcome, error, []))
                continue
            for record in planned:
                draft.add(record)
            records.extend(planned)
            decided.append(Decision(peer, outcome, response, planned))
        store = asyncio.ensure_future(self.storage.append(section.key, section.epoch, records)) if records else None
        return Batch(writes, decided, records, store)

    async def _wait(self, section: Section, store: asyncio.Future[None], more_allowed: bool) -> None:
        """Wait for the batch in flight, or, if another may be decided meanwhile, for new writes."""
        if not more_allowed:
            await asyncio.wait([store])
            return
        section.wakeup = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait([store, section.wakeup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            section.wakeup = None

    def _finish(self, section: Section, batch: Batch) -> None:
        """The batch is durable: apply it, reply, announce, in the order it was decided."""
        self._count_stored(batch.records)
        for peer, outcome, response, planned in batch.decided:
            if isinstance(response, ChatError):
                _settle(outcome, response)
                continue
            events = [section.apply(record) for record in planned]
            reply(peer, response)
            for event in events:
                self._broadcast(section, event, peer)
            _settle(outcome)
        if section.offset - section.kept_offset >= KEEP_STATE_EVERY:
            # A busy section may never leave memory: keep its state now and then, so that a load after a crash stays short.
            section.kept_offset = section.offset - 1  # not again before this task has run
            self._spawn(self._keep_state(section))
        section.pins -= len(batch.writes)

    def _count_stored(self, records: list[StoredRecord]) -> None:
        for record in records:
            if isinstance(record, MessageRecord):
                self.metrics.messages_stored.inc()
            elif isinstance(record, SessionCreatedRecord):
                self.metrics.sessions_created.inc()

    def _plan_create_session(self, peer: Peer, request: CreateSession, draft: Draft) -> Plan:
        if request.idempotency_key is not None:
            existing = draft.idempotent(peer.user, request.idempotency_key)
            if existing is not None:
                return Plan([], SessionCreated(session=existing, reply_to=request.id))
        if not self._session_quota.allow(peer.user):
            raise ChatError(
                errors.RATE_LIMITED, f"at most {self._session_quota.count} new sessions per minute; try again shortly"
            )
        session = Session(
            session_id=new_uuid4(),
            document_id=draft.key.document_id,
            section_id=draft.key.section_id,
            title=request.title,
            created_by=peer.user,
            created_at=rfc3339_now(),
            closed=False,
            last_seq=0,
        )
        record = SessionCreatedRecord(offset=draft.offset + 1, session=session, idempotency_key=request.idempotency_key)
        return Plan([record], SessionCreated(session=session, reply_to=request.id))

    def _plan_send_message(self, peer: Peer, request: SendMessage, draft: Draft) -> Plan:
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
            message_id=new_uuid4(),
            author=peer.user,
            text=request.text,
            client_msg_id=request.client_msg_id,
            sent_at=rfc3339_now(),
        )
        return Plan(
            [MessageRecord(offset=draft.offset + 1, message=message)], MessageAck(message=message, reply_to=request.id)
        )

    def _plan_close_session(self, peer: Peer, request: CloseSession, draft: Draft) -> Plan:
        session = draft.session(request.session_id)
        if session.closed:
            raise ChatError(errors.CONFLICT, "the session is already closed")
        closed = msgspec.structs.replace(session, closed=True)
        return Plan(
            [SessionClosedRecord(offset=draft.offset + 1, session=closed)],
            SessionClosed(session=closed, reply_to=request.id),
        )

    async def _repeated(self, peer: Peer, key: SectionKey, request: SendMessage) -> bool:
        """Answer a retry of a message stored earlier with the original; False if it is new (as far as is known yet)."""
        if request.client_msg_id is None:
            return False
        section = await self._loaded(key)
        state = section.session(request.session_id)
        seq = state.by_client_msg_id.get(request.client_msg_id)
        if seq is None:
            return False
        [original] = await self._messages_at(section, [state.offsets[seq - 1]])
        reply(peer, MessageAck(message=original, reply_to=request.id))
        return True

    async def _messages_at(self, section: Section, offsets: Sequence[int]) -> list[Message]:
        """Messages by offset: from the recovery window when they are all in it, else a page read from storage."""
        found = section.recent_messages(offsets)
        if found is not None:
            return found
        return [record.message for record in await self.storage.read_records(section.key, list(offsets))]  # type: ignore[union-attr]

    async def _history(self, section: Section, state: SessionState, request: History) -> HistoryPage:
        count, limit = len(state.offsets), request.limit
        if request.after_seq is not None:
            start = min(request.after_seq, count)
            end = min(start + limit, count)
            has_more = end < count
        else:
            end = count if request.before_seq is None else min(max(request.before_seq - 1, 0), count)
            start = max(end - limit, 0)
            has_more = start > 0
        page = await self._messages_at(section, state.offsets[start:end]) if end > start else []
        return HistoryPage(session_id=request.session_id, messages=page, has_more=has_more, reply_to=request.id)

    async def _catch_up(self, section: Section) -> None:
        """Apply and announce what other nodes stored in the section since we last looked."""
        log = await self.storage.read_after(section.key, section.offset)
        if log.epoch is not None and log.epoch != section.epoch:
            section.epoch = log.epoch
        for record in log.records:
            self._broadcast(section, section.apply(record), None)

    async def _list_sessions(self, request: ListSessions) -> SessionList:
        if request.section_id is not None:
            keys = [SectionKey(request.document_id, request.section_id)]
        else:
            keys = await self.storage.document_sections(request.document_id)
        sessions: list[Session] = []
        for key in keys:
            section = await self._loaded(key)
            sessions.extend(state.session for state in section.sessions.values())
        return _session_page(sessions, request)

    async def _subscribe(self, peer: Peer, request: Subscribe) -> None:
        _check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        subscribed = self._subscriptions.get(peer, ())
        if key not in subscribed and len(subscribed) >= self.max_subscriptions:
            raise ChatError(
                errors.BAD_REQUEST,
                f"this connection is subscribed to {len(subscribed)} sections, the limit; unsubscribe first",
            )
        section = await self._loaded(key)
        if self.cluster is not None and not section.subscribers:
            # Nobody here was watching this section's presence: ask the other nodes.
            try:
                section.remote_presence = await self.cluster.remote_presence(key)
            except StorageError as error:
                logger.warning("cannot read presence from other nodes: %s", error)
        # From here to the reply nothing awaits, so no event can slip between
        # the snapshot and the live stream.
        if peer not in section.subscribers:
            section.subscribers.add(peer)
            self._subscriptions.setdefault(peer, set()).add(key)
            self.metrics.subscriptions.inc()
            section.presence[peer.user] += 1
            if section.presence[peer.user] == 1:
                self._local_presence_changed(section)
            if section.presence_flush is not None:
                section.snapshots[peer] = section.present()
        # A plain subscribe recovers nothing; the client loads the snapshot.
        sessions, sessions_complete = _snapshot_sessions(section)
        events: list[StoredEvent] | None = None
        if request.since_offset is not None:
            # Having seen nothing, a client misses nothing by a change of epoch.
            same_stream = request.epoch in (None, section.epoch) or request.since_offset == 0
            events = section.events_after(request.since_offset) if same_stream else None
        reply(
            peer,
            Subscribed(
                document_id=key.document_id,
                section_id=key.section_id,
                epoch=section.epoch,
                offset=section.offset,
                sessions=sessions,
                presence=sorted(section.present()),
                recovered=events is not None,
                events=events or [],
                sessions_complete=sessions_complete,
                reply_to=request.id,
            ),
        )

    def _unsubscribe(self, peer: Peer, key: SectionKey) -> None:
        section = self._sections.get(key)
        if section is None or peer not in section.subscribers:
            return
        section.subscribers.discard(peer)
        self.metrics.subscriptions.dec()
        section.snapshots.pop(peer, None)
        keys = self._subscriptions.get(peer)
        if keys is not None:
            keys.discard(key)
        section.presence[peer.user] -= 1
        if section.presence[peer.user] == 0:
            del section.presence[peer.user]
            self._local_presence_changed(section)
        section.last_used = time.monotonic()

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection that has gone: its subscriptions end and its presence with them."""
        for key in list(self._subscriptions.get(peer, ())):
            self._unsubscribe(peer, key)
        self._subscriptions.pop(peer, None)

    # Fan-out ----------------------------------------------------------------

    def _broadcast(self, section: Section, frame: ServerFrame, cause: Peer | None) -> None:
        encoded: dict[Codec, bytes] = {}
        for peer in section.subscribers:
            if peer is cause:
                continue
            data = encoded.get(peer.codec)
            if data is None:
                data = encoded[peer.codec] = peer.codec.encode(frame)
            try:
                peer.send(data)
            except Exception:
                # As websockets' broadcast() does: one connection's failure is its own, never the others'.
                logger.exception("sending to connection %s failed; closing it", peer.connection_id)
                try:
                    peer.close(1011, "internal error")
                except Exception:
                    logger.exception("closing connection %s failed", peer.connection_id)
        delivered = len(section.subscribers) - (cause in section.subscribers)
        if delivered:
            self.metrics.events_delivered.inc(delivered)

    def _local_presence_changed(self, section: Section) -> None:
        if self.cluster is not None:
            self.cluster.local_presence_changed(section.key, set(section.presence))
        self._presence_changed(section)

    def _presence_changed(self, section: Section) -> None:
        if section.presence_flush is None:
            loop = asyncio.get_running_loop()
            section.presence_flush = loop.call_later(self.presence_window_s, self._flush_presence, section)

    def _flush_presence(self, section: Section) -> None:
        """Announce the net presence change of the window to every subscriber."""
        section.presence_flush = None
        present = section.present()
        snapshots, section.snapshots = section.snapshots, {}
        common = _presence_frame(section.key, section.announced, present)
        section.announced = present
        encoded: dict[Codec, bytes] = {}
        for peer in section.subscribers:
            if peer in snapshots:
                frame = _presence_frame(section.key, snapshots[peer], present)
                if frame is not None:
                    reply(peer, frame)
            elif common is not None:
                data = encoded.get(peer.codec)
                if data is None:
                    data = encoded[peer.codec] = peer.codec.encode(common)
                peer.send(data)

    # Other nodes (see server/cluster.py) ----------------------------------------

    def section_changed(self, key: SectionKey | None, offset: int | None = None) -> None:
        """Another node stored events in a section (None: in any section, e.g. after a reconnect)."""
        sections = (
            list(self._sections.values()) if key is None else [self._sections[key]] if key in self._sections else []
        )
        for section in sections:
            if section.loaded and not section.sync_scheduled and (offset is None or offset > section.offset):
                section.sync_scheduled = True
                self._spawn(self._sync(section.key))

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        """Run `work` beside the caller; `drain` waits for it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(_forget_task(self._tasks))

    async def _sync(self, key: SectionKey) -> None:
        try:
            async with self._locked(key) as section:
                section.sync_scheduled = False
                await self._catch_up(section)
        except StorageError as error:
            # The cluster resyncs every section when storage is back.
            logger.warning("cannot catch up with section: %s", error)

    def remote_presence_changed(self, key: SectionKey, users: set[str]) -> None:
        section = self._sections.get(key)
        if section is not None and section.subscribers and users != section.remote_presence:
            section.remote_presence = users
            self._presence_changed(section)

    def watches(self, key: SectionKey) -> bool:
        """Whether this node has subscribers in the section."""
        section = self._sections.get(key)
        return section is not None and bool(section.subscribers)

    def local_presence(self) -> dict[SectionKey, set[str]]:
        """This node's users in each section where it has any."""
        return {key: set(section.presence) for key, section in self._sections.items() if section.presence}

    # Sections in memory -----------------------------------------------------

    async def _key_of(self, peer: Peer, session_id: str) -> SectionKey:
        key = await self.storage.find_section(session_id)
        if key is None:
            raise ChatError(errors.NOT_FOUND, f"no session {session_id!r}")
        _check_access(peer, key.document_id)
        return key

    async def _section_of(self, peer: Peer, session_id: str) -> Section:
        return await self._loaded(await self._key_of(peer, session_id))

    async def _loaded(self, key: SectionKey) -> Section:
        """The section, loaded, for reading: reads never wait behind a write's fsync."""
        section = self._sections.get(key)
        if section is not None and section.loaded:
            section.last_used = time.monotonic()
            return section
        async with self._locked(key) as section:
            return section

    @asynccontextmanager
    async def _locked(self, key: SectionKey) -> AsyncIterator[Section]:
        section = self._sections.get(key)
        if section is None:
            section = self._sections[key] = Section(key, self.recovery_window)
        # Pinned sections are never evicted, so the object we lock is the one
        # the registry holds.
        section.pins += 1
        try:
            async with section.lock:
                if not section.loaded:
                    await self._load(section)
                yield section
        finally:
            section.pins -= 1
            section.last_used = time.monotonic()

    async def _load(self, section: Section) -> None:
        log = await self.storage.load_section(section.key)
        if log.state is not None:
            section.restore(*log.state)
            # The recovery window: the last records the state covers, read back (a page, not the section).
            first = max(1, log.state.offset - self.recovery_window + len(log.records) + 1)
            window = range(first, log.state.offset + 1)
            if window:
                section.recent.extend(map(event_of, await self.storage.read_records(section.key, list(window))))
        for n, record in enumerate(log.records, 1):
            section.apply(record)
            if n % LOAD_CHUNK == 0:
                # A big section must not stall every other client; nobody sees it until it is loaded.
                await asyncio.sleep(0)
        section.epoch = log.epoch or secrets.token_hex(8)
        section.loaded = True
        if len(log.records) >= self.keep_state_after:
            await self._keep_state(section)  # replayed many records: the next load need not

    async def _keep_state(self, section: Section) -> None:
        """Have the storage keep the section's state as it is now (everything applied is durable)."""
        if section.loaded and section.offset > section.kept_offset:
            section.kept_offset = section.offset
            await self.storage.keep_state(section.key, SectionState(section.offset, section.snapshot()))

    async def evict_idle(self) -> int:
        """Drop sections nobody has used for a while; returns how many."""
        now = time.monotonic()
        candidates = [s for s in self._sections.values() if s.evictable(now, self.section_idle_s)]
        excess = len(self._sections) - self.max_cached_sections
        if excess > 0:
            # Over the cap: also drop the least recently used of the rest.
            others = sorted(
                (s for s in self._sections.values() if s.evictable(now, 0.0) and s not in candidates),
                key=lambda s: s.last_used,
            )
            candidates.extend(others[: max(0, excess - len(candidates))])
        for section in candidates:
            del self._sections[section.key]
            if section.presence_flush is not None:
                section.presence_flush.cancel()  # nobody is left to tell
        for section in candidates:
            if section.offset - section.kept_offset >= self.keep_state_after:
                await self._keep_state(section)
            await self.storage.release(section.key)
        return len(candidates)

    @property
    def cached_sections(self) -> int:
        return len(self._sections)

    async def drain(self) -> None:
        """Wait for writes in flight (a connection that went away may have left some)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        """At shutdown, after the last write: have the storage keep the state of sections that changed much."""
        await self.drain()
        for section in list(self._sections.values()):
            if section.offset - section.kept_offset >= self.keep_state_after:
                await self._keep_state(section)


def _forget_task(tasks: set[asyncio.Task[None]]):
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        # The awaiting handler reports the outcome; if it went away, nobody
        # will, so retrieve it here to keep asyncio from warning about it.
        if not task.cancelled():
            task.exception()

    return done


def _check_access(peer: Peer, document_id: str) -> None:
    if peer.documents is not None and document_id not in peer.documents:
        raise ChatError(errors.FORBIDDEN, f"your token does not grant document {document_id!r}")


def _settle(outcome: asyncio.Future[None], error: Exception | None = None) -> None:
    # A waiter that was cancelled (its connection went away) has cancelled its
    # future; the write went ahead all the same, and there is nobody to tell.
    if outcome.done():
        return
    if error is None:
        outcome.set_result(None)
    else:
        outcome.set_exception(error)


def _fail(decided: list, error: StorageError) -> None:
    """Nothing of the batch was stored: every write in it fails (its own refusal, if it had one)."""
    for _, outcome, response, _ in decided:
        _settle(outcome, response if isinstance(response, ChatError) else error)


def _presence_frame(key: SectionKey, before: set[str], after: set[str]) -> Presence | None:
    joined, left = sorted(after - before), sorted(before - after)
    if not joined and not left:
        return None
    return Presence(document_id=key.document_id, section_id=key.section_id, joined=joined, left=left)


def _unavailable(reply_to: str | int | None) -> Error:
    return Error(
        code=errors.UNAVAILABLE, message="storage is unavailable; nothing was stored", temporary=True, reply_to=reply_to
    )


# Bounded session lists (`sessions` pages, `subscribed` snapshots) -----------------


def _created_at(session: Session) -> str:
    return session.created_at


def _session_page(sessions: list[Session], request: ListSessions) -> SessionList:
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


def _snapshot_sessions(section: Section) -> tuple[list[Session], bool]:
    """The sessions of a `subscribed` reply, and whether that is all of them.

    Past MAX_LISTED_SESSIONS, the most recently active ones (the later stored
    first among equals), still oldest created first; `list_sessions` has the rest.
    """
    states = section.sessions.values()
    if len(states) <= MAX_LISTED_SESSIONS:
        return [state.session for state in states], True
    recent = heapq.nlargest(MAX_LISTED_SESSIONS, enumerate(states), key=lambda item: (_last_activity(item[1]), item[0]))
    recent.sort(key=lambda item: (item[1].session.created_at, item[0]))
    return [state.session for _, state in recent], False
