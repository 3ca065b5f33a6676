# The fan-out baseline: raw `websockets` with `websockets.asyncio.server.broadcast()`.
#
# The least a server can do to fan a message out over the same transport:
# sectionchat's frames, field for field, with none of its work. It speaks the
# subset of sectionchat's protocol that the fan-out and memory benchmarks use:
#
#   on open             -> `welcome` (same shape as sectionchat's)
#   `subscribe`         -> adds the connection to the section's set, replies `subscribed`
#   `create_session`    -> `session_created` reply, and the event to the section
#   `send_message`      -> builds the `message` event {message: {7 fields}, offset},
#                          encodes it ONCE with msgspec and hands the bytes to
#                          `broadcast(subscribers, frame, text=True)`, then
#                          replies `message_ack`
#
# No storage, no validation beyond msgspec's types, no presence, no uuid4 or
# clock (ids and timestamps are strings of the same length). Same transport
# settings as sectionchat: compression off, 64 KiB max frame, pings every 20 s
# with a 20 s timeout (each can be changed on the command line).
#
#     python -m bench.broadcast_server --port 0

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import asyncio
import signal
import sys

import msgspec
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from bench.echo_server import (
    MAX_FRAME_BYTES,
    TIMESTAMP,
    Error,
    Frame,
    Message,
    MessageAck,
    Pong,
    Request,
    Session,
    fake_uuid,
    greet,
)
from bench.runs import EVENT_LOOPS, run_with_loop

# Requests (the fields sectionchat's have, without its constraints).


class CreateSession(Request, tag="create_session"):
    document_id: str
    section_id: str
    title: str | None = None
    idempotency_key: str | None = None


class SendMessage(Request, tag="send_message"):
    session_id: str
    text: str
    client_msg_id: str | None = None


class Subscribe(Request, tag="subscribe"):
    document_id: str
    section_id: str
    since_offset: int | None = None
    epoch: str | None = None


class Ping(Request, tag="ping"):
    pass


# Frames that echo_server does not have.


class SessionCreated(Frame, tag="session_created"):
    session: Session
    offset: int | None = None


class MessageEvent(Frame, tag="message"):
    message: Message
    offset: int


class Subscribed(Frame, tag="subscribed"):
    document_id: str
    section_id: str
    epoch: str
    offset: int
    sessions: list[Session]
    presence: list[str]
    recovered: bool
    events: list[MessageEvent]


decode = msgspec.json.Decoder(CreateSession | SendMessage | Subscribe | Ping).decode
encode = msgspec.json.Encoder().encode

EPOCH = "00000000000000000000000000000000"


class Section:
    __slots__ = ("subscribers", "offset", "sessions")

    def __init__(self) -> None:
        self.subscribers: set[ServerConnection] = set()
        self.offset = 0
        self.sessions: list[Session] = []


sections: dict[tuple[str, str], Section] = {}
session_sections: dict[str, tuple[Section, Session]] = {}


def section_for(document_id: str, section_id: str) -> Section:
    section = sections.get((document_id, section_id))
    if section is None:
        section = sections[(document_id, section_id)] = Section()
    return section


async def handle(websocket: ServerConnection) -> None:
    user, welcome = greet(websocket, "broadcast/0")
    subscribed: list[Section] = []
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
                    case SendMessage():
                        found = session_sections.get(request.session_id)
                        if found is None:
                            reply = Error(code="not_found", message="no such session", temporary=False)
                        else:
                            section, session = found
                            session.last_seq += 1
                            section.offset += 1
                            message = Message(
                                session_id=request.session_id,
                                seq=session.last_seq,
                                message_id=fake_uuid(),
                                author=user,
                                text=request.text,
                                client_msg_id=request.client_msg_id,
                                sent_at=TIMESTAMP,
                            )
                            event = encode(MessageEvent(message=message, offset=section.offset))
                            subscribers = section.subscribers
                            if websocket in subscribers:  # like sectionchat: the sender gets the reply, not the event
                                subscribers = subscribers - {websocket}
                            broadcast(subscribers, event, text=True)
                            reply = MessageAck(message=message, reply_to=request.id)
                    case Subscribe():
                        section = section_for(request.document_id, request.section_id)
                        section.subscribers.add(websocket)
                        subscribed.append(section)
                        reply = Subscribed(
                            document_id=request.document_id,
                            section_id=request.section_id,
                            epoch=EPOCH,
                            offset=section.offset,
                            sessions=section.sessions,
                            presence=[],
                            recovered=False,
                            events=[],
                            reply_to=request.id,
                        )
                    case CreateSession():
                        section = section_for(request.document_id, request.section_id)
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
                        section.offset += 1
                        section.sessions.append(session)
                        session_sections[session.session_id] = (section, session)
                        broadcast(
                            section.subscribers - {websocket},
                            encode(SessionCreated(session=session, offset=section.offset)),
                            text=True,
                        )
                        reply = SessionCreated(session=session, reply_to=request.id)
                    case _:
                        reply = Pong(reply_to=request.id)
            await websocket.send(encode(reply), text=True)
    except ConnectionClosed:
        pass
    finally:
        for section in subscribed:
            section.subscribers.discard(websocket)


async def main(arguments: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    async with serve(
        handle,
        arguments.host,
        arguments.port,
        compression=None,
        max_size=arguments.max_size,
        ping_interval=arguments.ping_interval,
        ping_timeout=arguments.ping_timeout,
        server_header=None,
    ) as server:
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        print(
            f"broadcast baseline listening on {bound_host}:{bound_port} ({type(loop).__module__.split('.')[0]} loop)",
            file=sys.stderr,
            flush=True,
        )
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.broadcast_server",
        description="raw websockets + broadcast() fan-out baseline (sectionchat's frames, none of its work)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8767, help="0 picks a free port")
    parser.add_argument("--max-size", type=int, default=MAX_FRAME_BYTES, help="largest frame accepted (default 65536)")
    parser.add_argument("--ping-interval", type=float, default=20.0, help="seconds between pings (default 20)")
    parser.add_argument(
        "--ping-timeout", type=float, default=20.0, help="seconds a ping may go unanswered (default 20)"
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="auto (uvloop when installed, like sectionchat), uvloop or asyncio",
    )
    arguments = parser.parse_args()
    run_with_loop(main(arguments), arguments.event_loop)
