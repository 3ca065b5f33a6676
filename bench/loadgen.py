# The load generator: closed-loop request/reply clients in a worker process.
#
# Each client does request -> await its reply -> next request, over a plain
# `websockets` connection, with pre-built request bytes and a minimal msgspec
# decode of the reply: the load generator should cost as little as possible
# next to the server it measures. A run is warm-up then a measured window;
# only replies that arrive inside the window count. A reply that is not the
# expected one (an `error`, a wrong `reply_to`) fails the run.
#
# Revision 1.1's writes (`edit_message`, `react`) target seq 1 of a session
# each client sets up before the clock starts (a session and one message), and
# must store something every time: an edit that leaves the text as it is, or a
# reaction given twice, stores nothing. So these requests come in two pre-built
# variants (edit text A / B; react on / off), picked by the request id's parity
# in the hot loop: `suffixes[request_id & 1]`, one tuple index per request, the
# same for every operation (the 1.0 operations' two variants are the same bytes).

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench.runs import abort_quietly

DOCUMENT_ID = "bench-doc"
SECTIONS = 10  # by default client i works in section "section-{i % SECTIONS}"
TEXT = "benchmark message: the quick brown fox jumps over the lazy dog 0123456789"
TITLE = "bench session"

# Edits alternate between two texts of TEXT's length, both unlike TEXT, so the first edit changes it too.
EDIT_TEXTS = tuple(TEXT.replace("message", f"edit #{variant}") for variant in "AB")
REACTION = "\N{THUMBS UP SIGN}"

EXPECTED = {
    "create_session": "session_created",
    "send_message": "message_ack",
    "edit_message": "message_edited",
    "react": "reaction",
}
NEEDS_SESSION = frozenset({"send_message", "edit_message", "react"})  # a session per client before the clock starts
NEEDS_MESSAGE = frozenset({"edit_message", "react"})  # ... and one message in it, seq 1, which they target


class Reply(msgspec.Struct):
    """Only what the hot loop checks; msgspec skips the rest without building it."""

    type: str
    reply_to: int | str | None = None


class Problem(msgspec.Struct):
    """An unexpected reply, decoded again to say what it was."""

    type: Any = None
    reply_to: Any = None
    code: Any = None
    message: Any = None


class SessionRef(msgspec.Struct):
    session_id: str


class Created(msgspec.Struct):
    type: str
    session: SessionRef | None = None
    reply_to: int | str | None = None
    code: str | None = None
    message: Any = None


decode_reply = msgspec.json.Decoder(Reply).decode
decode_problem = msgspec.json.Decoder(Problem).decode
decode_created = msgspec.json.Decoder(Created).decode


@dataclass
class WorkerSpec:
    url: str
    operation: str
    clients: list[int]  # global client indices this worker drives
    warmup_s: float
    seconds: float
    max_requests: int  # per client, across warm-up and window; a bound, not a target
    sections: int = SECTIONS
    keep_latencies: bool = True


@dataclass
class WorkerResult:
    completed: int = 0  # replies inside the measured window
    total: int = 0  # all replies, warm-up included
    latencies: list[float] = field(default_factory=list)  # seconds, window only
    window_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time during the window
    error: str | None = None


class BenchClientError(Exception):
    pass


def request_prefix(operation: str, index: int, sections: int, session_id: str | None) -> tuple[bytes, bytes]:
    """Request bytes around the id: prefix + str(id) + suffix is one JSON object (the first variant)."""
    prefix, suffixes = request_variants(operation, index, sections, session_id)
    return prefix, suffixes[1]


def request_variants(
    operation: str, index: int, sections: int, session_id: str | None
) -> tuple[bytes, tuple[bytes, bytes]]:
    """(prefix, (suffix for even ids, suffix for odd ids)): prefix + str(id) + suffixes[id & 1] is one JSON object.

    Ids count from 1, so the first request is the odd variant: an edit to text A,
    a reaction given (`on: true`); the next takes it back to B / `on: false`.
    The 1.0 operations have one variant, twice.
    """
    if operation == "create_session":
        bodies = [{"document_id": DOCUMENT_ID, "section_id": f"section-{index % sections}", "title": TITLE}] * 2
    elif operation == "send_message":
        bodies = [{"session_id": session_id, "text": TEXT}] * 2
    elif operation == "edit_message":
        bodies = [{"session_id": session_id, "seq": 1, "text": text} for text in reversed(EDIT_TEXTS)]
    elif operation == "react":
        bodies = [{"session_id": session_id, "seq": 1, "reaction": REACTION, "on": on} for on in (False, True)]
    else:
        raise ValueError(f"unknown operation {operation!r}")
    even, odd = (b"," + msgspec.json.encode(body)[1:] for body in bodies)
    return b'{"type":"' + operation.encode() + b'","id":', (even, odd)


