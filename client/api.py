"""A typed client for sectionchat's HTTP API (/api/v1/, for backends and bots).

    from client.api import ApiClient

    async with ApiClient("http://127.0.0.1:8766", key) as api:
        created = await api.create_session("backend", "spec-7", "intro", title="Wording")
        sent = await api.send_message(created.session.session_id, "backend", "Shall we say 'must'?")
        assert sent.created and sent.message.seq == 1

What this module owns: one method per path of the HTTP API table (PROTOCOL.md,
"HTTP API"), over one aiohttp ClientSession with keep-alive; every id in a path
percent-encoded once (`/` is `%2F`); replies decoded with msgspec into the
protocol's Structs (`Session`, `Message`, `SectionSummary`, the `StoredEvent`
union) or the small result Structs below. An error reply raises the exception
class client/chat.py raises for its code (`NotFound`, `Conflict`, `BadRequest`,
… all `ChatError`s) with the HTTP status as `.status`; a missing or wrong key
raises `Unauthorized`. Nothing here retries: the caller decides (a 503 write may
be stored; repeat it with the same idempotency_key or client_msg_id).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from client.chat import ERRORS, UNSET, ChatError, ClientError
from protocol.messages import Message, SectionSummary, Session, StoredEvent

__all__ = [
    "ApiClient",
    "Unauthorized",
    "CreatedSession",
    "SentMessage",
    "SessionsPage",
    "DocumentSummaryReply",
    "MovedSessions",
    "DeletedDocument",
    "HistoryReply",
    "ReactionReply",
    "ReadMarkReply",
    "EventsPage",
    "UNSET",
]

T = TypeVar("T")


class Unauthorized(ClientError):
    """401: the API key is missing or not one of the server's."""

    status = 401

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# Replies ------------------------------------------------------------------------


class CreatedSession(NamedTuple):
    session: Session
    created: bool  # 201; False (200) when the idempotency key returned an existing session


class SentMessage(NamedTuple):
    message: Message
    created: bool  # 201; False (200) for a repeated client_msg_id


class _SessionBody(msgspec.Struct):
    session: Session


class _MessageBody(msgspec.Struct):
    message: Message


class SessionsPage(msgspec.Struct):
    sessions: list[Session]
    next_cursor: str | None


class DocumentSummaryReply(msgspec.Struct):
    document_id: str
    sections: list[SectionSummary]


class MovedSessions(msgspec.Struct):
    document_id: str
    from_section_id: str
    to_section_id: str
    sessions: list[Session]


class DeletedDocument(msgspec.Struct):
    document_id: str
    sessions_deleted: int
    messages_deleted: int


class HistoryReply(msgspec.Struct):
    session_id: str
    messages: list[Message]
    has_more: bool


class ReactionReply(msgspec.Struct):
    session_id: str
    seq: int
    reaction: str
    user: str
    on: bool


class ReadMarkReply(msgspec.Struct):
    session_id: str
    seq: int


class EventsPage(msgspec.Struct):
    epoch: str
    offset: int
    events: list[StoredEvent]
    has_more: bool


class _ErrorDetail(msgspec.Struct):
    code: str
    message: str
    temporary: bool = False


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


def _query(**values: Any) -> dict[str, str]:
    """The given query parameters as strings (booleans as true/false); None leaves one out."""
    return {
        name: ("true" if value else "false") if isinstance(value, bool) else str(value)
        for name, value in values.items()
        if value is not None
    }


def _error(status: int, data: bytes, method: str, path: str) -> ClientError:
    try:
        detail = msgspec.json.decode(data, type=_ErrorBody).error
    except msgspec.DecodeError:
        text = data.decode(errors="replace").strip()[:200]
        detail = _ErrorDetail(f"http_{status}", f"HTTP {status} from {method} {path}: {text}")
    if status == 401:
        return Unauthorized(detail.message)
    error = ERRORS.get(detail.code, ChatError)(
        detail.message, code=detail.code, temporary=detail.temporary, request=f"{method} {path}"
    )
    error.status = status  # type: ignore[attr-defined]
    return error


