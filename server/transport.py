# The WebSocket transport: handshake checks, frames in, chat, frames out.
#
# Thin on purpose: decoding is the codec's, deciding is the chat's. What stays
# here is the connection lifecycle (welcome, a request loop, cleanup that
# always runs) and turning our own bugs into `internal` errors with a trace id.

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any, get_args
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from protocol import errors
from protocol.codec import SUBPROTOCOLS, Codec, codec_for_subprotocol
from protocol.errors import ChatError
from protocol.messages import PROTOCOL_VERSION, ClientRequest, Error, Limits, RequestId, Welcome

from . import __version__
from .auth import MODERATOR, AuthError, Identity, authenticate, bearer_token
from .chat import Chat
from .config import Config
from .http import HttpRoutes, method_not_allowed, response
from .limits import RequestRate
from .peer import reply

logger = logging.getLogger("sectionchat.transport")

SERVER_NAME = f"sectionchat/{__version__}"
WEBSOCKET_PATH = "/ws"
CLOSE_POLICY_VIOLATION = 1008
CLOSE_SLOW_CONSUMER = 4008


def valid_name(name: str) -> bool:
    return 1 <= len(name) <= 64 and all(c.isprintable() for c in name)


def _text(status: int, message: str) -> Response:
    return response(status, message.encode() + b"\n", "text/plain; charset=utf-8")


class IdentifiedConnection(ServerConnection):
    """websockets' connection, with who the handshake said is on the other end (serve's create_connection)."""

    identity: Identity | None = None


class Connection:
    """A WebSocket connection as the chat logic's Peer."""

    __slots__ = (
        "connection_id", "user", "documents", "moderator", "codec", "_websocket", "_send_frame", "_transport", "_closing",
    )  # fmt: skip

    def __init__(self, websocket: IdentifiedConnection, identity: Identity, codec: Codec, transport: Transport):
        self.connection_id = secrets.token_hex(8)
        self.user = identity.user
        self.documents = identity.documents
        self.moderator = identity.moderator
        self.codec = codec
        self._websocket = websocket
        protocol = websocket.protocol
        self._send_frame = protocol.send_binary if codec.binary else protocol.send_text
        self._transport = transport
        self._closing: asyncio.Task[None] | None = None

    def send(self, data: bytes) -> None:
        # What websockets.broadcast() does for one connection: queue the frame
        # in the transport's buffer without awaiting. That buffer is the
        # connection's outgoing queue; past its bound the reader is too slow.
        websocket = self._websocket
        if websocket.protocol.state is not State.OPEN:
            return
        # A backlog past the bound means the reader is too slow; one large frame
        # (a recovery reply) on an empty buffer does not.
        if websocket.transport.get_write_buffer_size() > self._transport.config.max_outgoing_bytes:
            logger.warning("connection %s of %s cannot keep up: closing with 4008", self.connection_id, self.user)
            self._transport.metrics.slow_consumers.inc()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        self._send_frame(data)
        websocket.send_data()

    @property
    def closing(self) -> bool:
        return self._closing is not None

    def stored(self, records: int) -> None:
        pass  # the reply says it all

    def close(self, code: int, reason: str) -> None:
        """Start closing now (nothing more is queued after the close frame), finish in the background."""
        websocket = self._websocket
        if websocket.protocol.state is State.OPEN:
            websocket.protocol.send_close(code, reason)
            websocket.send_data()
        if self._closing is None:
            # close() waits for the peer's close frame, up to close_timeout, then aborts.
            self._closing = asyncio.get_running_loop().create_task(websocket.close())


