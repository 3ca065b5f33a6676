# A minimal WebSocket client for load generation: many connections, little CPU.
#
# The fan-out and memory benchmarks open hundreds to thousands of connections
# from a few processes on a 2-core machine, and in the fan-out benchmark those
# connections receive tens of thousands of frames per second. A full client
# library (websockets' asyncio client, python-socketio's AsyncClient on
# aiohttp) costs a task, a queue and several layers per frame; this one is an
# asyncio.Protocol that parses the server's (unmasked) frames straight out of
# `data_received` and hands each text payload to a callback. It speaks just
# enough of RFC 6455 for a benchmark: the opening handshake (checked), text
# and binary frames, fragmentation, ping -> pong, close. Client frames are
# masked with an all-zero key, which the RFC allows (the key "should" be
# unpredictable; servers accept any key), so sending costs no masking work.
#
# The same client serves all three servers under test (sectionchat, the raw
# websockets broadcast baseline and python-socketio, whose Engine.IO protocol
# runs over plain WebSocket text frames), so their figures share one client
# cost.

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import resource
import struct
from collections.abc import Callable
from time import time_ns

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class HandshakeError(Exception):
    pass


# on_text(client, payload, received_ns): received_ns is time.time_ns() taken once
# per data_received call, i.e. when that data reached the process.
TextHandler = Callable[["LightClient", bytes, int], None]


class LightClient(asyncio.Protocol):
    """One WebSocket connection; text payloads go to `on_text`."""

    def __init__(self, host: str, port: int, path: str, on_text: TextHandler, state: object = None):
        self.host = host
        self.port = port
        self.path = path
        self.on_text = on_text
        self.state = state  # whatever the caller keeps per connection
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._key = base64.b64encode(os.urandom(16))
        self._open = False
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = 0

    # Connection -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not an asyncio.Transport subclass
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(f"connection lost during the handshake: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def _handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            raise HandshakeError(f"handshake refused: {lines[0].decode(errors='replace')}")
        accept = base64.b64encode(hashlib.sha1(self._key + GUID).digest())
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"sec-websocket-accept") != accept:
            raise HandshakeError("bad Sec-WebSocket-Accept")
        self._open = True
        self.opened.set_result(None)

    # Receiving --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        if not self._open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                buffer += data
                return
            try:
                self._handshake(data[:end])
            except HandshakeError as error:
                self.opened.set_exception(error)
                self.transport.abort()  # type: ignore[union-attr]
                return
            data = data[end + 4 :]
        now = time_ns()
        size = len(data)
        i = 0
        on_text = self.on_text
        while size - i >= 2:
            b0 = data[i]
            length = data[i + 1]
            if length & 0x80:
                self._fail(1002, "masked frame from the server")
                return
            start = i + 2
            if length == 126:
                if size - i < 4:
                    break
                length = (data[i + 2] << 8) | data[i + 3]
                start = i + 4
            elif length == 127:
                if size - i < 10:
                    break
                length = int.from_bytes(data[i + 2 : i + 10], "big")
                start = i + 10
            end = start + length
            if end > size:
                break
            if b0 == 0x81:  # the hot path: a whole text frame
                on_text(self, data[start:end], now)
            else:
                self._other(b0, data[start:end], now)
            i = end
        if i < size:
            buffer += data[i:]

    def _other(self, b0: int, payload: bytes, now: int) -> None:
        opcode, fin = b0 & 0x0F, b0 & 0x80
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self.on_text(self, payload, now)
            else:
                self._fragments, self._fragment_opcode = [payload], opcode
        elif opcode == OP_CONTINUATION and self._fragments is not None:
            self._fragments.append(payload)
            if fin:
                whole, self._fragments = b"".join(self._fragments), None
                self.on_text(self, whole, now)
        elif opcode == OP_PING:
            self._send_frame(0x80 | OP_PONG, payload)
        elif opcode == OP_CLOSE:
            if self.close_code is None:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode(errors="replace")
                self._send_frame(0x80 | OP_CLOSE, payload[:2])
            if self.transport is not None:
                self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        self.close_code = code
        self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # Sending ----------------------------------------------------------------

    def _send_frame(self, first: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            header = bytes((first, 0x80 | n))
        elif n < 65536:
            header = struct.pack("!BBH", first, 0xFE, n)
        else:
            header = struct.pack("!BBQ", first, 0xFF, n)
        transport.write(header + b"\0\0\0\0" + payload)  # zero mask key: payload unchanged

    def send_text(self, payload: bytes) -> None:
        self._send_frame(0x80 | OP_TEXT, payload)

    def close(self, code: int = 1000) -> None:
        """Send a close frame and close the TCP connection (no wait for the server's close frame)."""
        if self.transport is not None and not self.transport.is_closing():
            self._send_frame(0x80 | OP_CLOSE, code.to_bytes(2, "big"))
            self.transport.close()

    @property
    def is_open(self) -> bool:
        return self._open and self.transport is not None and not self.transport.is_closing()


async def connect(
    host: str, port: int, path: str, on_text: TextHandler, state: object = None, timeout: float = 30.0
) -> LightClient:
    loop = asyncio.get_running_loop()
    client = LightClient(host, port, path, on_text, state)
    async with asyncio.timeout(timeout):
        await loop.create_connection(lambda: client, host, port)
        await client.opened
    return client


async def connect_many(count: int, open_one: Callable[[int], object], concurrency: int = 25) -> list:
    """Run `open_one(i)` (a coroutine function) for i in range(count), at most `concurrency` at a time.

    The servers listen with asyncio's default backlog of 100; thousands of
    simultaneous connects overflow it and cost 1 s SYN retransmissions.
    """
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int):
        async with semaphore:
            return await open_one(i)  # type: ignore[misc]

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def raise_fd_limit(wanted: int | None = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (or `wanted`); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None or hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target != resource.RLIM_INFINITY and target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
