# section_summary fan-out (revision 1.1's watch_document): N watchers of one
# document (default 1,000, spread over several load-generator processes) while
# one publisher makes one section of it take a steady stream of messages
# (default 100/s) for a measured window.
#
#     .venv/bin/python -m bench.summaries                      # defaults: 1,000 watchers vs none, 3 runs each
#     .venv/bin/python -m bench.summaries --watchers 1000 --runs 5 --json out.json
#
# What a run reports:
#   - summary frames per watcher per second for the busy section, inside the
#     window (by design at most 1 per section per second: the server coalesces
#     a section's changes over SUMMARY_WINDOW_S = 1 s), and the shortest gap
#     between two of them at any watcher;
#   - frames for the document's other, idle sections (should be none: their
#     summaries do not change);
#   - the fraction of watchers whose latest summary (messages = everything the
#     publisher sent) arrived within --final-within (1.5 s) of the publisher's
#     last send, and that delay's p50 / max;
#   - the server's CPU during the window (fraction of one core, /proc), and the
#     publisher's ack latency (a long flush to 1,000 watchers would show there).
# There is no baseline server for this: the reference is the same run with no
# watcher at all (the publisher alone), alternating — watchers, none, watchers,
# none, … — every run a fresh server and data dir. CPU per 1,000 watchers is
# (CPU with N watchers − median CPU with none) × 1,000 / N. With --idle-control
# a third kind of run opens the same N connections without watching, which
# separates what connections cost (pings, bookkeeping) from what summaries cost.
#
# Each watcher connects as its own user (`watch-<i>`): summaries are personal
# (`unread`, `mentions`), so the server computes and encodes one per watcher.
# Bounded in count and time; only 127.0.0.1.

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import asyncio
import json
import multiprocessing
import queue
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import connect as ws_connect

from bench import runs as R
from bench import wsclient
from bench.fanload import decode_head
from bench.fanout import server_for
from bench.harness import (
    HOST,
    BenchError,
    filesystem_type,
    markdown_table,
    median,
    percentile,
    remove,
    run_main,
    scratch_dir,
)
from bench.loadgen import TEXT

DOCUMENT_ID = "bench-doc"
HOT_SECTION = "busy"
KINDS = ("watch", "idle", "none")  # N watchers; N connections that do not watch; the publisher alone


# Watchers (load-generator processes) ----------------------------------------------


class _Summary(msgspec.Struct):
    section_id: str
    messages: int


class _SummaryFrame(msgspec.Struct):
    type: str
    summary: _Summary | None = None
    sections: list[_Summary] | None = None
    reply_to: Any = None
    code: Any = None
    message: Any = None


decode_summary = msgspec.json.Decoder(_SummaryFrame).decode


@dataclass
class WatcherSpec:
    host: str
    port: int
    indices: list[int]  # global watcher numbers this process opens
    document_id: str
    hot_section: str
    watch: bool  # False: connect and stay idle (the --idle-control runs)
    deadline_s: float  # after the start barrier, stop waiting for the final summary
    connect_concurrency: int = 25
    event_loop: str = "auto"


