# Every frame of the sectionchat wire protocol (version 1) as a msgspec Struct.
#
# Rule kept here: the types are the validation. A request that decodes into one
# of these Structs is well-formed; everything else about it (does the session
# exist, is the text too long for this server) is the chat logic's business.
# New fields get defaults and go at the end, so old clients keep working.

from __future__ import annotations

from typing import Annotated, Union

from msgspec import Meta, Struct

PROTOCOL_VERSION = 1

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


# Objects ----------------------------------------------------------------------


class Session(Struct):
    session_id: str
    document_id: str
    section_id: str
    title: str | None
    created_by: str
    created_at: str
    closed: bool
    last_seq: int


class Message(Struct):
    session_id: str
    seq: int
    message_id: str
    author: str
    text: str
    client_msg_id: str | None
    sent_at: str


# Client requests ------------------------------------------------------------


class Request(Struct, tag_field="type", kw_only=True, omit_defaults=True):
    id: RequestId | None = None


class CreateSession(Request, tag="create_session"):
    document_id: Id
    section_id: Id
    title: Title | None = None
    idempotency_key: ShortKey | None = None


class GetSession(Request, tag="get_session"):
    session_id: SessionId


class ListSessions(Request, tag="list_sessions"):
    document_id: Id
    section_id: Id | None = None


class SendMessage(Request, tag="send_message"):
    session_id: SessionId
    # The upper bound is the server's max_text_chars, checked by the chat
    # logic so that it can answer `too_large` instead of `bad_request`.
    text: Annotated[str, Meta(min_length=1)]
    client_msg_id: ShortKey | None = None


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
]

REQUEST_TYPES = frozenset(t.__struct_config__.tag for t in ClientRequest.__args__)


# Server frames --------------------------------------------------------------
#
# Replies carry `reply_to` (omitted when the request had no id); events never
# do. `session_created`, `message` and `session_closed` are both a reply and an
# event: the event form carries the section `offset`, the reply form does not.


class ServerFrame(Struct, tag_field="type", kw_only=True, omit_defaults=True):
    reply_to: RequestId | None = None


class Limits(Struct):
    max_frame_bytes: int
    max_text_chars: int
    messages_per_s: float | int


class Welcome(ServerFrame, tag="welcome"):
    connection_id: str
    user: str
    protocol: int
    server: str
    limits: Limits


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


class HistoryPage(ServerFrame, tag="history"):
    session_id: str
    messages: list[Message]
    has_more: bool


StoredEvent = Union[SessionCreated, MessageEvent, SessionClosed]


class Subscribed(ServerFrame, tag="subscribed"):
    document_id: str
    section_id: str
    epoch: str
    offset: int
    sessions: list[Session]
    presence: list[str]
    recovered: bool
    events: list[StoredEvent]


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
]

