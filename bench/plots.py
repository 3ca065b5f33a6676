# How cost grows, as PNG plots for docs/performance.md:
#   docs/perf/fanout-latency.png     fan-out latency p50 and p99 at 10, 100, 1,000 subscribers
#   docs/perf/fanout-throughput.png  fan-out deliveries/s at the same sizes
#   docs/perf/create-rate.png        create_session round trips/s at 1, 10, 50, 200 clients
# for sectionchat and its baselines (raw websockets broadcast() and python-socketio
# for fan-out; the raw websockets+msgspec echo server for create_session).
#
#     .venv/bin/python -m bench.plots                       # runs the fan-out sweep (3 runs each), then draws
#     .venv/bin/python -m bench.plots --from-json           # only redraws from the saved JSON files
#     .venv/bin/python -m bench.plots --rerun-create        # also reruns the create_session sweep (bench.requests)
#
# The fan-out sweep is bench/fanout.py's benchmark (same options) and saves its
# runs to --fanout-json; the create_session curve comes from bench/requests.py's
# JSON (--create-json, by default the committed sweep in bench/results/).

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import fanout
from bench.harness import ROOT, BenchError, filesystem_type, median, run_main

FANOUT_JSON = ROOT / "bench" / "results" / "fanout-scaling.json"
CREATE_JSON = ROOT / "bench" / "results" / "requests-create-scaling.json"
OUT_DIR = ROOT / "docs" / "perf"