@dataclass
class WatcherResult:
    clients: int = 0
    # Per watcher: (arrival time.time_ns(), messages) of every busy-section summary after the barrier.
    hot: list[list[tuple[int, int]]] = field(default_factory=list)
    other_frames: int = 0  # summaries of the document's other sections
    initial_sections: int = 0  # sections listed in the `document` reply (of the first watcher)
    closed: dict[int, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    error: str | None = None


class _Watcher:
    __slots__ = ("ready", "hot", "messages", "armed", "error")

    def __init__(self, ready: asyncio.Future[None]):
        self.ready = ready
        self.hot: list[tuple[int, int]] = []
        self.messages = -1  # the busy section's message count in the latest summary
        self.armed = False  # past the start barrier: record what arrives
        self.error: str | None = None


async def run_watchers(spec: WatcherSpec, ready, final, set_up) -> WatcherResult:
    wsclient.raise_fd_limit()
    result = WatcherResult(clients=len(spec.indices))
    watch = msgspec.json.encode({"type": "watch_document", "id": 1, "document_id": spec.document_id})
    loop = asyncio.get_running_loop()
    other = [0]
    listed: list[int] = []

    def fail(state: _Watcher, text: str) -> None:
        state.error = text
        if not state.ready.done():
            state.ready.set_exception(RuntimeError(text))

    def on_text(client: wsclient.LightClient, payload: bytes, now: int) -> None:
        state: _Watcher = client.state  # type: ignore[assignment]
        if payload.startswith(b'{"type":"section_summary"'):
            summary = decode_summary(payload).summary
            if summary is None:
                return
            if summary.section_id == spec.hot_section:
                state.messages = summary.messages
                if state.armed:
                    state.hot.append((now, summary.messages))
            elif state.armed:
                other[0] += 1
            return
        head = decode_head(payload)
        if head.type == "welcome":
            if spec.watch:
                client.send_text(watch)
            elif not state.ready.done():
                state.ready.set_result(None)
        elif head.type == "document" and head.reply_to == 1:
            frame = decode_summary(payload)
            sections = frame.sections or []
            listed.append(len(sections))
            for summary in sections:
                if summary.section_id == spec.hot_section:
                    state.messages = summary.messages
            if not state.ready.done():
                state.ready.set_result(None)
        elif head.type == "error":
            fail(state, f"error {head.code}: {head.message}")

    async def open_one(i: int) -> wsclient.LightClient:
        state = _Watcher(loop.create_future())
        client = await wsclient.connect(spec.host, spec.port, f"/ws?name=watch-{spec.indices[i]}", on_text, state)
        async with asyncio.timeout(60):
            await state.ready
        return client

    clients: list[wsclient.LightClient] = []
    try:
        # The document's sessions exist before anyone watches, so nothing changes between watching and the barrier.
        if not await asyncio.to_thread(set_up.wait, 120):
            raise RuntimeError("the publisher did not set the document up within 120 s")
        clients = await wsclient.connect_many(len(spec.indices), open_one, spec.connect_concurrency)
        for client in clients:
            client.state.armed = True  # type: ignore[attr-defined]
        await asyncio.to_thread(ready)
        cpu_started = time.process_time()
        deadline = time.monotonic() + spec.deadline_s
        while time.monotonic() < deadline:
            total = final.value
            if not spec.watch and total >= 0:
                break
            if total >= 0 and all(c.state.messages >= total or not c.is_open for c in clients):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        result.cpu_s = time.process_time() - cpu_started
        result.hot = [client.state.hot for client in clients]  # type: ignore[attr-defined]
        result.other_frames = other[0]
        result.initial_sections = listed[0] if listed else 0
        errors = [client.state.error for client in clients if client.state.error]  # type: ignore[attr-defined]
        if errors:
            result.error = errors[0]
        for client in clients:
            if client.close_code is not None:
                result.closed[client.close_code] = result.closed.get(client.close_code, 0) + 1
            elif not client.is_open:
                result.closed[1006] = result.closed.get(1006, 0) + 1
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.05)
    return result


def watcher_main(spec: WatcherSpec, barrier, results, final, set_up) -> None:
    try:
        result = R.run_with_loop(run_watchers(spec, lambda: barrier.wait(timeout=180), final, set_up), spec.event_loop)
    except BaseException as error:  # noqa: BLE001 - reported to the driver
        R.abort_quietly(barrier)
        result = WatcherResult(error=f"{type(error).__name__}: {error}")
    results.put(("watchers", result))


# Publisher --------------------------------------------------------------------------


@dataclass
class PublisherSpec:
    host: str
    port: int
    document_id: str
    hot_section: str
    idle_sections: int  # other sections of the document, one session each, never written to
    settle_s: float  # after the barrier, before the first message
    warmup_s: float  # messages at `rate`, not counted
    seconds: float  # the measured window
    rate: float  # messages per second, open loop
    ack_timeout_s: float = 30.0
    event_loop: str = "auto"


