# The HTTP API for backends and bots: the same chat as the WebSocket transport,
# under /api/v1/ on a port of its own (aiohttp parses HTTP; nothing here does).
#
# Rules kept here:
# - Every request becomes the protocol's own request Struct and goes through
#   Chat.handle, as a WebSocket request does: one copy of every rule, durable
#   before its reply, announced live to subscribers. The caller is trusted: it
#   acts as the `user` it names, as a moderator, on any document.
# - A reply is the chat's reply frame reshaped into the documented body; an
#   error frame becomes {"error": {code, message, temporary}} with the status of
#   its code. A write whose outcome is unknown (the chat would close a socket
#   with 1011) answers 503 saying so: it may be stored, and a retry with the
#   same idempotency_key or client_msg_id returns it.
# - Bodies and query strings are decoded into the Structs below, which are also
#   what /api/v1/openapi.json is generated from (msgspec's JSON Schemas).

from __future__ import annotations

import hmac
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NamedTuple, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, Struct, UnsetType

from protocol import JSON, errors
from protocol.errors import ChatError
from protocol.messages import (
    MAX_MOVED_SESSIONS,
    ClientRequest,
    CloseSession,
    Count,
    CreateSession,
    Cursor,
    DeleteMessage,
    EditMessage,
    GetSession,
    History,
    Id,
    Limit,
    ListSessions,
    MarkRead,
    Mentions,
    Message,
    Metadata,
    MoveSessions,
    React,
    Reaction,
    ReopenSession,
    SectionSummary,
    SendMessage,
    Session,
    SessionId,
    SessionLimit,
    ShortKey,
    StoredEvent,
    Title,
    UpdateSession,
    UserName,
)

from .chat import Chat
from .storage.base import OutcomeUnknown, SectionKey, StorageError

logger = logging.getLogger("sectionchat.api")

MAX_BODY_BYTES = 64 * 1024
UNAUTHORIZED = "unauthorized"  # not a chat code: no rule of the chat was asked
STATUS = {
    UNAUTHORIZED: 401,
    errors.BAD_REQUEST: 400,
    errors.UNKNOWN_TYPE: 400,
    errors.FORBIDDEN: 403,
    errors.NOT_FOUND: 404,
    errors.CONFLICT: 409,
    errors.TOO_LARGE: 413,
    errors.RATE_LIMITED: 429,
    errors.INTERNAL: 500,
    errors.UNAVAILABLE: 503,
}
EventsLimit = Annotated[int, Meta(ge=1, le=1000)]


# Bodies and queries ---------------------------------------------------------------


class CreateSessionBody(Struct):
    user: UserName
    document_id: Id
    section_id: Id
    title: Title | None = None
    metadata: Metadata | None = None
    idempotency_key: ShortKey | None = None


class UpdateSessionBody(Struct):
    user: UserName
    title: Title | None | UnsetType = UNSET
    metadata: Metadata | None | UnsetType = UNSET
    closed: bool | UnsetType = UNSET


class MoveBody(Struct):
    user: UserName
    from_section_id: Id
    to_section_id: Id
    session_ids: Annotated[list[SessionId], Meta(min_length=1, max_length=MAX_MOVED_SESSIONS)] | None = None


class SendBody(Struct):
    user: UserName
    text: str
    client_msg_id: ShortKey | None = None
    mentions: Mentions | None = None


class EditBody(Struct):
    user: UserName
    text: str
    mentions: Mentions | None = None


class ReactBody(Struct):
    user: UserName
    reaction: Reaction
    on: bool = True


class ReadBody(Struct):
    user: UserName
    seq: Count


class SessionsQuery(Struct):
    section_id: Id | None = None
    closed: bool | None = None
    order: str = "created"
    limit: SessionLimit = 100
    cursor: Cursor | None = None


class HistoryQuery(Struct):
    after_seq: Count | None = None
    before_seq: Count | None = None
    limit: Limit = 50


class SummaryQuery(Struct):
    user: UserName | None = None


class UserQuery(Struct):
    user: UserName


class EventsQuery(Struct):
    since_offset: Count = 0
    epoch: ShortKey | None = None
    limit: EventsLimit = 100


# Replies ----------------------------------------------------------------------------


class SessionBody(Struct):
    session: Session


class SessionsPage(Struct):
    sessions: list[Session]
    next_cursor: str | None


class SummaryBody(Struct):
    document_id: str
    sections: list[SectionSummary]


class MovedBody(Struct):
    document_id: str
    from_section_id: str
    to_section_id: str
    sessions: list[Session]


class DeletedBody(Struct):
    document_id: str
    sessions_deleted: int
    messages_deleted: int


