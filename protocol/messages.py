# Every frame of the sectionchat wire protocol (version 1) as a msgspec Struct.
#
# Rule kept here: the types are the validation. A request that decodes into one
# of these Structs is well-formed; everything else about it (does the session
# exist, is the text too long for this server) is the chat logic's business.
# New fields get defaults and go at the end, so old clients keep working.

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Any, Literal, Union, get_args

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION = 1

# The most sessions one `sessions` page or one `subscribed` snapshot carries.
MAX_LISTED_SESSIONS = 1000
MAX_MOVED_SESSIONS = 1000  # named in one move_sessions, or in a source moved whole

# "Any Unicode except control characters": C0, DEL and C1. `\Z`, not `$`,
# because `$` also matches just before a trailing newline.
_NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*\Z"

Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=_NO_CONTROL)]
SessionId = Annotated[str, Meta(min_length=1, max_length=64, pattern=_NO_CONTROL)]
ShortKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=_NO_CONTROL)]
Title = Annotated[str, Meta(max_length=200, pattern=_NO_CONTROL)]
RequestId = Union[Annotated[str, Meta(min_length=1, max_length=64)], int]
Count = Annotated[int, Meta(ge=0, le=2**53)]
Limit = Annotated[int, Meta(ge=1, le=200)]
SessionLimit = Annotated[int, Meta(ge=1, le=MAX_LISTED_SESSIONS)]
Cursor = Annotated[str, Meta(min_length=1, max_length=1024)]
Seq = Annotated[int, Meta(ge=1, le=2**53)]
UserName = Annotated[str, Meta(min_length=1, max_length=64, pattern=_NO_CONTROL)]
Mentions = Annotated[list[UserName], Meta(max_length=20)]
Reaction = Annotated[str, Meta(min_length=1, max_length=32)]
# An opaque JSON object; its size (MAX_METADATA_BYTES) is checked by the chat logic, for `too_large`.
Metadata = dict[str, Any]

MAX_METADATA_BYTES = 4096
MAX_METADATA_DEPTH = 32


