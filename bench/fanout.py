# Fan-out benchmark: one section, N subscribers (default 1,000) spread over
# several load-generator processes, one publisher. Deliveries per second and
# end-to-end latency (publisher's send -> subscriber's receive) for
#   sectionchat   — the real server, durable file storage, abuse limits off;
#   raw           — raw `websockets` + broadcast() of the same frames (bench/broadcast_server.py);
#   socketio      — python-socketio AsyncServer on aiohttp, emit to a room (bench/socketio_server.py);
# alternating runs (sectionchat, raw, socketio, sectionchat, …), every run a
# new server process, medians over runs and ratios of medians.
#
#     .venv/bin/python -m bench.fanout                         # defaults: 1,000 subscribers, 5 runs each
#     .venv/bin/python -m bench.fanout --subscribers 10,100,1000 --json out.json
#
# Each run: the publisher connects and creates one session; the subscribers
# connect and subscribe to its section; all wait on a barrier; then the
# publisher sends a few warm-up messages, the PACED phase (a fixed rate, open
# loop: latency p50/p99 of every delivery) and the BURST phase (as fast as
# acknowledgements allow, at most --window unacknowledged: deliveries/s =
# every burst delivery / (last burst delivery − first burst send)). Loads are
# bounded in count and time; only 127.0.0.1.

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import json
import multiprocessing
import queue
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import runs as R
from bench.fanload import (
    PublisherResult,
    PublisherSpec,
    SubscriberResult,
    SubscriberSpec,
    publisher_main,
    subscriber_main,
)
from bench.harness import (
    HOST,
    BenchError,
    ServerProcess,
    filesystem_type,
    fmt_rate,
    markdown_table,
    median,
    percentile,
    remove,
    run_main,
    scratch_dir,
)
from bench.wsclient import raise_fd_limit

TARGETS = ("sectionchat", "raw", "socketio")
DOCUMENT_ID = "bench-doc"
SECTION_ID = "fanout"
# Issue 6's targets at 1,000 subscribers.
TARGET_DELIVERIES = 0.8  # deliveries/s ≥ 0.8 × raw
TARGET_P99 = 1.5  # p99 ≤ 1.5 × raw


def server_for(target: str, scratch: Path, event_loop: str = "auto") -> ServerProcess:
    """The server under test, on the same event loop whichever it is (see bench/runs.py)."""
    if target == "sectionchat":
        known = "--event-loop" in R.sectionchat_serve_options()
        return ServerProcess.sectionchat(scratch, *(("--event-loop", event_loop) if known else ()))
    module = {"raw": "bench.broadcast_server", "socketio": "bench.socketio_server"}[target]
    command = [sys.executable, "-m", module, "--host", HOST, "--port", "0", "--event-loop", event_loop]
    return ServerProcess(target, command, scratch)


@dataclass
class FanoutRun:
    target: str
    subscribers: int
    index: int
    deliveries_per_s: float  # burst deliveries / (last burst delivery − first burst send)
    burst_messages: int
    burst_deliveries: int
    burst_s: float
    paced_messages: int
    paced_deliveries: int
    paced_p50_ms: float
    paced_p99_ms: float
    paced_max_ms: float
    burst_p50_ms: float
    burst_p99_ms: float
    missing: int  # deliveries that never arrived (all phases)
    closed: dict[str, int]  # close code -> subscriber connections the server closed
    paced_late_ms: float  # publisher behind its schedule at the end of the paced phase
    window_s: float
    server_cpu: float | None  # fraction of one core over the window
    deliveries_per_server_cpu_s: float | None
    loadgen_cpu: float  # cores: subscriber processes + publisher
    other_cpu: float | None
    steal_cpu: float | None
    attempts: int = 1

    @property
    def disturbance(self) -> float:
        return R.disturbance(self.other_cpu, self.steal_cpu)


@dataclass
class Summary:
    subscribers: int
    runs: dict[str, list[FanoutRun]] = field(default_factory=dict)
    discarded: list[FanoutRun] = field(default_factory=list)

    def values(self, target: str, name: str) -> list[float]:
        return [getattr(run, name) for run in self.runs.get(target, [])]