STYLE = {
    "sectionchat": {"color": "#1f77b4", "marker": "o", "label": "sectionchat (durable)"},
    "raw": {"color": "#2ca02c", "marker": "s", "label": "raw websockets broadcast()"},
    "socketio": {"color": "#d62728", "marker": "^", "label": "python-socketio (aiohttp)"},
    "echo": {"color": "#2ca02c", "marker": "s", "label": "raw websockets + msgspec echo"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plots",
        description="run the fan-out sweep (10, 100, 1,000 subscribers) and draw the cost-growth plots (PNG)",
    )
    fanout.add_arguments(parser, [10, 100, 1000], 3)
    parser.add_argument("--from-json", action="store_true", help="draw from --fanout-json without running anything")
    parser.add_argument(
        "--fanout-json",
        type=Path,
        default=FANOUT_JSON,
        help=f"fan-out sweep results, written then read (default {FANOUT_JSON.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--create-json",
        type=Path,
        default=CREATE_JSON,
        help=f"bench.requests create_session sweep (default {CREATE_JSON.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--rerun-create",
        action="store_true",
        help="rerun the create_session sweep (bench.requests, 1,10,50,200 clients, 3 runs) into --create-json first",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=OUT_DIR, help=f"where the PNGs go (default {OUT_DIR.relative_to(ROOT)})"
    )
    return parser


def points(
    runs: list[dict], target: str, size_key: str, value: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    """(sizes, medians, lows, highs) of `value` over the runs of `target`, by size."""
    sizes = sorted({run[size_key] for run in runs if run["target"] == target})
    meds, lows, highs = [], [], []
    for size in sizes:
        values = [
            run[value] for run in runs if run["target"] == target and run[size_key] == size and run[value] == run[value]
        ]
        meds.append(median(values) if values else float("nan"))
        lows.append(min(values) if values else float("nan"))
        highs.append(max(values) if values else float("nan"))
    return sizes, meds, lows, highs


def _series(
    axis, runs: list[dict], target: str, size_key: str, value: str, linestyle: str = "-", label: str | None = None
) -> None:
    sizes, meds, lows, highs = points(runs, target, size_key, value)
    if not sizes:
        return
    style = STYLE[target]
    errors = [[m - lo for m, lo in zip(meds, lows, strict=True)], [hi - m for m, hi in zip(meds, highs, strict=True)]]
    axis.errorbar(
        sizes, meds, yerr=errors, color=style["color"], marker=style["marker"], linestyle=linestyle,
        linewidth=2, markersize=7, capsize=4, label=label or style["label"],
    )  # fmt: skip


def log_axes(
    axis, sizes: list[int], xlabel: str, ylabel: str, *, logy: bool = True, tick: Callable[[int], str] = "{:,}".format
) -> None:
    """Log x axis ticked at the sizes measured (labelled by `tick`), log y axis unless `logy` is false."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    axis.set_xscale("log")
    axis.set_xticks(sizes)
    axis.set_xticklabels([tick(s) for s in sizes])
    axis.xaxis.set_minor_locator(NullLocator())
    if logy:
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_xlabel(xlabel, fontsize=11)
    axis.set_ylabel(ylabel, fontsize=11)
    axis.grid(True, which="major", alpha=0.3)


def plot_fanout(document: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for summary in document["summaries"] for run in summary["runs"]]
    settings = document["settings"]
    targets = [t for t in fanout.TARGETS if any(run["target"] == t for run in runs)]
    sizes = sorted({run["subscribers"] for run in runs})
    runs_per = settings["runs"]
    paced = int(round(settings["rate"] * settings["paced_seconds"]))
    written = []

    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for axis, value, name in ((axes[0], "paced_p50_ms", "p50"), (axes[1], "paced_p99_ms", "p99")):
        for target in targets:
            _series(axis, runs, target, "subscribers", value)
        log_axes(axis, sizes, "subscribers in the section", f"latency {name}, ms (log)")
        axis.set_title(f"{name}: publisher send → subscriber receive", fontsize=12)
        axis.yaxis.set_tick_params(labelleft=True)
    axes[0].legend(loc="upper left", fontsize=10)
    figure.suptitle(
        f"Fan-out latency, {paced} messages at {settings['rate']:g}/s to one section "
        f"(median of {runs_per} run{'s' if runs_per > 1 else ''}, bars = min–max)",
        fontsize=13,
    )
    figure.tight_layout()
    path = out_dir / "fanout-latency.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    if settings.get("burst_messages") is not None:
        burst = f"{settings['burst_messages']} messages"
    else:
        burst = f"{settings.get('burst_deliveries', 0):,} deliveries"
    figure, axis = plt.subplots(figsize=(7.5, 5))
    for target in targets:
        _series(axis, runs, target, "subscribers", "deliveries_per_s")
    log_axes(axis, sizes, "subscribers in the section", "deliveries per second (log)")
    axis.set_title(
        f"Fan-out throughput, bursts of {burst}\n(≤ {settings['window']} unacked, ≤ {settings['burst_seconds']:g} s "
        f"of sending; median of {runs_per} runs, bars = min–max)",
        fontsize=12,
    )
    axis.legend(loc="lower right", fontsize=10)
    figure.tight_layout()
    path = out_dir / "fanout-throughput.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
    return written


def plot_create(document: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [
        run for summary in document["summaries"] if summary["operation"] == "create_session" for run in summary["runs"]
    ]
    if not runs:
        raise BenchError("the create_session JSON has no create_session runs")
    sizes = sorted({run["clients"] for run in runs})
    figure, axis = plt.subplots(figsize=(7.5, 5))
    for target in ("sectionchat", "echo"):
        _series(axis, runs, target, "clients", "rate")
    log_axes(axis, sizes, "concurrent clients", "create_session round trips per second (log)")
    _sizes, sc, _lo, _hi = points(runs, "sectionchat", "clients", "rate")
    _sizes, echo, _lo, _hi = points(runs, "echo", "clients", "rate")
    for size, a, b in zip(sizes, sc, echo, strict=False):
        if b:
            axis.annotate(
                f"{a / b:.2f}×",
                (size, a),
                textcoords="offset points",
                xytext=(0, 10),
                ha="center",
                fontsize=9,
                color=STYLE["sectionchat"]["color"],
            )
    runs_per = document["settings"]["runs"]
    axis.set_title(
        f"create_session rate, durable file storage vs echo baseline\n(median of {runs_per} runs, bars = min–max; "
        "labels: sectionchat / echo)",
        fontsize=12,
    )
    axis.legend(loc="center right", fontsize=10)
    axis.margins(x=0.08, y=0.15)
    figure.tight_layout()
    path = out_dir / "create-rate.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = fanout.check_args(args)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    began = time.monotonic()
    try:
        if args.rerun_create:
            say(f"create_session sweep (bench.requests) -> {args.create_json}")
            command = [
                sys.executable, "-m", "bench.requests", "--operations", "create_session", "--clients", "1,10,50,200",
                "--runs", "3", "--json", str(args.create_json),
            ]  # fmt: skip
            if args.data_root:
                command += ["--data-root", args.data_root]
            subprocess.run(command, cwd=ROOT, check=True, timeout=1800)
        if args.from_json:
            document = json.loads(args.fanout_json.read_text())
        else:
            root = args.data_root or tempfile.gettempdir()
            say(f"fan-out sweep: subscribers {args.subscribers}, {args.runs} runs × {', '.join(args.targets)}")
            summaries = fanout.run_all(args, say)
            print(fanout.table(summaries))
            ratios = fanout.ratio_table(summaries)
            if ratios:
                print()
                print(ratios)
            document = fanout.to_json(args, summaries, time.monotonic() - began, root, filesystem_type(root))
            args.fanout_json.parent.mkdir(parents=True, exist_ok=True)
            args.fanout_json.write_text(json.dumps(document, indent=2) + "\n")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        written = plot_fanout(document, args.out_dir)
        if args.create_json.exists():
            written.append(plot_create(json.loads(args.create_json.read_text()), args.out_dir))
        else:
            print(f"bench: {args.create_json} not found; run with --rerun-create to make it", file=sys.stderr)
    except (OSError, subprocess.SubprocessError, KeyError, ValueError) as error:
        raise BenchError(str(error)) from error
    print()
    print("| plot | file |")
    print("|---|---|")
    for path in written:
        print(f"| {path.stem} | {path} |")
    print(f"\nTotal {time.monotonic() - began:.0f} s.")
    return 0


if __name__ == "__main__":
    run_main(main)
