# The baseline: the transport's limit for one request/reply round trip.
#
# A raw `websockets` server with the same transport settings as sectionchat
# (compression off, 64 KiB frames) that, for each text frame, decodes the JSON
# into a typed msgspec Struct and encodes a reply of the same shape and field
# types as sectionchat's (`session_created` {session} or `message_ack`
# {message}, with `reply_to`; revision 1.1's `message_edited` {message} and
# `reaction` {session_id, seq, reaction, user, on, at}) — and does nothing
# else: no validation beyond msgspec's types, no storage, no locks, no uuid4,
# no clock. Whatever sectionchat costs beyond this is its own work.
#
# The 1.0 replies keep the 1.0 shapes (a Session of 8 fields, a Message of 7)
# so that the 1.0 ratios stay comparable with those recorded before 1.1
# (sectionchat's now carry 10 and 11 fields, about 60 bytes more per reply);
# `message_edited` carries the 1.1 Message, as sectionchat's does.
#
# With --durable FILE it is the durable echo: the physical limit of an
# acknowledged write on this disk. Each request's bytes are appended to one
# file and its reply waits until an fdatasync covers them; requests that arrive
# while one sync runs go out together with the next (group commit), the write
# and the sync in a worker thread so the loop goes on reading. Nothing else is
# added: no index, no per-section files, no records of its own.
#
#     python -m bench.echo_server --port 0
#     python -m bench.echo_server --port 0 --durable /var/tmp/echo.log

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys

import msgspec
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bench.runs import EVENT_LOOPS, run_with_loop

MAX_FRAME_BYTES = 65536  # sectionchat's default max_frame_bytes

# Requests: the fields sectionchat's requests have, without its constraints.


