# The chat: one handler per request kind, over the parts that do the work.
#
#   core.py           a section's stored state and the rules of each write (no asyncio)
#   writer.py         each section's writer: batches, group commit, pipelining, retries
#   subscriptions.py  who listens to each section, presence, fan-out
#   sections.py       the sections in memory: load, lock, evict, kept states
#
# Rules kept here:
# - A request's reply (or error) goes to the peer that sent it; a write's
#   reply goes out only once it is durable (the writer sends it).
# - Between building a `subscribed` snapshot and adding the subscriber
#   nothing awaits, so no event slips between the snapshot and the live stream.
# - An outcome the storage does not know is never a refusal: the connection is
#   closed with 1011 and the client retries with its key.

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol, cast, get_args

from protocol import errors
from protocol.errors import ChatError
from protocol.messages import (
    ClientRequest,
    CloseSession,
    CreateSession,
    DeleteMessage,
    DocumentSummary,
    EditMessage,
    Error,
    GetSession,
    History,
    HistoryPage,
    ListSessions,
    MarkRead,
    Mentioned,
    Message,
    MessageAck,
    MoveSessions,
    Ping,
    Pong,
    React,
    ReopenSession,
    SectionSummary,
    SendMessage,
    Session,
    SessionCreated,
    SessionInfo,
    StoredEvent,
    Subscribe,
    Subscribed,
    Typing,
    TypingEvent,
    Unsubscribe,
    Unsubscribed,
    UnwatchDocument,
    Unwatched,
    UpdateSession,
    WatchDocument,
)

from .background import Background
from .core import (
    Draft,
    Event,
    Plan,
    Rules,
    SessionElsewhere,
    SessionState,
    check_read_seq,
    event_of,
    history_window,
    newly_mentioned,
    read_state,
    section_summary,
    session_page,
    snapshot_sessions,
)
from .metrics import Metrics
from .peer import Peer, check_access, reply
from .sections import Section, SectionCache
from .storage.base import (
    MessageRecord,
    OutcomeUnknown,
    ReadRecord,
    SectionKey,
    SessionCreatedRecord,
    Storage,
    StorageError,
    StoredRecord,
    reads_key,
    section_of_reads,
)
from .subscriptions import Subscriptions
from .writer import Writer

logger = logging.getLogger("sectionchat.chat")
MAX_FORWARDS = 8  # sections a request follows a moving session through before it gives up


