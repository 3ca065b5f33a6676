# Request-rate benchmark: create_session and send_message round trips per second,
# sectionchat (durable file storage) against two baselines: the durable echo
# (raw websockets + msgspec, each request group-committed to one file with
# fdatasync before its reply: the physical limit of an acknowledged write on
# this disk) and the plain echo (the same without the file), alternating runs, each server its own process, the load generated
# by separate worker processes. Revision 1.1's edit_message and react on request
# (--operations react,edit_message): each client edits / reacts to seq 1 of its
# own session, alternating text A/B and on/off so that every request is a stored write.
#
#     .venv/bin/python -m bench.requests                   # the documented default
#     .venv/bin/python -m bench.requests --clients 1,10,50,200 --json out.json
#     .venv/bin/python -m bench.requests --operations react,edit_message
#
# Rules kept here: runs alternate (sectionchat, durable, echo, sectionchat, …) so
# that drift on a shared machine hits both alike; every sectionchat run gets a
# fresh data dir; everything is bounded in time (and in requests per client);
# only 127.0.0.1 is used. Results are medians over runs and the ratio of medians.

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import json
import multiprocessing
import os
import platform
import queue
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.harness import (
    BenchError,
    ServerProcess,
    filesystem_type,
    fmt_rate,
    fmt_spread,
    machine_cpu_seconds,
    markdown_table,
    median,
    percentile,
    remove,
    run_main,
    scratch_dir,
)
from bench.loadgen import DOCUMENT_ID, SECTIONS, WorkerResult, WorkerSpec, worker_main
from bench.runs import fmt_load, fmt_ratio_spread, fmt_source, ratio_spread, source_state

OPERATIONS = ("create_session", "send_message")  # the default: revision 1.0's writes
ALL_OPERATIONS = OPERATIONS + ("edit_message", "react")  # revision 1.1's, on request
TARGETS = ("sectionchat", "durable", "echo")  # the durable echo and the plain echo
BUSY_CORES = 0.25  # other work above this during a window makes a run "busy"


@dataclass
class Run:
    operation: str
    clients: int
    target: str
    index: int
    rate: float  # replies per second inside the measured window
    completed: int
    window_s: float
    p50_ms: float
    p99_ms: float
    server_cpu: float | None  # fraction of one core during the window
    loadgen_cpu: float | None  # fraction of one core, summed over worker processes (None: not measured)
    other_cpu: float | None  # cores busy with anything else on the machine during the window
    steal_cpu: float | None  # cores taken by the hypervisor (virtual machines)
    attempts: int = 1  # > 1 when earlier attempts ran on a busy machine and were retried
    source: dict | None = None  # commit and `git status --short server protocol` just before the server started


@dataclass
class Summary:
    operation: str
    clients: int
    runs: dict[str, list[Run]] = field(default_factory=dict)
    discarded: list[Run] = field(default_factory=list)  # busier attempts that a retry replaced

    def rates(self, target: str) -> list[float]:
        return [run.rate for run in self.runs.get(target, [])]

    def ratio(self, baseline: str = "echo") -> float:
        return ratio_spread(self.rates("sectionchat"), self.rates(baseline))[0]

    def pair_ratios(self, baseline: str = "echo") -> list[float]:
        return ratio_spread(self.rates("sectionchat"), self.rates(baseline))[1] or [float("nan")]