class MessageBody(Struct):
    message: Message


class HistoryBody(Struct):
    session_id: str
    messages: list[Message]
    has_more: bool


class ReactionBody(Struct):
    session_id: str
    seq: int
    reaction: str
    user: str
    on: bool


class ReadMarkBody(Struct):
    session_id: str
    seq: int


class EventsBody(Struct):
    epoch: str
    offset: int
    events: list[StoredEvent]
    has_more: bool


class ErrorDetail(Struct):
    code: str
    message: str
    temporary: bool


class ErrorBody(Struct):
    error: ErrorDetail


B = TypeVar("B", bound=Struct)


class Route(NamedTuple):
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.Response]]
    reply: type[Struct] | None  # None: not JSON of ours (the OpenAPI document itself)
    query: type[Struct] | None = None
    body: type[Struct] | None = None
    created: bool = False  # 201 when it stores something new


class ApiError(Exception):
    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.headers = code, message, headers or {}


class ApiPeer:
    """One API call as the chat sees a connection: a trusted user, every document, the reply kept."""

    documents: frozenset[str] | None = None
    moderator = True
    codec = JSON

    def __init__(self, user: str):
        self.connection_id = "api-" + secrets.token_hex(6)
        self.user = user
        self.frames: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.records = 0  # what its writes stored (0 for a repeat: 200, not 201)

    def send(self, data: bytes) -> None:
        self.frames.append(data)

    def stored(self, records: int) -> None:
        self.records += records

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


_decode_frame = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