@dataclass
class PublisherResult:
    sent: int = 0
    acked: int = 0
    window_start_ns: int = 0  # time.time_ns() of the window's scheduled start and end
    window_end_ns: int = 0
    last_send_ns: int = 0
    last_ack_ns: int = 0
    ack_ms: list[float] = field(default_factory=list)  # messages sent inside the window
    late_ms: float = 0.0  # how far behind its schedule the last send was
    error: str | None = None


async def run_publisher(spec: PublisherSpec, ready, final, set_up) -> PublisherResult:
    result = PublisherResult()
    websocket = await ws_connect(
        f"ws://{spec.host}:{spec.port}/ws?name=publisher",
        compression=None,
        max_size=2**24,
        ping_interval=None,
        open_timeout=30,
        close_timeout=2,
    )
    try:
        welcome = decode_head(await websocket.recv(decode=False))
        if welcome.type != "welcome":
            raise RuntimeError(f"expected welcome, got {welcome.type}")

        async def create(section_id: str, request_id: int) -> str:
            await websocket.send(
                msgspec.json.encode(
                    {"type": "create_session", "id": request_id, "document_id": spec.document_id,
                     "section_id": section_id, "title": "summary benchmark"}
                ),
                text=True,
            )  # fmt: skip
            async with asyncio.timeout(spec.ack_timeout_s):
                while True:
                    reply = msgspec.json.decode(await websocket.recv(decode=False))
                    if reply.get("reply_to") == request_id:
                        break
            if reply.get("type") != "session_created":
                raise RuntimeError(f"create_session failed: {reply}")
            return reply["session"]["session_id"]

        session_id = await create(spec.hot_section, -1)
        for k in range(spec.idle_sections):
            await create(f"idle-{k}", -2 - k)
        set_up.set()
        warmup = int(round(spec.rate * spec.warmup_s))
        counted = int(round(spec.rate * spec.seconds))
        sent_ns = [0] * (warmup + counted)
        acked = asyncio.Event()
        state = {"acked": 0, "error": None}

        async def read() -> None:
            try:
                async for data in websocket:
                    now = time.time_ns()
                    head = decode_head(data if isinstance(data, bytes) else data.encode())
                    if head.reply_to is None:
                        continue  # an event: not for the publisher
                    if head.type != "message_ack":
                        state["error"] = f"send_message got {head.type} {head.code or ''} {head.message or ''}"
                        acked.set()
                        return
                    seq = int(head.reply_to)
                    if seq >= warmup:
                        result.ack_ms.append((now - sent_ns[seq]) / 1e6)
                    result.last_ack_ns = now
                    state["acked"] += 1
                    if state["acked"] == len(sent_ns):
                        acked.set()
            except Exception as error:  # noqa: BLE001
                state["error"] = f"publisher connection: {type(error).__name__}: {error}"
                acked.set()

        await asyncio.to_thread(ready)
        reader = asyncio.create_task(read())
        prefix = b'{"type":"send_message","id":'
        suffix = b"," + msgspec.json.encode({"session_id": session_id, "text": TEXT})[1:]
        start = time.monotonic() + spec.settle_s
        start_ns = time.time_ns() + int(spec.settle_s * 1e9)
        result.window_start_ns = start_ns + int(spec.warmup_s * 1e9)
        result.window_end_ns = result.window_start_ns + int(spec.seconds * 1e9)
        interval = 1.0 / spec.rate
        for seq in range(len(sent_ns)):
            delay = start + seq * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if state["error"]:
                raise RuntimeError(state["error"])
            sent_ns[seq] = time.time_ns()
            await websocket.send(prefix + str(seq).encode() + suffix, text=True)
            result.sent += 1
        result.last_send_ns = sent_ns[-1] if sent_ns else time.time_ns()
        if sent_ns:
            result.late_ms = max(0.0, (time.monotonic() - (start + (len(sent_ns) - 1) * interval)) * 1000)
            async with asyncio.timeout(spec.ack_timeout_s):
                await acked.wait()
        if state["error"]:
            raise RuntimeError(state["error"])
        result.acked = state["acked"]
        reader.cancel()
    except BaseException as error:  # noqa: BLE001
        result.error = f"{type(error).__name__}: {error}"
    finally:
        final.value = result.sent if not result.error else 0  # watchers stop once they have this many messages
        await websocket.close()
    return result