class Request(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    id: str | int | None = None


class CreateSession(Request, tag="create_session"):
    document_id: str
    section_id: str
    title: str | None = None
    idempotency_key: str | None = None


class SendMessage(Request, tag="send_message"):
    session_id: str
    text: str
    client_msg_id: str | None = None


class EditMessage(Request, tag="edit_message"):
    session_id: str
    seq: int
    text: str
    mentions: list[str] | None = None


class React(Request, tag="react"):
    session_id: str
    seq: int
    reaction: str
    on: bool = True


class Ping(Request, tag="ping"):
    pass


# Replies: sectionchat's frames, field for field (protocol/messages.py).


class Session(msgspec.Struct):
    session_id: str
    document_id: str
    section_id: str
    title: str | None
    created_by: str
    created_at: str
    closed: bool
    last_seq: int


class Message(msgspec.Struct):
    session_id: str
    seq: int
    message_id: str
    author: str
    text: str
    client_msg_id: str | None
    sent_at: str


class EditedMessage(msgspec.Struct):
    """Revision 1.1's Message (protocol/messages.py), as an edit's reply carries it."""

    session_id: str
    seq: int
    message_id: str
    author: str
    text: str
    client_msg_id: str | None
    sent_at: str
    mentions: list[str]
    edited_at: str | None
    deleted_at: str | None
    reactions: dict[str, list[str]]


class Frame(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    reply_to: str | int | None = None


class Limits(msgspec.Struct):
    max_frame_bytes: int
    max_text_chars: int
    messages_per_s: int


class Welcome(Frame, tag="welcome"):
    connection_id: str
    user: str
    protocol: int
    server: str
    limits: Limits


class SessionCreated(Frame, tag="session_created"):
    session: Session


class MessageAck(Frame, tag="message_ack"):
    message: Message


class MessageEdited(Frame, tag="message_edited"):
    message: EditedMessage


class Reaction(Frame, tag="reaction"):
    session_id: str
    seq: int
    reaction: str
    user: str
    on: bool
    at: str


class Pong(Frame, tag="pong"):
    pass


class Error(Frame, tag="error"):
    code: str
    message: str
    temporary: bool


decode = msgspec.json.Decoder(CreateSession | SendMessage | EditMessage | React | Ping).decode
encode = msgspec.json.Encoder().encode

# Same length and character set as a uuid4 and an RFC 3339 time, without the cost.
_ids = itertools.count(1)
UUID_PREFIX = "00000000-0000-4000-8000-"
TIMESTAMP = "2026-01-01T00:00:00.000Z"


def fake_uuid() -> str:
    return f"{UUID_PREFIX}{next(_ids):012x}"


def greet(websocket: ServerConnection, server: str) -> tuple[str, bytes]:
    """The user named by `?name=` (else "bench") and the encoded welcome frame, as sectionchat sends it."""
    user = "bench"
    for part in websocket.request.path.partition("?")[2].split("&"):
        key, _, value = part.partition("=")
        if key == "name" and value:
            user = value
    welcome = Welcome(
        connection_id=f"{next(_ids):016x}",
        user=user,
        protocol=1,
        server=server,
        limits=Limits(max_frame_bytes=MAX_FRAME_BYTES, max_text_chars=8000, messages_per_s=0),
    )
    return user, encode(welcome)


class GroupCommit:
    """One append-only file; `append` returns once an fdatasync covers its bytes."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pending: list[bytes] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def append(self, data: bytes) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.pending.append(data)
        self.waiters.append(waiter)
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())
        await waiter

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                data, waiters = b"\n".join(self.pending) + b"\n", self.waiters
                self.pending, self.waiters = [], []
                await loop.run_in_executor(None, self._write, data)
                for waiter in waiters:
                    waiter.set_result(None)
        finally:
            self.flusher = None

    def _write(self, data: bytes) -> None:
        os.write(self.fd, data)
        os.fdatasync(self.fd)


journal: GroupCommit | None = None  # set by --durable


async def handle(websocket: ServerConnection) -> None:
    user, welcome = greet(websocket, "echo/0" if journal is None else "durable-echo/0")
    seqs: dict[str, int] = {}
    try:
        await websocket.send(welcome, text=True)
        while True:
            data = await websocket.recv(decode=False)
            try:
                request = decode(data)
            except msgspec.MsgspecError as error:
                reply: Frame = Error(code="bad_request", message=str(error), temporary=False)
            else:
                match request:
                    case CreateSession():
                        session = Session(
                            session_id=fake_uuid(),
                            document_id=request.document_id,
                            section_id=request.section_id,
                            title=request.title,
                            created_by=user,
                            created_at=TIMESTAMP,
                            closed=False,
                            last_seq=0,
                        )
                        reply = SessionCreated(session=session, reply_to=request.id)
                    case SendMessage():
                        seq = seqs[request.session_id] = seqs.get(request.session_id, 0) + 1
                        message = Message(
                            session_id=request.session_id,
                            seq=seq,
                            message_id=fake_uuid(),
                            author=user,
                            text=request.text,
                            client_msg_id=request.client_msg_id,
                            sent_at=TIMESTAMP,
                        )
                        reply = MessageAck(message=message, reply_to=request.id)
                    case EditMessage():
                        edited = EditedMessage(
                            session_id=request.session_id,
                            seq=request.seq,
                            message_id=fake_uuid(),
                            author=user,
                            text=request.text,
                            client_msg_id=None,
                            sent_at=TIMESTAMP,
                            mentions=request.mentions or [],
                            edited_at=TIMESTAMP,
                            deleted_at=None,
                            reactions={},
                        )
                        reply = MessageEdited(message=edited, reply_to=request.id)
                    case React():
                        reply = Reaction(
                            session_id=request.session_id,
                            seq=request.seq,
                            reaction=request.reaction,
                            user=user,
                            on=request.on,
                            at=TIMESTAMP,
                            reply_to=request.id,
                        )
                    case _:
                        reply = Pong(reply_to=request.id)
                if journal is not None and not isinstance(request, Ping):
                    await journal.append(data)
            await websocket.send(encode(reply), text=True)
    except ConnectionClosed:
        pass


async def main(host: str, port: int, backlog: int = 100) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    async with serve(
        handle, host, port, compression=None, max_size=MAX_FRAME_BYTES, server_header=None, backlog=backlog
    ) as server:
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        kind = "echo" if journal is None else "durable echo"
        print(f"{kind} baseline listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="raw websockets + msgspec request/reply baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766, help="0 picks a free port")
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="the same choice as sectionchat's (auto: uvloop when installed)",
    )
    parser.add_argument(
        "--durable",
        metavar="FILE",
        help="append every request to FILE and reply once an fdatasync covers it (group commit)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=100,
        help="the listen backlog (default asyncio's 100; the storm benchmark uses sectionchat's)",
    )
    arguments = parser.parse_args()
    if arguments.durable:
        journal = GroupCommit(arguments.durable)
    run_with_loop(main(arguments.host, arguments.port, arguments.backlog), arguments.event_loop)
