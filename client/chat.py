"""A Python client for sectionchat: typed requests, live events, reconnect with recovery.

    from client.chat import connect

    async with connect("ws://127.0.0.1:8765/ws", name="alice") as chat:
        session = await chat.create_session("spec-7", "intro", title="Wording")
        await chat.send_message(session.session_id, "Shall we say 'must'?")
        async with chat.subscribe("spec-7", "intro") as events:
            async for event in events:
                ...

Requests return the protocol's own Structs (`protocol.messages`): `Session`,
`Message`, `HistoryPage`, `Subscribed`, `ReactionEvent`, `DocumentSummary`
(and this module's `SessionListing`, a list of sessions with read state).
A section's events are the stored `SessionCreated`, `MessageEvent`,
`SessionClosed`, `MessageEdited`, `MessageDeleted`, `ReactionEvent`,
`SessionUpdated`, `SessionReopened`, and `Presence`, `TypingEvent`, `ReadEvent`
(this user read a session on another connection), and this module's `Resync`
(the section must be reloaded: its events could not be recovered). Mentions of
this user arrive on `chat.mentions()`; a watched document's `SectionSummaryEvent`s
on what `chat.watch_document()` returns.

The client reconnects by itself (exponential backoff with jitter) when the
connection drops, resubscribes every section with the last offset it saw, and
hands the recovered events to the subscription iterators before live ones.
Each iterator yields every stored event of its section once, in offset order,
except the events of this client's own writes (their results are what the
write methods return). See docs/python-client.md for the full semantics.

Exceptions, all importable from this module::

    ClientError                  anything this client raises
    ├── ChatError                the server answered `error`: .code, .message, .temporary
    │   ├── BadRequest           bad_request: a missing, mistyped or out-of-bounds field
    │   ├── UnknownType          unknown_type: a request type the server does not know
    │   ├── NotFound             not_found: unknown session
    │   ├── Forbidden            forbidden: the token does not grant the document, or not yours to change
    │   ├── Conflict             conflict: the session is closed (open, to reopen), or the message deleted
    │   ├── TooLarge             too_large: text over max_text_chars, metadata over 4,096 bytes, a 21st
    │   │                        reaction (or a frame over max_frame_bytes)
    │   ├── RateLimited          rate_limited (temporary; retried until the deadline)
    │   ├── Unavailable          unavailable (temporary; retried until the deadline)
    │   └── Internal             internal: a server bug, with a trace id in the message
    ├── ConnectionLost           the connection dropped while a request that is not safe
    │                            to repeat was in flight: it may or may not have taken effect
    ├── RequestTimeout           no answer before the request's deadline (also a TimeoutError)
    ├── ConnectionFailed         the client cannot or will not connect
    │   ├── HandshakeRejected    HTTP 400/401/403 at the handshake (bad name, bad token, origin)
    │   └── ClosedByServer       closed with 1008 (policy) or 1009 (frame too large): no reconnect
    └── ClientClosed             the client was closed before the request could finish

A `ChatError` whose code this module does not know is raised as `ChatError` itself.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Self, TypeVar, Union, get_args
from urllib.parse import quote

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from protocol import errors
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from protocol.messages import (
    DocumentSummary,
    Error,
    HistoryPage,
    Limits,
    Mentioned,
    Message,
    MessageAck,
    MessageDeleted,
    MessageEdited,
    MessageEvent,
    Pong,
    Presence,
    ReactionEvent,
    ReadEvent,
    ReadMarked,
    SectionSummary,
    SectionSummaryEvent,
    ServerFrame,
    ServerMessage,
    Session,
    SessionClosed,
    SessionCreated,
    SessionInfo,
    SessionList,
    SessionMoved,
    SessionReopened,
    SessionsMoved,
    SessionUpdated,
    StoredEvent,
    Subscribed,
    TypingEvent,
    Welcome,
)

__all__ = [
    # entry points
    "connect",
    "ChatClient",
    "Subscription",
    "DocumentWatch",
    "MentionFeed",
    "Backoff",
    "RetryInfo",
    "UNSET",
    # events and objects
    "Event",
    "Resync",
    "Session",
    "SessionListing",
    "Message",
    "HistoryPage",
    "Subscribed",
    "DocumentSummary",
    "SectionSummary",
    "SessionCreated",
    "MessageEvent",
    "SessionClosed",
    "MessageEdited",
    "MessageDeleted",
    "ReactionEvent",
    "SessionUpdated",
    "SessionReopened",
    "SessionMoved",
    "SessionsMoved",
    "Presence",
    "TypingEvent",
    "ReadEvent",
    "Mentioned",
    "SectionSummaryEvent",
    "Welcome",
    "Limits",
    # exceptions
    "ClientError",
    "ChatError",
    "BadRequest",
    "UnknownType",
    "NotFound",
    "Forbidden",
    "Conflict",
    "TooLarge",
    "RateLimited",
    "Unavailable",
    "Internal",
    "ConnectionLost",
    "RequestTimeout",
    "ConnectionFailed",
    "HandshakeRejected",
    "ClosedByServer",
    "ClientClosed",
]

logger = logging.getLogger("sectionchat.client")

# Close codes after which reconnecting at once would only repeat the offence.
NO_RECONNECT_CLOSE_CODES = frozenset({1008, 1009})
# Handshake answers that another attempt with the same credentials cannot change.
REJECTED_STATUSES = frozenset({400, 401, 403})
# How many of this client's own writes it remembers, to keep them out of recovered events.
OWN_WRITES_REMEMBERED = 10_000

# `update_session(title=UNSET)`: leave the field as it is (None clears it), as in protocol.messages.
UNSET = msgspec.UNSET


# Exceptions -----------------------------------------------------------------


class ClientError(Exception):
    """Base class of everything this client raises."""


class ChatError(ClientError):
    """The server answered a request with an `error` frame."""

    code: str = "error"
    temporary: bool = False

    def __init__(
        self, message: str = "", *, code: str | None = None, temporary: bool | None = None, request: str | None = None
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if temporary is not None:
            self.temporary = temporary
        self.request = request  # the request type that failed, e.g. "send_message"

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(ChatError):
    code = errors.BAD_REQUEST


class UnknownType(ChatError):
    code = errors.UNKNOWN_TYPE


class NotFound(ChatError):
    code = errors.NOT_FOUND


class Forbidden(ChatError):
    code = errors.FORBIDDEN


class Conflict(ChatError):
    code = errors.CONFLICT


class TooLarge(ChatError):
    code = errors.TOO_LARGE


class RateLimited(ChatError):
    code = errors.RATE_LIMITED
    temporary = errors.RATE_LIMITED in errors.TEMPORARY


class Unavailable(ChatError):
    code = errors.UNAVAILABLE
    temporary = errors.UNAVAILABLE in errors.TEMPORARY


class Internal(ChatError):
    code = errors.INTERNAL


ERRORS: dict[str, type[ChatError]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownType, NotFound, Forbidden, Conflict, TooLarge, RateLimited, Unavailable, Internal)
}


def error_from_frame(frame: Error, request: str | None = None) -> ChatError:
    """The typed exception for an `error` frame."""
    return ERRORS.get(frame.code, ChatError)(frame.message, code=frame.code, temporary=frame.temporary, request=request)


class ConnectionLost(ClientError):
    """The connection dropped while a request that is not safe to repeat was in flight.

    The server may or may not have carried it out: look (e.g. `list_sessions`)
    before trying again, or give the request an idempotency key next time.
    """


class RequestTimeout(ClientError, TimeoutError):
    """No answer came before the request's deadline (retries and reconnects included)."""


class ConnectionFailed(ClientError):
    """The client cannot connect, or has stopped trying."""


class HandshakeRejected(ConnectionFailed):
    """The server refused the WebSocket handshake with an HTTP status (400, 401 or 403)."""

    def __init__(self, status: int, body: str = ""):
        super().__init__(f"handshake rejected with HTTP {status}" + (f": {body}" if body else ""))
        self.status = status
        self.body = body


