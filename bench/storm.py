# Handshakes and reconnect storms: sectionchat against the raw websockets echo
# (bench/echo_server.py, which sends the same welcome frame), alternating runs,
# each server its own process, the clients bench/wsclient.py's light ones in
# this process.
#
# - handshakes/s: --connectors loops, each opening a connection, waiting for
#   the welcome frame and closing, for --seconds after a warm-up.
# - the storm: --clients connections (client i subscribed to section i % --sections
#   of one document with a message in each; on the echo, one ping each), then:
#   the server is stopped with all of them open (shutdown time: SIGTERM to
#   exit), started again, one more message is stored in every section, and
#   every client reconnects at once and recovers by offset (`subscribe` with
#   since_offset and epoch; on the echo, connect and ping). Storm time: first
#   connect attempt to the last client recovered. Every recovery is checked:
#   recovered, and the missed events' offsets exactly since_offset+1 .. offset.
#   Also: SYNs the kernel dropped (TcpExt ListenOverflows and ListenDrops), and
#   the server's CPU per reconnect.
#
#     .venv/bin/python -m bench.storm                       # 3 runs each, 5,000 clients
#     .venv/bin/python -m bench.storm --runs 1 --clients 500 --seconds 1

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec

from bench import runs as R
from bench.harness import HOST, BenchError, ServerProcess, markdown_table, median, remove, run_main, scratch_dir
from bench.wsclient import HandshakeError, LightClient, connect, connect_many, raise_fd_limit
from server.config import Config

TARGETS = ("sectionchat", "echo")
DOCUMENT_ID = "storm-doc"
RECONNECT_DEADLINE_S = 120.0  # a storm that takes longer fails the run


@dataclass
class Run:
    target: str
    index: int
    handshakes_per_s: float
    handshake_p50_ms: float
    handshake_server_cpu_ms: float | None  # server CPU per handshake
    clients: int
    shutdown_s: float  # SIGTERM to exit, with every client connected
    storm_s: float  # first reconnect attempt to the last client recovered
    storm_p50_s: float  # half the clients were back by then
    syn_drops: int  # ListenOverflows + ListenDrops during the storm
    storm_server_cpu_ms: float | None  # server CPU per reconnect and recovery
    retries: int  # connect attempts that failed and were made again
    events_recovered: int  # sectionchat: missed events the clients got back (all checked gapless)


def listen_drops() -> int:
    """The kernel's count of connections refused at a full accept queue (SYNs dropped), machine-wide."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            fields = dict(zip(header.split()[1:], map(int, values.split()[1:]), strict=True))
            return fields.get("ListenOverflows", 0) + fields.get("ListenDrops", 0)
    return 0


class Replies:
    """The first text frame after each request, per client (the welcome is skipped once seen)."""

    def __init__(self) -> None:
        self.waiting: dict[LightClient, asyncio.Future[bytes]] = {}

    def expect(self, client_key: object) -> asyncio.Future[bytes]:
        future = asyncio.get_running_loop().create_future()
        self.waiting[client_key] = future  # type: ignore[index]
        return future

    def on_text(self, client: LightClient, payload: bytes, received_ns: int) -> None:
        future = self.waiting.get(client.state)  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(payload)


async def open_client(port: int, name: str, replies: Replies, key: object) -> tuple[LightClient, bytes]:
    """Connect and return the client with its welcome frame."""
    welcome = replies.expect(key)
    client = await connect(HOST, port, f"/ws?name={name}", replies.on_text, state=key)
    return client, await asyncio.wait_for(welcome, 30)


async def handshakes(port: int, connectors: int, warmup: float, seconds: float) -> tuple[int, list[float]]:
    """Opens (handshake and welcome) completed inside the window, and their latencies."""
    replies = Replies()
    started = time.perf_counter()
    window = (started + warmup, started + warmup + seconds)
    latencies: list[float] = []

    async def connector(i: int) -> None:
        n = 0
        while time.perf_counter() < window[1]:
            begin = time.perf_counter()
            client, _ = await open_client(port, f"h{i}", replies, (i, n))
            end = time.perf_counter()
            if window[0] <= end <= window[1]:
                latencies.append(end - begin)
            del replies.waiting[(i, n)]  # type: ignore[arg-type]
            n += 1
            client.close()
            await client.lost

    await asyncio.gather(*(connector(i) for i in range(connectors)))
    return len(latencies), latencies


def subscribe_frame(i: int, sections: int, since: tuple[str, int] | None = None) -> bytes:
    frame: dict[str, object] = {
        "type": "subscribe",
        "id": i,
        "document_id": DOCUMENT_ID,
        "section_id": f"s-{i % sections}",
    }
    if since is not None:
        frame["epoch"], frame["since_offset"] = since
    return msgspec.json.encode(frame)


async def request(client: LightClient, replies: Replies, key: object, frame: bytes) -> dict:
    reply = replies.expect(key)
    client.send_text(frame)
    decoded = msgspec.json.decode(await asyncio.wait_for(reply, 60))
    if decoded.get("type") == "error":
        raise BenchError(f"client {key}: {decoded}")
    return decoded


async def message_each(port: int, sections: int, text: str, *, create: bool) -> None:
    """A message in every section (sectionchat only): in a new session, or in the section's first one."""
    replies = Replies()
    client, _ = await open_client(port, "poster", replies, "poster")

    async def call(**frame: object) -> dict:
        return await request(client, replies, "poster", msgspec.json.encode(frame))

    for n in range(sections):
        where = {"document_id": DOCUMENT_ID, "section_id": f"s-{n}"}
        if create:
            session_id = (await call(type="create_session", id=n, **where))["session"]["session_id"]
        else:
            session_id = (await call(type="list_sessions", id=n, **where))["sessions"][0]["session_id"]
        await call(type="send_message", id=n, session_id=session_id, text=text)
    client.close()
    await client.lost