def publisher_main(spec: PublisherSpec, barrier, results, final, set_up) -> None:
    try:
        result = R.run_with_loop(run_publisher(spec, lambda: barrier.wait(timeout=180), final, set_up), spec.event_loop)
    except BaseException as error:  # noqa: BLE001
        result = PublisherResult(error=f"{type(error).__name__}: {error}")
    if result.error:
        R.abort_quietly(barrier)
    results.put(("publisher", result))


# The driver ---------------------------------------------------------------------


@dataclass
class SummaryRun:
    kind: str  # watch | idle | none
    watchers: int  # connections (watching or not); 0 for "none"
    index: int
    messages: int  # the publisher sent, warm-up included
    window_s: float
    frames_per_watcher_s: float | None  # busy-section summaries inside the window / watchers / window
    frames_per_watcher_s_max: float | None  # the watcher that got the most
    min_gap_ms: float | None  # shortest time between two busy-section summaries at one watcher
    gap_p01_ms: float | None
    other_frames: int  # summaries of the idle sections (any watcher, whole run)
    final_within: float | None  # fraction of watchers with the latest state within --final-within of the last send
    final_p50_ms: float | None  # last send -> the watcher's latest summary
    final_max_ms: float | None
    final_missing: int  # watchers that never got the latest state (before their deadline)
    initial_sections: int  # sections in the `document` reply
    closed: dict[str, int]
    server_cpu: float | None  # fraction of one core over the window
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    publisher_late_ms: float
    loadgen_cpu: float  # cores: watcher processes + publisher, over the window
    other_cpu: float | None
    steal_cpu: float | None
    attempts: int = 1
    source: dict | None = None

    @property
    def disturbance(self) -> float:
        return R.disturbance(self.other_cpu, self.steal_cpu)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.summaries",
        description="section_summary fan-out: N watchers of one document while one section takes messages; "
        "frames per watcher per second, latest-state delay, server CPU against the publisher alone",
    )
    parser.add_argument("--watchers", type=int, default=1000, help="watching connections (default 1,000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind, alternating (default 3)")
    parser.add_argument(
        "--idle-control",
        action="store_true",
        help="also runs with the same connections open but not watching (what the connections alone cost)",
    )
    parser.add_argument("--procs", type=int, default=4, help="watcher processes, watchers split among them (default 4)")
    parser.add_argument(
        "--rate", type=float, default=100.0, help="messages per second into the busy section (default 100)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (default 10 s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="messages at --rate before the window (default 1 s)")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="after everyone is set up, before the first message (default 0.5 s)"
    )
    parser.add_argument(
        "--idle-sections", type=int, default=9, help="other sections of the document, one session each (default 9)"
    )
    parser.add_argument(
        "--final-within",
        type=float,
        default=1.5,
        help="a watcher has the latest state in time if it arrives within this of the last send (default 1.5 s)",
    )
    parser.add_argument(
        "--final-timeout", type=float, default=5.0, help="how long watchers wait for the latest state (default 5 s)"
    )
    parser.add_argument("--data-root", default=None, help="where the fresh data dirs go (default: the system temp dir)")
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=1,
        help=f"repeat a run up to this many times while other work used > {R.BUSY_CORES} cores (default 1)",
    )
    parser.add_argument(
        "--event-loop", choices=R.EVENT_LOOPS, default="auto", help="the server's event loop (default auto)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run and summary as JSON")
    parser.add_argument("--from-json", metavar="FILE", help="run nothing: print the table of runs saved by --json")
    parser.add_argument("--quiet", action="store_true", help="print only the tables")
    return parser


def from_json(path: str) -> int:
    document = json.loads(Path(path).read_text())
    settings = argparse.Namespace(**document["settings"])
    runs: dict[str, list[SummaryRun]] = {}
    for run in document["runs"]:
        runs.setdefault(run["kind"], []).append(SummaryRun(**run))
    print(table({kind: runs[kind] for kind in KINDS if kind in runs}, settings))
    return 0