class ClosedByServer(ConnectionFailed):
    """The server closed the connection with a code that forbids reconnecting at once (1008, 1009)."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(f"closed by the server with code {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


class ClientClosed(ClientError):
    """The client was closed."""


# Events -----------------------------------------------------------------------


class Resync(msgspec.Struct, frozen=True):
    """The section's missed events could not be recovered: reload it from `snapshot`.

    `reason` is "epoch_changed" (the server's stored stream of the section is a
    new one, e.g. its storage was wiped) or "window_exceeded" (more events were
    missed than the server keeps for recovery). `snapshot` is the fresh
    `subscribed` reply: its sessions and presence are current, and the events
    that follow continue from its offset. Reload messages with `history`.
    """

    document_id: str
    section_id: str
    reason: str
    snapshot: Subscribed


Event = Union[StoredEvent, Presence, TypingEvent, ReadEvent, Resync]
STORED_EVENTS = get_args(StoredEvent)


class SessionListing(list[Session]):
    """What `list_sessions` returns: the sessions (it is a list of them), and the user's read state.

    `read` maps each listed session's id to the user's last read seq (0 when
    never marked), `unread` to the count of messages after it that are neither
    the user's own nor deleted. `next_cursor` is the cursor of the next page
    when one page was asked for (`limit` or `cursor`) and more follow, else None.
    """

    def __init__(
        self,
        sessions: Iterable[Session] = (),
        *,
        read: dict[str, int] | None = None,
        unread: dict[str, int] | None = None,
        next_cursor: str | None = None,
    ):
        super().__init__(sessions)
        self.read: dict[str, int] = dict(read or {})
        self.unread: dict[str, int] = dict(unread or {})
        self.next_cursor = next_cursor

    def __repr__(self) -> str:
        state = f"read={self.read!r}, unread={self.unread!r}, next_cursor={self.next_cursor!r}"
        return f"SessionListing({list.__repr__(self)}, {state})"


def _emptied(section_id: str) -> SectionSummary:
    """The last summary of a section that has no session left (as the server sends when one moves out)."""
    return SectionSummary(
        section_id=section_id, sessions=0, open_sessions=0, messages=0, last_activity_at=None, unread=0, mentions=0
    )


# Which stored events are this client's own writes ---------------------------------
#
# A write's reply and the stored event it caused carry the same object, so an
# event is recognised by a key computed alike from both (`_own_key`). A write
# retried after a drop may find its first attempt stored: the retry's reply is
# then the "repeat that changes nothing" answer, which for a reaction carries
# another `at` and for a close or reopen is a conflict, so its exact key can
# miss the stored event. Such a write also leaves a looser key (`_loose_key`),
# matched once against the events recovered by the resubscription that follows.

OwnKey = tuple[Any, ...]


def _metadata_key(metadata: dict[str, Any] | None) -> bytes:
    return msgspec.json.encode(metadata, order="sorted")


def _own_key(frame: ServerFrame) -> OwnKey | None:
    """What identifies a stored event, computed alike from the reply to the write that stored it."""
    match frame:
        case SessionCreated(session=session):
            return ("session_created", session.session_id)
        case MessageEvent(message=message) | MessageAck(message=message):
            return ("message", message.message_id)
        case SessionClosed(session=session):
            return ("session_closed", session.session_id, session.last_activity_at)
        case SessionReopened(session=session):
            return ("session_reopened", session.session_id, session.last_activity_at)
        case SessionUpdated(session=session):
            key = (session.title, _metadata_key(session.metadata))
            return ("session_updated", session.session_id, session.last_activity_at, *key)
        case MessageEdited(message=message):
            # After a delete, edits are served with the tombstone, which keeps the last `edited_at`.
            return ("message_edited", message.message_id, message.edited_at)
        case MessageDeleted(message=message):
            return ("message_deleted", message.message_id)  # a message is deleted once
        case ReactionEvent():
            return ("reaction", frame.session_id, frame.seq, frame.reaction, frame.user, frame.on, frame.at)
        case ReadMarked() | ReadEvent():
            return ("read", frame.session_id, frame.seq)  # a user's marker reaches a seq once
    return None


def _loose_key(frame: ServerFrame) -> OwnKey | None:
    """What a write retried after a drop shares with the event its first attempt may have stored."""
    match frame:
        case SessionClosed(session=session):
            return ("session_closed", session.session_id)
        case SessionReopened(session=session):
            return ("session_reopened", session.session_id)
        case SessionUpdated(session=session):
            return ("session_updated", session.session_id, session.title, _metadata_key(session.metadata))
        case MessageEdited(message=message):
            return ("message_edited", message.message_id, message.text, tuple(message.mentions))
        case ReactionEvent():
            return ("reaction", frame.session_id, frame.seq, frame.reaction, frame.user, frame.on)
    return None


def _session_of(frame: ServerFrame) -> str | None:
    """The session a write or an event concerns."""
    match frame:
        case SessionCreated(session=session) | SessionClosed(session=session) | SessionUpdated(session=session):
            return session.session_id
        case SessionReopened(session=session):
            return session.session_id
        case MessageEvent(message=message) | MessageAck(message=message) | MessageEdited(message=message):
            return message.session_id
        case MessageDeleted(message=message):
            return message.session_id
        case ReactionEvent() | ReadMarked() | ReadEvent() | TypingEvent():
            return frame.session_id
    return None


# Options ----------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits min(maximum, initial * factor**n), minus up to `jitter` of it."""

    initial: float = 0.05
    maximum: float = 2.0
    factor: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base * (1.0 - self.jitter * random.random())


@dataclass(frozen=True)
class RetryInfo:
    """What `on_retry` is told before a request is tried again."""

    request: str  # the request type, e.g. "send_message"
    attempt: int  # 1 for the first retry
    reason: BaseException  # the temporary ChatError, or ConnectionLost for a dropped connection
    delay: float  # seconds until the retry (0: as soon as the connection is back)


# Internals --------------------------------------------------------------------


class _Null:
    """A field sent as JSON null (request fields that are None are left out of the frame)."""

    def __repr__(self) -> str:
        return "null"


_NULL = _Null()


def _nullable(value: Any) -> Any:
    """A request field where None means null and UNSET means absent."""
    if value is msgspec.UNSET:
        return None
    return _NULL if value is None else value


def _names(mentions: Iterable[str] | None) -> list[str] | None:
    if mentions is None:
        return None
    if isinstance(mentions, str):
        raise TypeError("mentions is a list of user names, not one string")
    return list(mentions)


class _Dropped(Exception):
    """The connection went away while a request waited for its reply (or before it was sent)."""

    def __init__(self, sent: bool = True):
        super().__init__()
        self.sent = sent


class _Op:
    """One request, across all its attempts."""

    __slots__ = ("type", "retry", "write", "sent", "resent")

    def __init__(self, type: str, *, retry: bool, write: bool):
        self.type = type
        self.retry = retry  # may be sent again after a drop (a read, or a write with an idempotency key)
        self.write = write  # has effects: giving up after sending it leaves its outcome unknown
        self.sent = False  # some attempt may have reached the server
        self.resent = False  # sent again after a drop hit a sent attempt

    @property
    def replay(self) -> bool:
        """A write retried after a drop: recovered events wait until it is answered."""
        return self.retry and self.write


class _Pending:
    __slots__ = ("future", "on_reply", "op")

    def __init__(self, future: asyncio.Future[ServerFrame], on_reply: Callable[[Any], None] | None, op: _Op):
        self.future = future
        self.on_reply = on_reply
        self.op = op


class _Connection:
    """One open WebSocket and what its welcome said."""

    def __init__(self, websocket: ClientConnection, welcome: Welcome, binary: bool, generation: int):
        self.websocket = websocket
        self.welcome = welcome
        self.binary = binary
        self.generation = generation


SectionKey = tuple[str, str]


class _Section:
    """A subscribed section, shared by every Subscription to it."""

    def __init__(self, key: SectionKey, epoch: str, position: int, presence: list[str], read: dict[str, int]):
        self.key = key
        self.epoch = epoch
        self.position = position  # the last offset delivered or known: where recovery resumes
        self.presence: set[str] = set(presence)
        self.read: dict[str, int] = dict(read)  # session_id -> this user's read marker, as last heard
        self.subscriptions: list[Subscription] = []
        # After a reconnect: the `subscribed` reply and the live events behind it,
        # held until this client's own retried writes are settled.
        self.resume: tuple[Subscribed, list[ServerFrame]] | None = None

    def note_read(self, read: dict[str, int]) -> None:
        """Markers only move forward: a reply that raced a later mark_read does not take it back."""
        for session_id, seq in read.items():
            if seq > self.read.get(session_id, -1):
                self.read[session_id] = seq


T = TypeVar("T")