def check_recovered(i: int, since: tuple[str, int], reply: dict) -> int:
    """The missed events, gapless: offsets since+1 .. the reply's offset. Returns how many."""
    offsets = [event["offset"] for event in reply.get("events", [])]
    expected = list(range(since[1] + 1, reply["offset"] + 1))
    if reply.get("type") != "subscribed" or not reply.get("recovered") or offsets != expected or not offsets:
        raise BenchError(f"client {i} did not recover gaplessly from {since}: {str(reply)[:400]}")
    return len(offsets)


async def storm(server: ServerProcess, target: str, count: int, sections: int) -> dict[str, float | int]:
    """Connect `count` clients, restart the server under them, and time their return."""
    replies = Replies()
    since: dict[int, tuple[str, int]] = {}
    if target == "sectionchat":
        await message_each(server.port, sections, "before", create=True)  # something to recover

    async def first(i: int) -> LightClient:
        client, _ = await open_client(server.port, f"u{i}", replies, i)
        if target == "sectionchat":
            reply = await request(client, replies, i, subscribe_frame(i, sections))
            since[i] = (reply["epoch"], reply["offset"])
        else:
            await request(client, replies, i, b'{"type":"ping","id":1}')
        return client

    clients = await connect_many(count, first, concurrency=100)
    stop_began = time.perf_counter()
    await asyncio.to_thread(server.stop, 60)  # in a thread: the clients answer the server's close frames meanwhile
    shutdown_s = time.perf_counter() - stop_began
    await asyncio.wait_for(asyncio.gather(*(client.lost for client in clients)), 30)
    server.start()
    if target == "sectionchat":
        await message_each(server.port, sections, "missed", create=False)  # stored while the clients are away
    cpu_before, drops_before = server.cpu_seconds(), listen_drops()
    retries = 0
    recovered = 0
    back: list[float] = []
    began = time.perf_counter()

    async def again(i: int) -> LightClient:
        nonlocal retries, recovered
        delay = 0.05
        while True:
            try:
                client, _ = await open_client(server.port, f"u{i}", replies, i)
                break
            except (OSError, TimeoutError, HandshakeError) as error:
                if time.perf_counter() - began > RECONNECT_DEADLINE_S:
                    raise BenchError(
                        f"client {i} could not reconnect within {RECONNECT_DEADLINE_S:g} s: {error}"
                    ) from None
                retries += 1
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        if target == "sectionchat":
            reply = await request(client, replies, i, subscribe_frame(i, sections, since[i]))
            recovered += check_recovered(i, since[i], reply)
        else:
            await request(client, replies, i, b'{"type":"ping","id":2}')
        back.append(time.perf_counter() - began)
        return client

    clients = await asyncio.gather(*(again(i) for i in range(count)))
    storm_s = time.perf_counter() - began
    cpu_after, drops_after = server.cpu_seconds(), listen_drops()
    for client in clients:
        client.close()
    back.sort()
    return {
        "shutdown_s": shutdown_s,
        "storm_s": storm_s,
        "storm_p50_s": back[len(back) // 2],
        "syn_drops": drops_after - drops_before,
        "storm_server_cpu_ms": None
        if cpu_before is None or cpu_after is None
        else (cpu_after - cpu_before) / count * 1000,
        "retries": retries,
        "events_recovered": recovered,
    }


def run_once(args: argparse.Namespace, target: str, index: int) -> Run:
    scratch = scratch_dir(args.data_root)
    if target == "sectionchat":
        profile = None
        if args.profile is not None:  # the file is written again by the restart: it shows the storm and the shutdown
            profile = Path(args.profile).resolve() / f"storm-{index + 1}.svg"
            profile.parent.mkdir(parents=True, exist_ok=True)
        server = ServerProcess.sectionchat(scratch, profile=profile)
    else:  # with sectionchat's default listen backlog: the same kernel queue for both
        server = ServerProcess.echo(scratch, "--backlog", str(Config.listen_backlog))
    try:
        server.start()
        cpu_before = server.cpu_seconds()
        count, latencies = asyncio.run(handshakes(server.port, args.connectors, args.warmup, args.seconds))
        cpu_after = server.cpu_seconds()
        latencies.sort()
        handshake_cpu = None
        if cpu_before is not None and cpu_after is not None and count:
            handshake_cpu = (cpu_after - cpu_before) / count * 1000  # the warm-up's too: an upper bound
        result = asyncio.run(storm(server, target, args.clients, args.sections))
        if server.errors_in_log():
            raise BenchError(f"{target} logged errors:\n{server.first_error()}")
    finally:
        server.stop(timeout=60)
        remove(scratch)
    return Run(
        target=target,
        index=index,
        handshakes_per_s=count / args.seconds,
        handshake_p50_ms=latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
        handshake_server_cpu_ms=handshake_cpu,
        clients=args.clients,
        **result,  # type: ignore[arg-type]
    )


def table(runs: dict[str, list[Run]]) -> str:
    sc, echo = runs["sectionchat"], runs["echo"]

    def row(name: str, field: str, fmt=R.fmt_rate, ratio: bool = True) -> list[str]:
        a = [getattr(run, field) for run in sc]
        b = [getattr(run, field) for run in echo]
        return [name, R.spread(a, fmt), R.spread(b, fmt), R.fmt_ratio_spread(a, b) if ratio else "—"]

    seconds = lambda v: f"{v:.2f}"  # noqa: E731
    ms = lambda v: f"{v:.2f}"  # noqa: E731
    count = lambda v: f"{v:,.0f}"  # noqa: E731
    rows = [
        row("handshakes/s (higher is better)", "handshakes_per_s"),
        row("handshake p50 ms", "handshake_p50_ms", ms),
        row("server CPU ms per handshake", "handshake_server_cpu_ms", ms),
        row(f"storm: all {sc[0].clients:,} back, s (lower is better)", "storm_s", seconds),
        row("storm: half back, s", "storm_p50_s", seconds),
        row("storm: SYNs dropped", "syn_drops", count, ratio=False),
        row("storm: connect retries", "retries", count, ratio=False),
        row("storm: server CPU ms per reconnect", "storm_server_cpu_ms", ms),
        row(f"shutdown with {sc[0].clients:,} open, s", "shutdown_s", seconds),
    ]
    return markdown_table(["", "sectionchat median (min–max)", "raw websockets echo", "ratio (pair min–max)"], rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storm", description="handshakes/s and a reconnect storm: sectionchat vs raw websockets"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per server, alternating (default 3)")
    parser.add_argument(
        "--connectors", type=int, default=50, help="concurrent connect loops for handshakes/s (default 50)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="handshake window (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="handshake warm-up (default 0.5)")
    parser.add_argument("--clients", type=int, default=5000, help="clients in the storm (default 5,000)")
    parser.add_argument(
        "--sections", type=int, default=100, help="sections the storm's clients subscribe to (default 100)"
    )
    parser.add_argument("--data-root", default=None, help="where the fresh data dirs go (default: the system temp dir)")
    parser.add_argument(
        "--profile", metavar="DIR", help="run sectionchat under py-spy: a flame graph per run in DIR (storm-<run>.svg)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.connectors < 1 or args.clients < 1 or args.sections < 1 or args.seconds <= 0:
        print("bench: --runs, --connectors, --clients and --sections must be ≥ 1, --seconds > 0", file=sys.stderr)
        return 2
    limit = raise_fd_limit(args.clients + args.connectors + 100)
    if limit < args.clients + args.connectors + 100:
        print(f"bench: the open-file limit is {limit}; --clients {args.clients} needs more", file=sys.stderr)
        return 2
    print(
        f"sectionchat storm benchmark: {args.runs} runs each; handshakes: {args.connectors} connectors, "
        f"{args.warmup:g} s + {args.seconds:g} s; storm: {args.clients:,} clients in {args.sections} sections",
        file=sys.stderr,
    )
    source = R.source_state()
    runs: dict[str, list[Run]] = {target: [] for target in TARGETS}
    began = time.monotonic()
    for index in range(args.runs):
        for target in TARGETS:
            run = run_once(args, target, index)
            runs[target].append(run)
            print(
                f"  run {index + 1}/{args.runs} {target:<11} {run.handshakes_per_s:,.0f} handshakes/s; storm {run.storm_s:.2f} s "
                f"(half {run.storm_p50_s:.2f} s), {run.syn_drops} SYNs dropped, {run.retries} retries; "
                f"shutdown {run.shutdown_s:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    print(table(runs))
    print(
        f"\nRuns per server: {args.runs}, alternating; ratio = sectionchat median / echo median (for times, lower is "
        f"better: a ratio of 1.2 is 20 % slower). Every sectionchat client recovered gaplessly. "
        f"Total {time.monotonic() - began:.0f} s. Server source: {R.fmt_source(source)}."
    )
    if args.json:
        document = {
            "benchmark": "storm",
            "settings": vars(args),
            "source": source,
            "runs": [asdict(run) for target in TARGETS for run in runs[target]],
            "medians": {
                target: {
                    field: median([getattr(r, field) or 0.0 for r in runs[target]])
                    for field in asdict(runs[target][0])
                    if field not in ("target", "index")
                }
                for target in TARGETS
            },
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