def check_args(args: argparse.Namespace) -> str | None:
    if args.watchers < 1 or args.runs < 1 or args.procs < 1 or args.rate <= 0 or args.seconds <= 0:
        return "--watchers, --runs, --procs must be ≥ 1, --rate and --seconds > 0"
    if min(args.warmup, args.settle, args.idle_sections, args.busy_retries) < 0:
        return "--warmup, --settle, --idle-sections, --busy-retries must be ≥ 0"
    if args.final_within <= 0 or args.final_timeout <= 0:
        return "--final-within and --final-timeout must be > 0"
    return None


def run_once(args: argparse.Namespace, kind: str, index: int, ctx) -> SummaryRun:
    watchers = 0 if kind == "none" else args.watchers
    scratch = scratch_dir(args.data_root)
    server = server_for("sectionchat", scratch, args.event_loop)
    processes: list = []
    source = R.source_state()
    try:
        server.start()
        procs = max(0, min(args.procs, watchers))
        barrier = ctx.Barrier(procs + 2)
        results = ctx.Queue()
        final = ctx.Value("q", -1)
        set_up = ctx.Event()
        schedule_s = args.settle + args.warmup + args.seconds
        publisher = PublisherSpec(
            host=HOST,
            port=server.port,
            document_id=DOCUMENT_ID,
            hot_section=HOT_SECTION,
            idle_sections=args.idle_sections,
            settle_s=args.settle,
            warmup_s=args.warmup,
            seconds=args.seconds,
            rate=args.rate,
            event_loop=args.event_loop,
        )
        process = ctx.Process(target=publisher_main, args=(publisher, barrier, results, final, set_up), daemon=True)
        process.start()
        processes.append(process)
        for worker in range(procs):
            spec = WatcherSpec(
                host=HOST,
                port=server.port,
                indices=list(range(worker, watchers, procs)),
                document_id=DOCUMENT_ID,
                hot_section=HOT_SECTION,
                watch=kind == "watch",
                deadline_s=schedule_s + args.final_timeout,
            )
            process = ctx.Process(target=watcher_main, args=(spec, barrier, results, final, set_up), daemon=True)
            process.start()
            processes.append(process)
        try:
            barrier.wait(timeout=180)
        except Exception:  # noqa: BLE001 - a worker failed during set-up; its result says why
            pass
        released = time.monotonic()
        pids = [server.process.pid] + [p.pid for p in processes]  # type: ignore[union-attr]
        time.sleep(max(0.0, released + args.settle + args.warmup - time.monotonic()))
        window = R.Window(pids)
        time.sleep(max(0.0, released + schedule_s - time.monotonic()))
        window.stop()
        subs: list[WatcherResult] = []
        pub: PublisherResult | None = None
        deadline = time.monotonic() + args.final_timeout + 60
        while len(subs) < procs or pub is None:
            try:
                who, result = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"{kind} run {index + 1}: load generators did not report in time") from None
            if who == "publisher":
                pub = result
            else:
                subs.append(result)
            if (pub is not None and pub.error) or any(s.error for s in subs):
                break
        failures = ([pub.error] if pub is not None and pub.error else []) + [s.error for s in subs if s.error]
        if failures:
            raise BenchError(f"{kind} run {index + 1}: {failures[0]}\n--- server log ---\n{server.first_error()}")
        assert pub is not None
        for process in processes:
            process.join(10)
        if server.errors_in_log():
            raise BenchError(f"sectionchat logged errors during the run:\n{server.first_error()}")
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        server.stop()
        remove(scratch)
    return measure(args, kind, watchers, index, pub, subs, window, source)