class Api:
    """The routes of /api/v1/, each a few lines over Chat.handle."""

    def __init__(self, chat: Chat, keys: tuple[str, ...]):
        self.chat = chat
        self._keys = [key.encode() for key in keys]

    # The aiohttp application ---------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        for route in self.routes():
            app.router.add_route(route.method, route.path, route.handler)
        return app

    def routes(self) -> list[Route]:
        """Every path of PROTOCOL.md's table, with what it takes and answers (openapi.json is made of these)."""
        return [
            Route("POST", "/api/v1/sessions", self.create_session, SessionBody, body=CreateSessionBody, created=True),
            Route("GET", "/api/v1/sessions/{session_id}", self.get_session, SessionBody),
            Route("PATCH", "/api/v1/sessions/{session_id}", self.update_session, SessionBody, body=UpdateSessionBody),
            Route("GET", "/api/v1/documents/{document_id}/sessions", self.list_sessions, SessionsPage, SessionsQuery),
            Route("GET", "/api/v1/documents/{document_id}/summary", self.summary, SummaryBody, SummaryQuery),
            Route("POST", "/api/v1/documents/{document_id}/move", self.move, MovedBody, body=MoveBody),
            Route("DELETE", "/api/v1/documents/{document_id}", self.delete_document, DeletedBody),
            Route(
                "POST",
                "/api/v1/sessions/{session_id}/messages",
                self.send_message,
                MessageBody,
                body=SendBody,
                created=True,
            ),  # fmt: skip
            Route("GET", "/api/v1/sessions/{session_id}/messages", self.history, HistoryBody, HistoryQuery),
            Route(
                "PATCH", "/api/v1/sessions/{session_id}/messages/{seq}", self.edit_message, MessageBody, body=EditBody
            ),
            Route(
                "DELETE", "/api/v1/sessions/{session_id}/messages/{seq}", self.delete_message, MessageBody, UserQuery
            ),
            Route(
                "POST",
                "/api/v1/sessions/{session_id}/messages/{seq}/reactions",
                self.react,
                ReactionBody,
                body=ReactBody,
            ),  # fmt: skip
            Route("POST", "/api/v1/sessions/{session_id}/read", self.mark_read, ReadMarkBody, body=ReadBody),
            Route(
                "GET",
                "/api/v1/documents/{document_id}/sections/{section_id}/events",
                self.events,
                EventsBody,
                EventsQuery,
            ),  # fmt: skip
            Route("GET", "/api/v1/openapi.json", self.openapi, None),
        ]

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        try:
            if request.path != "/api/v1/openapi.json":
                self._authorize(request)
            return await handler(request)
        except ApiError as error:
            return _error(error.code, error.message, error.headers)
        except ChatError as error:
            return _error(error.code, error.message)
        except OutcomeUnknown as error:
            return _error(errors.UNAVAILABLE, f"the outcome is unknown, retry it: {error}")
        except StorageError as error:
            return _error(errors.UNAVAILABLE, f"storage is unavailable; nothing was done: {error}")
        except web.HTTPException as error:  # aiohttp's own: unknown path, wrong method, body too large
            code = {405: errors.BAD_REQUEST, 413: errors.TOO_LARGE}.get(error.status, errors.NOT_FOUND)
            response = _error(
                code, error.reason, {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
            )
            response.set_status(error.status)
            return response
        except Exception:
            trace_id = uuid.uuid4().hex[:12]
            logger.exception("internal error %s handling %s %s", trace_id, request.method, request.path)
            return _error(errors.INTERNAL, f"internal error; trace id {trace_id}")

    def _authorize(self, request: web.Request) -> None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        offered = given.strip().encode()
        # Every key is compared, each in constant time: the answer takes as long whichever matched.
        matched = [hmac.compare_digest(offered, key) for key in self._keys]
        if scheme.lower() != "bearer" or not any(matched):
            raise ApiError(UNAUTHORIZED, "a valid API key is required", {"WWW-Authenticate": "Bearer"})

    # Asking the chat -----------------------------------------------------------------

    async def _ask(self, user: str, request: ClientRequest, peer: ApiPeer | None = None) -> dict[str, Any]:
        """The chat's reply to the request, as a WebSocket client would get it (an error raises ApiError)."""
        peer = peer or ApiPeer(user)
        await self.chat.handle(peer, request)
        if peer.closed is not None:
            raise ApiError(
                errors.UNAVAILABLE,
                "the outcome of the write is unknown: it may be stored; retry it with the same "
                "idempotency_key or client_msg_id to get it",
            )
        if not peer.frames:
            raise ApiError(errors.INTERNAL, "the chat gave no reply")
        frame = _decode_frame(peer.frames[-1])
        if frame["type"] == "error":
            raise ApiError(frame["code"], frame["message"])
        frame.pop("type")
        frame.pop("reply_to", None)
        return frame

    # The routes ------------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        body = await _body(request, CreateSessionBody)
        fields = msgspec.structs.asdict(body)
        peer = ApiPeer(fields.pop("user"))
        frame = await self._ask(peer.user, CreateSession(**fields), peer)
        return _reply(SessionBody, frame, 201 if peer.records else 200)  # 200: an idempotency key's session

    async def get_session(self, request: web.Request) -> web.Response:
        frame = await self._ask("api", GetSession(session_id=_segment(request, "session_id")))
        return _reply(SessionBody, frame)

    async def update_session(self, request: web.Request) -> web.Response:
        body = await _body(request, UpdateSessionBody)
        session_id = _segment(request, "session_id")
        frame = await self._ask(body.user, GetSession(session_id=session_id))
        if body.title is not UNSET or body.metadata is not UNSET:
            update = UpdateSession(session_id=session_id, title=body.title, metadata=body.metadata)
            frame = await self._ask(body.user, update)
        if body.closed is not UNSET and body.closed != frame["session"]["closed"]:
            change = CloseSession if body.closed else ReopenSession
            frame = await self._ask(body.user, change(session_id=session_id))
        return _reply(SessionBody, frame)

    async def list_sessions(self, request: web.Request) -> web.Response:
        query = _query(request, SessionsQuery)
        listing = ListSessions(document_id=_segment(request, "document_id"), **msgspec.structs.asdict(query))
        return _reply(SessionsPage, await self._ask("api", listing))

    async def summary(self, request: web.Request) -> web.Response:
        query = _query(request, SummaryQuery)
        document_id = _segment(request, "document_id")
        sections = await self.chat.document_summaries(document_id, query.user)
        return _json(SummaryBody(document_id, sections))

    async def move(self, request: web.Request) -> web.Response:
        body = await _body(request, MoveBody)
        fields = msgspec.structs.asdict(body)
        user = fields.pop("user")
        frame = await self._ask(user, MoveSessions(document_id=_segment(request, "document_id"), **fields))
        return _reply(MovedBody, frame)

    async def delete_document(self, request: web.Request) -> web.Response:
        document_id = _segment(request, "document_id")
        sessions, messages = await self.chat.delete_document(document_id)
        return _json(DeletedBody(document_id, sessions, messages))

    async def send_message(self, request: web.Request) -> web.Response:
        body = await _body(request, SendBody)
        fields = msgspec.structs.asdict(body)
        peer = ApiPeer(fields.pop("user"))
        frame = await self._ask(peer.user, SendMessage(session_id=_segment(request, "session_id"), **fields), peer)
        return _reply(MessageBody, frame, 201 if peer.records else 200)  # 200: a repeated client_msg_id

    async def history(self, request: web.Request) -> web.Response:
        query = _query(request, HistoryQuery)
        page = History(session_id=_segment(request, "session_id"), **msgspec.structs.asdict(query))
        return _reply(HistoryBody, await self._ask("api", page))

    async def edit_message(self, request: web.Request) -> web.Response:
        body = await _body(request, EditBody)
        edit = EditMessage(
            session_id=_segment(request, "session_id"), seq=_seq(request), text=body.text, mentions=body.mentions
        )
        return _reply(MessageBody, await self._ask(body.user, edit))

    async def delete_message(self, request: web.Request) -> web.Response:
        query = _query(request, UserQuery)
        delete = DeleteMessage(session_id=_segment(request, "session_id"), seq=_seq(request))
        return _reply(MessageBody, await self._ask(query.user, delete))

    async def react(self, request: web.Request) -> web.Response:
        body = await _body(request, ReactBody)
        react = React(session_id=_segment(request, "session_id"), seq=_seq(request), reaction=body.reaction, on=body.on)
        frame = await self._ask(body.user, react)
        return _reply(ReactionBody, frame)

    async def mark_read(self, request: web.Request) -> web.Response:
        body = await _body(request, ReadBody)
        frame = await self._ask(body.user, MarkRead(session_id=_segment(request, "session_id"), seq=body.seq))
        return _reply(ReadMarkBody, frame)

    async def events(self, request: web.Request) -> web.Response:
        query = _query(request, EventsQuery)
        key = SectionKey(_segment(request, "document_id"), _segment(request, "section_id"))
        epoch, offset, events, has_more = await self.chat.stored_events(
            key, query.since_offset, query.epoch, query.limit
        )
        return _json(EventsBody(epoch, offset, events, has_more))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=_encode(openapi_document(self.routes())), content_type="application/json")


