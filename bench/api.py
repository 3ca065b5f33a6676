# HTTP API benchmark (issue 14): writes per second through the HTTP API with
# keep-alive (POST /api/v1/sessions/{id}/messages and POST /api/v1/sessions), each
# client its own aiohttp session, against the WebSocket path of the same server
# (send_message / create_session, bench/loadgen.py's closed-loop clients), at 50
# clients by default, alternating runs, each run a fresh server process (with the
# API on for both paths, so that the two differ only in the path the writes take).
#
#     .venv/bin/python -m bench.api                       # 50 clients, 3 runs
#     .venv/bin/python -m bench.api --runs 5 --json out.json
#
# Rules kept here (as bench/requests.py): the server is its own process, started as
# operators start it, on 127.0.0.1 and port 0 (the API's port from its `api
# listening on` line); the load generator is one process for either path; runs
# alternate (api, websocket, api, …); rates are replies inside the measured window;
# results are medians with min–max, ratios with the min–max over (run i, run i) pairs.

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import asyncio
import json
import multiprocessing
import queue
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec

from bench.harness import (
    HOST,
    BenchError,
    ServerProcess,
    filesystem_type,
    markdown_table,
    median,
    percentile,
    remove,
    run_main,
    scratch_dir,
)
from bench.loadgen import (
    DOCUMENT_ID,
    SECTIONS,
    TEXT,
    TITLE,
    BenchClientError,
    WorkerResult,
    WorkerSpec,
    worker_main,
)
from bench.requests import Run, Summary
from bench.runs import (
    BUSY_CORES,
    Window,
    describe_machine,
    disturbance,
    fmt_load,
    fmt_ms,
    fmt_ratio_spread,
    fmt_source,
    is_busy,
    parse_counts,
    parse_names,
    ratio_spread,
    retry_quietest,
    source_state,
    spread,
)

OPERATIONS = ("send_message", "create_session")
TARGETS = ("api", "websocket")
API_KEY = "bench-api-key"
API_LISTENING = re.compile(r"api listening on (\S+):(\d+)")


@dataclass
class ApiSpec:
    base: str  # http://127.0.0.1:PORT
    operation: str
    clients: list[int]
    warmup_s: float
    seconds: float
    max_requests: int
    sections: int = SECTIONS


# The HTTP load generator ---------------------------------------------------------


def api_body(operation: str, index: int, sections: int, session_id: str | None) -> bytes:
    user = f"bench-{index}"
    if operation == "create_session":
        return msgspec.json.encode(
            {"user": user, "document_id": DOCUMENT_ID, "section_id": f"section-{index % sections}", "title": TITLE}
        )
    return msgspec.json.encode({"user": user, "text": TEXT})


class Created(msgspec.Struct):
    session: dict


async def api_client(
    http, spec: ApiSpec, index: int, session_id: str | None, window: tuple[float, float], result: WorkerResult
) -> None:
    """Closed loop: POST, await the 201, next POST (one keep-alive connection)."""
    if spec.operation == "send_message":
        url = f"{spec.base}/api/v1/sessions/{session_id}/messages"
    else:
        url = f"{spec.base}/api/v1/sessions"
    body = api_body(spec.operation, index, spec.sections, session_id)
    window_start, window_end = window
    clock = time.perf_counter
    for _ in range(spec.max_requests):
        started = clock()
        if started >= window_end:
            return
        async with http.post(url, data=body) as response:
            data = await response.read()
            status = response.status
        done = clock()
        if status != 201:
            raise BenchClientError(f"client {index}: {spec.operation} answered {status}: {data[:300]!r}")
        result.total += 1
        if window_start <= done < window_end:
            result.completed += 1
            result.latencies.append(done - started)


