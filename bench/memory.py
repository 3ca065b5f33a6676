# Memory benchmark: server RSS per idle connection at 5,000 connections,
# sectionchat against a raw `websockets` server with the same settings
# (bench/broadcast_server.py: compression off, 64 KiB max frame, pings every
# 20 s with a 20 s timeout — sectionchat's defaults), alternating runs.
#
#     .venv/bin/python -m bench.memory                      # defaults: 5,000 connections, 3 runs each
#     .venv/bin/python -m bench.memory --targets sectionchat,raw,socketio
#
# Each run: start the server, let it settle, read its VmRSS (/proc/PID/status)
# — "before"; open the connections from --procs load-generator processes and
# wait until every one has its `welcome` (python-socketio: its CONNECT), let it
# settle, read VmRSS — "idle"; then subscribe every connection to one section
# (connection i to section-(i % --sections)), wait for every `subscribed`
# reply, let presence frames drain and settle, read VmRSS — "subscribed".
# Per connection = (idle − before) / N and (subscribed − before) / N. VmRSS counts
# the server's user-space memory (Python objects, buffers, allocator slack), not
# the kernel's socket buffers.

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import asyncio
import json
import multiprocessing
import queue
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from bench import runs as R
from bench import wsclient
from bench.fanload import decode_head, ws_path
from bench.fanout import server_for
from bench.harness import BenchError, ServerProcess, markdown_table, median, remove, run_main, scratch_dir

TARGETS = ("sectionchat", "raw", "socketio")
DEFAULT_TARGETS = list(TARGETS)
DOCUMENT_ID = "bench-doc"
TARGET_RATIO = 1.3  # issue 6: memory per idle connection ≤ 1.3 × raw websockets


# Load generator (worker processes) -----------------------------------------------


@dataclass
class WorkerSpec:
    target: str
    host: str
    port: int
    indices: list[int]
    sections: int
    concurrency: int = 25


class Conn:
    __slots__ = ("opened", "subscribed", "subscribe_frame")

    def __init__(self, loop: asyncio.AbstractEventLoop, subscribe_frame: bytes):
        self.opened = loop.create_future()
        self.subscribed = loop.create_future()
        self.subscribe_frame = subscribe_frame


def _settle(future: asyncio.Future, error: str | None = None) -> None:
    if not future.done():
        if error:
            future.set_exception(RuntimeError(error))
        else:
            future.set_result(None)


def on_json(client: wsclient.LightClient, payload: bytes, now: int) -> None:
    conn: Conn = client.state  # type: ignore[assignment]
    if conn.subscribed.done() and b'"presence"' in payload[:20]:
        return
    head = decode_head(payload)
    if head.type == "welcome":
        _settle(conn.opened)
    elif head.type == "subscribed":
        _settle(conn.subscribed)
    elif head.type == "error":
        _settle(conn.opened if not conn.opened.done() else conn.subscribed, f"error {head.code}: {head.message}")


def on_socketio(client: wsclient.LightClient, payload: bytes, now: int) -> None:
    conn: Conn = client.state  # type: ignore[assignment]
    if payload == b"2":
        client.send_text(b"3")
    elif payload[:1] == b"0":
        client.send_text(b"40")
    elif payload[:2] == b"40":
        _settle(conn.opened)
    elif payload[:3] == b"431":
        _settle(conn.subscribed)
    elif payload[:2] == b"44":
        _settle(conn.opened, f"socket.io connect error {payload[:200]!r}")


def subscribe_frame(target: str, section: str) -> bytes:
    if target == "socketio":
        return b"421" + json.dumps(["subscribe", {"document_id": DOCUMENT_ID, "section_id": section}]).encode()
    return msgspec.json.encode({"type": "subscribe", "id": 1, "document_id": DOCUMENT_ID, "section_id": section})


async def subscribe_all(clients: list[wsclient.LightClient], concurrency: int) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def subscribe(client: wsclient.LightClient) -> None:
        async with semaphore:
            conn: Conn = client.state  # type: ignore[assignment]
            client.send_text(conn.subscribe_frame)
            async with asyncio.timeout(60):
                await conn.subscribed

    await asyncio.gather(*(subscribe(c) for c in clients))


async def run_worker(spec: WorkerSpec, commands, results) -> None:
    wsclient.raise_fd_limit()
    loop = asyncio.get_running_loop()
    handler = on_socketio if spec.target == "socketio" else on_json

    async def open_one(i: int) -> wsclient.LightClient:
        index = spec.indices[i]
        conn = Conn(loop, subscribe_frame(spec.target, f"section-{index % spec.sections}"))
        client = await wsclient.connect(spec.host, spec.port, ws_path(spec.target, f"idle-{index}"), handler, conn)
        async with asyncio.timeout(60):
            await conn.opened
        return client

    clients: list[wsclient.LightClient] = []
    try:
        clients = await wsclient.connect_many(len(spec.indices), open_one, spec.concurrency)
        results.put(("opened", len(clients), None))
        while True:
            command = await asyncio.to_thread(commands.get, True, 600)
            if command == "subscribe":
                await subscribe_all(clients, spec.concurrency * 4)
                results.put(("subscribed", len(clients), None))
            elif command == "check":
                lost = sum(not c.is_open for c in clients)
                results.put(("checked", lost, None))
            else:
                break
    except BaseException as error:  # noqa: BLE001 - reported to the driver
        results.put(("error", 0, f"{type(error).__name__}: {error}"))
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.1)