class ApiClient:
    """The HTTP API of one server, as `async with ApiClient(base_url, key) as api:`."""

    def __init__(self, base_url: str, key: str, *, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, query: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One call: (status, body bytes) of a success; an error status raises (see the module's doc)."""
        if self._http is None:
            raise ClientError("ApiClient is not open: use `async with ApiClient(...) as api:`")
        data = msgspec.json.encode(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        # encoded=True: the path's segments are already percent-encoded, once.
        url = URL(self.base_url + path, encoded=True)
        async with self._http.request(method, url, data=data, params=query or None, headers=headers) as response:
            content = await response.read()
            if response.status >= 400:
                raise _error(response.status, content, method, path)
            return response.status, content

    async def _call(
        self,
        kind: type[T],
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> tuple[int, T]:
        status, content = await self.request(method, path, body, query)
        return status, msgspec.json.decode(content, type=kind)

    # Sessions ---------------------------------------------------------------------

    async def create_session(
        self,
        user: str,
        document_id: str,
        section_id: str,
        *,
        title: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> CreatedSession:
        body: dict[str, Any] = {"user": user, "document_id": document_id, "section_id": section_id}
        for name, value in (("title", title), ("metadata", metadata), ("idempotency_key", idempotency_key)):
            if value is not None:
                body[name] = value
        status, reply = await self._call(_SessionBody, "POST", "/api/v1/sessions", body)
        return CreatedSession(reply.session, status == 201)

    async def get_session(self, session_id: str) -> Session:
        _, reply = await self._call(_SessionBody, "GET", f"/api/v1/sessions/{_segment(session_id)}")
        return reply.session

    async def update_session(
        self,
        session_id: str,
        user: str,
        *,
        title: str | None | msgspec.UnsetType = UNSET,
        metadata: dict[str, Any] | None | msgspec.UnsetType = UNSET,
        closed: bool | msgspec.UnsetType = UNSET,
    ) -> Session:
        """Change what is given: UNSET leaves a field as it is, None clears title or metadata."""
        body: dict[str, Any] = {"user": user}
        for name, value in (("title", title), ("metadata", metadata), ("closed", closed)):
            if value is not UNSET:
                body[name] = value
        _, reply = await self._call(_SessionBody, "PATCH", f"/api/v1/sessions/{_segment(session_id)}", body)
        return reply.session

    async def list_sessions(
        self,
        document_id: str,
        *,
        section_id: str | None = None,
        closed: bool | None = None,
        order: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionsPage:
        query = _query(section_id=section_id, closed=closed, order=order, limit=limit, cursor=cursor)
        _, page = await self._call(
            SessionsPage, "GET", f"/api/v1/documents/{_segment(document_id)}/sessions", query=query
        )
        return page

    # Documents --------------------------------------------------------------------

    async def document_summary(self, document_id: str, *, user: str | None = None) -> DocumentSummaryReply:
        path = f"/api/v1/documents/{_segment(document_id)}/summary"
        _, reply = await self._call(DocumentSummaryReply, "GET", path, query=_query(user=user))
        return reply

    async def move_sessions(
        self,
        document_id: str,
        user: str,
        from_section_id: str,
        to_section_id: str,
        *,
        session_ids: list[str] | None = None,
    ) -> MovedSessions:
        body: dict[str, Any] = {"user": user, "from_section_id": from_section_id, "to_section_id": to_section_id}
        if session_ids is not None:
            body["session_ids"] = session_ids
        _, reply = await self._call(MovedSessions, "POST", f"/api/v1/documents/{_segment(document_id)}/move", body)
        return reply

    async def delete_document(self, document_id: str) -> DeletedDocument:
        _, reply = await self._call(DeletedDocument, "DELETE", f"/api/v1/documents/{_segment(document_id)}")
        return reply

    async def events(
        self, document_id: str, section_id: str, *, since_offset: int = 0, epoch: str | None = None, limit: int = 100
    ) -> EventsPage:
        path = f"/api/v1/documents/{_segment(document_id)}/sections/{_segment(section_id)}/events"
        query = _query(since_offset=since_offset, epoch=epoch, limit=limit)
        _, page = await self._call(EventsPage, "GET", path, query=query)
        return page

    # Messages ---------------------------------------------------------------------

    async def send_message(
        self,
        session_id: str,
        user: str,
        text: str,
        *,
        client_msg_id: str | None = None,
        mentions: list[str] | None = None,
    ) -> SentMessage:
        body: dict[str, Any] = {"user": user, "text": text}
        if client_msg_id is not None:
            body["client_msg_id"] = client_msg_id
        if mentions is not None:
            body["mentions"] = mentions
        status, reply = await self._call(
            _MessageBody, "POST", f"/api/v1/sessions/{_segment(session_id)}/messages", body
        )
        return SentMessage(reply.message, status == 201)

    async def history(
        self,
        session_id: str,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int | None = None,
    ) -> HistoryReply:
        query = _query(after_seq=after_seq, before_seq=before_seq, limit=limit)
        _, page = await self._call(
            HistoryReply, "GET", f"/api/v1/sessions/{_segment(session_id)}/messages", query=query
        )
        return page

    async def edit_message(
        self, session_id: str, seq: int, user: str, text: str, *, mentions: list[str] | None = None
    ) -> Message:
        body: dict[str, Any] = {"user": user, "text": text}
        if mentions is not None:
            body["mentions"] = mentions
        path = f"/api/v1/sessions/{_segment(session_id)}/messages/{_segment(seq)}"
        _, reply = await self._call(_MessageBody, "PATCH", path, body)
        return reply.message

    async def delete_message(self, session_id: str, seq: int, user: str) -> Message:
        """The tombstone of the message."""
        path = f"/api/v1/sessions/{_segment(session_id)}/messages/{_segment(seq)}"
        _, reply = await self._call(_MessageBody, "DELETE", path, query=_query(user=user))
        return reply.message

    async def react(self, session_id: str, seq: int, user: str, reaction: str, *, on: bool = True) -> ReactionReply:
        path = f"/api/v1/sessions/{_segment(session_id)}/messages/{_segment(seq)}/reactions"
        _, reply = await self._call(ReactionReply, "POST", path, {"user": user, "reaction": reaction, "on": on})
        return reply

    async def mark_read(self, session_id: str, user: str, seq: int) -> ReadMarkReply:
        path = f"/api/v1/sessions/{_segment(session_id)}/read"
        _, reply = await self._call(ReadMarkReply, "POST", path, {"user": user, "seq": seq})
        return reply