async def run_api_worker(spec: ApiSpec, ready) -> WorkerResult:
    import aiohttp

    result = WorkerResult()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=60),
        )
        for _ in spec.clients
    ]
    try:

        async def setup(http, index: int) -> str | None:
            """A session each (send_message) and, either way, the keep-alive connection opened."""
            body = api_body("create_session", index, spec.sections, None)
            async with http.post(f"{spec.base}/api/v1/sessions", data=body) as response:
                data = await response.read()
                if response.status != 201:
                    raise BenchClientError(f"client {index}: create_session answered {response.status}: {data!r}")
            return msgspec.json.decode(data, type=Created).session["session_id"]

        session_ids = await asyncio.gather(*(setup(http, i) for http, i in zip(sessions, spec.clients, strict=True)))
        ready()
        window_start = time.perf_counter() + spec.warmup_s
        window = (window_start, window_start + spec.seconds)
        await asyncio.gather(
            *(
                api_client(http, spec, index, session_id, window, result)
                for http, index, session_id in zip(sessions, spec.clients, session_ids, strict=True)
            )
        )
        result.window_s = spec.seconds
    finally:
        await asyncio.gather(*(http.close() for http in sessions), return_exceptions=True)
    return result


def api_worker_main(spec: ApiSpec, barrier, results) -> None:
    from bench.runs import abort_quietly

    try:
        result = asyncio.run(run_api_worker(spec, lambda: barrier.wait(timeout=120)))
    except BaseException as error:  # noqa: BLE001 - reported to the driver, which fails the run
        abort_quietly(barrier)
        result = WorkerResult(error=f"{type(error).__name__}: {error}")
    results.put(result)


# One run ---------------------------------------------------------------------------


def start_server(scratch: Path, *extra: str) -> tuple[ServerProcess, int]:
    """sectionchat with its HTTP API on: (the process, the API's port)."""
    server = ServerProcess.sectionchat(scratch, "--api-key", API_KEY, "--api-host", HOST, "--api-port", "0", *extra)
    server.start()
    deadline = time.monotonic() + 20
    while True:
        found = API_LISTENING.search(server.output)
        if found:
            return server, int(found.group(2))
        if time.monotonic() > deadline or not server.running:
            server.stop()
            raise BenchError(f"the server did not log 'api listening on' within 20 s:\n{server.log()}")
        time.sleep(0.02)


def run_once(args: argparse.Namespace, operation: str, target: str, index: int, ctx) -> Run:
    scratch = scratch_dir(args.data_root)
    source = source_state()
    server, api_port = start_server(scratch)
    process = None
    try:
        barrier = ctx.Barrier(2)
        results = ctx.Queue()
        clients = list(range(args.clients))
        if target == "api":
            spec: object = ApiSpec(
                f"http://{HOST}:{api_port}", operation, clients, args.warmup, args.seconds, args.max_requests
            )
            entry = api_worker_main
        else:
            spec = WorkerSpec(server.url, operation, clients, args.warmup, args.seconds, args.max_requests)
            entry = worker_main
        process = ctx.Process(target=entry, args=(spec, barrier, results), daemon=True)
        process.start()
        try:
            barrier.wait(timeout=120)
        except Exception:  # noqa: BLE001 - the worker failed during setup; its result says why
            pass
        started = time.perf_counter()
        time.sleep(args.warmup)
        window = Window([server.pid, process.pid])
        time.sleep(max(0.0, started + args.warmup + args.seconds - time.perf_counter()))
        window.stop()
        try:
            result: WorkerResult = results.get(timeout=args.seconds + args.warmup + 60)
        except queue.Empty:
            raise BenchError(f"{target}: the load generator did not report within 60 s of the window's end") from None
        if result.error:
            raise BenchError(
                f"{target} {operation} run {index + 1}: {result.error}\n--- server log ---\n{server.log()}"
            )
        process.join(10)
        if server.errors_in_log():
            raise BenchError(f"{target}: the server logged errors during the run:\n{server.first_error()}")
    finally:
        if process is not None and process.is_alive():
            process.kill()
        server.stop()
        server.close()
        remove(scratch)
    server_cpu, loadgen_cpu = window.cpu_seconds()
    ours = (server_cpu or 0.0) + (loadgen_cpu or 0.0)
    other, steal = window.machine(args.seconds, ours)
    latencies = sorted(result.latencies)
    return Run(
        operation=operation,
        clients=args.clients,
        target=target,
        index=index,
        rate=result.completed / args.seconds,
        completed=result.completed,
        window_s=args.seconds,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        server_cpu=None if server_cpu is None else server_cpu / args.seconds,
        loadgen_cpu=None if loadgen_cpu is None else loadgen_cpu / args.seconds,
        other_cpu=other,
        steal_cpu=steal,
        source=source,
    )