def check_json_object(value: Any, path: str = "metadata", depth: int = 0) -> None:
    """Raise ValueError unless `value` is plain JSON that both codecs carry unchanged.

    MessagePack can hold more than JSON (non-string keys, binary, NaN, timestamps,
    extensions) and JSON more than MessagePack (integers past 64 bits); metadata is
    returned as an equal JSON value to clients of either, so it is refused here.
    """
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"`{path}` is nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"`{path}` has a key that is not a string")
            check_json_object(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json_object(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ValueError(f"`{path}` is an integer outside 64 bits")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"`{path}` is not a finite number")
    else:
        raise ValueError(f"`{path}` holds a value JSON does not have ({type(value).__name__})")


MAX_REACTIONS = 20  # distinct reactions on one message


# Objects ----------------------------------------------------------------------


# Sessions, messages and the frames that carry them are never in a reference
# cycle: gc=False keeps the garbage collector from walking the many a server
# holds (a section's recovery window, its sessions).


class Session(Struct, gc=False):
    session_id: str
    document_id: str
    section_id: str
    title: str | None
    created_by: str
    created_at: str
    closed: bool
    last_seq: int
    # New in 1.1. Sessions stored by 1.0 have no last_activity_at: it starts as created_at.
    last_activity_at: str = ""
    metadata: Metadata | None = None

    def __post_init__(self) -> None:
        if not self.last_activity_at:
            self.last_activity_at = self.created_at


class Message(Struct, gc=False):
    session_id: str
    seq: int
    message_id: str
    author: str
    text: str
    client_msg_id: str | None
    sent_at: str
    # New in 1.1.
    mentions: list[str] = msgspec.field(default_factory=list)
    edited_at: str | None = None
    deleted_at: str | None = None
    reactions: dict[str, list[str]] = msgspec.field(default_factory=dict)


# Client requests ------------------------------------------------------------


class Request(Struct, tag_field="type", kw_only=True, omit_defaults=True):
    id: RequestId | None = None


class CreateSession(Request, tag="create_session"):
    document_id: Id
    section_id: Id
    title: Title | None = None
    idempotency_key: ShortKey | None = None
    metadata: Metadata | None = None

    def __post_init__(self) -> None:
        if self.metadata is not None:
            check_json_object(self.metadata)


class GetSession(Request, tag="get_session"):
    session_id: SessionId


class ListSessions(Request, tag="list_sessions"):
    document_id: Id
    section_id: Id | None = None
    limit: SessionLimit = MAX_LISTED_SESSIONS
    cursor: Cursor | None = None
    closed: bool | None = None  # only closed (true) or only open (false) sessions
    order: Literal["created", "activity"] = "created"

    def __post_init__(self) -> None:
        # A cursor that does not decode, or was handed out for other fields, is
        # a malformed request: checked with the request's shape.
        self.position()

    def position(self) -> tuple[str, str] | None:
        """Where the page starts: after the session (created_at, session_id) the cursor names; None: at the start."""
        if self.cursor is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(self.cursor + "=" * (-len(self.cursor) % 4))
            created_at, session_id, fields = _CURSOR.decode(raw)
        except (binascii.Error, ValueError, msgspec.MsgspecError):
            raise ValueError("`cursor` is not a cursor this server handed out") from None
        if fields != self._fields_digest():
            raise ValueError(
                "`cursor` was handed out for a list_sessions with other fields; pass the same fields again"
            )
        return created_at, session_id

    def sort_key(self, session: Session) -> str:
        """The timestamp the listing is ordered by."""
        return session.last_activity_at if self.order == "activity" else session.created_at

    def cursor_after(self, session: Session) -> str:
        """The cursor of the page that follows `session` in this listing.

        It encodes the position, not server state: it stays valid across
        restarts and nodes. A page's `limit` may change from page to page.
        """
        raw = msgspec.json.encode((self.sort_key(session), session.session_id, self._fields_digest()))
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def _fields_digest(self) -> str:
        # Every field that chooses what is listed, fields added later included by
        # themselves; those at their default are left out, so that a cursor handed
        # out before a field existed still pages on after an upgrade.
        fields = {
            field.name: getattr(self, field.name)
            for field in msgspec.structs.fields(self)
            if field.name not in _NOT_A_LISTING_FIELD and getattr(self, field.name) != field.default
        }
        return hashlib.sha256(msgspec.json.encode(fields, order="sorted")).hexdigest()[:16]


_CURSOR = msgspec.json.Decoder(tuple[str, str, str])
_NOT_A_LISTING_FIELD = frozenset({"id", "limit", "cursor"})


class SendMessage(Request, tag="send_message"):
    session_id: SessionId
    # The upper bound is the server's max_text_chars, checked by the chat
    # logic so that it can answer `too_large` instead of `bad_request`.
    text: Annotated[str, Meta(min_length=1)]
    client_msg_id: ShortKey | None = None
    mentions: Mentions | None = None


class EditMessage(Request, tag="edit_message"):
    session_id: SessionId
    seq: Seq
    text: Annotated[str, Meta(min_length=1)]
    mentions: Mentions | None = None  # None: kept as they were


class DeleteMessage(Request, tag="delete_message"):
    session_id: SessionId
    seq: Seq


class React(Request, tag="react"):
    session_id: SessionId
    seq: Seq
    reaction: Reaction
    on: bool = True


class MarkRead(Request, tag="mark_read"):
    session_id: SessionId
    seq: Count


class UpdateSession(Request, tag="update_session"):
    session_id: SessionId
    # Absent (UNSET): unchanged; null: cleared.
    title: Title | None | msgspec.UnsetType = msgspec.UNSET
    metadata: Metadata | None | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if isinstance(self.metadata, dict):
            check_json_object(self.metadata)


class ReopenSession(Request, tag="reopen_session"):
    session_id: SessionId


class History(Request, tag="history"):
    session_id: SessionId
    after_seq: Count | None = None
    before_seq: Count | None = None
    limit: Limit = 50

    def __post_init__(self) -> None:
        if self.after_seq is not None and self.before_seq is not None:
            raise ValueError("`after_seq` and `before_seq` cannot be used together")


class CloseSession(Request, tag="close_session"):
    session_id: SessionId


class Subscribe(Request, tag="subscribe"):
    document_id: Id
    section_id: Id
    since_offset: Count | None = None
    epoch: ShortKey | None = None


class Unsubscribe(Request, tag="unsubscribe"):
    document_id: Id
    section_id: Id


class Typing(Request, tag="typing"):
    session_id: SessionId


class WatchDocument(Request, tag="watch_document"):
    document_id: Id


class UnwatchDocument(Request, tag="unwatch_document"):
    document_id: Id


class MoveSessions(Request, tag="move_sessions"):
    document_id: Id
    from_section_id: Id
    to_section_id: Id
    session_ids: Annotated[list[SessionId], Meta(min_length=1, max_length=MAX_MOVED_SESSIONS)] | None = None


class Ping(Request, tag="ping"):
    pass


ClientRequest = Union[
    CreateSession,
    GetSession,
    ListSessions,
    SendMessage,
    History,
    CloseSession,
    Subscribe,
    Unsubscribe,
    Typing,
    Ping,
    EditMessage,
    DeleteMessage,
    React,
    UpdateSession,
    ReopenSession,
    MarkRead,
    WatchDocument,
    UnwatchDocument,
    MoveSessions,
]

REQUEST_TYPES = frozenset(t.__struct_config__.tag for t in get_args(ClientRequest))


# Server frames --------------------------------------------------------------
#
# Replies carry `reply_to` (omitted when the request had no id); events never
# do. `session_created`, `message` and `session_closed` are both a reply and an
# event: the event form carries the section `offset`, the reply form does not.


class ServerFrame(Struct, tag_field="type", kw_only=True, omit_defaults=True, gc=False):
    reply_to: RequestId | None = None


class Limits(Struct):
    max_frame_bytes: int
    max_text_chars: int
    messages_per_s: float | int
    max_subscriptions: int = 100  # new in 1.1: subscriptions and watched documents together


class Welcome(ServerFrame, tag="welcome"):
    connection_id: str
    user: str
    protocol: int
    server: str
    limits: Limits
    # Not in the contract's welcome (extra fields are allowed): the token's roles, so a
    # page shows moderator actions only to moderators. Always sent (a list, maybe empty).
    roles: list[str] = msgspec.field(default_factory=lambda: [])


class SessionCreated(ServerFrame, tag="session_created"):
    session: Session
    offset: int | None = None


class MessageAck(ServerFrame, tag="message_ack"):
    message: Message


class MessageEvent(ServerFrame, tag="message"):
    message: Message
    offset: int


class SessionClosed(ServerFrame, tag="session_closed"):
    session: Session
    offset: int | None = None


class SessionInfo(ServerFrame, tag="session"):
    session: Session


class SessionList(ServerFrame, tag="sessions"):
    sessions: list[Session]
    # New in 1.1. A default_factory that is a lambda (unlike a plain default, or the
    # `list`/`dict` factories) is never omitted by omit_defaults: these are always sent.
    next_cursor: str | None = msgspec.field(default_factory=lambda: None)
    read: dict[str, int] = msgspec.field(default_factory=lambda: {})  # session_id -> the user's last read seq
    unread: dict[str, int] = msgspec.field(default_factory=lambda: {})  # session_id -> unread messages


class MessageEdited(ServerFrame, tag="message_edited"):
    message: Message
    offset: int | None = None


class MessageDeleted(ServerFrame, tag="message_deleted"):
    message: Message  # the tombstone
    offset: int | None = None


class ReactionEvent(ServerFrame, tag="reaction"):
    session_id: str
    seq: int
    reaction: str
    user: str
    on: bool
    at: str
    offset: int | None = None


class ReadMarked(ServerFrame, tag="read_marked"):
    session_id: str
    seq: int


class ReadEvent(ServerFrame, tag="read"):
    session_id: str
    seq: int


class SessionUpdated(ServerFrame, tag="session_updated"):
    session: Session
    offset: int | None = None


class SessionReopened(ServerFrame, tag="session_reopened"):
    session: Session
    offset: int | None = None


class SessionMoved(ServerFrame, tag="session_moved"):
    """An event only (the request's reply is SessionsMoved), in both sections' streams."""

    session: Session
    from_section_id: str
    to_section_id: str
    offset: int


class SessionsMoved(ServerFrame, tag="sessions_moved"):
    document_id: str
    from_section_id: str
    to_section_id: str
    sessions: list[Session]


class DocumentDeleted(ServerFrame, tag="document_deleted"):
    """To the document's subscribers and watchers, whose subscriptions to it end."""

    document_id: str


class Mentioned(ServerFrame, tag="mentioned"):
    document_id: str
    section_id: str
    message: Message


class SectionSummary(Struct, gc=False):
    section_id: str
    sessions: int
    open_sessions: int
    messages: int  # not deleted
    last_activity_at: str | None
    unread: int
    mentions: int


class DocumentSummary(ServerFrame, tag="document"):
    document_id: str
    sections: list[SectionSummary]


class Unwatched(ServerFrame, tag="unwatched"):
    document_id: str


class SectionSummaryEvent(ServerFrame, tag="section_summary"):
    document_id: str
    summary: SectionSummary


class HistoryPage(ServerFrame, tag="history"):
    session_id: str
    messages: list[Message]
    has_more: bool


StoredEvent = Union[
    SessionCreated,
    MessageEvent,
    SessionClosed,
    MessageEdited,
    MessageDeleted,
    ReactionEvent,
    SessionUpdated,
    SessionReopened,
    SessionMoved,
]


class Subscribed(ServerFrame, tag="subscribed"):
    document_id: str
    section_id: str
    epoch: str
    offset: int
    sessions: list[Session]
    presence: list[str]
    recovered: bool
    events: list[StoredEvent]
    # New in 1.1: false when `sessions` holds only the MAX_LISTED_SESSIONS most
    # recently active; always sent (see SessionList.next_cursor); a 1.0 server sent all.
    sessions_complete: bool = msgspec.field(default_factory=lambda: True)
    read: dict[str, int] = msgspec.field(default_factory=lambda: {})  # as in SessionList
    unread: dict[str, int] = msgspec.field(default_factory=lambda: {})


class Unsubscribed(ServerFrame, tag="unsubscribed"):
    document_id: str
    section_id: str


class Presence(ServerFrame, tag="presence"):
    document_id: str
    section_id: str
    joined: list[str]
    left: list[str]


class TypingEvent(ServerFrame, tag="typing"):
    session_id: str
    user: str


class Pong(ServerFrame, tag="pong"):
    pass


class Error(ServerFrame, tag="error"):
    code: str
    message: str
    temporary: bool


ServerMessage = Union[
    Welcome,
    SessionCreated,
    MessageAck,
    MessageEvent,
    SessionClosed,
    SessionInfo,
    SessionList,
    HistoryPage,
    Subscribed,
    Unsubscribed,
    Presence,
    TypingEvent,
    Pong,
    Error,
    MessageEdited,
    MessageDeleted,
    ReactionEvent,
    ReadMarked,
    ReadEvent,
    SessionUpdated,
    SessionReopened,
    Mentioned,
    SessionMoved,
    SessionsMoved,
    DocumentDeleted,
    DocumentSummary,
    Unwatched,
    SectionSummaryEvent,
]