def worker_main(spec: WorkerSpec, commands, results) -> None:
    asyncio.run(run_worker(spec, commands, results))


# Driver ----------------------------------------------------------------------------


@dataclass
class MemoryRun:
    target: str
    connections: int
    index: int
    before_bytes: int
    idle_bytes: int
    subscribed_bytes: int | None
    per_idle: float  # (idle − before) / connections
    per_subscribed: float | None  # (subscribed − before) / connections
    open_s: float  # time to open every connection
    lost: int  # connections that were closed before the end


@dataclass
class Summary:
    connections: int
    runs: dict[str, list[MemoryRun]] = field(default_factory=dict)

    def values(self, target: str, name: str) -> list[float]:
        return [v for v in (getattr(run, name) for run in self.runs.get(target, [])) if v is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description="server RSS per idle connection: sectionchat vs a raw websockets server with the same settings",
    )
    parser.add_argument(
        "--connections",
        type=lambda t: R.parse_counts(t, 1, 18000),
        default=[5000],
        help="idle connections; a list runs each (default 5000)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per server, alternating (default 3)")
    parser.add_argument(
        "--targets",
        type=R.parse_names(TARGETS),
        default=DEFAULT_TARGETS,
        help="comma-separated (default sectionchat,raw,socketio)",
    )
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes (default 4)")
    parser.add_argument(
        "--sections",
        type=int,
        default=100,
        help="subscribed phase: connection i subscribes to section-(i %% SECTIONS) (default 100)",
    )
    parser.add_argument("--no-subscribe", action="store_true", help="measure idle connections only")
    parser.add_argument("--settle", type=float, default=1.0, help="pause before each RSS reading (default 1 s)")
    parser.add_argument(
        "--data-root", default=None, help="where sectionchat's fresh data dirs go (default: the system temp dir)"
    )
    parser.add_argument(
        "--event-loop",
        choices=R.EVENT_LOOPS,
        default="auto",
        help="event loop of every server: auto (uvloop when installed, sectionchat's default), uvloop or asyncio",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def collect(results, kind: str, expected: int, timeout: float) -> int:
    """Wait for `expected` reports of `kind`; return the sum of their counts."""
    total, got = 0, 0
    deadline = time.monotonic() + timeout
    while got < expected:
        try:
            what, count, error = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"load generators did not report {kind!r} within {timeout:.0f} s") from None
        if what == "error":
            raise BenchError(f"a load generator failed: {error}")
        if what == kind:
            total += count
            got += 1
    return total


def rss(server: ServerProcess) -> int:
    value = server.rss_bytes()
    if value is None:
        raise BenchError(f"cannot read VmRSS of {server.name}")
    return value


def run_once(args: argparse.Namespace, target: str, connections: int, index: int, ctx) -> MemoryRun:
    scratch = scratch_dir(args.data_root)
    server = server_for(target, scratch, args.event_loop)
    workers: list = []
    command_queues: list = []
    try:
        server.start()
        time.sleep(args.settle)
        before = rss(server)
        procs = max(1, min(args.procs, connections))
        results = ctx.Queue()
        started = time.monotonic()
        for worker in range(procs):
            commands = ctx.Queue()
            spec = WorkerSpec(target, "127.0.0.1", server.port, list(range(worker, connections, procs)), args.sections)
            process = ctx.Process(target=worker_main, args=(spec, commands, results), daemon=True)
            process.start()
            workers.append(process)
            command_queues.append(commands)
        opened = collect(results, "opened", procs, 180)
        open_s = time.monotonic() - started
        time.sleep(args.settle)
        idle = rss(server)
        subscribed = None
        if not args.no_subscribe:
            for commands in command_queues:
                commands.put("subscribe")
            collect(results, "subscribed", procs, 180)
            time.sleep(args.settle)
            subscribed = rss(server)
        for commands in command_queues:
            commands.put("check")
        lost = collect(results, "checked", procs, 60)
        if opened != connections:
            raise BenchError(f"{target}: {opened} of {connections} connections opened")
        for commands in command_queues:
            commands.put("stop")
        for process in workers:
            process.join(20)
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
        server.stop()
        remove(scratch)
    return MemoryRun(
        target=target,
        connections=connections,
        index=index,
        before_bytes=before,
        idle_bytes=idle,
        subscribed_bytes=subscribed,
        per_idle=(idle - before) / connections,
        per_subscribed=None if subscribed is None else (subscribed - before) / connections,
        open_s=open_s,
        lost=lost,
    )


