# The load generator: closed-loop request/reply clients in a worker process.
#
# Each client does request -> await its reply -> next request, over a plain
# `websockets` connection, with pre-built request bytes and a minimal msgspec
# decode of the reply: the load generator should cost as little as possible
# next to the server it measures. A run is warm-up then a measured window;
# only replies that arrive inside the window count. A reply that is not the
# expected one (an `error`, a wrong `reply_to`) fails the run.

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

DOCUMENT_ID = "bench-doc"
SECTIONS = 10  # by default client i works in section "section-{i % SECTIONS}"
TEXT = "benchmark message: the quick brown fox jumps over the lazy dog 0123456789"
TITLE = "bench session"

EXPECTED = {"create_session": "session_created", "send_message": "message_ack"}


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
    """Request bytes around the id: prefix + str(id) + suffix is one JSON object."""
    if operation == "create_session":
        body = msgspec.json.encode(
            {"document_id": DOCUMENT_ID, "section_id": f"section-{index % sections}", "title": TITLE}
        )
    elif operation == "send_message":
        body = msgspec.json.encode({"session_id": session_id, "text": TEXT})
    else:
        raise ValueError(f"unknown operation {operation!r}")
    return b'{"type":"' + operation.encode() + b'","id":', b"," + body[1:]


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


async def run_client(
    websocket: ClientConnection,
    index: int,
    prefix: bytes,
    suffix: bytes,
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
        await send(prefix + str(request_id).encode() + suffix, text=True)
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
        if spec.operation == "send_message":
            session_ids = list(
                await asyncio.gather(
                    *(create_one_session(ws, i, spec.sections) for ws, i in zip(websockets, spec.clients, strict=True))
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
                    *request_prefix(spec.operation, index, spec.sections, session_id),
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
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        result = WorkerResult(error=f"{type(error).__name__}: {error}")
    results.put(result)
