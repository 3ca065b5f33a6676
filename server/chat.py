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
from typing import Any, Protocol, get_args

from protocol import errors
from protocol.errors import ChatError
from protocol.messages import (
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
    Ping,
    Pong,
    SendMessage,
    Session,
    SessionInfo,
    StoredEvent,
    Subscribe,
    Subscribed,
    Typing,
    TypingEvent,
    Unsubscribe,
    Unsubscribed,
)

from .background import Background
from .core import Rules, history_window, session_page, snapshot_sessions
from .metrics import Metrics
from .peer import Peer, check_access, reply
from .sections import Section, SectionCache
from .storage.base import (
    MessageRecord,
    OutcomeUnknown,
    SectionKey,
    SessionCreatedRecord,
    Storage,
    StorageError,
    StoredRecord,
)
from .subscriptions import Subscriptions
from .writer import Writer

logger = logging.getLogger("sectionchat.chat")


class Cluster(Protocol):
    """What the chat tells other nodes, and asks them."""

    def local_presence_changed(self, key: SectionKey, users: set[str]) -> None: ...

    async def remote_presence(self, key: SectionKey) -> set[str]: ...


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
        )
        self.writer = Writer(storage, self.sections, self.background, self.subscriptions.broadcast, self._stored)
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

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection that has gone: its subscriptions end and its presence with them."""
        self.subscriptions.disconnect(peer)

    # One handler per request kind (the table is built in __init__) ----------------

    async def _create_session(self, peer: Peer, request: CreateSession) -> None:
        check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        await self.writer.write(key, peer, partial(self.rules.create_session, peer.user, request))

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
        for key in keys:
            section = await self.sections.loaded(key)
            sessions.extend(state.session for state in section.stream.sessions.values())
        reply(peer, session_page(sessions, request))

    async def _send_message(self, peer: Peer, request: SendMessage) -> None:
        self.rules.check_text(request.text)
        key = await self._key_of(peer, request.session_id)
        if not await self._repeated(peer, key, request):
            await self.writer.write(key, peer, partial(self.rules.send_message, peer.user, request))

    async def _history(self, peer: Peer, request: History) -> None:
        section = await self._section_of(peer, request.session_id)
        offsets, has_more = history_window(section.stream.state_of(request.session_id), request)
        page = await self._messages_at(section, offsets) if offsets else []
        reply(peer, HistoryPage(session_id=request.session_id, messages=page, has_more=has_more, reply_to=request.id))

    async def _close_session(self, peer: Peer, request: CloseSession) -> None:
        key = await self._key_of(peer, request.session_id)
        await self.writer.write(key, peer, partial(self.rules.close_session, peer.user, request))

    async def _subscribe(self, peer: Peer, request: Subscribe) -> None:
        check_access(peer, request.document_id)
        key = SectionKey(request.document_id, request.section_id)
        self.subscriptions.check_room(peer, key)
        section = await self.sections.loaded(key)
        audience, stream = section.audience, section.stream
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
        key = await self.storage.find_section(session_id)
        if key is None:
            raise ChatError(errors.NOT_FOUND, f"no session {session_id!r}")
        check_access(peer, key.document_id)
        return key

    async def _section_of(self, peer: Peer, session_id: str) -> Section:
        return await self.sections.loaded(await self._key_of(peer, session_id))

    async def _repeated(self, peer: Peer, key: SectionKey, request: SendMessage) -> bool:
        """Answer a retry of a message stored earlier with the original; False if it is new (as far as is known yet)."""
        if request.client_msg_id is None:
            return False
        section = await self.sections.loaded(key)
        offset = section.stream.offset_of_client_msg(request.session_id, request.client_msg_id)
        if offset is None:
            return False
        [original] = await self._messages_at(section, [offset])
        reply(peer, MessageAck(message=original, reply_to=request.id))
        return True

    async def _messages_at(self, section: Section, offsets: Sequence[int]) -> list[Message]:
        """Messages by offset: from the recovery window when they are all in it, else a page read from storage."""
        found = section.stream.recent_messages(offsets)
        if found is not None:
            return found
        return [record.message for record in await self.storage.read_records(section.key, list(offsets))]  # type: ignore[union-attr]

    def _stored(self, section: Section, records: list[StoredRecord]) -> None:
        for record in records:
            if isinstance(record, MessageRecord):
                self.metrics.messages_stored.inc()
            elif isinstance(record, SessionCreatedRecord):
                self.metrics.sessions_created.inc()
        self.sections.stored(section)

    # Other nodes (see server/cluster.py) ----------------------------------------

    def _tell_other_nodes(self, key: SectionKey, users: set[str]) -> None:
        if self.cluster is not None:
            self.cluster.local_presence_changed(key, users)

    def section_changed(self, key: SectionKey | None, offset: int | None = None) -> None:
        """Another node stored events in a section (None: in any section, e.g. after a reconnect)."""
        if key is None:
            sections = list(self.sections)
        else:
            section = self.sections.get(key)
            sections = [] if section is None else [section]
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
