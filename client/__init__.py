"""A small scripting client for sectionchat: connect, request, collect events.

    async with ScriptClient.connect("ws://127.0.0.1:8765/ws", name="alice") as alice:
        reply = await alice.request("create_session", document_id="spec-7", section_id="intro")
        event = await alice.next_event("message")

Frames are plain dicts, exactly as they travel on the wire, so a test can
assert on them field by field. `request` returns the reply to its own `id`
(an `error` frame included); `call` does the same but raises `RequestFailed`
for errors. Events (frames without `reply_to`) queue up in arrival order;
`next_event(type)` takes the first of a type and leaves the others queued.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol.codec import MSGPACK_SUBPROTOCOL

__all__ = ["ScriptClient", "RequestFailed"]

Frame = dict[str, Any]


class RequestFailed(Exception):
    """The server answered a request with an `error` frame."""

    def __init__(self, frame: Frame):
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code = frame.get("code")


class ScriptClient:
    """One WebSocket connection to a sectionchat server."""

    def __init__(self, websocket: ClientConnection):
        self.websocket = websocket
        self.welcome: Frame = {}
        self.events: list[Frame] = []
        self._arrival = asyncio.Event()
        self._pending: dict[Any, asyncio.Future[Frame]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._binary = websocket.subprotocol == MSGPACK_SUBPROTOCOL

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **options: Any) -> AsyncIterator[ScriptClient]:
        """`open` for the length of an `async with` block; takes the same arguments."""
        client = await cls.open(url, **options)
        try:
            yield client
        finally:
            await client.close()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        name: str | None = None,
        subprotocol: str | None = None,
        timeout: float = 10.0,
        **options: Any,
    ) -> ScriptClient:
        if name is not None:
            url += ("&" if "?" in url else "?") + "name=" + quote(name)
        if subprotocol is not None:
            options["subprotocols"] = [subprotocol]
        options.setdefault("max_size", None)  # recovery replies can be large
        websocket = await connect(url, open_timeout=timeout, compression=None, **options)
        client = cls(websocket)
        first = await asyncio.wait_for(client._receive(), timeout)
        if first.get("type") != "welcome":
            raise AssertionError(f"expected welcome, got {first}")
        client.welcome = first
        client._reader = asyncio.create_task(client._read())
        return client

    @property
    def user(self) -> str:
        return self.welcome["user"]

    async def _receive(self) -> Frame:
        data = await self.websocket.recv()
        if isinstance(data, bytes):
            return msgspec.msgpack.decode(data)
        return msgspec.json.decode(data)

    async def _read(self) -> None:
        try:
            while True:
                frame = await self._receive()
                future = self._pending.pop(frame["reply_to"], None) if "reply_to" in frame else None
                if future is not None and not future.done():
                    future.set_result(frame)
                else:
                    self.events.append(frame)
                    self._arrival.set()
        except ConnectionClosed as closed:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(closed)

    async def send_raw(self, data: str | bytes) -> None:
        """Send a frame exactly as given (for testing how the server treats bad input)."""
        await self.websocket.send(data)

    async def send(self, frame: Frame) -> None:
        await self.websocket.send(
            msgspec.msgpack.encode(frame) if self._binary else msgspec.json.encode(frame).decode()
        )

    async def request(self, type: str, *, timeout: float = 10.0, **fields: Any) -> Frame:
        """Send a request with a fresh `id` and return the reply to it (errors included)."""
        request_id = fields.pop("id") if "id" in fields else next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.send({"type": type, "id": request_id, **fields})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: a failure is reported once, by whoever raised

    async def call(self, type: str, *, timeout: float = 10.0, **fields: Any) -> Frame:
        """Like `request`, but an `error` reply raises RequestFailed."""
        frame = await self.request(type, timeout=timeout, **fields)
        if frame["type"] == "error":
            raise RequestFailed(frame)
        return frame

    async def next_event(self, type: str | None = None, *, timeout: float = 5.0) -> Frame:
        """Take the first queued event (of `type`, if given), waiting up to `timeout` for it."""

        async def wait() -> Frame:
            while True:
                for index, frame in enumerate(self.events):
                    if type is None or frame.get("type") == type:
                        return self.events.pop(index)
                self._arrival.clear()
                await self._arrival.wait()

        return await asyncio.wait_for(wait(), timeout)

    async def next_events(self, type: str, count: int, *, timeout: float = 5.0) -> list[Frame]:
        """Take `count` events of `type`, in arrival order."""
        return [await self.next_event(type, timeout=timeout) for _ in range(count)]

    def take_events(self) -> list[Frame]:
        """The events received so far, removed from the queue."""
        frames, self.events = self.events, []
        return frames

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        """Wait for the server to close the connection; return the close code."""
        await asyncio.wait_for(self.websocket.wait_closed(), timeout)
        return self.websocket.close_code

    async def close(self) -> None:
        await self.websocket.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
