# Scale-out benchmark: send_message acknowledgements per second with C clients
# (default 50) against ONE sectionchat node and against TWO nodes sharing one
# Redis, clients split evenly across the nodes; alternating runs (1 node,
# 2 nodes, 1 node, …), a fresh redis-server (AOF, appendfsync always, no RDB)
# and fresh node processes for every run.
#
#     .venv/bin/python -m bench.scaling                 # defaults: 50 clients, 5 runs each
#     .venv/bin/python -m bench.scaling --nodes 1,2,3 --clients 100
#
# The clients are bench/loadgen.py's closed-loop request/reply clients (the
# request benchmark's): client i works in section-(i % --sections) of one
# document. Always two load-generator processes, whichever the node count:
# with N nodes, client i talks to node (i + i // sections) % N ("mixed": an
# even split in which every section with more than one client is written from
# several nodes — what a load balancer without stickiness produces, and the
# case where nodes contend on one section) or, with --placement by-section, to
# node (i % sections) % N (each section written from one node only).

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import json
import multiprocessing
import queue
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import runs as R
from bench.harness import (
    HOST,
    BenchError,
    ServerProcess,
    fmt_rate,
    markdown_table,
    median,
    percentile,
    remove,
    run_main,
    scratch_dir,
    sectionchat_limits_off,
)
from bench.loadgen import SECTIONS, WorkerResult, WorkerSpec, worker_main

LOADGEN_PROCS = 2
PLACEMENTS = ("by-section", "mixed")


