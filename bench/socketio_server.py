# The other fan-out baseline: python-socketio's AsyncServer on aiohttp, emitting
# to a room — what a Python team would otherwise pick for a chat server.
#
# Same events, same payloads as sectionchat (as Socket.IO events with acks):
#
#   connect (Engine.IO open + Socket.IO CONNECT)      -> nothing more
#   "subscribe" {document_id, section_id}             -> enter_room; ack {"type":"subscribed",…}
#   "create_session" {document_id, section_id, title} -> ack {"type":"session_created","session":{…}}
#   "send_message" {session_id, text}                 -> emit("message", {"type":"message",
#                                                        "message":{7 fields},"offset":N}, to=room,
#                                                        skip_sid=sender); ack {"type":"message_ack",…}
#
# python-socketio encodes a room emit once (stdlib json) and queues the packet
# to every member through a task each; every Engine.IO socket has its own
# writer task. WebSocket compression is off (clients offer none); ping
# interval 20 s like sectionchat (Engine.IO default is 25 s).
#
#     python -m bench.socketio_server --port 0

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import asyncio
import itertools
import logging
import signal
import sys

import socketio
from aiohttp import web

from bench.echo_server import MAX_FRAME_BYTES, TIMESTAMP, UUID_PREFIX
from bench.runs import EVENT_LOOPS, run_with_loop

EIO_PATH = "/socket.io/"

_ids = itertools.count(1)


def fake_uuid() -> str:
    return f"{UUID_PREFIX}{next(_ids):012x}"


def build(ping_interval: float, ping_timeout: float, max_size: int) -> tuple[socketio.AsyncServer, web.Application]:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        max_http_buffer_size=max_size,
        cors_allowed_origins=[],  # no Origin check (the benchmark's clients send none)
        logger=False,
        engineio_logger=False,
    )
    app = web.Application()
    sio.attach(app, socketio_path=EIO_PATH)
    offsets: dict[str, int] = {}
    sessions: dict[str, tuple[str, dict]] = {}

    def room_of(document_id: str, section_id: str) -> str:
        return f"{document_id}\x00{section_id}"

    @sio.event
    async def subscribe(sid: str, data: dict) -> dict:
        room = room_of(data["document_id"], data["section_id"])
        await sio.enter_room(sid, room)
        return {
            "type": "subscribed",
            "document_id": data["document_id"],
            "section_id": data["section_id"],
            "epoch": "0" * 32,
            "offset": offsets.get(room, 0),
            "sessions": [],
            "presence": [],
            "recovered": False,
            "events": [],
        }

    @sio.event
    async def create_session(sid: str, data: dict) -> dict:
        room = room_of(data["document_id"], data["section_id"])
        session = {
            "session_id": fake_uuid(),
            "document_id": data["document_id"],
            "section_id": data["section_id"],
            "title": data.get("title"),
            "created_by": sid,
            "created_at": TIMESTAMP,
            "closed": False,
            "last_seq": 0,
        }
        sessions[session["session_id"]] = (room, session)
        offset = offsets[room] = offsets.get(room, 0) + 1
        await sio.emit(
            "session_created", {"type": "session_created", "session": session, "offset": offset}, to=room, skip_sid=sid
        )
        return {"type": "session_created", "session": session}

    @sio.event
    async def send_message(sid: str, data: dict) -> dict:
        found = sessions.get(data["session_id"])
        if found is None:
            return {"type": "error", "code": "not_found", "message": "no such session", "temporary": False}
        room, session = found
        session["last_seq"] += 1
        offset = offsets[room] = offsets[room] + 1
        message = {
            "session_id": data["session_id"],
            "seq": session["last_seq"],
            "message_id": fake_uuid(),
            "author": sid,
            "text": data["text"],
            "client_msg_id": data.get("client_msg_id"),
            "sent_at": TIMESTAMP,
        }
        await sio.emit("message", {"type": "message", "message": message, "offset": offset}, to=room, skip_sid=sid)
        return {"type": "message_ack", "message": message}

    return sio, app


async def main(arguments: argparse.Namespace) -> None:
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _sio, app = build(arguments.ping_interval, arguments.ping_timeout, arguments.max_size)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, arguments.host, arguments.port)
    await site.start()
    bound_host, bound_port = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    print(
        f"socketio baseline listening on {bound_host}:{bound_port} ({type(loop).__module__.split('.')[0]} loop)",
        file=sys.stderr,
        flush=True,
    )
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    try:
        await stop
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.socketio_server",
        description="python-socketio AsyncServer (aiohttp) fan-out baseline: emit to a room",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8768, help="0 picks a free port")
    parser.add_argument(
        "--max-size", type=int, default=MAX_FRAME_BYTES, help="largest message accepted (default 65536)"
    )
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