def add_arguments(parser: argparse.ArgumentParser, subscribers: list[int], runs: int) -> None:
    """The fan-out options (shared with bench/plots.py, which sweeps the subscriber count)."""
    parser.add_argument(
        "--subscribers",
        type=R.parse_counts,
        default=subscribers,
        help=f"subscribers; a list runs each (default {','.join(map(str, subscribers))})",
    )
    parser.add_argument("--runs", type=int, default=runs, help=f"runs per server, alternating (default {runs})")
    parser.add_argument(
        "--targets",
        type=R.parse_names(TARGETS),
        default=list(TARGETS),
        help="comma-separated (default sectionchat,raw,socketio)",
    )
    parser.add_argument(
        "--procs", type=int, default=4, help="subscriber processes, subscribers split among them (default 4)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="paced phase: messages per second (default 10: 10,000 deliveries/s at 1,000 subscribers, below every server's capacity here)",
    )
    parser.add_argument(
        "--paced-seconds", type=float, default=3.0, help="paced phase length (default 3 s: 30 messages at 10/s)"
    )
    parser.add_argument(
        "--warmup-messages", type=int, default=5, help="paced warm-up messages, not counted (default 5)"
    )
    parser.add_argument(
        "--burst-deliveries",
        type=int,
        default=200_000,
        help="burst phase: publish ceil(this / subscribers) messages (default 200,000: 200 messages at 1,000 subscribers, 20,000 at 10)",
    )
    parser.add_argument(
        "--burst-messages",
        type=int,
        default=None,
        help="burst phase: publish exactly this many messages instead (overrides --burst-deliveries)",
    )
    parser.add_argument(
        "--burst-seconds", type=float, default=3.0, help="burst phase: stop sending after this long (default 3)"
    )
    parser.add_argument("--window", type=int, default=4, help="burst phase: most unacknowledged messages (default 4)")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="pause after everyone subscribed, before publishing (default 0.5 s)"
    )
    parser.add_argument("--gap", type=float, default=0.3, help="pause between phases (default 0.3 s)")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="how long subscribers wait for the last deliveries (default 30 s)",
    )
    parser.add_argument(
        "--data-root", default=None, help="where sectionchat's fresh data dirs go (default: the system temp dir)"
    )
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=1,
        help=f"repeat a run up to this many times while other work used > {R.BUSY_CORES} cores (default 1)",
    )
    parser.add_argument(
        "--event-loop",
        choices=R.EVENT_LOOPS,
        default="auto",
        help="event loop of every server: auto (uvloop when installed, sectionchat's default), uvloop or asyncio",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description="fan-out to one section's subscribers: deliveries/s and latency p50/p99, "
        "sectionchat vs raw websockets broadcast() vs python-socketio",
    )
    add_arguments(parser, [1000], 5)
    parser.add_argument("--json", metavar="FILE", help="also write every run and summary as JSON")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    if args.runs < 1 or args.procs < 1 or args.window < 1 or args.rate <= 0:
        return "--runs, --procs, --window must be ≥ 1 and --rate > 0"
    if (
        args.paced_seconds < 0
        or args.burst_seconds < 0
        or (args.burst_messages or 0) < 0
        or args.burst_deliveries < 0
        or args.warmup_messages < 0
    ):
        return "phase lengths and counts must be ≥ 0"
    if args.busy_retries < 0 or args.settle < 0 or args.gap < 0 or args.drain_timeout <= 0:
        return "--busy-retries, --settle, --gap must be ≥ 0 and --drain-timeout > 0"
    return None