def describe(run: MemoryRun) -> str:
    text = (
        f"before {R.fmt_bytes(run.before_bytes):>9}  idle {R.fmt_bytes(run.idle_bytes):>9}"
        f"  -> {R.fmt_bytes(run.per_idle):>9}/connection"
    )
    if run.subscribed_bytes is not None and run.per_subscribed is not None:
        text += (
            f"  subscribed {R.fmt_bytes(run.subscribed_bytes):>9} -> {R.fmt_bytes(run.per_subscribed):>9}/connection"
        )
    text += f"  (opened in {run.open_s:.1f} s)"
    if run.lost:
        text += f"  LOST {run.lost}"
    return text


def fmt_kib(value: float) -> str:
    return f"{value / 1024:.2f} KiB"


def table(summaries: list[Summary]) -> str:
    header = [
        "connections",
        "server",
        "RSS before",
        "per idle connection median (min–max)",
        "per subscribed connection median (min–max)",
        "idle ratio to raw (pair min–max)",
        "subscribed ratio to raw (pair min–max)",
    ]
    rows = []
    for s in summaries:
        for target in s.runs:
            befores = s.values(target, "before_bytes")
            ratio_idle = ratio_sub = "—"
            if "raw" in s.runs and target != "raw":
                ratio_idle = R.fmt_ratio_spread(s.values(target, "per_idle"), s.values("raw", "per_idle"))
                ratio_sub = R.fmt_ratio_spread(s.values(target, "per_subscribed"), s.values("raw", "per_subscribed"))
            rows.append(
                [
                    f"{s.connections:,}",
                    target,
                    R.fmt_bytes(median(befores)) if befores else "n/a",
                    R.spread(s.values(target, "per_idle"), fmt_kib),
                    R.spread(s.values(target, "per_subscribed"), fmt_kib),
                    ratio_idle,
                    ratio_sub,
                ]
            )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.procs < 1 or args.sections < 1 or args.settle < 0:
        print("bench: --runs, --procs and --sections must be ≥ 1, --settle ≥ 0", file=sys.stderr)
        return 2
    needed = max(args.connections) + 1000
    limit = wsclient.raise_fd_limit(needed)  # the servers inherit it
    if limit < needed:
        print(
            f"bench: RLIMIT_NOFILE is {limit}; {max(args.connections)} connections need about {needed}", file=sys.stderr
        )
        return 2

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    ctx = multiprocessing.get_context("spawn")
    say(
        f"memory benchmark: {', '.join(args.targets)} × {args.runs} runs × connections {args.connections} "
        f"from {args.procs} processes; every server on {R.loop_in_use(args.event_loop)}; subscribed phase: {'off' if args.no_subscribe else f'{args.sections} sections'}"
    )
    began = time.monotonic()
    summaries: list[Summary] = []
    for connections in args.connections:
        summary = Summary(connections, {target: [] for target in args.targets})
        for index in range(args.runs):
            for target in args.targets:
                run = run_once(args, target, connections, index, ctx)
                say(f"  n={connections:<6} run {index + 1}/{args.runs}  {target:<11} {describe(run)}")
                summary.runs[target].append(run)
        summaries.append(summary)
    elapsed = time.monotonic() - began
    print(table(summaries))
    print(
        f"\n{args.runs} runs per server, alternating; VmRSS of the server process: per connection = "
        f"(after − before) / connections, read {args.settle:g} s after the last connection opened (idle: after its "
        f"welcome) or subscribed (connection i to section-(i % {args.sections})). Ratios: of medians, min–max over "
        f"(run i, run i) pairs. Total {elapsed:.0f} s."
    )
    for s in summaries:
        if "sectionchat" in s.runs and "raw" in s.runs:
            value, _ = R.ratio_spread(s.values("sectionchat", "per_idle"), s.values("raw", "per_idle"))
            print(
                f"Issue 6 target at {s.connections:,} connections: memory per idle connection ≤ {TARGET_RATIO} × raw: "
                f"{R.fmt_ratio(value)} — {'met' if value <= TARGET_RATIO else 'MISSED'}."
            )
    if args.json:
        document = {
            "benchmark": "memory",
            "machine": R.describe_machine(),
            "settings": {
                "connections": args.connections,
                "runs": args.runs,
                "targets": args.targets,
                "procs": args.procs,
                "sections": args.sections,
                "subscribe": not args.no_subscribe,
                "settle": args.settle,
                "event_loop": args.event_loop,
                "loop_in_use": R.loop_in_use(args.event_loop),
            },
            "runs": [asdict(run) for s in summaries for runs in s.runs.values() for run in runs],
            "elapsed_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
