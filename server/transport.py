# The WebSocket transport: handshake checks, frames in, chat, frames out.
#
# Thin on purpose: decoding is the codec's, deciding is the chat's. What stays
# here is the connection lifecycle (welcome, a request loop, cleanup that
# always runs) and turning our own bugs into `internal` errors with a trace id.

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from protocol import errors
from protocol.codec import Codec, codec_for_subprotocol
from protocol.errors import ChatError
from protocol.messages import PROTOCOL_VERSION, Error, Limits, Welcome

from .chat import Chat, reply
from .config import Config
from .http import HttpRoutes, response

logger = logging.getLogger("sectionchat.transport")

SERVER_NAME = "sectionchat/0.1.0"
WEBSOCKET_PATH = "/ws"


def valid_name(name: str) -> bool:
    return 1 <= len(name) <= 64 and all(c.isprintable() for c in name)


class Connection:
    """A WebSocket connection as the chat logic's Peer."""

    __slots__ = ("connection_id", "user", "codec", "_websocket", "_send_frame")

    def __init__(self, websocket: ServerConnection, user: str, codec: Codec):
        self.connection_id = secrets.token_hex(8)
        self.user = user
        self.codec = codec
        self._websocket = websocket
        protocol = websocket.protocol
        self._send_frame = protocol.send_binary if codec.binary else protocol.send_text

    def send(self, data: bytes) -> None:
        # What websockets.broadcast() does for one connection: queue the frame
        # in the transport's buffer without awaiting.
        websocket = self._websocket
        if websocket.protocol.state is not State.OPEN:
            return
        self._send_frame(data)
        websocket.send_data()


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
        )
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def process_request(self, websocket: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != WEBSOCKET_PATH:
            return self.routes(url.path)
        if self.config.allowed_origins:
            origin = request.headers.get("Origin")
            if origin not in self.config.allowed_origins:
                return response(403, b"origin not allowed\n", "text/plain; charset=utf-8")
        names = parse_qs(url.query).get("name")
        if names is not None and not valid_name(names[0]):
            return response(400, b"name must be 1-64 printable characters\n", "text/plain; charset=utf-8")
        return None

    @staticmethod
    def select_subprotocol(websocket: ServerConnection, subprotocols: list[str]) -> str | None:
        for offered in subprotocols:
            if offered in ("sectionchat.v1", "sectionchat.v1.msgpack"):
                return offered
        return None

    async def handle(self, websocket: ServerConnection) -> None:
        names = parse_qs(urlsplit(websocket.request.path).query).get("name")
        user = names[0] if names else f"anon-{secrets.token_hex(3)}"
        peer = Connection(websocket, user, codec_for_subprotocol(websocket.subprotocol))
        logger.info("connection %s opened by %s", peer.connection_id, user)
        reply(
            peer,
            Welcome(connection_id=peer.connection_id, user=user, protocol=PROTOCOL_VERSION, server=SERVER_NAME, limits=self.limits),
        )
        try:
            async for data in websocket:
                if self.draining:
                    continue  # the close with 1001 is on its way; the client retries elsewhere
                await self._serve_one(peer, data)
        except ConnectionClosed:
            pass
        finally:
            self.chat.disconnect(peer)
            logger.info(
                "connection %s closed (code %s)",
                peer.connection_id,
                websocket.close_code if websocket.close_code is not None else "none",
            )

    async def _serve_one(self, peer: Connection, data: str | bytes) -> None:
        try:
            request = peer.codec.decode(data)
        except ChatError as error:
            reply(peer, Error(code=error.code, message=error.message, temporary=error.temporary, reply_to=error.reply_to))
            return
        self.in_flight += 1
        self._idle.clear()
        try:
            await self.chat.handle(peer, request)
        except Exception:
            trace_id = uuid.uuid4().hex[:12]
            logger.exception("internal error %s handling %s", trace_id, type(request).__name__)
            message = f"internal error; trace id {trace_id}"
            reply(peer, Error(code=errors.INTERNAL, message=message, temporary=False, reply_to=request.id))
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