def burst_messages(args: argparse.Namespace, subscribers: int) -> int:
    if args.burst_messages is not None:
        return args.burst_messages
    return -(-args.burst_deliveries // subscribers)


def describe_burst(args: argparse.Namespace) -> str:
    if args.burst_messages is not None:
        return f"{args.burst_messages} messages"
    return f"{args.burst_deliveries:,} deliveries' worth of messages"


def paced_messages(args: argparse.Namespace) -> int:
    return int(round(args.rate * args.paced_seconds))


def run_once(args: argparse.Namespace, target: str, subscribers: int, index: int, ctx) -> FanoutRun:
    scratch = scratch_dir(args.data_root)
    server = server_for(target, scratch, args.event_loop)
    processes: list = []
    try:
        server.start()
        procs = max(1, min(args.procs, subscribers))
        barrier = ctx.Barrier(procs + 2)
        results = ctx.Queue()
        published = ctx.Value("q", -1)
        paced = paced_messages(args)
        schedule_s = args.settle + (args.warmup_messages + paced) / args.rate + 2 * args.gap + args.burst_seconds
        publisher = PublisherSpec(
            target=target,
            host=HOST,
            port=server.port,
            document_id=DOCUMENT_ID,
            section_id=SECTION_ID,
            settle_s=args.settle,
            warmup_messages=args.warmup_messages,
            rate=args.rate,
            paced_messages=paced,
            gap_s=args.gap,
            burst_messages=burst_messages(args, subscribers),
            burst_seconds=args.burst_seconds,
            window=args.window,
        )
        process = ctx.Process(target=publisher_main, args=(publisher, barrier, results, published), daemon=True)
        process.start()
        processes.append(process)
        for worker in range(procs):
            spec = SubscriberSpec(
                target=target,
                host=HOST,
                port=server.port,
                indices=list(range(worker, subscribers, procs)),
                document_id=DOCUMENT_ID,
                section_id=SECTION_ID,
                deadline_s=schedule_s + args.drain_timeout,
            )
            process = ctx.Process(target=subscriber_main, args=(spec, barrier, results, published), daemon=True)
            process.start()
            processes.append(process)
        try:
            barrier.wait(timeout=180)
        except Exception:  # noqa: BLE001 - a worker failed during set-up; its result says why
            pass
        window = R.Window([server.process.pid] + [p.pid for p in processes])  # type: ignore[union-attr]
        started = time.monotonic()
        subs: list[SubscriberResult] = []
        pub: PublisherResult | None = None
        deadline = started + schedule_s + args.drain_timeout + 60
        while len(subs) < procs or pub is None:
            try:
                kind, result = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"{target}: load generators did not report in time") from None
            if kind == "publisher":
                pub = result
            else:
                subs.append(result)
            if (pub is not None and pub.error) or any(s.error for s in subs):
                break
        window.stop()
        elapsed = time.monotonic() - started
        failures = ([pub.error] if pub is not None and pub.error else []) + [s.error for s in subs if s.error]
        if failures:
            raise BenchError(
                f"{target} with {subscribers} subscribers, run {index + 1}: {failures[0]}\n--- server log ---\n{server.first_error()}"
            )
        assert pub is not None
        for process in processes:
            process.join(10)
        if target == "sectionchat" and server.errors_in_log():
            raise BenchError(f"sectionchat logged errors during the run:\n{server.first_error()}")
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        server.stop()
        remove(scratch)

    cpu = window.cpu_seconds()
    server_cpu_s = cpu[0]
    loadgen_cpu_s = sum(c for c in cpu[1:] if c is not None)
    other, steal = window.machine(elapsed, (server_cpu_s or 0.0) + loadgen_cpu_s)

    def phase(name: str) -> list[float]:
        return sorted(v / 1e6 for s in subs for v in s.latencies.get(name, []))

    paced_ms, burst_ms = phase("paced"), phase("burst")
    burst_last = max((s.last_ns.get("burst", 0) for s in subs), default=0)
    burst_s = (burst_last - pub.burst_first_ns) / 1e9 if burst_ms and pub.burst_first_ns else float("nan")
    received = sum(s.received for s in subs)
    closed: dict[str, int] = {}
    for s in subs:
        for code, count in s.closed.items():
            closed[str(code)] = closed.get(str(code), 0) + count
    return FanoutRun(
        target=target,
        subscribers=subscribers,
        index=index,
        deliveries_per_s=len(burst_ms) / burst_s if burst_s and burst_s == burst_s else float("nan"),
        burst_messages=pub.sent.get("burst", 0),
        burst_deliveries=len(burst_ms),
        burst_s=burst_s,
        paced_messages=pub.sent.get("paced", 0),
        paced_deliveries=len(paced_ms),
        paced_p50_ms=percentile(paced_ms, 0.50),
        paced_p99_ms=percentile(paced_ms, 0.99),
        paced_max_ms=paced_ms[-1] if paced_ms else float("nan"),
        burst_p50_ms=percentile(burst_ms, 0.50),
        burst_p99_ms=percentile(burst_ms, 0.99),
        missing=sum(s.missing for s in subs),
        closed=closed,
        paced_late_ms=pub.paced_late_s * 1000,
        window_s=elapsed,
        server_cpu=None if server_cpu_s is None else server_cpu_s / elapsed,
        deliveries_per_server_cpu_s=received / server_cpu_s if server_cpu_s else None,
        loadgen_cpu=loadgen_cpu_s / elapsed,
        other_cpu=other,
        steal_cpu=steal,
    )