def run_disturbance(run: Run) -> float:
    return disturbance(run.other_cpu, run.steal_cpu)


def describe(run: Run) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 100:.0f}%"

    return (
        f"{run.rate:>8,.0f}/s  p50 {run.p50_ms:6.1f} ms  p99 {run.p99_ms:6.1f} ms"
        f"  server CPU {pct(run.server_cpu):>4}  loadgen CPU {pct(run.loadgen_cpu):>4}"
        + fmt_load(run.other_cpu, run.steal_cpu, is_busy(run.other_cpu, run.steal_cpu))
    )


# Output ------------------------------------------------------------------------------


def cpu_median(runs: list[Run], attr: str) -> str:
    values = [getattr(run, attr) for run in runs if getattr(run, attr) is not None]
    return f"{median(values) * 100:.0f}%" if values else "n/a"


def per_cpu_second(run: Run) -> float | None:
    return run.rate / run.server_cpu if run.server_cpu else None


def table(summaries: list[Summary]) -> str:
    header = [
        "write",
        "clients",
        "HTTP API /s median (min–max)",
        "WebSocket /s median (min–max)",
        "ratio API / WS (pair min–max)",
        "p50 ms API / WS",
        "p99 ms API / WS",
        "server CPU API / WS",
        "loadgen CPU API / WS",
        "per server CPU-s API / WS",
    ]
    rows = []
    for s in summaries:
        api, ws = s.runs["api"], s.runs["websocket"]

        def both(attr: str, pair: tuple[list[Run], list[Run]] = (api, ws)) -> str:
            return " / ".join(spread([getattr(r, attr) for r in runs], fmt_ms) for runs in pair)

        def per_cpu(runs: list[Run]) -> str:
            return spread([v for v in map(per_cpu_second, runs) if v is not None])

        rows.append(
            [
                s.operation,
                str(s.clients),
                spread(s.rates("api")),
                spread(s.rates("websocket")),
                f"**{fmt_ratio_spread(s.rates('api'), s.rates('websocket'))}**",
                both("p50_ms"),
                both("p99_ms"),
                f"{cpu_median(api, 'server_cpu')} / {cpu_median(ws, 'server_cpu')}",
                f"{cpu_median(api, 'loadgen_cpu')} / {cpu_median(ws, 'loadgen_cpu')}",
                f"{per_cpu(api)} / {per_cpu(ws)}",
            ]
        )
    return markdown_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.api",
        description="HTTP API writes per second (keep-alive, a session per client) against the same server's "
        "WebSocket path: send_message and create_session",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per path, alternating (default 3)")
    parser.add_argument("--clients", type=lambda t: parse_counts(t, 1, 2000)[0], default=50, help="(default 50)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up before the window (default 0.5)")
    parser.add_argument(
        "--operations",
        type=parse_names(OPERATIONS),
        default=list(OPERATIONS),
        help="comma-separated, of send_message, create_session (default both)",
    )
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="bound on requests per client per run")
    parser.add_argument("--data-root", default=None, help="where the fresh data dirs go (default: the temp dir)")
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=1,
        help=f"repeat a run while other work used > {BUSY_CORES} cores, keeping the quietest (default 1)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run and summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.seconds <= 0 or args.warmup < 0 or args.busy_retries < 0:
        print("bench: --runs must be ≥ 1, --seconds > 0, --warmup and --busy-retries ≥ 0", file=sys.stderr)
        return 2
    root = args.data_root or tempfile.gettempdir()
    fs = filesystem_type(root)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    ctx = multiprocessing.get_context("spawn")
    say(
        f"sectionchat HTTP API benchmark: {args.runs} runs × {', '.join(args.operations)} × {args.clients} clients, "
        f"HTTP API vs WebSocket; {args.warmup:g} s warm-up + {args.seconds:g} s window; data under {root} ({fs})"
    )
    source_at_start = source_state()
    say(f"  server source: {fmt_source(source_at_start)}")
    began = time.monotonic()
    summaries = []
    for operation in args.operations:
        summary = Summary(operation, args.clients, {target: [] for target in TARGETS})
        for index in range(args.runs):
            # Alternate which path goes first, so that drift hits both alike.
            for target in TARGETS if index % 2 == 0 else TARGETS[::-1]:

                def report(
                    run: Run, attempt: int, retry: bool, target: str = target, index: int = index, op: str = operation
                ) -> None:
                    label = f"run {index + 1}/{args.runs}" + (f" try {attempt}" if attempt > 1 else "")
                    say(f"  {op:<14} {label:<14} {target:<9} {describe(run)}{'  -> again' if retry else ''}")

                kept, discarded = retry_quietest(
                    lambda target=target, index=index, op=operation: run_once(args, op, target, index, ctx),
                    run_disturbance,  # type: ignore[arg-type]
                    args.busy_retries,
                    report,
                )
                kept.attempts = len(discarded) + 1
                summary.runs[target].append(kept)
                summary.discarded.extend(discarded)
        summaries.append(summary)
    elapsed = time.monotonic() - began
    print(table(summaries))
    kept_runs = [run for s in summaries for t in TARGETS for run in s.runs[t]]
    busy = sum(is_busy(run.other_cpu, run.steal_cpu) for run in kept_runs)
    retried = sum(run.attempts > 1 for run in kept_runs)
    sources = sorted({fmt_source(run.source) for run in kept_runs if run.source})
    print(
        f"\nRuns per path: {args.runs}, alternating, each a fresh server; {args.clients} clients, closed loop; "
        f"rate = 201s / acks received inside the {args.seconds:g} s window; ratio = API median / WebSocket median, "
        f"pair min–max over (run i, run i). Total {elapsed:.0f} s. Server source: {'; '.join(sources)}."
    )
    if retried:
        print(f"{retried} of {len(kept_runs)} runs were repeated because other work used > {BUSY_CORES} cores.")
    if busy:
        print(
            f"Warning: {busy} of {len(kept_runs)} kept runs shared the machine with other work (> {BUSY_CORES} "
            "cores): the machine was shared."
        )
    if args.json:
        document = {
            "benchmark": "api",
            "machine": describe_machine(),
            "source": {"start": source_at_start, "end": source_state()},
            "settings": {
                "runs": args.runs,
                "clients": args.clients,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "busy_retries": args.busy_retries,
                "busy_cores": BUSY_CORES,
                "data_root": root,
                "data_fs": fs,
            },
            "summaries": [summary_json(s) for s in summaries],
            "busy_runs": busy,
            "elapsed_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


def summary_json(s: Summary) -> dict:
    ratio, pairs = ratio_spread(s.rates("api"), s.rates("websocket"))
    return {
        "operation": s.operation,
        "clients": s.clients,
        "api_median": median(s.rates("api")),
        "websocket_median": median(s.rates("websocket")),
        "ratio": ratio,
        "pair_ratio_min": min(pairs) if pairs else None,
        "pair_ratio_max": max(pairs) if pairs else None,
        "api_p50_ms_median": median([r.p50_ms for r in s.runs["api"]]),
        "api_p99_ms_median": median([r.p99_ms for r in s.runs["api"]]),
        "websocket_p50_ms_median": median([r.p50_ms for r in s.runs["websocket"]]),
        "websocket_p99_ms_median": median([r.p99_ms for r in s.runs["websocket"]]),
        "runs": [asdict(run) for target in TARGETS for run in s.runs[target]],
        "discarded_attempts": [asdict(run) for run in s.discarded],
    }


if __name__ == "__main__":
    run_main(main)