class Transport:
    """The websockets handler and handshake hook for one Chat."""

    def __init__(self, chat: Chat, config: Config, routes: HttpRoutes):
        self.chat = chat
        self.config = config
        self.routes = routes
        self.limits = Limits(
            max_frame_bytes=config.max_frame_bytes,
            max_text_chars=config.max_text_chars,
            messages_per_s=int(config.rate_limit) if config.rate_limit == int(config.rate_limit) else config.rate_limit,
            max_subscriptions=config.max_subscriptions,
        )
        self.metrics = chat.metrics
        # Histogram children resolved once: labels() costs a lock and a dict lookup per call.
        self._request_seconds = {
            kind: self.metrics.request_seconds.labels(kind.__struct_config__.tag) for kind in get_args(ClientRequest)
        }
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._connections_per_user: Counter[str] = Counter()

    async def process_request(self, websocket: ServerConnection, request: Request) -> Response | None:
        """Answer plain HTTP, or check a WebSocket handshake (origin, identity, connection count)."""
        url = urlsplit(request.path)
        # Request.method is websockets >= 15; older versions refuse every other method while parsing.
        method = getattr(request, "method", "GET")
        if url.path != WEBSOCKET_PATH:
            return await self.routes(url.path, method)
        if method != "GET":
            # websockets would say the same after our checks; say it before them.
            return method_not_allowed(("GET",))
        origin = request.headers.get("Origin")
        # Browsers always send Origin; only they can be hijacked cross-site.
        if self.config.allowed_origins and origin is not None and origin not in self.config.allowed_origins:
            return _text(403, "origin not allowed")
        query = parse_qs(url.query)
        if self.config.auth_secret:
            try:
                identity = authenticate(bearer_token(query, request.headers), self.config.auth_secret, valid_name)
            except AuthError as error:
                denied = _text(401, str(error))
                denied.headers["WWW-Authenticate"] = "Bearer"
                return denied
        else:
            names = query.get("name")
            if names is not None and not valid_name(names[0]):
                return _text(400, "name must be 1-64 printable characters")
            identity = Identity(names[0] if names else f"anon-{secrets.token_hex(3)}", None)
        limit = self.config.max_connections_per_user
        if limit and self._connections_per_user[identity.user] >= limit:
            return _text(429, f"too many connections for this user (limit {limit})")
        assert isinstance(websocket, IdentifiedConnection), "serve() is given create_connection=IdentifiedConnection"
        websocket.identity = identity
        return None

    @staticmethod
    def select_subprotocol(websocket: ServerConnection, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        return next((offered for offered in subprotocols if offered in SUBPROTOCOLS), None)

    async def handle(self, websocket: ServerConnection) -> None:
        assert isinstance(websocket, IdentifiedConnection) and websocket.identity is not None, "set by process_request"
        identity = websocket.identity
        codec = codec_for_subprotocol(websocket.subprotocol)
        peer = Connection(websocket, identity, codec, self)
        rate = RequestRate(self.config.rate_limit) if self.config.rate_limit > 0 else None
        self._connections_per_user[peer.user] += 1
        self.metrics.connections.inc()
        logger.info("connection %s opened by %s", peer.connection_id, peer.user)
        reply(
            peer,
            Welcome(
                connection_id=peer.connection_id,
                user=peer.user,
                protocol=PROTOCOL_VERSION,
                server=SERVER_NAME,
                limits=self.limits,
                roles=[MODERATOR] if peer.moderator else [],
            ),
        )
        self.chat.connect(peer)
        try:
            async for data in websocket:
                await self._serve_one(peer, data, rate)
        except ConnectionClosed:
            pass
        finally:
            self.chat.disconnect(peer)
            self.metrics.connections.dec()
            self._connections_per_user[peer.user] -= 1
            if self._connections_per_user[peer.user] <= 0:
                del self._connections_per_user[peer.user]
            logger.info(
                "connection %s closed (code %s)",
                peer.connection_id,
                websocket.close_code if websocket.close_code is not None else "none",
            )

    async def _serve_one(self, peer: Connection, data: str | bytes, rate: RequestRate | None) -> None:
        # The rate comes first, before any decoding: every frame costs a token,
        # malformed ones too, so a flood of garbage is refused (and then closed)
        # as cheaply as a flood of requests.
        if rate is not None and not rate.allow():
            self._refuse_over_rate(peer, data, rate)
            return
        try:
            request = peer.codec.decode(data)
        except ChatError as error:
            self.metrics.errors.labels(error.code).inc()
            reply(
                peer, Error(code=error.code, message=error.message, temporary=error.temporary, reply_to=error.reply_to)
            )
            return
        if self.draining:
            # The close with 1001 is on its way; say so, so the client knows nothing was done.
            self.metrics.errors.labels(errors.UNAVAILABLE).inc()
            message = "the server is shutting down; nothing was done; retry after reconnecting"
            reply(peer, Error(code=errors.UNAVAILABLE, message=message, temporary=True, reply_to=request.id))
            return
        self.in_flight += 1
        self._idle.clear()
        started = time.perf_counter()
        try:
            await self.chat.handle(peer, request)
        except Exception:
            trace_id = uuid.uuid4().hex[:12]
            logger.exception("internal error %s handling %s", trace_id, type(request).__name__)
            self.metrics.errors.labels(errors.INTERNAL).inc()
            message = f"internal error; trace id {trace_id}"
            reply(peer, Error(code=errors.INTERNAL, message=message, temporary=False, reply_to=request.id))
        finally:
            self._request_seconds[type(request)].observe(time.perf_counter() - started)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _refuse_over_rate(self, peer: Connection, data: str | bytes, rate: RequestRate) -> None:
        """A frame over the connection's rate: `rate_limited`, or a 1008 close once it keeps on."""
        if peer.closing:
            return  # frames that were on their way when we closed: nobody is left to tell
        if rate.strike():
            logger.warning(
                "connection %s of %s keeps exceeding the rate limit: closing with 1008", peer.connection_id, peer.user
            )
            self.metrics.rate_limit_closes.inc()
            peer.close(CLOSE_POLICY_VIOLATION, "rate limit exceeded")
            return
        message = f"more than {self.limits.messages_per_s} requests per second; slow down"
        self.metrics.errors.labels(errors.RATE_LIMITED).inc()
        reply(
            peer,
            Error(code=errors.RATE_LIMITED, message=message, temporary=True, reply_to=_request_id(peer.codec, data)),
        )

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _IdOnly(msgspec.Struct):
    """All a refused frame is read for: its `id`, so the client can match the refusal (other fields are skipped unchecked)."""

    id: Any = None


_ID_DECODERS: dict[bool, Any] = {False: msgspec.json.Decoder(_IdOnly), True: msgspec.msgpack.Decoder(_IdOnly)}


def _request_id(codec: Codec, data: str | bytes) -> RequestId | None:
    """The frame's `id` when it has a valid one, else None; never a full decode of the request."""
    if isinstance(data, str) == codec.binary:
        return None  # the wrong kind of frame for this connection: nothing in it is addressable
    try:
        value = _ID_DECODERS[codec.binary].decode(data).id
    except (msgspec.MsgspecError, RecursionError, UnicodeError, ValueError):
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and 1 <= len(value) <= 64):
        return value
    return None