def describe(run: FanoutRun) -> str:
    cpu = "n/a" if run.server_cpu is None else f"{run.server_cpu * 100:.0f}%"
    text = (
        f"{run.deliveries_per_s:>9,.0f} deliveries/s  paced p50 {R.fmt_ms(run.paced_p50_ms):>6} ms"
        f"  p99 {R.fmt_ms(run.paced_p99_ms):>6} ms  burst p99 {R.fmt_ms(run.burst_p99_ms):>6} ms"
        f"  server CPU {cpu:>4}  loadgen CPU {run.loadgen_cpu * 100:3.0f}%"
    )
    if run.missing:
        text += f"  MISSING {run.missing}"
    if run.closed:
        text += f"  closed {run.closed}"
    if run.paced_late_ms > 50:
        text += f"  publisher {run.paced_late_ms:.0f} ms behind"
    text += R.fmt_load(run.other_cpu, run.steal_cpu, R.is_busy(run.other_cpu, run.steal_cpu))
    return text


def run_all(args: argparse.Namespace, say) -> list[Summary]:
    raise_fd_limit()
    ctx = multiprocessing.get_context("spawn")
    summaries = []
    for subscribers in args.subscribers:
        summary = Summary(subscribers, {target: [] for target in args.targets})
        for index in range(args.runs):
            for target in args.targets:

                def report(
                    run: FanoutRun, attempt: int, retry: bool, index=index, target=target, n=subscribers
                ) -> None:
                    label = f"run {index + 1}/{args.runs}" + (f" try {attempt}" if attempt > 1 else "")
                    say(f"  n={n:<5} {label:<14} {target:<11} {describe(run)}{'  -> again' if retry else ''}")

                kept, discarded = R.retry_quietest(
                    lambda target=target, index=index, n=subscribers: run_once(args, target, n, index, ctx),
                    lambda run: run.disturbance,
                    args.busy_retries,
                    report,
                )
                kept.attempts = 1 + len(discarded)
                summary.runs[target].append(kept)
                summary.discarded.extend(discarded)
        summaries.append(summary)
    return summaries


def table(summaries: list[Summary]) -> str:
    header = [
        "subscribers",
        "server",
        "deliveries/s median (min–max)",
        "p50 ms median (min–max)",
        "p99 ms median (min–max)",
        "burst p99 ms",
        "deliveries per server CPU-s",
        "server CPU (whole run)",
        "missing",
    ]
    rows = []
    for s in summaries:
        for target, runs in s.runs.items():
            cpu = [r.server_cpu for r in runs if r.server_cpu is not None]
            per_cpu = [r.deliveries_per_server_cpu_s for r in runs if r.deliveries_per_server_cpu_s]
            rows.append(
                [
                    f"{s.subscribers:,}",
                    target,
                    R.spread(s.values(target, "deliveries_per_s")),
                    R.spread(s.values(target, "paced_p50_ms"), R.fmt_ms),
                    R.spread(s.values(target, "paced_p99_ms"), R.fmt_ms),
                    R.fmt_ms(median(s.values(target, "burst_p99_ms"))),
                    fmt_rate(median(per_cpu)) if per_cpu else "n/a",
                    f"{median(cpu) * 100:.0f}%" if cpu else "n/a",
                    str(sum(r.missing for r in runs)),
                ]
            )
    return markdown_table(header, rows)


def ratio_table(summaries: list[Summary]) -> str:
    header = [
        "subscribers",
        "ratio",
        "deliveries/s (pair min–max)",
        "p50 (pair min–max)",
        "p99 (pair min–max)",
        "per server CPU-s",
    ]
    rows = []
    for s in summaries:
        if "sectionchat" not in s.runs:
            continue
        for base in ("raw", "socketio"):
            if base not in s.runs:
                continue
            row = [f"{s.subscribers:,}", f"sectionchat / {base}"]
            for name in ("deliveries_per_s", "paced_p50_ms", "paced_p99_ms", "deliveries_per_server_cpu_s"):
                row.append(R.fmt_ratio_spread(s.values("sectionchat", name), s.values(base, name)))
            rows.append(row)
    return markdown_table(header, rows) if rows else ""