class RedisProcess:
    """A fresh redis-server on a free loopback port, durable like production (AOF, fsync always)."""

    def __init__(self, directory: Path, fsync: str = "always"):
        self.directory = directory
        self.fsync = fsync
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisProcess:
        executable = shutil.which("redis-server")
        if executable is None:
            raise BenchError("redis-server is not installed (Debian package redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            self.port = probe.getsockname()[1]
        command = [
            executable, "--port", str(self.port), "--bind", HOST, "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and "Ready to accept connections" in self.log_path.read_text(errors="replace"):
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise BenchError(f"redis-server did not start:\n{log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def node_process(scratch: Path, number: int, redis_url: str) -> ServerProcess:
    data_dir = scratch / f"node-{number}-data"
    command = [
        sys.executable, "-m", "server", "serve", "--host", HOST, "--port", "0",
        "--data-dir", str(data_dir), "--storage", redis_url, *sectionchat_limits_off(),
    ]  # fmt: skip
    return ServerProcess(f"node-{number}", command, scratch)


@dataclass
class ScalingRun:
    placement: str
    nodes: int
    clients: int
    index: int
    rate: float  # acknowledgements per second inside the window
    completed: int
    window_s: float
    p50_ms: float
    p99_ms: float
    nodes_cpu: float | None  # cores, summed over the nodes
    redis_cpu: float | None
    loadgen_cpu: float
    other_cpu: float | None
    steal_cpu: float | None
    attempts: int = 1

    @property
    def disturbance(self) -> float:
        return R.disturbance(self.other_cpu, self.steal_cpu)


def node_of(client: int, nodes: int, sections: int, placement: str) -> int:
    if placement == "by-section":
        return (client % sections) % nodes
    return (client + client // sections) % nodes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaling",
        description="send_message acks/s: one sectionchat node vs two nodes on one Redis (appendfsync always)",
    )
    parser.add_argument(
        "--nodes",
        type=lambda t: R.parse_counts(t, 1, 8),
        default=[1, 2],
        help="node counts to compare, alternating (default 1,2)",
    )
    parser.add_argument(
        "--clients", type=int, default=50, help="concurrent clients, split evenly across the nodes (default 50)"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per node count (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run (default 3)")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="warm-up before the window, not counted (default 0.5)"
    )
    parser.add_argument(
        "--sections",
        type=int,
        default=SECTIONS,
        help=f"client i writes to section-(i %% SECTIONS) (default {SECTIONS})",
    )
    parser.add_argument(
        "--placement",
        type=R.parse_names(PLACEMENTS),
        default=list(PLACEMENTS),
        help="which node a client uses: by-section, mixed or both (default by-section,mixed; see the module's comment)",
    )
    parser.add_argument(
        "--appendfsync",
        choices=("always", "everysec"),
        default="always",
        help="Redis AOF fsync policy (default always)",
    )
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="bound on requests per client per run")
    parser.add_argument(
        "--data-root", default=None, help="where the fresh Redis and node dirs go (default: the system temp dir)"
    )
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=1,
        help=f"repeat a run up to this many times while other work used > {R.BUSY_CORES} cores (default 1)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def run_once(args: argparse.Namespace, placement: str, nodes: int, index: int, ctx) -> ScalingRun:
    scratch = scratch_dir(args.data_root)
    redis = RedisProcess(scratch / "redis", args.appendfsync)
    servers: list[ServerProcess] = []
    workers: list = []
    try:
        redis.start()
        servers = [node_process(scratch, k + 1, redis.url).start() for k in range(nodes)]
        results = ctx.Queue()
        # Two load-generator groups (whatever the node count), each split by node.
        groups = [[c for c in range(args.clients) if c % LOADGEN_PROCS == g] for g in range(LOADGEN_PROCS)]
        assignments: list[tuple[int, list[int]]] = []
        for group in groups:
            for k in range(nodes):
                assignments.append((k, [c for c in group if node_of(c, nodes, args.sections, placement) == k]))
        assignments = [(k, clients) for k, clients in assignments if clients]
        barrier = ctx.Barrier(len(assignments) + 1)
        for k, clients in assignments:
            spec = WorkerSpec(
                url=servers[k].url,
                operation="send_message",
                clients=clients,
                warmup_s=args.warmup,
                seconds=args.seconds,
                max_requests=args.max_requests,
                sections=args.sections,
            )
            process = ctx.Process(target=worker_main, args=(spec, barrier, results), daemon=True)
            process.start()
            workers.append(process)
        try:
            barrier.wait(timeout=120)
        except Exception:  # noqa: BLE001 - a worker failed during set-up; its result says why
            pass
        started = time.perf_counter()
        time.sleep(args.warmup)
        pids = [s.process.pid for s in servers] + [redis.process.pid] + [w.pid for w in workers]  # type: ignore[union-attr]
        window = R.Window(pids)
        time.sleep(max(0.0, started + args.warmup + args.seconds - time.perf_counter()))
        window.stop()
        collected: list[WorkerResult] = []
        deadline = time.monotonic() + 60
        while len(collected) < len(workers):
            try:
                collected.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise BenchError("load generator did not report within 60 s of the window's end") from None
        failures = [r.error for r in collected if r.error]
        if failures:
            logs = "\n".join(s.first_error() for s in servers)
            raise BenchError(f"{nodes} node(s), run {index + 1}: {failures[0]}\n--- node logs ---\n{logs}")
        for process in workers:
            process.join(10)
        for server in servers:
            if server.errors_in_log():
                raise BenchError(f"{server.name} logged errors during the run:\n{server.first_error()}")
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
        for server in servers:
            server.stop()
        redis.stop()
        remove(scratch)
    cpu = window.cpu_seconds()
    nodes_cpu_s = [c for c in cpu[:nodes] if c is not None]
    redis_cpu_s = cpu[nodes]
    loadgen_cpu_s = sum(c for c in cpu[nodes + 1 :] if c is not None)
    ours = sum(nodes_cpu_s) + (redis_cpu_s or 0.0) + loadgen_cpu_s
    other, steal = window.machine(args.seconds, ours)
    latencies = sorted(latency for r in collected for latency in r.latencies)
    completed = sum(r.completed for r in collected)
    return ScalingRun(
        placement=placement,
        nodes=nodes,
        clients=args.clients,
        index=index,
        rate=completed / args.seconds,
        completed=completed,
        window_s=args.seconds,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        nodes_cpu=sum(nodes_cpu_s) / args.seconds if nodes_cpu_s else None,
        redis_cpu=None if redis_cpu_s is None else redis_cpu_s / args.seconds,
        loadgen_cpu=loadgen_cpu_s / args.seconds,
        other_cpu=other,
        steal_cpu=steal,
    )


def describe(run: ScalingRun) -> str:
    nodes_cpu = "n/a" if run.nodes_cpu is None else f"{run.nodes_cpu * 100:.0f}%"
    redis_cpu = "n/a" if run.redis_cpu is None else f"{run.redis_cpu * 100:.0f}%"
    text = (
        f"{run.rate:>8,.0f} acks/s  p50 {run.p50_ms:6.1f} ms  p99 {run.p99_ms:6.1f} ms"
        f"  nodes CPU {nodes_cpu:>5}  redis CPU {redis_cpu:>4}  loadgen CPU {run.loadgen_cpu * 100:3.0f}%"
    )
    text += R.fmt_load(run.other_cpu, run.steal_cpu, R.is_busy(run.other_cpu, run.steal_cpu))
    return text


def per_cpu(run: ScalingRun) -> float:
    """Acks per CPU-second of the nodes and Redis together."""
    cpu = (run.nodes_cpu or 0.0) + (run.redis_cpu or 0.0)
    return run.rate / cpu if cpu else float("nan")


def table(results: dict[tuple[str, int], list[ScalingRun]], base: int) -> str:
    header = [
        "placement",
        "nodes",
        "clients",
        "send_message acks/s median (min–max)",
        f"ratio to {base} node{'s' if base > 1 else ''} (pair min–max)",
        "p50 ms",
        "p99 ms",
        "nodes CPU",
        "Redis CPU",
        "acks per CPU-s (nodes + Redis)",
    ]
    rows = []
    for (placement, nodes), runs in results.items():
        rates = [r.rate for r in runs]
        rows.append(
            [
                placement,
                str(nodes),
                str(runs[0].clients),
                R.spread(rates),
                "—" if nodes == base else R.fmt_ratio_spread(rates, [r.rate for r in results[(placement, base)]]),
                R.fmt_ms(median([r.p50_ms for r in runs])),
                R.fmt_ms(median([r.p99_ms for r in runs])),
                f"{median([r.nodes_cpu or 0.0 for r in runs]) * 100:.0f}%",
                f"{median([r.redis_cpu or 0.0 for r in runs]) * 100:.0f}%",
                fmt_rate(median([per_cpu(r) for r in runs])),
            ]
        )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (
        args.runs < 1
        or args.clients < 1
        or args.seconds <= 0
        or args.warmup < 0
        or args.sections < 1
        or args.busy_retries < 0
    ):
        print(
            "bench: --runs, --clients, --sections ≥ 1, --seconds > 0, --warmup and --busy-retries ≥ 0", file=sys.stderr
        )
        return 2

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    ctx = multiprocessing.get_context("spawn")
    say(
        f"scaling benchmark: send_message, {args.clients} clients ({' and '.join(args.placement)} placement, "
        f"{args.sections} sections) on {' vs '.join(map(str, args.nodes))} node(s) sharing one Redis "
        f"(appendfsync {args.appendfsync}); {args.runs} runs each, {args.warmup:g} s warm-up + {args.seconds:g} s window"
    )
    began = time.monotonic()
    results: dict[tuple[str, int], list[ScalingRun]] = {(p, n): [] for p in args.placement for n in args.nodes}
    discarded: list[ScalingRun] = []
    for placement in args.placement:
        for index in range(args.runs):
            for nodes in args.nodes:

                def report(run: ScalingRun, attempt: int, retry: bool, index=index, nodes=nodes) -> None:
                    label = f"run {index + 1}/{args.runs}" + (f" try {attempt}" if attempt > 1 else "")
                    say(
                        f"  {run.placement:<10} {nodes} node{'s' if nodes > 1 else ' '} {label:<14} "
                        f"{describe(run)}{'  -> again' if retry else ''}"
                    )

                kept, dropped = R.retry_quietest(
                    lambda index=index, nodes=nodes, placement=placement: run_once(args, placement, nodes, index, ctx),
                    lambda run: run.disturbance,
                    args.busy_retries,
                    report,
                )
                kept.attempts = 1 + len(dropped)
                results[(placement, nodes)].append(kept)
                discarded.extend(dropped)
    elapsed = time.monotonic() - began
    base = args.nodes[0]
    print(table(results, base))
    print(
        f"\n{args.runs} runs per node count, alternating; rate = acknowledgements received inside the "
        f"{args.seconds:g} s window; ratio = median / median of {base} node{'s' if base > 1 else ''}, min–max over "
        f"(run i, run i) pairs. CPU in cores (100% = one core). Total {elapsed:.0f} s."
    )
    runs = [run for rs in results.values() for run in rs]
    busy = sum(R.is_busy(run.other_cpu, run.steal_cpu) for run in runs)
    retried = sum(run.attempts > 1 for run in runs)
    if retried:
        print(f"{retried} of {len(runs)} runs were repeated because other work used more than {R.BUSY_CORES} cores.")
    if busy:
        print(f"Warning: {busy} of {len(runs)} kept runs still shared the machine with other work.")
    if args.json:
        document = {
            "benchmark": "scaling",
            "machine": R.describe_machine(),
            "settings": {
                key: getattr(args, key)
                for key in (
                    "nodes",
                    "clients",
                    "runs",
                    "seconds",
                    "warmup",
                    "sections",
                    "placement",
                    "appendfsync",
                    "busy_retries",
                )
            },
            "runs": [asdict(run) for run in runs],
            "discarded_attempts": [asdict(run) for run in discarded],
            "elapsed_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