class _Feed(Generic[T]):
    """Items pushed by the client, taken as an async iterator; also an async context manager."""

    def __init__(self) -> None:
        self._queue: deque[T] = deque()
        self._arrival = asyncio.Event()
        self._done = False
        self._error: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._done

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._arrival.clear()
            await self._arrival.wait()

    async def next(self, timeout: float | None = None) -> T:
        """The next item, waiting up to `timeout` seconds (TimeoutError after that)."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    def pending(self) -> list[T]:
        """The items already received and not yet taken, removed from the queue."""
        items = list(self._queue)
        self._queue.clear()
        return items

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._finish(None)

    def _push(self, item: T) -> None:
        if not self._done:
            self._queue.append(item)
            self._arrival.set()

    def _finish(self, error: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._arrival.set()


class Subscription(_Feed[Event]):
    """The events of one section, as an async iterator; also an async context manager.

    `snapshot` is the latest `subscribed` reply (sessions, presence, epoch,
    offset, read, unread); it is replaced on every resubscription. `presence` is
    the set of users present, kept current by `Presence` events. `read` is this
    user's read marker per session, kept current by `ReadEvent`s and this
    client's own `mark_read`. `offset` is the offset of the last stored event
    yielded (or of the snapshot).
    """

    def __init__(self, client: ChatClient, section: _Section, snapshot: Subscribed, offset: int):
        super().__init__()
        self._client = client
        self._section = section
        self.snapshot = snapshot
        self.document_id, self.section_id = section.key
        self._last = offset
        self.resubscriptions = 0  # how often the client resubscribed after a reconnect
        self.recovered_events = 0  # stored events that came through recovery

    @property
    def offset(self) -> int:
        return self._last

    @property
    def epoch(self) -> str:
        return self._section.epoch

    @property
    def presence(self) -> set[str]:
        return set(self._section.presence)

    @property
    def read(self) -> dict[str, int]:
        return dict(self._section.read)

    async def next(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to `timeout` seconds (TimeoutError after that)."""
        return await super().next(timeout)

    async def unsubscribe(self) -> None:
        """Stop receiving this section's events; the iterator ends once its queue is empty."""
        if not self._done:
            self._finish(None)
            await self._client._drop_subscription(self)

    aclose = unsubscribe

    # Fed by the client, synchronously with the frames' arrival.

    def _push_stored(self, event: StoredEvent, *, recovered: bool = False) -> None:
        offset = event.offset
        if offset is None or offset <= self._last:
            return  # already yielded (or not an event)
        self._last = offset
        if recovered:
            self.recovered_events += 1
        self._push(event)

    def _reset(self, resync: Resync) -> None:
        self.snapshot = resync.snapshot
        self._last = resync.snapshot.offset
        self._push(resync)


class _Watched:
    """A watched document, shared by every DocumentWatch of it."""

    def __init__(self, document_id: str):
        self.document_id = document_id
        self.sections: dict[str, SectionSummary] = {}
        self.watches: list[DocumentWatch] = []

    def refresh(self, reply: DocumentSummary, tell: list[DocumentWatch]) -> None:
        """Take a fresh `document` reply; tell `tell` of every section that differs from what they knew."""
        fresh = {summary.section_id: summary for summary in reply.sections}
        changed = [summary for section_id, summary in fresh.items() if self.sections.get(section_id) != summary]
        changed += [_emptied(section_id) for section_id in self.sections if section_id not in fresh]
        self.sections = fresh
        for watch in tell:
            for summary in changed:
                watch._push(SectionSummaryEvent(document_id=self.document_id, summary=summary))

    def changed(self, event: SectionSummaryEvent) -> None:
        summary = event.summary
        if summary.sessions:
            self.sections[summary.section_id] = summary
        else:
            self.sections.pop(summary.section_id, None)  # its last session moved out: no longer listed
        for watch in self.watches:
            watch._push(event)


class DocumentWatch(_Feed[SectionSummaryEvent]):
    """A watched document: its `section_summary` events, as an async iterator; also an async context manager.

    `summary` is the `document` reply (every section of the document that has
    a session, with this user's unread and mention counts); it is replaced when
    the client watches again after a reconnect. `sections` maps each listed
    section's id to its latest summary, kept current by the events. After a
    reconnect, every section whose summary changed while away (or that lost its
    last session: `sessions == 0`) is yielded as a `SectionSummaryEvent`.
    """

    def __init__(self, client: ChatClient, watched: _Watched, summary: DocumentSummary):
        super().__init__()
        self._client = client
        self._watched = watched
        self.document_id = watched.document_id
        self.summary = summary
        self.rewatches = 0  # how often the client watched again after a reconnect

    @property
    def sections(self) -> dict[str, SectionSummary]:
        return dict(self._watched.sections)

    async def next(self, timeout: float | None = None) -> SectionSummaryEvent:
        """The next summary, waiting up to `timeout` seconds (TimeoutError after that)."""
        return await super().next(timeout)

    async def unwatch(self) -> None:
        """Stop receiving the document's summaries; the iterator ends once its queue is empty."""
        if not self._done:
            self._finish(None)
            await self._client._drop_watch(self)

    aclose = unwatch


class MentionFeed(_Feed[Mentioned]):
    """`Mentioned` events for this user, from any document it may use, as an async iterator.

    Made by `chat.mentions()`; every feed gets every mention received from its
    creation until it is closed (`close()`, `await aclose()`, or the client
    closing). Mentions are not stored events: those made while the client was
    disconnected are not recovered (they count in `SectionSummary.mentions`).
    """

    def __init__(self, client: ChatClient):
        super().__init__()
        self._client = client

    async def next(self, timeout: float | None = None) -> Mentioned:
        """The next mention, waiting up to `timeout` seconds (TimeoutError after that)."""
        return await super().next(timeout)

    def close(self) -> None:
        if not self._done:
            self._finish(None)
        if self in self._client._mention_feeds:
            self._client._mention_feeds.remove(self)

    async def aclose(self) -> None:
        self.close()


F = TypeVar("F", bound=_Feed[Any])


class _Opening(Generic[F]):
    """What `subscribe` and `watch_document` return: await it, or use it with `async with`."""

    def __init__(self, open: Callable[[], Awaitable[F]]):
        self._open = open
        self._feed: F | None = None

    def __await__(self) -> Generator[Any, None, F]:
        return self._open().__await__()

    async def __aenter__(self) -> F:
        self._feed = await self._open()
        return self._feed

    async def __aexit__(self, *exc_info: object) -> None:
        if self._feed is not None:
            await self._feed.aclose()


# The client -------------------------------------------------------------------