def target_lines(summaries: list[Summary]) -> list[str]:
    lines = []
    for s in summaries:
        if s.subscribers != 1000 or "sectionchat" not in s.runs or "raw" not in s.runs:
            continue
        deliveries, _ = R.ratio_spread(s.values("sectionchat", "deliveries_per_s"), s.values("raw", "deliveries_per_s"))
        p99, _ = R.ratio_spread(s.values("sectionchat", "paced_p99_ms"), s.values("raw", "paced_p99_ms"))

        def verdict(value: float, ok: bool) -> str:
            return "n/a" if value != value else f"{R.fmt_ratio(value)} — {'met' if ok else 'MISSED'}"

        lines.append(
            f"Issue 6 targets at 1,000 subscribers: deliveries/s ≥ {TARGET_DELIVERIES} × raw: "
            f"{verdict(deliveries, deliveries >= TARGET_DELIVERIES)}; "
            f"p99 ≤ {TARGET_P99} × raw: {verdict(p99, p99 <= TARGET_P99)}."
        )
    return lines


def to_json(args: argparse.Namespace, summaries: list[Summary], elapsed: float, root: str, fs: str | None) -> dict:
    return {
        "benchmark": "fanout",
        "machine": R.describe_machine(),
        "settings": {
            key: getattr(args, key)
            for key in (
                "subscribers",
                "runs",
                "targets",
                "procs",
                "rate",
                "paced_seconds",
                "warmup_messages",
                "burst_messages",
                "burst_deliveries",
                "burst_seconds",
                "window",
                "settle",
                "gap",
                "busy_retries",
                "event_loop",
            )
        }
        | {"data_root": root, "data_fs": fs, "busy_cores": R.BUSY_CORES, "loop_in_use": R.loop_in_use(args.event_loop)},
        "summaries": [
            {
                "subscribers": s.subscribers,
                "medians": {
                    target: {
                        name: median(s.values(target, name))
                        for name in ("deliveries_per_s", "paced_p50_ms", "paced_p99_ms", "burst_p50_ms", "burst_p99_ms")
                    }
                    for target in s.runs
                },
                "runs": [asdict(run) for runs in s.runs.values() for run in runs],
                "discarded_attempts": [asdict(run) for run in s.discarded],
            }
            for s in summaries
        ],
        "elapsed_s": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    root = args.data_root or tempfile.gettempdir()
    fs = filesystem_type(root)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    say(
        f"fan-out benchmark: {', '.join(args.targets)} × {args.runs} runs × subscribers {args.subscribers} "
        f"over {args.procs} processes; paced {paced_messages(args)} messages at {args.rate:g}/s, "
        f"burst {describe_burst(args)} / ≤ {args.burst_seconds:g} s of sending, window {args.window}; "
        f"every server on {R.loop_in_use(args.event_loop)}; "
        f"sectionchat data under {root} ({fs or 'unknown fs'})"
    )
    began = time.monotonic()
    summaries = run_all(args, lambda text: say(text))
    elapsed = time.monotonic() - began
    print(table(summaries))
    ratios = ratio_table(summaries)
    if ratios:
        print()
        print(ratios)
    print(
        f"\n{args.runs} runs per server, alternating. deliveries/s: burst phase ({describe_burst(args)}, "
        f"≤ {args.window} unacknowledged), every delivery / (last delivery − first send). p50/p99: paced phase "
        f"({paced_messages(args)} messages at {args.rate:g}/s), publisher send → subscriber receive, all deliveries. "
        f"Ratios: of medians, with min–max over (run i, run i) pairs. Total {elapsed:.0f} s."
    )
    for line in target_lines(summaries):
        print(line)
    all_runs = [run for s in summaries for runs in s.runs.values() for run in runs]
    busy = sum(R.is_busy(run.other_cpu, run.steal_cpu) for run in all_runs)
    retried = sum(run.attempts > 1 for run in all_runs)
    if retried:
        print(
            f"{retried} of {len(all_runs)} runs were repeated because other work used more than {R.BUSY_CORES} cores."
        )
    if busy:
        print(f"Warning: {busy} of {len(all_runs)} kept runs still shared the machine with other work.")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(args, summaries, elapsed, root, fs), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