class Cluster(Protocol):
    """What the chat tells other nodes, and asks them."""

    def local_presence_changed(self, key: SectionKey, users: set[str]) -> None: ...

    async def remote_presence(self, key: SectionKey) -> set[str]: ...

    def mentioned(self, users: list[str], notice: Mentioned) -> None: ...


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
        self.cluster: Cluster | None = None  # set when other nodes share the storage
        self.rules = Rules(max_text_chars=max_text_chars, sessions_per_minute=sessions_per_minute)
        self.background = Background()
        self.sections = SectionCache(
            storage,
            self.background,
            recovery_window=recovery_window,
            idle_s=section_idle_s,
            max_cached=max_cached_sections,
        )
        self.subscriptions = Subscriptions(
            self.metrics,
            max_subscriptions=max_subscriptions,
            presence_window_s=presence_window_s,
            local_presence_changed=self._tell_other_nodes,
            summarize=self._summarize,
        )
        self.sections.watched = self.subscriptions.watched
        # Told of every section that stored events, here or (through section_changed) on another node.
        self.stored_hooks: list[Callable[[SectionKey], None]] = []
        self.deleted_hooks: list[Callable[[str, list[SectionKey]], None]] = []  # a document deleted, its sections
        self.writer = Writer(storage, self.sections, self.background, self._announce, self._stored)
        self._handlers: dict[type, Callable[[Peer, Any], Awaitable[None]]] = {
            CreateSession: self._create_session,
            GetSession: self._get_session,
            ListSessions: self._list_sessions,
            SendMessage: self._send_message,
            History: self._history,
            CloseSession: self._close_session,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            Typing: self._typing,
            Ping: self._ping,
            EditMessage: self._edit_message,
            DeleteMessage: self._delete_message,
            React: self._react,
            UpdateSession: self._update_session,
            ReopenSession: self._reopen_session,
            MarkRead: self._mark_read,
            WatchDocument: self._watch_document,
            UnwatchDocument: self._unwatch_document,
            MoveSessions: self._move_sessions,
        }
        assert set(self._handlers) == set(get_args(ClientRequest)), "every request kind has one handler"

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

    def connect(self, peer: Peer) -> None:
        """A connection opened (mentions reach it whether it subscribes or not)."""
        self.subscriptions.connect(peer)

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection that has gone: its subscriptions end and its presence with them."""
        self.subscriptions.disconnect(peer)

    # One handler per request kind (the table is built in __init__) ----------------

    async def _create_session(self, peer: Peer, request: CreateSession) -> None:
        self.rules.check_metadata(request.metadata)
        check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        try:
            await self.writer.write(key, peer, partial(self.rules.create_session, peer.user, request))
        except SessionElsewhere as moved:
            # A retry whose session has moved since: its key stays with this section, the session is there.
            section = await self._section_of(peer, moved.session_id)
            session = section.stream.session(moved.session_id)
            reply(peer, SessionCreated(session=session, reply_to=request.id))

    async def _get_session(self, peer: Peer, request: GetSession) -> None:
        section = await self._section_of(peer, request.session_id)
        reply(peer, SessionInfo(session=section.stream.session(request.session_id), reply_to=request.id))

    async def _list_sessions(self, peer: Peer, request: ListSessions) -> None:
        check_access(peer, request.document_id)
        if request.section_id is not None:
            keys = [SectionKey(request.document_id, request.section_id)]
        else:
            keys = await self.storage.document_sections(request.document_id)
        sessions: list[Session] = []
        states: dict[str, tuple[SessionState, dict[str, dict[str, int]]]] = {}
        for key in keys:
            section = await self.sections.loaded(key)
            marked = await self._marked(key)
            for state in section.stream.sessions.values():
                sessions.append(state.session)
                states[state.session.session_id] = (state, marked)
        page = session_page(sessions, request)
        page.read, page.unread = read_state(peer.user, [states[s.session_id] for s in page.sessions])
        reply(peer, page)

    async def _send_message(self, peer: Peer, request: SendMessage) -> None:
        self.rules.check_text(request.text)
        plan = partial(self.rules.send_message, peer.user, request)

        async def send(key: SectionKey) -> None:
            if not await self._repeated(peer, key, request):
                await self.writer.write(key, peer, plan)

        await self._in_session(peer, request.session_id, send)

    async def _history(self, peer: Peer, request: History) -> None:
        section = await self._section_of(peer, request.session_id)
        state = section.stream.state_of(request.session_id)
        places, has_more = history_window(state, request)
        page = await self._messages_at(section, state, places) if places else []
        reply(peer, HistoryPage(session_id=request.session_id, messages=page, has_more=has_more, reply_to=request.id))

    async def _close_session(self, peer: Peer, request: CloseSession) -> None:
        await self._write_in_session(peer, request.session_id, partial(self.rules.close_session, peer.user, request))

    async def _edit_message(self, peer: Peer, request: EditMessage) -> None:
        self.rules.check_text(request.text)
        plan = partial(self.rules.edit_message, peer.user, request, moderator=peer.moderator)
        await self._change_message(peer, request.session_id, request.seq, plan)

    async def _delete_message(self, peer: Peer, request: DeleteMessage) -> None:
        plan = partial(self.rules.delete_message, peer.user, request, moderator=peer.moderator)
        await self._change_message(peer, request.session_id, request.seq, plan)

    async def _react(self, peer: Peer, request: React) -> None:
        await self._change_message(peer, request.session_id, request.seq, partial(self.rules.react, peer.user, request))

    async def _update_session(self, peer: Peer, request: UpdateSession) -> None:
        self.rules.check_metadata(request.metadata)
        plan = partial(self.rules.update_session, peer.user, request, moderator=peer.moderator)
        await self._write_in_session(peer, request.session_id, plan)

    async def _reopen_session(self, peer: Peer, request: ReopenSession) -> None:
        await self._write_in_session(peer, request.session_id, partial(self.rules.reopen_session, peer.user, request))

    async def _mark_read(self, peer: Peer, request: MarkRead) -> None:
        async def mark(key: SectionKey) -> None:
            section = await self.sections.loaded(key)
            check_read_seq(section.stream.state_of(request.session_id), request.seq)
            plan = partial(self.rules.mark_read, peer.user, request, section.stream)
            await self.writer.write(reads_key(key), peer, plan)

        await self._in_session(peer, request.session_id, mark)

    async def _move_sessions(self, peer: Peer, request: MoveSessions) -> None:
        if request.from_section_id == request.to_section_id:
            raise ChatError(errors.BAD_REQUEST, "from_section_id and to_section_id are the same section")
        check_access(peer, request.document_id)
        source = SectionKey(request.document_id, request.from_section_id)
        target = SectionKey(request.document_id, request.to_section_id)
        await self.writer.move(peer, source, target, partial(self.rules.move_sessions, request))

    # Writes to a session, wherever it is -------------------------------------------

    async def _in_session(self, peer: Peer, session_id: str, act: Callable[[SectionKey], Awaitable[None]]) -> None:
        """Act on the session's section; if the session moved on meanwhile, act again where it went."""
        for _ in range(MAX_FORWARDS):
            key = await self._key_of(peer, session_id)
            try:
                await act(key)
                return
            except SessionElsewhere:
                continue  # moved while the write waited: it lands after the move, in the new section
        raise ChatError(errors.UNAVAILABLE, "the session keeps moving; retry")

    async def _write_in_session(self, peer: Peer, session_id: str, plan: Callable[[Draft], Plan]) -> None:
        async def write(key: SectionKey) -> None:
            await self.writer.write(key, peer, plan)

        await self._in_session(peer, session_id, write)

    async def _change_message(self, peer: Peer, session_id: str, seq: int, plan: Callable[[Draft], Plan]) -> None:
        async def change(key: SectionKey) -> None:
            await self._message_ready(key, session_id, seq)
            await self.writer.write(key, peer, plan)

        await self._in_session(peer, session_id, change)

    async def _watch_document(self, peer: Peer, request: WatchDocument) -> None:
        check_access(peer, request.document_id)
        self.subscriptions.check_room(peer, request.document_id)
        summaries = await self.document_summaries(request.document_id, peer.user)
        # From here to the watch nothing awaits: no change slips between the summaries and the live ones.
        reply(peer, DocumentSummary(document_id=request.document_id, sections=summaries, reply_to=request.id))
        self.subscriptions.watch(peer, request.document_id, summaries)

    async def document_summaries(self, document_id: str, user: str | None) -> list[SectionSummary]:
        """A summary of each section of the document that has a session, for `user` (None: nobody's unread).

        Computed after the last await: a caller that acts on them at once misses no change.
        """
        keys = await self.storage.document_sections(document_id)
        loaded = [(await self.sections.loaded(key), await self._marked(key)) for key in keys]
        summaries = [section_summary(section.stream, marked, user or "") for section, marked in loaded]
        return [summary for summary in summaries if summary.sessions]

    async def delete_document(self, document_id: str) -> tuple[int, int]:
        """Remove every session, message, read marker and stored event of the document: (sessions, messages) removed.

        With every one of its sections' writers held: nothing is written to it
        meanwhile. Its subscribers and watchers are told and let go; its
        sections start afresh, with new epochs. Deleting again removes nothing.
        """
        keys = await self.storage.document_sections(document_id)
        streams = [*keys, *map(reads_key, keys)]
        async with self.writer.holding(streams):
            sections = [await self.sections.loaded(key) for key in keys]
            states = [state for section in sections for state in section.stream.sessions.values()]
            session_ids = [state.session.session_id for state in states]
            messages = sum(state.session.last_seq for state in states)  # tombstones count
            try:
                if keys:
                    await self.storage.delete_document(document_id, streams, session_ids)
            finally:  # whatever storage says, the next use reads what it holds
                for key in streams:
                    self.sections.section(key).reset()
        self.subscriptions.document_deleted(document_id, [section.audience for section in sections])
        for hook in self.deleted_hooks:
            hook(document_id, keys)
        logger.info("document %r deleted: %d sessions, %d messages", document_id, len(session_ids), messages)
        return len(session_ids), messages

    async def position(self, key: SectionKey) -> tuple[str, int]:
        """The section's epoch and offset (its last stored event)."""
        stream = (await self.sections.loaded(key)).stream
        return stream.epoch, stream.offset

    async def stored_events(
        self, key: SectionKey, since_offset: int, epoch: str | None, limit: int
    ) -> tuple[str, int, list[StoredEvent], bool]:
        """(epoch, offset, events, has_more): up to `limit` stored events after `since_offset`, read from storage."""
        section = await self.sections.loaded(key)
        stream = section.stream
        if epoch is not None and epoch != stream.epoch:
            raise ChatError(errors.CONFLICT, f"the section's epoch is {stream.epoch!r}, not {epoch!r}")
        if since_offset > stream.offset:
            raise ChatError(errors.CONFLICT, f"the section's offset is {stream.offset}, before {since_offset}")
        last = min(stream.offset, since_offset + limit)
        offsets = list(range(since_offset + 1, last + 1))
        first_recent = stream.offset - len(stream.recent) + 1
        if offsets and offsets[0] >= first_recent:
            records = [stream.recent[offset - first_recent] for offset in offsets]
        else:
            records = await self.storage.read_records(key, offsets) if offsets else []
        events = [cast(StoredEvent, event_of(stream.redacted(record))) for record in records]
        return stream.epoch, stream.offset, events, last < stream.offset

    async def _unwatch_document(self, peer: Peer, request: UnwatchDocument) -> None:
        self.subscriptions.unwatch(peer, request.document_id)
        reply(peer, Unwatched(document_id=request.document_id, reply_to=request.id))

    def _summarize(self, key: SectionKey, user: str) -> SectionSummary | None:
        """The section's summary for the user, from memory (None, and a load begun, if it is not there)."""
        section, reads = self.sections.get(key), self.sections.get(reads_key(key))
        if section is None or not section.loaded:
            return None
        if reads is None or not reads.loaded:
            self.background.spawn(self._summary_later(key))
            return None
        return section_summary(section.stream, reads.stream.reads, user)

    async def _summary_later(self, key: SectionKey) -> None:
        """Load the section and its read markers, then have its summary sent to the watchers."""
        try:
            await self.sections.loaded(key)
            await self._marked(key)
        except StorageError as error:
            logger.warning("cannot load read markers for a summary: %s", error)
            return
        self.subscriptions.section_changed(key)

    async def _marked(self, key: SectionKey) -> dict[str, dict[str, int]]:
        """The read markers of the section's sessions: session id -> user -> seq marked."""
        return (await self.sections.loaded(reads_key(key))).stream.reads

    async def _subscribe(self, peer: Peer, request: Subscribe) -> None:
        check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        self.subscriptions.check_room(peer, key)
        section = await self.sections.loaded(key)
        audience, stream = section.audience, section.stream
        marked = await self._marked(key)
        if self.cluster is not None and not audience.subscribers:
            # Nobody here was watching this section's presence: ask the other nodes.
            try:
                audience.remote_presence = await self.cluster.remote_presence(key)
            except StorageError as error:
                logger.warning("cannot read presence from other nodes: %s", error)
        # From here to the reply nothing awaits (see the rules above).
        self.subscriptions.subscribe(peer, audience)
        # A plain subscribe recovers nothing; the client loads the snapshot.
        sessions, sessions_complete = snapshot_sessions(stream)
        events: list[StoredEvent] | None = None
        if request.since_offset is not None:
            # Having seen nothing, a client misses nothing by a change of epoch.
            same_stream = request.epoch in (None, stream.epoch) or request.since_offset == 0
            events = stream.events_after(request.since_offset) if same_stream else None
        read, unread = read_state(peer.user, [(stream.sessions[s.session_id], marked) for s in sessions])
        reply(
            peer,
            Subscribed(
                document_id=key.document_id,
                section_id=key.section_id,
                epoch=stream.epoch,
                offset=stream.offset,
                sessions=sessions,
                presence=sorted(audience.present()),
                recovered=events is not None,
                events=events or [],
                sessions_complete=sessions_complete,
                read=read,
                unread=unread,
                reply_to=request.id,
            ),
        )

    async def _unsubscribe(self, peer: Peer, request: Unsubscribe) -> None:
        check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        self.subscriptions.unsubscribe(peer, key)
        section = self.sections.get(key)
        if section is not None:
            section.last_used = time.monotonic()
        reply(peer, Unsubscribed(document_id=key.document_id, section_id=key.section_id, reply_to=request.id))

    async def _typing(self, peer: Peer, request: Typing) -> None:
        section = await self._section_of(peer, request.session_id)
        if section.stream.session(request.session_id).closed:
            raise ChatError(errors.CONFLICT, "the session is closed")
        self.subscriptions.broadcast(section.audience, TypingEvent(session_id=request.session_id, user=peer.user), peer)

    async def _ping(self, peer: Peer, request: Ping) -> None:
        reply(peer, Pong(reply_to=request.id))

    # Reads --------------------------------------------------------------------------

    async def _key_of(self, peer: Peer, session_id: str) -> SectionKey:
        """The section that holds the session now (the index may name one it left: each says where it went)."""
        key = await self.storage.find_section(session_id)
        if key is None:
            raise ChatError(errors.NOT_FOUND, f"no session {session_id!r}")
        check_access(peer, key.document_id)
        for _ in range(MAX_FORWARDS):
            moved_to = (await self.sections.loaded(key)).stream.moved.get(session_id)
            if moved_to is None:
                return key
            key = SectionKey(key.document_id, moved_to)
        raise ChatError(errors.UNAVAILABLE, "the session keeps moving; retry")

    async def _section_of(self, peer: Peer, session_id: str) -> Section:
        return await self.sections.loaded(await self._key_of(peer, session_id))

    async def _message_ready(self, key: SectionKey, session_id: str, seq: int) -> None:
        """The message as it is now, in memory for the write that changes it."""
        section = await self.sections.loaded(key)
        stream = section.stream
        if seq <= stream.session(session_id).last_seq and stream.current_message(session_id, seq) is None:
            state = stream.state_of(session_id)
            place = state.latest_offset(seq)
            [message] = await self._messages_at(section, state, [place])
            if session_id in stream.sessions and stream.state_of(session_id).latest_offset(seq) == place:
                stream.remember(place, message)  # else a newer version is in memory

    async def _repeated(self, peer: Peer, key: SectionKey, request: SendMessage) -> bool:
        """Answer a retry of a message stored earlier with the original; False if it is new (as far as is known yet)."""
        if request.client_msg_id is None:
            return False
        section = await self.sections.loaded(key)
        place = section.stream.offset_of_client_msg(request.session_id, request.client_msg_id)
        if place is None:
            return False
        [original] = await self._messages_at(section, section.stream.state_of(request.session_id), [place])
        reply(peer, MessageAck(message=original, reply_to=request.id))
        return True

    async def _messages_at(self, section: Section, state: SessionState, places: Sequence[int]) -> list[Message]:
        """Messages by place (SessionState.offsets): from the recovery window when they are all in it, else
        pages read from storage, from the sections the session was in before for those stored there."""
        local = [state.local(place) for place in places]
        if None not in local:
            offsets = cast(list[int], local)
            found = section.stream.recent_messages(offsets)
            if found is not None:
                return found
            return [record.message for record in await self.storage.read_records(section.key, offsets)]  # type: ignore[union-attr]
        by_home: dict[str, list[int]] = {}
        for section_id, offset in map(state.place, places):
            by_home.setdefault(section_id, []).append(offset)
        found_at: dict[tuple[str, int], Message] = {}
        for section_id, offsets in by_home.items():
            home = await self.sections.loaded(SectionKey(section.key.document_id, section_id))
            for offset, record in zip(offsets, await self.storage.read_records(home.key, offsets), strict=True):
                found_at[(section_id, offset)] = record.message  # type: ignore[union-attr]
        return [found_at[state.place(place)] for place in places]

    def _announce(self, section: Section, record: StoredRecord, event: Event, cause: Peer | None) -> None:
        """A durable record's event to the section's subscribers, and its mentions to whom it names."""
        if isinstance(record, ReadRecord):
            # To the reader's other connections subscribed to the section, so that every tab clears its badge.
            reads_of = section_of_reads(section.key)
            read_in = None if reads_of is None else self.sections.get(reads_of)
            if read_in is not None:
                self.subscriptions.tell_user(read_in.audience, record.user, event, cause)
                self.subscriptions.section_changed(read_in.key)  # the reader's unread count
            return
        self.subscriptions.broadcast(section.audience, event, cause)
        self.subscriptions.section_changed(section.key)
        mentioned = newly_mentioned(record)
        if mentioned and cause is not None:
            # Told by the node that stored it (cause: a write of ours), to its connections and the other nodes';
            # a record caught up from another node was announced there.
            message = record.message  # type: ignore[union-attr]
            notice = Mentioned(document_id=section.key.document_id, section_id=section.key.section_id, message=message)
            self.tell_mentioned(mentioned, notice)
            if self.cluster is not None:
                self.cluster.mentioned(mentioned, notice)

    def tell_mentioned(self, users: list[str], notice: Mentioned) -> None:
        """A `mentioned` notice to this node's connections of these users."""
        self.subscriptions.tell_users(users, notice.document_id, notice)

    def _stored(self, section: Section, records: list[StoredRecord]) -> None:
        # Counted per batch: a counter's inc() takes a lock.
        messages = sessions = 0
        for record in records:
            if isinstance(record, MessageRecord):
                messages += 1
            elif isinstance(record, SessionCreatedRecord):
                sessions += 1
        if messages:
            self.metrics.messages_stored.inc(messages)
        if sessions:
            self.metrics.sessions_created.inc(sessions)
        if records:
            for hook in self.stored_hooks:  # once a batch (other nodes' batches: section_changed)
                hook(section.key)
        self.sections.stored(section)

    # Other nodes (see server/cluster.py) ----------------------------------------

    def _tell_other_nodes(self, key: SectionKey, users: set[str]) -> None:
        if self.cluster is not None:
            self.cluster.local_presence_changed(key, users)

    def section_changed(self, key: SectionKey | None, offset: int | None = None) -> None:
        """Another node stored events in a section (None: in any section, e.g. after a reconnect)."""
        if key is not None:
            for hook in self.stored_hooks:
                hook(key)
        if key is None:
            sections = list(self.sections)
        else:
            section = self.sections.get(key)
            sections = [] if section is None else [section]
            if section is None and self.subscriptions.watched(key.document_id):
                # A section of a watched document that this node has not loaded (new, say): load it for the summary.
                self.background.spawn(self._summary_later(section_of_reads(key) or key))
        for section in sections:
            if section.loaded and not section.sync_scheduled and (offset is None or offset > section.stream.offset):
                section.sync_scheduled = True
                self.background.spawn(self._sync(section.key))

    async def _sync(self, key: SectionKey) -> None:
        try:
            async with self.sections.locked(key) as section:
                section.sync_scheduled = False
                await self.writer.catch_up(section)
        except StorageError as error:
            # The cluster resyncs every section when storage is back.
            logger.warning("cannot catch up with section: %s", error)

    def remote_presence_changed(self, key: SectionKey, users: set[str]) -> None:
        section = self.sections.get(key)
        if section is not None:
            self.subscriptions.remote_presence_changed(section.audience, users)

    def watches(self, key: SectionKey) -> bool:
        """Whether this node has subscribers in the section."""
        section = self.sections.get(key)
        return section is not None and bool(section.audience.subscribers)

    def local_presence(self) -> dict[SectionKey, set[str]]:
        """This node's users in each section where it has any."""
        return {section.key: set(section.audience.presence) for section in self.sections if section.audience.presence}

    # Memory and shutdown ----------------------------------------------------------

    async def evict_idle(self) -> int:
        """Drop sections nobody has used for a while; returns how many."""
        return await self.sections.evict_idle()

    @property
    def cached_sections(self) -> int:
        return len(self.sections)

    async def drain(self) -> None:
        """Wait for writes in flight (a connection that went away may have left some)."""
        await self.background.drain()

    async def close(self) -> None:
        """At shutdown, after the last write: have the storage keep the state of sections that changed much."""
        await self.drain()
        await self.sections.close()


def _unavailable(reply_to: str | int | None) -> Error:
    return Error(
        code=errors.UNAVAILABLE, message="storage is unavailable; nothing was stored", temporary=True, reply_to=reply_to
    )