class ChatClient:
    """A connection to a sectionchat server that stays connected.

    Use `connect(url, ...)` (same arguments) rather than this class directly:
    `async with connect(...) as chat` or `chat = await connect(...)` and later
    `await chat.aclose()`.

    Options:
        name: the user name in open mode (the `name` query parameter).
        token: a JWT for token mode, sent as `Authorization: Bearer`; a callable
            (sync or async) returning one is called before each connection attempt.
        format: "json" (default) or "msgpack" (the `sectionchat.v1.msgpack` subprotocol).
        request_timeout: seconds a request may take, retries and reconnects included.
        backoff: reconnect delays (also the delays between retries of temporary errors).
        reconnect: False turns automatic reconnection off (a drop then fails the client).
        reconnect_timeout: give up reconnecting after this many seconds (None: never).
        retry_temporary: retry `rate_limited` and `unavailable` answers until the deadline.
        on_retry: called with a RetryInfo before each retry (for logs and metrics).
        open_timeout, ping_interval, ping_timeout, close_timeout, max_size: passed to websockets.
        additional_headers, **websocket_options: passed to `websockets.asyncio.client.connect`.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        token: str | Callable[[], str | Awaitable[str]] | None = None,
        format: str = "json",
        request_timeout: float = 30.0,
        backoff: Backoff = Backoff(),
        reconnect: bool = True,
        reconnect_timeout: float | None = None,
        retry_temporary: bool = True,
        on_retry: Callable[[RetryInfo], object] | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 5.0,
        max_size: int | None = 64 * 1024 * 1024,
        additional_headers: dict[str, str] | None = None,
        **websocket_options: Any,
    ):
        if format not in ("json", "msgpack"):
            raise ValueError(f"format must be 'json' or 'msgpack', not {format!r}")
        if name is not None:
            url += ("&" if "?" in url else "?") + "name=" + quote(name, safe="")
        self.url = url
        # Without a name or token the server names us `anon-…`; reconnects keep that
        # name, since idempotency keys are scoped per user.
        self._keep_assigned_name = name is None and token is None and "name=" not in url
        self._token = token
        self._format = format
        self.request_timeout = request_timeout
        self.backoff = backoff
        self._reconnect = reconnect
        self._reconnect_timeout = reconnect_timeout
        self._retry_temporary = retry_temporary
        self._on_retry = on_retry
        self._open_timeout = open_timeout
        self._ws_options: dict[str, Any] = {
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": close_timeout,
            "max_size": max_size,
            "compression": None,
            **websocket_options,
        }
        self._headers = dict(additional_headers or {})

        self.welcome: Welcome | None = None
        self.reconnects = 0  # successful reconnections so far
        self._connection: _Connection | None = None  # set while open and usable
        self._generation = 0
        self._runner: asyncio.Task[None] | None = None
        self._resumer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._closed = False
        self._failure: ClientError | None = None
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._sections: dict[SectionKey, _Section] = {}
        self._watched: dict[str, _Watched] = {}
        self._mention_feeds: list[MentionFeed] = []
        self._session_keys: dict[str, SectionKey] = {}
        self._moves_seen: dict[tuple[str, str, str], set[SectionKey]] = {}  # moves whose events came in one stream
        # This client's own writes, to keep them out of recovered events (see _own_key).
        self._own: OrderedDict[OwnKey, None] = OrderedDict()
        # Loose keys of writes retried after a drop, for the resubscription that follows (see _loose_key).
        self._loose: list[tuple[SectionKey, OwnKey]] = []
        self._sending: dict[tuple[str, str], int] = {}  # (session_id, client_msg_id) of sends under way
        # Writes that were in flight at a drop and are being retried.
        self._replaying: set[_Op] = set()
        self._replay_changed = asyncio.Event()
        self._json_decoder = msgspec.json.Decoder(ServerMessage)
        self._msgpack_decoder = msgspec.msgpack.Decoder(ServerMessage)

    # Lifecycle ----------------------------------------------------------------

    async def start(self) -> ChatClient:
        """Open the first connection (raising ConnectionFailed if it cannot), then keep it open."""
        if self._runner is not None:
            return self
        if self._closed:
            raise ClientClosed("the client is closed")
        try:
            connection = await self._open()
        except ConnectionFailed:
            raise
        except Exception as error:
            raise ConnectionFailed(f"cannot connect to {self.url}: {error}") from error
        self._connection = connection  # usable at once; the runner reads from it
        self._runner = asyncio.create_task(self._run(connection), name="sectionchat-client")
        self._runner.add_done_callback(self._runner_done)
        return self

    async def aclose(self) -> None:
        """Close the connection, end every subscription, fail requests still waiting."""
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        for pending in list(self._tasks):
            pending.cancel()
        for task in (self._resumer, self._runner):
            if task is not None:
                task.cancel()
        if connection is not None:
            await connection.websocket.close()
        for task in (self._resumer, self._runner):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        self._connection = None
        closed = ClientClosed("the client is closed")
        self._fail_pending(closed)
        self._finish_feeds(None)
        self._notify()

    close = aclose

    async def __aenter__(self) -> ChatClient:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @property
    def user(self) -> str:
        """The user the server knows this client as (from its welcome)."""
        assert self.welcome is not None, "not connected yet"
        return self.welcome.user

    @property
    def limits(self) -> Limits:
        assert self.welcome is not None, "not connected yet"
        return self.welcome.limits

    @property
    def roles(self) -> list[str]:
        """The token's roles, from the welcome (["moderator"] for a moderator; [] in open mode)."""
        assert self.welcome is not None, "not connected yet"
        return list(self.welcome.roles)

    @property
    def in_flight(self) -> int:
        """Requests sent and waiting for their reply."""
        return len({id(pending.op) for pending in self._pending.values()})

    @property
    def failure(self) -> ClientError | None:
        """Why the client stopped (ClosedByServer, HandshakeRejected, ...), or None."""
        return self._failure

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the client is connected (again)."""
        async with asyncio.timeout(timeout):
            while self._connection is None:
                self._check_usable()
                await self._changed.wait()

    # Requests -----------------------------------------------------------------

    async def create_session(
        self,
        document_id: str,
        section_id: str,
        *,
        title: str | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Session:
        """Create a session in a section. With an `idempotency_key`, a retry returns the same session.

        `metadata` is an opaque JSON object (at most 4,096 bytes as JSON) stored
        with the session, e.g. where an editor anchors it.
        """
        fields = {
            "document_id": document_id,
            "section_id": section_id,
            "title": title,
            "idempotency_key": idempotency_key,
            "metadata": metadata,
        }
        op = _Op("create_session", retry=idempotency_key is not None, write=True)
        reply = await self._call(fields, op, timeout=timeout)
        assert isinstance(reply, SessionCreated)
        self._note_session(reply.session)
        self._wrote(reply, op)
        return reply.session

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        reply = await self._call(
            {"type": "get_session", "session_id": session_id}, _read_op("get_session"), timeout=timeout
        )
        assert isinstance(reply, SessionInfo)
        self._note_session(reply.session)
        return reply.session

    async def list_sessions(
        self,
        document_id: str,
        section_id: str | None = None,
        *,
        closed: bool | None = None,
        order: Literal["created", "activity"] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        timeout: float | None = None,
    ) -> SessionListing:
        """The sessions of a document (or of one of its sections), with this user's read state.

        `closed` lists only closed (True) or open (False) sessions; `order` is
        "created" (the default: oldest first) or "activity" (latest
        `last_activity_at` first). Without `limit` and `cursor` this follows
        `next_cursor` to the last page (`timeout` applies to each page); with
        either, it returns that one page, and its `next_cursor` (None on the last
        page) is passed back as `cursor`, with the same other arguments, for the next.
        """
        fields: dict[str, Any] = {
            "type": "list_sessions",
            "document_id": document_id,
            "section_id": section_id,
            "closed": closed,
            "order": order,
            "limit": limit,
            "cursor": cursor,
        }
        listing = SessionListing()
        while True:
            reply = await self._call(fields, _read_op("list_sessions"), timeout=timeout)
            assert isinstance(reply, SessionList)
            self._note_sessions(reply.sessions)
            listing.extend(reply.sessions)
            listing.read.update(reply.read)
            listing.unread.update(reply.unread)
            listing.next_cursor = reply.next_cursor
            if reply.next_cursor is None or limit is not None or cursor is not None:
                return listing
            fields = {**fields, "cursor": reply.next_cursor}

    async def send_message(
        self,
        session_id: str,
        text: str,
        *,
        client_msg_id: str | None = None,
        mentions: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Send a message; it is stored exactly once however often it has to be retried.

        `mentions` names users (at most 20) who get a `mentioned` event.
        """
        if client_msg_id is None:
            client_msg_id = str(uuid.uuid4())
        fields = {
            "type": "send_message",
            "session_id": session_id,
            "text": text,
            "client_msg_id": client_msg_id,
            "mentions": _names(mentions),
        }
        sending = (session_id, client_msg_id)
        self._sending[sending] = self._sending.get(sending, 0) + 1
        op = _Op("send_message", retry=True, write=True)
        try:
            reply = await self._call(fields, op, timeout=timeout)
        finally:
            if self._sending[sending] <= 1:
                del self._sending[sending]
            else:
                self._sending[sending] -= 1
        assert isinstance(reply, MessageAck)
        self._wrote(reply, op)
        self._note_marker(session_id, reply.message.seq)  # sending moves the sender's read marker to it
        return reply.message

    async def edit_message(
        self,
        session_id: str,
        seq: int,
        text: str,
        mentions: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> Message:
        """Change a message's text (and, when given, replace its mentions); returns the edited message.

        Only its author (or a moderator) may. Editing to the text and mentions it
        has already changes nothing, so an edit in flight when the connection
        drops is retried and takes effect once.
        """
        fields = {
            "type": "edit_message",
            "session_id": session_id,
            "seq": seq,
            "text": text,
            "mentions": _names(mentions),
        }
        op = _Op("edit_message", retry=True, write=True)
        reply = await self._call(fields, op, timeout=timeout)
        assert isinstance(reply, MessageEdited)
        self._wrote(reply, op)
        return reply.message

    async def delete_message(self, session_id: str, seq: int, *, timeout: float | None = None) -> Message:
        """Delete a message; returns its tombstone (text "", no mentions or reactions, `deleted_at` set).

        Deleting a deleted message returns the tombstone again, so a delete in
        flight when the connection drops is retried.
        """
        op = _Op("delete_message", retry=True, write=True)
        reply = await self._call({"session_id": session_id, "seq": seq}, op, timeout=timeout)
        assert isinstance(reply, MessageDeleted)
        self._wrote(reply, op)
        return reply.message

    async def react(
        self, session_id: str, seq: int, reaction: str, on: bool = True, *, timeout: float | None = None
    ) -> ReactionEvent:
        """Give (`on=True`) or take back (`on=False`) a reaction to a message; returns the server's `reaction` reply.

        `on` is always sent, so repeating the request changes nothing: a reaction
        in flight when the connection drops is retried and takes effect once.
        """
        fields = {"session_id": session_id, "seq": seq, "reaction": reaction, "on": on}
        op = _Op("react", retry=True, write=True)
        reply = await self._call(fields, op, timeout=timeout)
        assert isinstance(reply, ReactionEvent)
        self._wrote(reply, op)
        return reply

    async def mark_read(self, session_id: str, seq: int, *, timeout: float | None = None) -> int:
        """Mark a session read up to `seq` (0 to its `last_seq`); returns this user's marker after it.

        A marker only moves forward: at or below the current one nothing changes
        and the current (higher) marker is returned.
        """
        op = _Op("mark_read", retry=True, write=True)
        reply = await self._call({"session_id": session_id, "seq": seq}, op, timeout=timeout)
        assert isinstance(reply, ReadMarked)
        if reply.seq == seq:
            self._wrote(reply, op)  # this call may have moved the marker: its `read` event is ours
        self._note_marker(session_id, reply.seq)
        return reply.seq

    async def update_session(
        self,
        session_id: str,
        *,
        title: str | None | msgspec.UnsetType = UNSET,
        metadata: dict[str, Any] | None | msgspec.UnsetType = UNSET,
        timeout: float | None = None,
    ) -> Session:
        """Change a session's title and/or metadata (UNSET, the default: unchanged; None: cleared).

        Only its creator (or a moderator) may; it works on closed sessions too.
        Setting what is already there changes nothing, so an update in flight
        when the connection drops is retried and takes effect once.
        """
        fields = {"session_id": session_id, "title": _nullable(title), "metadata": _nullable(metadata)}
        op = _Op("update_session", retry=True, write=True)
        reply = await self._call(fields, op, timeout=timeout)
        assert isinstance(reply, SessionUpdated)
        self._note_session(reply.session)
        self._wrote(reply, op)
        return reply.session

    async def move_sessions(
        self,
        document_id: str,
        from_section_id: str,
        to_section_id: str,
        session_ids: list[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Session]:
        """Move the named sessions (None: every session of the section) to another section, atomically.

        Returns them as they are in the target, with everything they hold. A
        named session already in the target counts as moved, so a move in
        flight when the connection drops is retried and answers the same
        (a retried move of a whole section returns what is left to move then).
        """
        fields = {
            "document_id": document_id,
            "from_section_id": from_section_id,
            "to_section_id": to_section_id,
            "session_ids": session_ids,
        }
        op = _Op("move_sessions", retry=True, write=True)
        try:
            reply = await self._call(fields, op, timeout=timeout)
            assert isinstance(reply, SessionsMoved)
            self._note_sessions(reply.sessions)
            return reply.sessions
        finally:
            self._settled(op)

    async def history(
        self,
        session_id: str,
        *,
        before_seq: int | None = None,
        after_seq: int | None = None,
        limit: int = 50,
        timeout: float | None = None,
    ) -> HistoryPage:
        """A page of messages in ascending `seq`: the newest `limit`, or those after/before a seq."""
        fields = {
            "type": "history",
            "session_id": session_id,
            "before_seq": before_seq,
            "after_seq": after_seq,
            "limit": limit,
        }
        reply = await self._call(fields, _read_op("history"), timeout=timeout)
        assert isinstance(reply, HistoryPage)
        return reply

    async def messages(self, session_id: str, *, after_seq: int = 0, page_size: int = 200) -> AsyncIterator[Message]:
        """Every message of a session after `after_seq`, oldest first, fetched page by page."""
        while True:
            page = await self.history(session_id, after_seq=after_seq, limit=page_size)
            for message in page.messages:
                yield message
            if not page.has_more or not page.messages:
                return
            after_seq = page.messages[-1].seq

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        """Close a session; returns it, closed.

        Closing a closed session is `Conflict`. A close in flight when the
        connection drops is retried; if the retry finds the session already
        closed (by that first attempt, or by someone else meanwhile), the closed
        session is returned rather than `Conflict`.
        """
        return await self._open_or_close(session_id, "close_session", closed=True, timeout=timeout)

    async def reopen_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        """Reopen a closed session; returns it, open.

        Reopening an open session is `Conflict`. As with `close_session`, a
        reopen in flight when the connection drops is retried, and if the retry
        finds the session open (reopened by that first attempt, or by someone
        else meanwhile), the open session is returned rather than `Conflict`.
        """
        return await self._open_or_close(session_id, "reopen_session", closed=False, timeout=timeout)

    async def _open_or_close(self, session_id: str, type: str, *, closed: bool, timeout: float | None) -> Session:
        op = _Op(type, retry=True, write=True)
        try:
            try:
                reply = await self._call(
                    {"type": type, "session_id": session_id}, op, timeout=timeout, settle_on_conflict=False
                )
            except Conflict:
                if not op.resent:
                    raise
                session = await self.get_session(session_id, timeout=timeout)
                if session.closed != closed:
                    raise
                reply = SessionClosed(session=session) if closed else SessionReopened(session=session)
            assert isinstance(reply, (SessionClosed, SessionReopened))
            self._note_session(reply.session)
            self._wrote(reply, op)
            return reply.session
        finally:
            self._settled(op)

    async def typing(self, session_id: str, *, timeout: float | None = None) -> None:
        """Tell the section's other subscribers that this user is typing in a session.

        The server answers `typing` only with errors, so the client follows it
        with a `ping` on the same connection (the server handles a connection's
        requests in order): the pong means the typing was accepted.
        """
        await self._call(
            {"type": "typing", "session_id": session_id}, _read_op("typing"), timeout=timeout, confirm=True
        )

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round trip to the server; returns the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await self._call({"type": "ping"}, _read_op("ping"), timeout=timeout)
        assert isinstance(reply, Pong)
        return loop.time() - started

    def subscribe(
        self,
        document_id: str,
        section_id: str,
        *,
        since_offset: int | None = None,
        epoch: str | None = None,
        timeout: float | None = None,
    ) -> _Opening[Subscription]:
        """Subscribe to a section's events: `async with chat.subscribe(...) as events` or `await`.

        Without `since_offset` the subscription starts at the snapshot
        (`events.snapshot`). With `since_offset` (and the `epoch` it belongs to),
        the events after it are recovered first; if they cannot be, the first
        event is a `Resync`.
        """
        return _Opening(lambda: self._subscribe(document_id, section_id, since_offset, epoch, timeout))

    def watch_document(self, document_id: str, *, timeout: float | None = None) -> _Opening[DocumentWatch]:
        """Watch a document's section summaries: `async with chat.watch_document(doc) as watch` or `await`.

        `watch.summary` is the server's `document` reply (a `DocumentSummary`:
        every section that has a session, with this user's unread and mention
        counts); iterating the watch yields a `SectionSummaryEvent` whenever a
        section's summary changes for this user (the server coalesces them per
        section over at most a second). Watching survives reconnects. A watched
        document counts against the welcome's `max_subscriptions`.
        """
        return _Opening(lambda: self._watch(document_id, timeout))

    async def unwatch_document(self, document_id: str, *, timeout: float | None = None) -> None:
        """Stop watching a document: every DocumentWatch of it ends (once its queue is empty)."""
        watched = self._watched.pop(document_id, None)
        if watched is not None:
            for watch in watched.watches:
                watch._finish(None)
            watched.watches.clear()
        await self._tell_unwatched(document_id, timeout)

    def mentions(self) -> MentionFeed:
        """A feed of the `Mentioned` events this user receives from now on (`async for mention in feed`).

        The server sends a mention to every connection of the mentioned user that
        may use the document, subscribed to its section or not, so mentions come
        here, not on subscriptions. End it with `feed.close()` (or `async with`).
        """
        self._check_usable()
        feed = MentionFeed(self)
        self._mention_feeds.append(feed)
        return feed

    async def request(
        self, type: str, *, safe: bool = False, timeout: float | None = None, **fields: Any
    ) -> ServerFrame:
        """Send any request and return the typed reply (errors raise), for what the typed methods do not cover.

        `safe=True` allows retrying it after a connection drop (reads, idempotent writes).
        `None` values are left out of the frame.
        """
        return await self._call({"type": type, **fields}, _Op(type, retry=safe, write=True), timeout=timeout)

    # Subscriptions ------------------------------------------------------------

    async def _subscribe(
        self, document_id: str, section_id: str, since_offset: int | None, epoch: str | None, timeout: float | None
    ) -> Subscription:
        key = (document_id, section_id)
        created: list[Subscription] = []

        def on_reply(reply: Subscribed) -> None:
            # Runs in the reader, before any later frame is dispatched: no event can slip by.
            self._note_sessions(reply.sessions)
            section = self._sections.get(key)
            if section is None:
                section = _Section(key, reply.epoch, reply.offset, reply.presence, reply.read)
                self._sections[key] = section
            elif section.resume is None:
                section.epoch = reply.epoch
                section.position = max(section.position, reply.offset)
                section.presence = set(reply.presence)
                section.note_read(reply.read)
            start = reply.offset if since_offset is None or not reply.recovered else since_offset
            subscription = Subscription(self, section, reply, start)
            section.subscriptions.append(subscription)
            created.append(subscription)
            if since_offset is not None:
                if reply.recovered:
                    for event in reply.events:
                        if not self._is_own(event):
                            subscription._push_stored(event, recovered=True)
                    subscription._last = max(subscription._last, reply.offset)
                else:
                    reason = "epoch_changed" if epoch is not None and epoch != reply.epoch else "window_exceeded"
                    subscription._push(Resync(document_id, section_id, reason, reply))

        fields = {
            "type": "subscribe",
            "document_id": document_id,
            "section_id": section_id,
            "since_offset": since_offset,
            "epoch": epoch,
        }
        try:
            await self._call(fields, _read_op("subscribe"), timeout=timeout, on_reply=on_reply)
        except BaseException:
            for subscription in created:
                await subscription.unsubscribe()
            raise
        return created[-1]

    async def _drop_subscription(self, subscription: Subscription) -> None:
        key = (subscription.document_id, subscription.section_id)
        section = self._sections.get(key)
        if section is None or subscription not in section.subscriptions:
            return
        section.subscriptions.remove(subscription)
        if section.subscriptions:
            return
        del self._sections[key]
        if self._connection is not None:
            fields = {"type": "unsubscribe", "document_id": key[0], "section_id": key[1]}
            try:
                await self._call(fields, _read_op("unsubscribe"), timeout=self._open_timeout, wait=False)
            except ClientError as error:
                logger.debug("unsubscribe from %s failed: %s", key, error)

    # Watched documents and mentions ----------------------------------------------

    async def _watch(self, document_id: str, timeout: float | None) -> DocumentWatch:
        created: list[DocumentWatch] = []

        def on_reply(reply: DocumentSummary) -> None:
            # Runs in the reader: the summaries that follow the reply are relative to it.
            watched = self._watched.get(document_id)
            if watched is None:
                watched = self._watched[document_id] = _Watched(document_id)
            # The server now measures changes from this reply: tell the other watches what it moved.
            watched.refresh(reply, watched.watches)
            watch = DocumentWatch(self, watched, reply)
            watched.watches.append(watch)
            created.append(watch)

        fields = {"type": "watch_document", "document_id": document_id}
        try:
            await self._call(fields, _read_op("watch_document"), timeout=timeout, on_reply=on_reply)
        except BaseException:
            for watch in created:
                await watch.unwatch()
            raise
        return created[-1]

    async def _drop_watch(self, watch: DocumentWatch) -> None:
        watched = self._watched.get(watch.document_id)
        if watched is None or watch not in watched.watches:
            return
        watched.watches.remove(watch)
        if watched.watches:
            return
        del self._watched[watch.document_id]
        await self._tell_unwatched(watch.document_id, self._open_timeout)

    async def _tell_unwatched(self, document_id: str, timeout: float | None) -> None:
        """Tell the server, if connected (a new connection watches nothing until told to)."""
        if self._connection is None:
            return
        fields = {"type": "unwatch_document", "document_id": document_id}
        try:
            await self._call(fields, _read_op("unwatch_document"), timeout=timeout, wait=False)
        except ClientError as error:
            logger.debug("unwatch_document %r failed: %s", document_id, error)

    # Requests, internals ------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._failure is not None:
            raise self._failure

    async def _until_connected(
        self, op: _Op, deadline: float, wait: bool, dead: _Connection | None = None
    ) -> _Connection:
        """The open connection (not `dead`, which a request just saw fail), waiting for it within the deadline."""
        loop = asyncio.get_running_loop()
        while self._connection is None or self._connection is dead:
            try:
                self._check_usable()
            except ClientError as error:
                if op.sent and op.write:
                    raise ConnectionLost(f"{op.type}: connection lost; outcome unknown ({error})") from error
                raise
            remaining = deadline - loop.time()
            if not wait or remaining <= 0:
                if op.sent and op.write:
                    raise ConnectionLost(f"{op.type}: connection lost and not back in time; outcome unknown")
                raise RequestTimeout(f"{op.type}: not connected to the server within the deadline")
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                continue
        return self._connection

    async def _call(
        self,
        fields: dict[str, Any],
        op: _Op,
        *,
        timeout: float | None,
        on_reply: Callable[[Any], None] | None = None,
        confirm: bool = False,
        wait: bool = True,
        settle_on_conflict: bool = True,
    ) -> ServerFrame:
        """Send a request until it gets an answer, retrying what is safe to retry, within the deadline."""
        fields.setdefault("type", op.type)
        self._check_usable()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.request_timeout if timeout is None else timeout)
        retries = 0
        temporary_failures = 0
        dead: _Connection | None = None
        try:
            while True:
                connection = await self._until_connected(op, deadline, wait, dead)
                try:
                    frame = await self._attempt(connection, fields, op, deadline, on_reply, confirm)
                except _Dropped as dropped:
                    if dropped.sent and not (op.retry and self._reconnect):
                        if not op.write:
                            raise ConnectionLost(f"{op.type}: connection lost") from None
                        raise ConnectionLost(f"{op.type}: connection lost while in flight; outcome unknown") from None
                    retries += 1
                    op.resent = op.resent or dropped.sent
                    dead = connection
                    self._report_retry(op, retries, ConnectionLost("connection lost"), 0.0)
                    continue
                if settle_on_conflict or not (isinstance(frame, Error) and frame.code == Conflict.code):
                    self._settled(op)
                if not isinstance(frame, Error):
                    return frame
                error = error_from_frame(frame, op.type)
                if not (error.temporary and self._retry_temporary):
                    raise error
                delay = self.backoff.delay(temporary_failures)
                if isinstance(error, RateLimited) and connection.welcome.limits.messages_per_s:
                    delay = max(delay, 1.0 / float(connection.welcome.limits.messages_per_s))
                temporary_failures += 1
                if loop.time() + delay > deadline:
                    raise error
                retries += 1
                self._report_retry(op, retries, error, delay)
                await self._pause(delay)
        finally:
            if settle_on_conflict:
                self._settled(op)

    async def _attempt(
        self,
        connection: _Connection,
        fields: dict[str, Any],
        op: _Op,
        deadline: float,
        on_reply: Callable[[Any], None] | None,
        confirm: bool,
    ) -> ServerFrame:
        """One try on one connection: send, then wait for the reply (raises _Dropped)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ServerFrame] = loop.create_future()
        frames = [{key: None if value is _NULL else value for key, value in fields.items() if value is not None}]
        if confirm:
            frames.append({"type": "ping"})
        ids = []
        for frame in frames:
            frame["id"] = request_id = next(self._ids)
            ids.append(request_id)
        datas = [self._encode(connection, frame) for frame in frames]
        for request_id in ids:
            self._pending[request_id] = _Pending(future, on_reply if request_id == ids[0] else None, op)
        try:
            sent = False
            try:
                for data in datas:
                    if connection.websocket.state is not State.OPEN:
                        raise _Dropped(sent)
                    # Once handed to websockets the frame may reach the server even if send() fails.
                    op.sent = sent = True
                    await connection.websocket.send(data)
            except ConnectionClosed:
                if not future.done():
                    raise _Dropped(sent) from None
            remaining = deadline - loop.time()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    return await future
            except TimeoutError:
                if future.done() and not future.cancelled() and future.exception() is None:
                    return future.result()
                raise RequestTimeout(f"{op.type}: no answer within the deadline") from None
        finally:
            for request_id in ids:
                self._pending.pop(request_id, None)

    def _encode(self, connection: _Connection, frame: dict[str, Any]) -> str | bytes:
        data: str | bytes
        if connection.binary:
            data = msgspec.msgpack.encode(frame)
            size = len(data)
        else:
            encoded = msgspec.json.encode(frame)
            data, size = encoded.decode(), len(encoded)
        limit = connection.welcome.limits.max_frame_bytes
        if size > limit:
            # The server would close the connection with 1009; refuse here instead.
            raise TooLarge(
                f"the request is {size} bytes; the server's max_frame_bytes is {limit}", request=str(frame.get("type"))
            )
        return data

    async def _pause(self, delay: float) -> None:
        """Sleep, but stop early (raising) if the client is closed or fails meanwhile."""
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
        while (remaining := end - loop.time()) > 0:
            self._check_usable()
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                break
        self._check_usable()

    def _settled(self, op: _Op) -> None:
        if op in self._replaying:
            self._replaying.discard(op)
            self._replay_changed.set()

    def _report_retry(self, op: _Op, attempt: int, reason: BaseException, delay: float) -> None:
        logger.info("retrying %s (attempt %d) after %s", op.type, attempt, reason)
        if self._on_retry is not None:
            try:
                self._on_retry(RetryInfo(op.type, attempt, reason, delay))
            except Exception:
                logger.exception("on_retry callback failed")

    # Connection ---------------------------------------------------------------

    async def _open(self) -> _Connection:
        headers = dict(self._headers)
        if self._token is not None:
            token = self._token() if callable(self._token) else self._token
            if inspect.isawaitable(token):
                token = await token
            headers["Authorization"] = f"Bearer {token}"
        subprotocol = MSGPACK_SUBPROTOCOL if self._format == "msgpack" else JSON_SUBPROTOCOL
        try:
            websocket = await ws_connect(
                self.url,
                subprotocols=[subprotocol],  # type: ignore[list-item]
                additional_headers=headers or None,
                open_timeout=self._open_timeout,
                **self._ws_options,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            if status in REJECTED_STATUSES:
                body = error.response.body.decode(errors="replace").strip() if error.response.body else ""
                raise HandshakeRejected(status, body) from None
            raise
        try:
            async with asyncio.timeout(self._open_timeout):
                first = self._decode(websocket.subprotocol == MSGPACK_SUBPROTOCOL, await websocket.recv())
            if not isinstance(first, Welcome):
                raise ConnectionFailed(f"expected a welcome frame first, got {first!r}")
        except BaseException:
            await websocket.close()
            raise
        self._generation += 1
        if self._keep_assigned_name:
            self._keep_assigned_name = False
            self.url += ("&" if "?" in self.url else "?") + "name=" + quote(first.user, safe="")
        self.welcome = first
        return _Connection(websocket, first, websocket.subprotocol == MSGPACK_SUBPROTOCOL, self._generation)

    def _decode(self, binary: bool, data: str | bytes) -> ServerFrame | None:
        try:
            if isinstance(data, bytes) and binary:
                return self._msgpack_decoder.decode(data)
            return self._json_decoder.decode(data)
        except msgspec.MsgspecError as error:
            logger.warning("ignoring a frame this client cannot decode (%s): %.200r", error, data)
            return None

    async def _run(self, connection: _Connection | None) -> None:
        """Serve connections until the client is closed or must stop."""
        while connection is not None:
            code, reason = await self._serve(connection)
            if self._closed:
                return
            if code in NO_RECONNECT_CLOSE_CODES:
                logger.warning("the server closed the connection with %s (%s): not reconnecting", code, reason)
                self._fail(ClosedByServer(code, reason))
                return
            if not self._reconnect:
                self._fail(ConnectionFailed(f"connection closed ({code} {reason}) and reconnect is off"))
                return
            logger.info("connection closed (%s %s): reconnecting", code, reason)
            connection = await self._reconnect_with_backoff()
            if connection is not None:
                self.reconnects += 1

    async def _reconnect_with_backoff(self) -> _Connection | None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for attempt in itertools.count():
            await asyncio.sleep(self.backoff.delay(attempt))
            try:
                return await self._open()
            except HandshakeRejected as error:
                self._fail(error)
                return None
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, ConnectionFailed) as error:
                logger.debug("reconnect attempt %d failed: %s", attempt + 1, error)
            except Exception as error:  # e.g. the token callable failed: try again later
                logger.warning("reconnect attempt %d failed: %r", attempt + 1, error)
            if self._reconnect_timeout is not None and loop.time() - started > self._reconnect_timeout:
                self._fail(ConnectionFailed(f"could not reconnect within {self._reconnect_timeout} s"))
                return None
        return None  # pragma: no cover

    async def _serve(self, connection: _Connection) -> tuple[int | None, str]:
        """Read one connection's frames until it closes; returns the close code and reason."""
        websocket = connection.websocket
        self._connection = connection
        self._notify()
        self._resumer = asyncio.create_task(self._resume(connection), name="sectionchat-resume")
        try:
            async for data in websocket:
                frame = self._decode(connection.binary, data)
                if frame is not None:
                    try:
                        self._dispatch(frame)
                    except Exception:
                        logger.exception("error dispatching %s", type(frame).__name__)
        except ConnectionClosed:
            pass
        finally:
            self._connection = None
            self._resumer.cancel()
            self._on_drop()
            self._notify()
        return websocket.close_code, websocket.close_reason or ""

    def _on_drop(self) -> None:
        for pending in self._pending.values():
            if pending.op.replay and pending.op.sent:
                self._replaying.add(pending.op)
            if not pending.future.done():
                pending.future.set_exception(_Dropped())
        self._pending.clear()
        for section in self._sections.values():
            section.resume = None  # recovered again from the unchanged position next time

    def _background(self, coroutine: Awaitable[object]) -> None:
        async def run() -> None:
            try:
                await coroutine
            except ClientError as error:
                logger.debug("background request failed: %s", error)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the client's connection task failed", exc_info=task.exception())
            self._fail(ConnectionFailed(f"internal client error: {task.exception()!r}"))

    def _fail(self, error: ClientError) -> None:
        """Stop for good: requests and subscriptions get `error`."""
        if self._failure is None:
            self._failure = error
        self._fail_pending(error)
        self._finish_feeds(error)
        self._notify()

    def _finish_feeds(self, error: ClientError | None) -> None:
        """End every subscription, watch and mention feed (raising `error` once drained, if given)."""
        for section in self._sections.values():
            for subscription in section.subscriptions:
                subscription._finish(error)
        self._sections.clear()
        for watched in self._watched.values():
            for watch in watched.watches:
                watch._finish(error)
        self._watched.clear()
        for feed in self._mention_feeds:
            feed._finish(error)
        self._mention_feeds.clear()

    def _fail_pending(self, error: BaseException) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # Frames in ----------------------------------------------------------------

    def _dispatch(self, frame: ServerFrame) -> None:
        if frame.reply_to is not None:
            pending = self._pending.pop(frame.reply_to, None)  # type: ignore[arg-type]
            if pending is None or pending.future.done():
                return  # the request gave up waiting
            if pending.on_reply is not None and not isinstance(frame, Error):
                try:
                    pending.on_reply(frame)
                except Exception as error:
                    logger.exception("error handling the reply to %s", pending.op.type)
                    pending.future.set_exception(
                        ClientError(f"cannot handle the reply to {pending.op.type}: {error!r}")
                    )
                    return
            pending.future.set_result(frame)
            return
        if isinstance(frame, Mentioned):
            for feed in self._mention_feeds:
                feed._push(frame)
            return
        if isinstance(frame, SectionSummaryEvent):
            watched = self._watched.get(frame.document_id)
            if watched is not None:
                watched.changed(frame)
            return
        if isinstance(frame, Error):
            logger.warning("the server reported an error for no request: %s: %s", frame.code, frame.message)
            return
        key = self._section_of_event(frame)
        section = self._sections.get(key) if key is not None else None
        if section is None:
            return
        if section.resume is not None:
            section.resume[1].append(frame)
        else:
            self._deliver(section, frame)

    def _section_of_event(self, frame: ServerFrame) -> SectionKey | None:
        """The section a pushed event belongs to (None: not a section's event, or a session not known here)."""
        if isinstance(frame, (SessionCreated, SessionClosed, SessionUpdated, SessionReopened)):
            if frame.offset is None:
                return None
            # Known at once, so that the session's messages find their section even while held.
            self._note_session(frame.session)
            return (frame.session.document_id, frame.session.section_id)
        if isinstance(frame, Presence):
            return (frame.document_id, frame.section_id)
        if isinstance(frame, SessionMoved):
            return self._section_of_move(frame)
        session_id = _session_of(frame)
        if session_id is None:
            logger.debug("ignoring an unexpected %s frame", type(frame).__name__)
            return None
        return self._session_keys.get(session_id)

    def _section_of_move(self, frame: SessionMoved) -> SectionKey:
        """Which of the two streams a `session_moved` came in (it is in both, each at its own next offset)."""
        document_id = frame.session.document_id
        source, target = (document_id, frame.from_section_id), (document_id, frame.to_section_id)
        self._note_session(frame.session)  # what follows of the session is the target's
        routed = self._moves_seen.setdefault(
            (frame.session.session_id, frame.from_section_id, frame.to_section_id), set()
        )
        section = self._sections.get(source)
        if section is not None and source not in routed and (section.position + 1 == frame.offset or target in routed):
            key = source
        else:
            key = target if target not in routed else source
        routed.add(key)
        if len(routed) == 2:
            del self._moves_seen[(frame.session.session_id, frame.from_section_id, frame.to_section_id)]
        return key

    def _deliver(
        self,
        section: _Section,
        frame: ServerFrame,
        *,
        recovered: bool = False,
        replayed: bool = False,
        own: frozenset[int] = frozenset(),
    ) -> None:
        """Hand an event to the section's subscriptions.

        The server never sends a connection the events of its own writes, so
        only events that come with a resubscription (`replayed`: recovered, or
        held behind it) can be this client's: those of writes made on an
        earlier connection. `own` are offsets known to be such writes.
        """
        if isinstance(frame, STORED_EVENTS):
            if frame.offset is None:
                return
            if isinstance(frame, (SessionCreated, SessionClosed, SessionUpdated, SessionReopened)):
                self._note_session(frame.session)
            section.position = max(section.position, frame.offset)
            if frame.offset in own or (self._is_own(frame) if replayed else self._being_sent(frame)):
                return
            for subscription in section.subscriptions:
                subscription._push_stored(frame, recovered=recovered)
            return
        event: Event
        if isinstance(frame, Presence):
            section.presence.difference_update(frame.left)
            section.presence.update(frame.joined)
            event = frame
        elif isinstance(frame, ReadEvent):
            section.note_read({frame.session_id: frame.seq})
            if replayed and _own_key(frame) in self._own:
                return  # this client's own mark_read, retried on a new connection after the first one landed
            event = frame
        elif isinstance(frame, TypingEvent):
            event = frame
        else:
            return
        for subscription in section.subscriptions:
            subscription._push(event)

    def _is_own(self, event: StoredEvent) -> bool:
        """Whether a recovered event is of one of this client's writes."""
        return _own_key(event) in self._own or self._being_sent(event)

    def _being_sent(self, event: StoredEvent) -> bool:
        """A message of a send still in progress (its first attempt, made on an earlier connection, was stored)."""
        if not isinstance(event, MessageEvent):
            return False
        message = event.message
        welcome = self.welcome
        return (
            welcome is not None
            and message.author == welcome.user
            and message.client_msg_id is not None
            and (message.session_id, message.client_msg_id) in self._sending
        )

    def _wrote(self, reply: ServerFrame, op: _Op) -> None:
        """Remember a write's result as this client's own, so that its event is not yielded to it."""
        key = _own_key(reply)
        if key is not None:
            self._own[key] = None
            self._own.move_to_end(key)
            while len(self._own) > OWN_WRITES_REMEMBERED:
                self._own.popitem(last=False)
        if not op.resent or self._resumer is None or self._resumer.done():
            return  # no resubscription is waiting for this write: its events are known by their exact key
        loose, session_id = _loose_key(reply), _session_of(reply)
        section = self._session_keys.get(session_id) if session_id is not None else None
        if loose is not None and section is not None:
            self._loose.append((section, loose))

    def _own_among(self, key: SectionKey, events: list[ServerFrame]) -> frozenset[int]:
        """The offsets of `events` that are the first attempts of this client's retried writes in the section.

        Each retried write claims at most one event: none if an event is
        already known to be its own (the retry stored it, or the exact key
        matched), else the first one that matches its loose key.
        """
        wanted = [loose for section, loose in self._loose if section == key]
        if not wanted:
            return frozenset()
        self._loose = [(section, loose) for section, loose in self._loose if section != key]
        stored = [event for event in events if isinstance(event, STORED_EVENTS) and event.offset is not None]
        claimed: set[int] = set()
        for loose in wanted:
            matching = [event for event in stored if _loose_key(event) == loose]
            if any(self._is_own(event) for event in matching):
                continue
            for event in matching:
                if event.offset not in claimed:
                    claimed.add(event.offset)
                    break
        return frozenset(claimed)

    def _note_marker(self, session_id: str, seq: int) -> None:
        key = self._session_keys.get(session_id)
        section = self._sections.get(key) if key is not None else None
        if section is not None:
            section.note_read({session_id: seq})

    def _note_session(self, session: Session) -> None:
        self._session_keys[session.session_id] = (session.document_id, session.section_id)

    def _note_sessions(self, sessions: list[Session]) -> None:
        for session in sessions:
            self._note_session(session)

    # Recovery -----------------------------------------------------------------

    async def _resume(self, connection: _Connection) -> None:
        """After a reconnect: resubscribe every section and watch every document again, then deliver what was missed."""
        try:
            sections = list(self._sections.values())
            watched = list(self._watched.values())
            if not sections and not watched:
                self._loose.clear()
                return
            results = await asyncio.gather(
                *(self._resubscribe(connection, section) for section in sections),
                *(self._rewatch(connection, document) for document in watched),
                return_exceptions=True,
            )
            for document, result in zip(watched, results[len(sections) :], strict=True):
                self._rewatched(document, result)
            # Writes in flight at the drop are being retried; once they are
            # answered, their results are known to be ours and stay out of the
            # recovered events. The server answers a connection's requests in
            # order, so this rarely waits; it never waits past the deadline.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.request_timeout
            while self._replaying and loop.time() < deadline:
                self._replay_changed.clear()
                try:
                    async with asyncio.timeout(deadline - loop.time()):
                        await self._replay_changed.wait()
                except TimeoutError:
                    break
            for section, result in zip(sections, results[: len(sections)], strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    self._section_failed(section, result)
                elif self._sections.get(section.key) is section:
                    self._release(section)
                elif section.key not in self._sections:
                    # Unsubscribed while resubscribing: tell the server too.
                    fields = {"type": "unsubscribe", "document_id": section.key[0], "section_id": section.key[1]}
                    self._background(
                        self._call(fields, _read_op("unsubscribe"), timeout=self._open_timeout, wait=False)
                    )
            self._loose.clear()  # each was for the events just released
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("resubscribing after a reconnect failed")

    async def _resubscribe(self, connection: _Connection, section: _Section) -> None:
        document_id, section_id = section.key
        fields = {
            "type": "subscribe",
            "document_id": document_id,
            "section_id": section_id,
            "since_offset": section.position,
            "epoch": section.epoch or None,
        }

        def on_reply(reply: Subscribed) -> None:
            self._note_sessions(reply.sessions)
            section.resume = (reply, [])

        await self._resume_call(connection, fields, _read_op("subscribe"), on_reply)

    async def _rewatch(self, connection: _Connection, watched: _Watched) -> None:
        def on_reply(reply: DocumentSummary) -> None:
            # What changed while away comes as events, before the live ones that follow the reply.
            watched.refresh(reply, watched.watches)
            for watch in watched.watches:
                watch.summary = reply
                watch.rewatches += 1

        fields = {"type": "watch_document", "document_id": watched.document_id}
        await self._resume_call(connection, fields, _read_op("watch_document"), on_reply)

    def _rewatched(self, watched: _Watched, result: BaseException | None) -> None:
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, _Dropped):
            return  # the next connection watches again
        if self._watched.get(watched.document_id) is not watched:
            if watched.document_id not in self._watched:
                # Unwatched while watching again: tell the server too.
                self._background(self._tell_unwatched(watched.document_id, self._open_timeout))
            return
        if isinstance(result, BaseException):
            logger.warning("watching %r again failed: %s", watched.document_id, result)
            del self._watched[watched.document_id]
            for watch in watched.watches:
                watch._finish(result)

    async def _resume_call(
        self, connection: _Connection, fields: dict[str, Any], op: _Op, on_reply: Callable[[Any], None]
    ) -> None:
        """A request of the resumption, on this connection only, retrying temporary errors within the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        failures = 0
        while True:
            frame = await self._attempt(connection, fields, op, deadline, on_reply, False)
            if not isinstance(frame, Error):
                return
            error = error_from_frame(frame, op.type)
            delay = self.backoff.delay(failures)
            failures += 1
            if not error.temporary or loop.time() + delay > deadline:
                raise error
            await self._pause(delay)

    def _release(self, section: _Section) -> None:
        """Deliver a resubscribed section's recovered (or reset) state, then the live events held behind it."""
        if section.resume is None:
            return
        reply, held = section.resume
        section.resume = None
        self._note_sessions(reply.sessions)
        for subscription in section.subscriptions:
            subscription.resubscriptions += 1
        own = self._own_among(section.key, [*(reply.events if reply.recovered else []), *held])
        if reply.recovered:
            before = section.presence
            section.epoch = reply.epoch
            for subscription in section.subscriptions:
                subscription.snapshot = reply
            for event in reply.events:
                self._deliver(section, event, recovered=True, replayed=True, own=own)
            section.position = max(section.position, reply.offset)
            section.presence = set(reply.presence)
            joined, left = sorted(section.presence - before), sorted(before - section.presence)
            if joined or left:
                presence = Presence(document_id=section.key[0], section_id=section.key[1], joined=joined, left=left)
                for subscription in section.subscriptions:
                    subscription._push(presence)
            # Read markers are not recovered: what this user read elsewhere while away comes as `read` events.
            for session_id, seq in reply.read.items():
                if seq > section.read.get(session_id, 0):
                    read = ReadEvent(session_id=session_id, seq=seq)
                    for subscription in section.subscriptions:
                        subscription._push(read)
            section.note_read(reply.read)
        else:
            reason = "epoch_changed" if reply.epoch != section.epoch else "window_exceeded"
            logger.info("section %s could not be recovered (%s): resync", section.key, reason)
            section.epoch, section.position = reply.epoch, reply.offset
            section.presence = set(reply.presence)
            section.read = dict(reply.read)
            resync = Resync(section.key[0], section.key[1], reason, reply)
            for subscription in section.subscriptions:
                subscription._reset(resync)
        for frame in held:
            self._deliver(section, frame, replayed=True, own=own)

    def _section_failed(self, section: _Section, error: BaseException) -> None:
        if isinstance(error, _Dropped):
            return  # the next connection resubscribes
        logger.warning("resubscribing to %s failed: %s", section.key, error)
        if self._sections.get(section.key) is section:
            del self._sections[section.key]
        for subscription in section.subscriptions:
            subscription._finish(error)


def _read_op(type: str) -> _Op:
    """A request without effects, safe to send again."""
    return _Op(type, retry=True, write=False)


class connect:
    """Connect to a sectionchat server: `async with connect(url, name="alice") as chat`, or `chat = await connect(...)`.

    Takes the arguments of `ChatClient`. The first connection attempt raises
    `ConnectionFailed` (or `HandshakeRejected`) if it fails; after that the
    client reconnects by itself.
    """

    def __init__(self, url: str, **options: Any):
        self.client = ChatClient(url, **options)

    def __await__(self) -> Generator[Any, None, ChatClient]:
        return self.client.start().__await__()

    async def __aenter__(self) -> ChatClient:
        return await self.client.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.aclose()