# Helpers -------------------------------------------------------------------------------


async def _body(request: web.Request, kind: type[B]) -> B:
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(errors.TOO_LARGE, f"the body is larger than {MAX_BODY_BYTES} bytes") from None
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as error:
        raise ApiError(errors.BAD_REQUEST, str(error)) from None
    except msgspec.DecodeError as error:
        raise ApiError(errors.BAD_REQUEST, f"the body is not JSON: {error}") from None


def _query(request: web.Request, kind: type[B]) -> B:
    known = {field.name for field in msgspec.structs.fields(kind)}
    values = {name: value for name, value in request.query.items() if name in known}  # unknown ones are ignored
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as error:
        raise ApiError(errors.BAD_REQUEST, f"query: {error}") from None


def _segment(request: web.Request, name: str) -> str:
    return request.match_info[name]  # aiohttp decodes each segment once (%2F stays inside the id)


def _seq(request: web.Request) -> int:
    raw = request.match_info["seq"]
    if not raw.isdigit() or int(raw) < 1:
        raise ApiError(errors.BAD_REQUEST, f"seq must be a positive integer, not {raw!r}")
    return int(raw)


def _reply(kind: type[Struct], frame: dict[str, Any], status: int = 200) -> web.Response:
    return _json(msgspec.convert(frame, kind), status)  # the documented fields, in the documented shape


def _json(body: Struct, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def _error(code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(ErrorDetail(code, message, code in errors.TEMPORARY))
    return web.Response(
        body=_encode(body), status=STATUS.get(code, 500), content_type="application/json", headers=headers
    )


# The OpenAPI document -------------------------------------------------------------------


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    """OpenAPI 3.1 for these routes, every schema generated by msgspec from the Structs above."""
    from server import __version__

    types = sorted({t for r in routes for t in (r.reply, r.query, r.body) if t is not None} | {ErrorBody}, key=str)
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if route.reply is None:
            continue
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "integer" if name == "seq" else "string"}}
            for name in _path_names(route.path)
        ]
        if route.query is not None:
            schema = components[route.query.__name__]
            required = set(schema.get("required", []))
            parameters += [
                {"name": name, "in": "query", "required": name in required, "schema": field}
                for name, field in schema["properties"].items()
            ]
        ok = {"description": "success", "content": _json_content(route.reply)}
        responses: dict[str, Any] = {"201" if route.created else "200": ok}
        if route.created:
            responses["200"] = {
                "description": "a repeat: what was stored before",
                "content": _json_content(route.reply),
            }
        for status in ("400", "401", "403", "404", "409", "413", "429", "500", "503"):
            responses[status] = {"description": "an error", "content": _json_content(ErrorBody)}
        operation: dict[str, Any] = {"parameters": parameters, "responses": responses, "security": [{"apiKey": []}]}
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": _json_content(route.body)}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "sectionchat HTTP API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _json_content(kind: type[Struct]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{kind.__name__}"}}}