def measure(
    args: argparse.Namespace,
    kind: str,
    watchers: int,
    index: int,
    pub: PublisherResult,
    subs: list[WatcherResult],
    window: R.Window,
    source: dict,
) -> SummaryRun:
    cpu = window.cpu_seconds()
    server_cpu_s = cpu[0]
    loadgen_cpu_s = sum(c for c in cpu[1:] if c is not None)
    other, steal = window.machine(args.seconds, (server_cpu_s or 0.0) + loadgen_cpu_s)
    hot = [frames for s in subs for frames in s.hot]
    watching = kind == "watch" and bool(hot)
    in_window = [
        sum(pub.window_start_ns <= at < pub.window_end_ns for at, _ in frames) / args.seconds for frames in hot
    ]
    gaps = sorted((b[0] - a[0]) / 1e6 for frames in hot for a, b in zip(frames, frames[1:], strict=False))
    delays: list[float] = []
    missing = 0
    for frames in hot:
        arrived = next((at for at, messages in frames if messages >= pub.sent), None)
        if arrived is None:
            missing += 1
        else:
            delays.append((arrived - pub.last_send_ns) / 1e6)
    delays.sort()
    acks = sorted(pub.ack_ms)
    closed: dict[str, int] = {}
    for s in subs:
        for code, count in s.closed.items():
            closed[str(code)] = closed.get(str(code), 0) + count
    return SummaryRun(
        kind=kind,
        watchers=watchers,
        index=index,
        messages=pub.sent,
        window_s=args.seconds,
        frames_per_watcher_s=sum(in_window) / len(in_window) if watching else None,
        frames_per_watcher_s_max=max(in_window) if watching else None,
        min_gap_ms=gaps[0] if watching and gaps else None,
        gap_p01_ms=percentile(gaps, 0.01) if watching and gaps else None,
        other_frames=sum(s.other_frames for s in subs),
        final_within=(sum(d <= args.final_within * 1000 for d in delays) / len(hot)) if watching else None,
        final_p50_ms=percentile(delays, 0.5) if watching and delays else None,
        final_max_ms=delays[-1] if watching and delays else None,
        final_missing=missing if watching else 0,
        initial_sections=max((s.initial_sections for s in subs), default=0),
        closed=closed,
        server_cpu=None if server_cpu_s is None else server_cpu_s / args.seconds,
        ack_p50_ms=percentile(acks, 0.5),
        ack_p99_ms=percentile(acks, 0.99),
        ack_max_ms=acks[-1] if acks else float("nan"),
        publisher_late_ms=pub.late_ms,
        loadgen_cpu=loadgen_cpu_s / args.seconds,
        other_cpu=other,
        steal_cpu=steal,
        source=source,
    )


def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None or value != value else f"{value:{spec}}{unit}"


def describe(run: SummaryRun) -> str:
    text = f"server CPU {_fmt(None if run.server_cpu is None else run.server_cpu * 100, '.1f', '%'):>6}"
    if run.kind == "watch":
        text += (
            f"  frames/watcher/s {_fmt(run.frames_per_watcher_s)} (max {_fmt(run.frames_per_watcher_s_max)})"
            f"  min gap {_fmt(run.min_gap_ms, '.0f')} ms  latest within {_fmt(run.final_within and run.final_within * 100, '.1f', '%')}"
            f" (p50 {_fmt(run.final_p50_ms, '.0f')} ms, max {_fmt(run.final_max_ms, '.0f')} ms)"
        )
        if run.final_missing:
            text += f"  NEVER GOT IT {run.final_missing}"
        if run.other_frames:
            text += f"  idle-section frames {run.other_frames}"
    text += f"  ack p50 {R.fmt_ms(run.ack_p50_ms)} p99 {R.fmt_ms(run.ack_p99_ms)} ms  loadgen CPU {run.loadgen_cpu * 100:.0f}%"
    if run.closed:
        text += f"  closed {run.closed}"
    if run.publisher_late_ms > 50:
        text += f"  publisher {run.publisher_late_ms:.0f} ms behind"
    text += R.fmt_load(run.other_cpu, run.steal_cpu, R.is_busy(run.other_cpu, run.steal_cpu))
    return text


def label(kind: str, watchers: int) -> str:
    return {"watch": f"{watchers:,} watchers", "idle": f"{watchers:,} connections, not watching", "none": "no watcher"}[
        kind
    ]