async def open_client(url: str, index: int) -> ClientConnection:
    websocket = await connect(
        f"{url}?name=bench-{index}",
        compression=None,
        max_size=2**20,
        ping_interval=None,
        open_timeout=30,
        close_timeout=5,
    )
    welcome = decode_reply(await websocket.recv(decode=False))
    if welcome.type != "welcome":
        raise BenchClientError(f"client {index}: expected welcome, got {welcome.type}")
    return websocket


async def create_one_session(websocket: ClientConnection, index: int, sections: int) -> str:
    prefix, suffix = request_prefix("create_session", index, sections, None)
    await websocket.send(prefix + b"0" + suffix, text=True)
    reply = decode_created(await websocket.recv(decode=False))
    if reply.type != "session_created" or reply.session is None:
        raise BenchClientError(f"client {index}: create_session failed: {reply.type} {reply.code} {reply.message}")
    return reply.session.session_id


async def send_one_message(websocket: ClientConnection, index: int, session_id: str) -> None:
    """The message at seq 1 that a client's edits and reactions target."""
    prefix, suffix = request_prefix("send_message", index, 1, session_id)
    await websocket.send(prefix + b"0" + suffix, text=True)
    data = await websocket.recv(decode=False)
    reply = decode_reply(data)
    if reply.type != "message_ack" or reply.reply_to != 0:
        problem = decode_problem(data)
        raise BenchClientError(f"client {index}: send_message failed: {problem.type} {problem.code} {problem.message}")


async def run_client(
    websocket: ClientConnection,
    index: int,
    prefix: bytes,
    suffixes: tuple[bytes, bytes],
    expected: str,
    window_start: float,
    window_end: float,
    max_requests: int,
    result: WorkerResult,
    keep_latencies: bool,
) -> None:
    clock = time.perf_counter
    send = websocket.send
    recv = websocket.recv
    latencies = result.latencies
    for request_id in range(1, max_requests + 1):
        started = clock()
        if started >= window_end:
            return
        await send(prefix + str(request_id).encode() + suffixes[request_id & 1], text=True)
        data = await recv(decode=False)
        done = clock()
        reply = decode_reply(data)
        if reply.type != expected or reply.reply_to != request_id:
            problem = decode_problem(data)
            raise BenchClientError(
                f"client {index}: request {request_id} got {problem.type} reply_to={problem.reply_to!r}"
                f" {problem.code or ''} {problem.message if problem.code else ''}".rstrip()
            )
        result.total += 1
        if window_start <= done < window_end:
            result.completed += 1
            if keep_latencies:
                latencies.append(done - started)


async def run_worker(spec: WorkerSpec, ready) -> WorkerResult:
    """Connect, set up, wait for the others (`ready()` blocks), then run warm-up + window."""
    result = WorkerResult()
    websockets = await asyncio.gather(*(open_client(spec.url, index) for index in spec.clients))
    try:
        session_ids: list[str | None] = [None] * len(spec.clients)
        if spec.operation in NEEDS_SESSION:
            session_ids = list(
                await asyncio.gather(
                    *(create_one_session(ws, i, spec.sections) for ws, i in zip(websockets, spec.clients, strict=True))
                )
            )
        if spec.operation in NEEDS_MESSAGE:
            await asyncio.gather(
                *(
                    send_one_message(ws, i, session_id)  # type: ignore[arg-type]
                    for ws, i, session_id in zip(websockets, spec.clients, session_ids, strict=True)
                )
            )
        expected = EXPECTED[spec.operation]
        ready()
        start = time.perf_counter()
        window_start = start + spec.warmup_s
        window_end = window_start + spec.seconds

        async def sample_cpu() -> float:
            await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
            cpu_start = time.process_time()
            await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
            return time.process_time() - cpu_start

        sampler = asyncio.create_task(sample_cpu())
        await asyncio.gather(
            *(
                run_client(
                    ws,
                    index,
                    *request_variants(spec.operation, index, spec.sections, session_id),
                    expected,
                    window_start,
                    window_end,
                    spec.max_requests,
                    result,
                    spec.keep_latencies,
                )
                for ws, index, session_id in zip(websockets, spec.clients, session_ids, strict=True)
            )
        )
        result.cpu_s = await sampler
        result.window_s = spec.seconds
    finally:
        await asyncio.gather(*(ws.close() for ws in websockets), return_exceptions=True)
    return result


def worker_main(spec: WorkerSpec, barrier, results) -> None:
    """Entry point of a load-generator process: put one WorkerResult on `results`."""
    try:
        result = asyncio.run(run_worker(spec, lambda: barrier.wait(timeout=120)))
    except BaseException as error:  # noqa: BLE001 - reported to the driver, which fails the run
        abort_quietly(barrier)
        result = WorkerResult(error=f"{type(error).__name__}: {error}")
    results.put(result)
