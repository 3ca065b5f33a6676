# Every benchmark of the issues' targets, one after the other, each against its
# baseline in the same invocation (`make bench`, about 20 minutes on 2 cores):
#
#   requests   durable create/send and 1.1's edit/react at 50 and 200 clients
#              vs the durable echo and the plain echo (bench.requests)
#   storm      handshakes/s, a 5,000-client reconnect storm, shutdown (bench.storm)
#   fanout     1,000 subscribers vs raw broadcast() and python-socketio (bench.fanout)
#   memory     per idle / subscribed connection vs raw websockets (bench.memory)
#   summaries  section_summary to 1,000 watchers of a busy document (bench.summaries)
#   api        HTTP API writes vs the WebSocket path (bench.api)
#   webhooks   delivery throughput and ack-to-delivery lag at 1,000 msg/s (bench.webhooks)
#
# Each one prints its own table (medians, min–max over runs, ratios with the
# min–max over run pairs) and writes its JSON into --out; this prints them all,
# then the targets, met or not, from those JSONs.
#
#     .venv/bin/python -m bench.all                         # everything, the documented defaults
#     .venv/bin/python -m bench.all --only requests,storm --runs 1

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import ROOT, markdown_table, median, run_main
from bench.runs import fmt_ratio, ratio_spread, source_state

# name -> arguments of `python -m bench.<module>` (the runs are added from --runs)
BENCHMARKS: dict[str, list[str]] = {
    "requests": [
        "bench.requests", "--operations", "create_session,send_message,edit_message,react", "--clients", "50,200",
    ],
    "storm": ["bench.storm"],
    "fanout": ["bench.fanout"],
    "memory": ["bench.memory"],
    "summaries": ["bench.summaries"],
    "api": ["bench.api"],
    "webhooks": ["bench.webhooks"],
}  # fmt: skip


def spread(value: float, pairs: list[float]) -> str:
    if value != value:
        return "n/a"
    return (
        f"{fmt_ratio(value)} ({fmt_ratio(min(pairs))}–{fmt_ratio(max(pairs))})" if len(pairs) > 1 else fmt_ratio(value)
    )


def targets(out: Path) -> list[list[str]]:
    """(target, figure, met?) for what the JSONs of this invocation hold."""
    rows: list[list[str]] = []
    requests = out / "requests.json"
    if requests.exists():
        for s in json.loads(requests.read_text())["summaries"]:
            value, low, high = s["durable_ratio"], s["durable_pair_ratio_min"], s["durable_pair_ratio_max"]
            figure = f"{fmt_ratio(value)} ({fmt_ratio(low)}–{fmt_ratio(high)}) of the durable echo"
            rows.append([f"{s['operation']} at {s['clients']} clients ≥ 0.8× durable echo", figure, _met(value >= 0.8)])
    storm = out / "storm.json"
    if storm.exists():
        runs = json.loads(storm.read_text())["runs"]

        def of(target: str, field: str) -> list[float]:
            return [run[field] for run in runs if run["target"] == target]

        value, pairs = ratio_spread(of("sectionchat", "handshakes_per_s"), of("echo", "handshakes_per_s"))
        rows.append(["handshakes ≥ 0.8× raw websockets", spread(value, pairs), _met(value >= 0.8)])
        value, pairs = ratio_spread(of("sectionchat", "storm_s"), of("echo", "storm_s"))
        clients = runs[0]["clients"]
        rows.append([f"{clients:,}-client storm within 1.2× the echo's time", spread(value, pairs), _met(value <= 1.2)])
        value, pairs = ratio_spread(of("sectionchat", "shutdown_s"), of("echo", "shutdown_s"))
        figure = f"{spread(value, pairs)} ({median(of('sectionchat', 'shutdown_s')):.2f} s vs {median(of('echo', 'shutdown_s')):.2f} s)"
        rows.append([f"shutdown of {clients:,} connections about the raw server's", figure, _met(value <= 1.2)])
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description="every benchmark, then the targets")
    parser.add_argument("--runs", type=int, default=3, help="runs per server in each benchmark (default 3)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", default=None, help="where the JSONs go (default bench/results/all-<commit>)")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown or args.runs < 1:
        print(f"bench: --only takes {', '.join(BENCHMARKS)}; --runs ≥ 1", file=sys.stderr)
        return 2
    source = source_state()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"all-{source.get('commit', 'unknown')}"
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    failed: list[str] = []
    for name in chosen:
        command = [
            sys.executable,
            "-m",
            *BENCHMARKS[name],
            "--runs",
            str(args.runs),
            "--json",
            str(out / f"{name}.json"),
        ]
        print(f"\n## {name}\n\n`{' '.join(['python', '-m', *command[2:]])}`\n", flush=True)
        started = time.monotonic()
        finished = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        print(finished.stdout.rstrip())
        print(f"\n({time.monotonic() - started:.0f} s)", flush=True)
        if finished.returncode != 0:
            failed.append(name)
    rows = targets(out)
    if rows:
        print("\n## The targets\n")
        print(markdown_table(["target", "figure: median ratio (pair min–max)", ""], rows))
    print(f"\nTotal {time.monotonic() - began:.0f} s; JSON in {out}.")
    if failed:
        print(f"bench: {', '.join(failed)} failed (its error is above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