def _values(runs: list[SummaryRun], name: str) -> list[float]:
    return [v for v in (getattr(run, name) for run in runs) if v is not None and v == v]


def cpu_per_thousand(runs: dict[str, list[SummaryRun]], kind: str) -> tuple[list[float], float | None]:
    """Per run of `kind`: (its server CPU − the median of the no-watcher runs) × 1,000 / watchers, in % of a core."""
    base = _values(runs.get("none", []), "server_cpu")
    if not base or kind not in runs:
        return [], None
    reference = median(base)
    values = [
        (run.server_cpu - reference) * 1000 / run.watchers * 100 for run in runs[kind] if run.server_cpu is not None
    ]
    return values, reference


def _f0(value: float) -> str:
    return f"{value:,.0f}"


def _f1(value: float) -> str:
    return f"{value:.1f}"


def _f2(value: float) -> str:
    return f"{value:.2f}"


def _pct(value: float) -> str:
    return f"{value:.1f}%"


def table(runs: dict[str, list[SummaryRun]], args: argparse.Namespace) -> str:
    header = [
        "run",
        "summary frames / watcher / s",
        "most at one watcher / s",
        "shortest gap ms",
        "idle-section frames",
        f"latest state ≤ {args.final_within:g} s",
        "latest state delay p50 / max ms",
        "server CPU (% of a core)",
        "CPU per 1,000 watchers (% of a core, over none)",
        "publisher ack p50 / p99 ms",
    ]
    rows = []
    for kind in KINDS:
        if kind not in runs:
            continue
        kept = runs[kind]
        cpu = [v * 100 for v in _values(kept, "server_cpu")]
        per_k, _ = cpu_per_thousand(runs, kind) if kind != "none" else ([], None)
        watching = kind == "watch"
        frames = R.spread(_values(kept, "frames_per_watcher_s"), _f2)
        most = R.spread(_values(kept, "frames_per_watcher_s_max"), _f2)
        within = R.spread([v * 100 for v in _values(kept, "final_within")], _pct)
        delay = f"{R.spread(_values(kept, 'final_p50_ms'), _f0)} / {R.spread(_values(kept, 'final_max_ms'), _f0)}"
        rows.append(
            [
                label(kind, args.watchers),
                frames if watching else "—",
                most if watching else "—",
                R.spread(_values(kept, "min_gap_ms"), _f0) if watching else "—",
                str(sum(run.other_frames for run in kept)) if watching else "—",
                within if watching else "—",
                delay if watching else "—",
                R.spread(cpu, _f1),
                R.spread(per_k, _f1) if per_k else "—",
                f"{R.spread(_values(kept, 'ack_p50_ms'), R.fmt_ms)} / {R.spread(_values(kept, 'ack_p99_ms'), R.fmt_ms)}",
            ]
        )
    return markdown_table(header, rows)