def parse_clients(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, not {text!r}") from None
    if not counts or any(c < 1 or c > 2000 for c in counts):
        raise argparse.ArgumentTypeError("client counts must be between 1 and 2000")
    return counts


def parse_operations(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in ALL_OPERATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"operations are {', '.join(ALL_OPERATIONS)}; not {', '.join(unknown) or text!r}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.requests",
        description="create_session / send_message (and 1.1's edit_message / react) round trips per second: "
        "sectionchat (durable) vs a durable (group-commit fdatasync) and a plain raw websockets+msgspec echo",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per server, alternating (default 5)")
    parser.add_argument(
        "--clients",
        type=parse_clients,
        default=[50],
        help="concurrent clients; a list runs each (default 50; e.g. 1,10,50,200)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run (default 3)")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="warm-up before the window, not counted (default 0.5)"
    )
    parser.add_argument(
        "--operations",
        type=parse_operations,
        default=list(OPERATIONS),
        help="comma-separated, of create_session, send_message, edit_message, react (default create_session,send_message)",
    )
    parser.add_argument(
        "--sections",
        type=int,
        default=SECTIONS,
        help=f"client i works in section-(i %% SECTIONS) of one document (default {SECTIONS})",
    )
    parser.add_argument(
        "--procs", type=int, default=1, help="load-generator processes, clients split among them (default 1)"
    )
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="bound on requests per client per run (default 1,000,000)"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="where the fresh data dirs go (default: the system temp dir); must be a real disk for fsync to mean anything",
    )
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=2,
        help=f"repeat a run up to this many times while other work used > {BUSY_CORES} cores during it, keeping the quietest attempt (default 2; 0 keeps every run as it came)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run sectionchat under py-spy and write one flame graph per run into DIR "
        "(<operation>-c<clients>-<run>.svg; --profile-format raw: py-spy's collapsed stacks in .txt; "
        "cprofile: cProfile's stats in .prof, from inside the server, every call slower); the rates are then lower",
    )
    parser.add_argument(
        "--profile-format", choices=("svg", "raw", "cprofile"), default="svg", help="see --profile (default svg)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run and summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def run_once(args: argparse.Namespace, operation: str, clients: int, target: str, index: int, ctx) -> Run:
    scratch = scratch_dir(args.data_root)
    if target == "sectionchat":
        profile = None
        if args.profile:
            suffix = {"raw": "txt", "cprofile": "prof"}.get(args.profile_format, "svg")
            profile = Path(args.profile).resolve() / f"{operation}-c{clients}-{index + 1}.{suffix}"
            profile.parent.mkdir(parents=True, exist_ok=True)
        server = ServerProcess.sectionchat(scratch, profile=profile)
    else:
        server = ServerProcess.durable_echo(scratch) if target == "durable" else ServerProcess.echo(scratch)
    workers: list = []
    source = source_state()
    try:
        server.start()
        procs = max(1, min(args.procs, clients))
        barrier = ctx.Barrier(procs + 1)
        results = ctx.Queue()
        for worker in range(procs):
            spec = WorkerSpec(
                url=server.url,
                operation=operation,
                clients=list(range(worker, clients, procs)),
                warmup_s=args.warmup,
                seconds=args.seconds,
                max_requests=args.max_requests,
                sections=args.sections,
            )
            process = ctx.Process(target=worker_main, args=(spec, barrier, results), daemon=True)
            process.start()
            workers.append(process)
        try:
            barrier.wait(timeout=120)  # every client connected (and, for send_message, has its session)
        except Exception:  # noqa: BLE001 - a worker failed during setup; its result says why
            pass
        started = time.perf_counter()
        time.sleep(args.warmup)
        cpu_start, machine_start = server.cpu_seconds(), machine_cpu_seconds()
        time.sleep(max(0.0, started + args.warmup + args.seconds - time.perf_counter()))
        cpu_end, machine_end = server.cpu_seconds(), machine_cpu_seconds()
        collected: list[WorkerResult] = []
        deadline = time.monotonic() + args.seconds + args.warmup + 60
        while len(collected) < procs:
            try:
                collected.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise BenchError(f"{target}: load generator did not report within 60 s of the window's end") from None
        failures = [r.error for r in collected if r.error]
        if failures:
            raise BenchError(
                f"{target} {operation} run {index + 1}: {failures[0]}\n--- server log ---\n{server.first_error()}"
            )
        for process in workers:
            process.join(10)
        if server.errors_in_log():
            raise BenchError(f"{target} logged errors during the run:\n{server.first_error()}")
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
        server.stop()
        remove(scratch)
    latencies = sorted(latency for r in collected for latency in r.latencies)
    completed = sum(r.completed for r in collected)
    window = args.seconds
    server_cpu = None if cpu_start is None or cpu_end is None else (cpu_end - cpu_start) / window
    loadgen_cpu = sum(r.cpu_s for r in collected) / window
    other_cpu = steal_cpu = None
    if machine_start is not None and machine_end is not None:
        busy = (machine_end[0] - machine_start[0]) / window
        other_cpu = max(0.0, busy - (server_cpu or 0.0) - loadgen_cpu)
        steal_cpu = (machine_end[1] - machine_start[1]) / window
    return Run(
        operation=operation,
        clients=clients,
        target=target,
        index=index,
        rate=completed / window,
        completed=completed,
        window_s=window,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        server_cpu=server_cpu,
        loadgen_cpu=loadgen_cpu,
        other_cpu=other_cpu,
        steal_cpu=steal_cpu,
        source=source,
    )


def disturbance(run: Run) -> float:
    """Cores that other work (and the hypervisor) took during the run's window."""
    return (run.other_cpu or 0.0) + (run.steal_cpu or 0.0)


def is_busy(run: Run) -> bool:
    return disturbance(run) > BUSY_CORES


def describe(run: Run) -> str:
    cpu = "n/a" if run.server_cpu is None else f"{run.server_cpu * 100:.0f}%"
    text = (
        f"{run.rate:>9,.0f}/s  p50 {run.p50_ms:6.1f} ms  p99 {run.p99_ms:6.1f} ms"
        f"  server CPU {cpu:>4}  loadgen CPU {run.loadgen_cpu * 100:3.0f}%"
    )
    text += fmt_load(run.other_cpu, run.steal_cpu, is_busy(run))
    return text


def busy_runs(summaries: list[Summary]) -> tuple[int, int, int]:
    """(runs kept although busy, runs kept, runs that needed retries)."""
    runs = [run for s in summaries for target in TARGETS for run in s.runs[target]]
    return sum(is_busy(r) for r in runs), len(runs), sum(r.attempts > 1 for r in runs)


def fmt_ms(value: float) -> str:
    return f"{value:.1f}"


def per_cpu_second(run: Run) -> float | None:
    """Replies per CPU-second of the server: a figure that other work on the machine disturbs less."""
    return run.rate / run.server_cpu if run.server_cpu else None


def fmt_per_cpu(runs: list[Run]) -> str:
    values = [v for v in map(per_cpu_second, runs) if v is not None]
    return fmt_rate(median(values)) if values else "n/a"


def fmt_cpu(runs: list[Run]) -> str:
    values = [run.server_cpu for run in runs if run.server_cpu is not None]
    return f"{median(values) * 100:.0f}%" if values else "n/a"


def table(summaries: list[Summary]) -> str:
    header = [
        "request",
        "clients",
        "sectionchat /s median (min–max)",
        "durable echo /s",
        "echo /s",
        "vs durable echo (pair min–max)",
        "vs echo (pair min–max)",
        "p50 ms sc / durable / echo",
        "p99 ms sc / durable / echo",
        "server CPU sc / durable / echo",
        "per server CPU-s sc / durable / echo",
    ]
    rows = []
    for s in summaries:
        runs = [s.runs[target] for target in TARGETS]
        rows.append(
            [
                s.operation,
                str(s.clients),
                *(fmt_spread(s.rates(target)) for target in TARGETS),
                f"**{fmt_ratio_spread(s.rates('sectionchat'), s.rates('durable'))}**",
                fmt_ratio_spread(s.rates("sectionchat"), s.rates("echo")),
                " / ".join(fmt_ms(median([r.p50_ms for r in target])) for target in runs),
                " / ".join(fmt_ms(median([r.p99_ms for r in target])) for target in runs),
                " / ".join(map(fmt_cpu, runs)),
                " / ".join(map(fmt_per_cpu, runs)),
            ]
        )
    return markdown_table(header, rows)


def describe_machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (
        args.runs < 1
        or args.seconds <= 0
        or args.warmup < 0
        or args.procs < 1
        or args.sections < 1
        or args.busy_retries < 0
    ):
        print(
            "bench: --runs, --procs and --sections must be ≥ 1, --seconds > 0, --warmup and --busy-retries ≥ 0",
            file=sys.stderr,
        )
        return 2
    root = args.data_root or tempfile.gettempdir()
    fs = filesystem_type(root)
    if fs in ("tmpfs", "ramfs"):
        print(
            f"bench: warning: {root} is {fs}; fsync costs nothing there, so 'durable' is not measured", file=sys.stderr
        )

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    ctx = multiprocessing.get_context("spawn")
    say(
        f"sectionchat request benchmark: {args.runs} runs × {', '.join(args.operations)} × clients {args.clients}; "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s window; document {DOCUMENT_ID!r}, "
        f"client i in section-(i % {args.sections}); data under {root} ({fs or 'unknown fs'})"
    )
    began = time.monotonic()
    source_at_start = source_state()
    say(f"  server source: {fmt_source(source_at_start)}")
    summaries: list[Summary] = []
    for operation in args.operations:
        for clients in args.clients:
            summary = Summary(operation, clients, {target: [] for target in TARGETS})
            for index in range(args.runs):
                for target in TARGETS:
                    attempts: list[Run] = []
                    while True:
                        run = run_once(args, operation, clients, target, index, ctx)
                        attempts.append(run)
                        retry = is_busy(run) and len(attempts) <= args.busy_retries
                        label = f"run {index + 1}/{args.runs}" + (f" try {len(attempts)}" if len(attempts) > 1 else "")
                        say(
                            f"  {operation:<14} c={clients:<4} {label:<14} {target:<11} {describe(run)}{'  -> again' if retry else ''}"
                        )
                        if not retry:
                            break
                    run = min(attempts, key=disturbance)
                    run.attempts = len(attempts)
                    summary.runs[target].append(run)
                    summary.discarded.extend(attempt for attempt in attempts if attempt is not run)
            summaries.append(summary)
    elapsed = time.monotonic() - began
    source_at_end = source_state()
    sources = sorted({fmt_source(run.source) for s in summaries for t in TARGETS for run in s.runs[t] if run.source})
    print(table(summaries))
    print(
        f"\nRuns per server: {args.runs}, alternating; rate = replies received inside the {args.seconds:g} s window. "
        f"ratio = sectionchat median / baseline median; pair min–max over (run i, run i) pairs; "
        "the durable echo group-commits each request to one file with fdatasync before replying. "
        f"Total {elapsed:.0f} s. Server source: {'; '.join(sources) or fmt_source(source_at_end)}"
        + (" (it changed during the invocation)" if len(sources) > 1 else "")
        + "."
    )
    busy, total, retried = busy_runs(summaries)
    if retried:
        print(
            f"{retried} of {total} runs were repeated because other work used more than {BUSY_CORES} cores during them."
        )
    if busy:
        print(
            f"Warning: {busy} of {total} kept runs still shared the machine with other work (> {BUSY_CORES} cores); "
            "medians absorb some of that, a quieter machine gives steadier figures."
        )
    if args.json:
        document = {
            "benchmark": "requests",
            "machine": describe_machine(),
            "source": {"start": source_at_start, "end": source_at_end},
            "settings": {
                "runs": args.runs,
                "clients": args.clients,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "procs": args.procs,
                "busy_retries": args.busy_retries,
                "busy_cores": BUSY_CORES,
                "document_id": DOCUMENT_ID,
                "sections": args.sections,
                "data_root": root,
                "data_fs": fs,
            },
            "summaries": [
                {
                    "operation": s.operation,
                    "clients": s.clients,
                    "sectionchat_median": median(s.rates("sectionchat")),
                    "durable_median": median(s.rates("durable")),
                    "echo_median": median(s.rates("echo")),
                    "ratio": s.ratio(),
                    "pair_ratio_min": min(s.pair_ratios()),
                    "pair_ratio_max": max(s.pair_ratios()),
                    "durable_ratio": s.ratio("durable"),
                    "durable_pair_ratio_min": min(s.pair_ratios("durable")),
                    "durable_pair_ratio_max": max(s.pair_ratios("durable")),
                    "sectionchat_per_cpu_second_median": median(
                        [v for v in map(per_cpu_second, s.runs["sectionchat"]) if v is not None] or [float("nan")]
                    ),
                    "echo_per_cpu_second_median": median(
                        [v for v in map(per_cpu_second, s.runs["echo"]) if v is not None] or [float("nan")]
                    ),
                    "runs": [asdict(run) for target in TARGETS for run in s.runs[target]],
                    "discarded_attempts": [asdict(run) for run in s.discarded],
                }
                for s in summaries
            ],
            "elapsed_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