def to_json(args: argparse.Namespace, runs: dict[str, list[SummaryRun]], discarded: list[SummaryRun], elapsed: float,
            root: str, fs: str | None, sources: dict) -> dict:  # fmt: skip
    summaries = {}
    for kind, kept in runs.items():
        per_k, reference = cpu_per_thousand(runs, kind) if kind != "none" else ([], None)
        summaries[kind] = {
            name: (median(_values(kept, name)) if _values(kept, name) else None)
            for name in (
                "server_cpu",
                "frames_per_watcher_s",
                "frames_per_watcher_s_max",
                "min_gap_ms",
                "final_within",
                "final_p50_ms",
                "final_max_ms",
                "ack_p50_ms",
                "ack_p99_ms",
            )
        } | {  # fmt: skip
            "cpu_per_1000_watchers_pct_of_core": median(per_k) if per_k else None,
            "cpu_per_1000_watchers_min_max": [min(per_k), max(per_k)] if per_k else None,
            "reference_server_cpu": reference,
        }
    return {
        "benchmark": "summaries",
        "machine": R.describe_machine(),
        "source": sources,
        "settings": {
            key: getattr(args, key)
            for key in (
                "watchers",
                "runs",
                "idle_control",
                "procs",
                "rate",
                "seconds",
                "warmup",
                "settle",
                "idle_sections",
                "final_within",
                "final_timeout",
                "busy_retries",
                "event_loop",
            )
        }
        | {
            "data_root": root,
            "data_fs": fs,
            "busy_cores": R.BUSY_CORES,
            "document_id": DOCUMENT_ID,  # fmt: skip
            "hot_section": HOT_SECTION,
            "loop_in_use": R.loop_in_use(args.event_loop),
        },
        "summaries": summaries,
        "runs": [asdict(run) for kept in runs.values() for run in kept],
        "discarded_attempts": [asdict(run) for run in discarded],
        "elapsed_s": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        return from_json(args.from_json)
    problem = check_args(args)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    root = args.data_root or tempfile.gettempdir()
    fs = filesystem_type(root)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    kinds = ["watch"] + (["idle"] if args.idle_control else []) + ["none"]
    start_source = R.source_state()
    say(
        f"summary fan-out benchmark: {', '.join(label(k, args.watchers) for k in kinds)} × {args.runs} runs, alternating; "
        f"{args.watchers:,} watchers over {args.procs} processes; {args.rate:g} messages/s into one section "
        f"({args.idle_sections} idle sections), {args.warmup:g} s warm-up + {args.seconds:g} s window; "
        f"server on {R.loop_in_use(args.event_loop)}; data under {root} ({fs or 'unknown fs'}); "
        f"server source {R.fmt_source(start_source)}"
    )
    wsclient.raise_fd_limit()
    ctx = multiprocessing.get_context("spawn")
    began = time.monotonic()
    runs: dict[str, list[SummaryRun]] = {kind: [] for kind in kinds}
    discarded: list[SummaryRun] = []
    for index in range(args.runs):
        for kind in kinds:

            def report(run: SummaryRun, attempt: int, retry: bool, index=index, kind=kind) -> None:
                tag = f"run {index + 1}/{args.runs}" + (f" try {attempt}" if attempt > 1 else "")
                say(f"  {kind:<5} {tag:<14} {describe(run)}{'  -> again' if retry else ''}")

            kept, dropped = R.retry_quietest(
                lambda kind=kind, index=index: run_once(args, kind, index, ctx),
                lambda run: run.disturbance,
                args.busy_retries,
                report,
            )
            kept.attempts = 1 + len(dropped)
            runs[kind].append(kept)
            discarded.extend(dropped)
    elapsed = time.monotonic() - began
    end_source = R.source_state()
    sources = sorted({R.fmt_source(run.source) for kept in runs.values() for run in kept if run.source})
    print(table(runs, args))
    print(
        f"\n{args.runs} runs of each, alternating, medians (min–max over runs). {args.rate:g} messages/s into one section "
        f"for a {args.seconds:g} s window after {args.warmup:g} s of warm-up. Frames: busy-section `section_summary` "
        f"frames arriving inside the window, per watcher per second (the mean over watchers, and the watcher with "
        f"most); shortest gap: between two of them at one watcher, over the whole run. Latest state: the summary "
        f"counting every message sent, after the last send. CPU per 1,000 watchers: (server CPU − median CPU with no "
        f"watcher) × 1,000 / {args.watchers:,}. Total {elapsed:.0f} s. Server source: {'; '.join(sources)}"
        + (" (it changed during the invocation)" if len(sources) > 1 else "")
        + "."
    )
    all_runs = [run for kept in runs.values() for run in kept]
    busy = sum(R.is_busy(run.other_cpu, run.steal_cpu) for run in all_runs)
    retried = sum(run.attempts > 1 for run in all_runs)
    if retried:
        print(
            f"{retried} of {len(all_runs)} runs were repeated because other work used more than {R.BUSY_CORES} cores."
        )
    if busy:
        print(f"Warning: {busy} of {len(all_runs)} kept runs still shared the machine with other work.")
    if args.json:
        document = to_json(args, runs, discarded, elapsed, root, fs, {"start": start_source, "end": end_source})
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
