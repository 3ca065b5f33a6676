# Growth benchmarks: how the server's costs change as the data grows (issue 10).
#
#   start      start time (spawn -> "listening on") and VmRSS after start, against sessions stored
#   history    cold (first) and warm `history` latency against the section's size, with another
#              client's ping latency during the load
#   subscribe  subscribes per second against the number of sections already loaded
#   write      p99 / max send_message latency against the number of sections written, over a window
#   restart    restart time after kill -9 against the journal's size (messages written since start)
#
#     .venv/bin/python -m bench.growth                      # every curve, full sizes (~16 min here)
#     .venv/bin/python -m bench.growth --quick              # small and fast (~2 min), results in a temp dir
#     .venv/bin/python -m bench.growth --curve history,write
#     .venv/bin/python -m bench.growth --git-rev b259098    # servers from that commit (git archive), not the tree
#     .venv/bin/python -m bench.growth --from-json          # only redraw the plots and tables from the JSON
#
# Rules kept here: data dirs are made the way an operator would migrate data in —
# a JSON-lines file in the export format, loaded with `sectionchat import` — and
# cached under --cache-dir, keyed by their size and by a hash of the server code
# that wrote them (so a storage rewrite regenerates them). The benchmark relies on
# nothing but the command line and the data dir: no storage internals. The server
# is the real process (`python -m server serve --port 0`, abuse limits off), its
# log goes to a file, everything is bounded in time, only 127.0.0.1 is used.
# Cached data dirs are only read by servers; a curve that writes works on a copy.

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):
    import _script_path  # noqa: F401 (run as a file: the project importable, bench/ off sys.path)

import argparse
import asyncio
import calendar
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.harness import (
    LIMITS_OFF,
    ROOT,
    BenchError,
    ServerProcess,
    filesystem_type,
    markdown_table,
    median,
    percentile,
    run_main,
)
from bench.plots import log_axes

CURVES = ("start", "history", "subscribe", "write", "restart")
RESULTS_DIR = ROOT / "bench" / "results"
PLOTS_DIR = ROOT / "docs" / "perf"
HOST = "127.0.0.1"

TEXT = "benchmark message: the quick brown fox jumps over the lazy dog 0123456789"  # as bench/loadgen.py
STAMP = "2026-01-01T00:00:00.000Z"
SESSIONS_PER_SECTION = 100  # start curve: sessions are stored 100 to a section
SECTIONS_PER_DOCUMENT = 100  # subscribe and write curves: 100 sections to a document
SUBSCRIBE_MESSAGES = 5  # each section of the subscribe curve: one session and 5 messages

# Code whose change makes cached data dirs stale (they are written by it).
FINGERPRINT_GLOBS = ("server/storage/*.py", "server/transfer.py", "server/cli.py", "protocol/messages.py")


@dataclass(frozen=True)
class Sizes:
    runs: int
    sessions: tuple[int, ...]
    messages: tuple[int, ...]
    sections: tuple[int, ...]
    subscribe_block: int
    subscribe_blocks: int
    subscribe_budget_s: float
    write_sections: tuple[int, ...]
    write_seconds: float
    write_warmup_s: float
    write_clients: int
    journal_messages: tuple[int, ...]
    restart_base: tuple[int, int]  # sections, messages each
    warm_requests: int


FULL = Sizes(
    runs=3,
    sessions=(10_000, 30_000, 100_000, 300_000, 1_000_000),
    messages=(50_000, 100_000, 200_000, 500_000, 1_000_000),
    sections=(1_000, 2_000, 5_000, 10_000, 20_000, 50_000),
    subscribe_block=200,
    subscribe_blocks=3,
    subscribe_budget_s=300.0,
    write_sections=(10, 100, 500, 2_000),
    write_seconds=60.0,
    write_warmup_s=3.0,
    write_clients=50,
    journal_messages=(1_000, 4_000, 16_000, 40_000),
    restart_base=(20, 20_000),
    warm_requests=20,
)

QUICK = Sizes(
    runs=2,
    sessions=(1_000, 10_000, 50_000),
    messages=(5_000, 20_000, 100_000),
    sections=(200, 500, 1_000, 2_000),
    subscribe_block=50,
    subscribe_blocks=3,
    subscribe_budget_s=60.0,
    write_sections=(10, 100, 500),
    write_seconds=5.0,
    write_warmup_s=1.0,
    write_clients=20,
    journal_messages=(500, 2_000, 8_000),
    restart_base=(5, 5_000),
    warm_requests=10,
)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# The server code under test ----------------------------------------------------


class Tree:
    """Where the server runs from: the working tree, or a `git archive` of one commit."""

    def __init__(self, path: Path, rev: str | None):
        self.path = path
        self.rev = rev
        self.commit = _git(["rev-parse", rev or "HEAD"])
        self.dirty = rev is None and bool(_git(["status", "--porcelain", "--", "server", "protocol"]))
        digest = hashlib.sha256()
        for pattern in FINGERPRINT_GLOBS:
            for file in sorted(path.glob(pattern)):
                digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
        self.fingerprint = digest.hexdigest()[:16]
        self.env = dict(os.environ, PYTHONPATH=str(path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._limits: tuple[str, ...] | None = None

    @classmethod
    def make(cls, rev: str | None, scratch_root: Path) -> Tree:
        if rev is None:
            return cls(ROOT, None)
        commit = _git(["rev-parse", "--verify", f"{rev}^{{commit}}"])
        target = scratch_root / f"tree-{commit[:12]}"
        if not (target / "server" / "__main__.py").exists():
            partial = Path(tempfile.mkdtemp(prefix="tree-", dir=scratch_root))
            archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True, timeout=120)
            subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True, timeout=120)
            try:
                partial.rename(target)
            except OSError:
                shutil.rmtree(partial, ignore_errors=True)  # someone else made it meanwhile
        return cls(target, commit)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def limits_off(self) -> tuple[str, ...]:
        if self._limits is None:
            usage = subprocess.run(
                self.python("-m", "server", "serve", "--help"),
                cwd=self.path, env=self.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if usage.returncode != 0:
                raise BenchError(f"`python -m server serve --help` failed in {self.path}:\n{usage.stderr[-3000:]}")
            known = set(re.findall(r"--[a-z][a-z0-9-]*", usage.stdout))
            self._limits = tuple(
                part for option, value in LIMITS_OFF.items() if option in known for part in (option, value)
            )
        return self._limits

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "rev": self.rev,
            "commit": self.commit,
            "dirty": self.dirty,
            "fingerprint": self.fingerprint,
        }


def _git(args: list[str]) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class Server(ServerProcess):
    """One `python -m server serve` process of a tree on a given data dir, its log appended to a file."""

    def __init__(self, tree: Tree, data_dir: Path, log_path: Path, *extra: str):
        command = tree.python(
            "-m", "server", "serve", "--host", HOST, "--port", "0", "--data-dir", str(data_dir), "--storage", "file",
            *tree.limits_off(), *extra,
        )  # fmt: skip
        super().__init__(log_path.stem, command, log_path.parent, cwd=tree.path, env=tree.env)
        self.log_path = log_path
        self.data_dir = data_dir
        self.start_s = float("nan")

    def start(self, timeout: float = 300.0) -> float:  # type: ignore[override]
        """Spawn it and wait for "listening on"; return seconds from spawn to that line."""
        super().start(timeout)
        # The line's own timestamp (ms, UTC) is more precise than polling for it.
        logged = _log_time(self.listening_line.decode(errors="replace"))
        fits = logged is not None and 0 < logged - self.spawned_at <= self.ready_s + 0.05
        self.start_s = logged - self.spawned_at if fits else self.ready_s  # type: ignore[operator]
        return self.start_s

    def cpu_s(self) -> float | None:
        return self.cpu_seconds()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a clean stop); BenchError if it is still there after `timeout` (then it is killed)."""
        if not self.running:
            return self.returncode
        code = super().stop(timeout)
        if code == -signal.SIGKILL:
            raise BenchError(f"server did not stop within {timeout:.0f} s of SIGTERM")
        return code

    def errors(self) -> list[str]:
        lines = self.log(tail=20_000_000).splitlines()
        return [line for line in lines if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]


def _log_time(line: str) -> float | None:
    found = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z", line)
    if not found:
        return None
    return calendar.timegm(time.strptime(found.group(1), "%Y-%m-%dT%H:%M:%S")) + int(found.group(2)) / 1000


# Generated data dirs --------------------------------------------------------------


def session_id(kind: int, index: int) -> str:
    """A uuid-shaped, deterministic session id."""
    return f"{index:08x}-{kind:04x}-4000-8000-{index * 2654435761 % 2**48:012x}"


class Export:
    """Writes an export file (server/transfer.py's format: a header, then per section a
    `section` line and its stored records) with plain string formatting: fast."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115
        self.file.write('{"kind":"sectionchat-export","version":1,"document_id":"growth"}\n')
        self.records = 0
        self.offset = 0

    def section(self, document_id: str, section_id: str) -> None:
        epoch = hashlib.blake2b(f"{document_id}/{section_id}".encode(), digest_size=8).hexdigest()
        self.file.write(
            f'{{"kind":"section","document_id":"{document_id}","section_id":"{section_id}","epoch":"{epoch}"}}\n'
        )
        self.offset = 0

    def session(self, sid: str, document_id: str, section_id: str) -> None:
        self.offset += 1
        self.records += 1
        self.file.write(
            f'{{"kind":"session_created","offset":{self.offset},"session":{{"session_id":"{sid}",'
            f'"document_id":"{document_id}","section_id":"{section_id}","title":"growth session",'
            f'"created_by":"gen","created_at":"{STAMP}","closed":false,"last_seq":0}}}}\n'
        )

    def messages(self, sid: str, count: int, first_seq: int = 1) -> None:
        write = self.file.write
        head = '{"kind":"message","offset":'
        middle = f',"message":{{"session_id":"{sid}","seq":'
        for seq in range(first_seq, first_seq + count):
            self.offset += 1
            write(
                f'{head}{self.offset}{middle}{seq},"message_id":"{seq:032x}","author":"gen-{seq % 7}",'
                f'"text":"{TEXT}","client_msg_id":null,"sent_at":"{STAMP}"}}}}\n'
            )
        self.records += count

    def close(self) -> int:
        self.file.close()
        return self.path.stat().st_size


@dataclass
class Dataset:
    key: str
    path: Path
    meta: dict[str, Any]


class Cache:
    """Data dirs made by `sectionchat import`, one per kind and size, made once."""

    def __init__(self, root: Path, tree: Tree):
        self.root = root / tree.fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        self.tree = tree
        self.made: list[dict[str, Any]] = []  # what this invocation generated (and how long it took)

    def get(
        self,
        key: str,
        build: Callable[[Export], None],
        base: Dataset | None = None,
        use: Callable[[str], Awaitable[None]] | None = None,
    ) -> Dataset:
        path = self.root / key
        meta_path = path / "growth-meta.json"
        if meta_path.exists():
            return Dataset(key, path, json.loads(meta_path.read_text()))
        partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        data = partial / "data"
        try:
            began = time.monotonic()
            if base is not None:
                shutil.copytree(base.path / "data", data, ignore=shutil.ignore_patterns("LOCK", ".probe-*"))
            export = Export(partial / "export.jsonl")
            build(export)
            export_bytes = export.close()
            generated_s = time.monotonic() - began
            say(f"  importing {key}: {export.records:,} records ({export_bytes / 2**20:,.0f} MiB of JSON lines)")
            began = time.monotonic()
            finished = subprocess.run(
                self.tree.python("-m", "server", "import", str(export.path), "--data-dir", str(data)),
                cwd=self.tree.path, env=self.tree.env, capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            import_s = time.monotonic() - began
            if finished.returncode != 0:
                raise BenchError(f"sectionchat import failed for {key}:\n{finished.stderr[-3000:]}")
            os.unlink(export.path)
            # One clean start and stop, so any first-start work (migrations, rebuilt
            # indexes) is done here and not in the first measured run; and `use`
            # (a first request, as any server sees after an import), timed.
            began = time.monotonic()
            server = Server(self.tree, data, partial / "settle.log")
            first_use_s = None
            try:
                server.start(timeout=1800)
                if use is not None:
                    used = time.monotonic()
                    asyncio.run(use(server.url))
                    first_use_s = round(time.monotonic() - used, 3)
            finally:
                code = server.stop(timeout=600)
            settle_s = time.monotonic() - began
            if code != 0:
                raise BenchError(f"the settling start on {key} exited {code}:\n{server.log()}")
            os.unlink(partial / "settle.log")
            meta = {
                "key": key,
                "records_imported": export.records,
                "base": base.key if base else None,
                "export_bytes": export_bytes,
                "generate_s": round(generated_s, 2),
                "import_s": round(import_s, 2),
                "settle_s": round(settle_s, 2),
                "first_use_s": first_use_s,
                "import_output": finished.stderr.strip().splitlines()[-1:],
                "data_dir_bytes": dir_bytes(data),
                "tree": self.tree.describe(),
                "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (partial / "growth-meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                partial.rename(path)
            except OSError:  # made by another run meanwhile
                shutil.rmtree(partial, ignore_errors=True)
                return Dataset(key, path, json.loads(meta_path.read_text()))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        say(f"  made {key} in {meta['import_s']:.1f} s of import ({meta['data_dir_bytes'] / 2**20:,.0f} MiB on disk)")
        self.made.append(meta)
        return Dataset(key, path, meta)

    # The data dirs of each curve ------------------------------------------------

    def sessions(self, count: int, smaller: Dataset | None) -> Dataset:
        """`count` sessions, 100 to a section, 100 sections to a document; no messages."""
        first = smaller.meta["sessions"] if smaller is not None else 0

        def build(export: Export) -> None:
            for index in range(first, count):
                section = index // SESSIONS_PER_SECTION
                document_id, section_id = f"doc-{section // SECTIONS_PER_DOCUMENT}", f"sec-{section}"
                if index == first or index % SESSIONS_PER_SECTION == 0:
                    export.section(document_id, section_id)
                export.session(session_id(1, index), document_id, section_id)

        dataset = self.get(f"sessions-{count}", build, smaller)
        dataset.meta["sessions"] = count
        return dataset

    def history(self, messages: int) -> Dataset:
        """One section, one session with `messages` messages."""

        def build(export: Export) -> None:
            export.section("doc-history", "history")
            export.session(session_id(2, 0), "doc-history", "history")
            export.messages(session_id(2, 0), messages)

        async def use(url: str) -> None:
            client = await Client.open(url, "first-use")
            try:
                await client.call("history", session_id=session_id(2, 0), limit=50)
            finally:
                await client.close()

        return self.get(f"history-{messages}", build, use=use)

    def sections(self, count: int) -> Dataset:
        """`count` sections, each one session with a few messages."""
        return self.get(f"sections-{count}", _one_session_each(count, 3, SUBSCRIBE_MESSAGES))

    def write_sections(self, count: int) -> Dataset:
        """`count` sections, one empty session each."""
        return self.get(f"write-{count}", _one_session_each(count, 4, 0))

    def restart_base(self, sections: int, messages: int) -> Dataset:
        """`sections` sections, each one session with `messages` messages."""

        def build(export: Export) -> None:
            for index in range(sections):
                export.section("doc-restart", f"sec-{index}")
                export.session(session_id(5, index), "doc-restart", f"sec-{index}")
                export.messages(session_id(5, index), messages)

        return self.get(f"restart-{sections}x{messages}", build)


def _one_session_each(count: int, kind: int, messages: int) -> Callable[[Export], None]:
    """An export of `count` sections, each holding one session (ids of `kind`) with `messages` messages."""

    def build(export: Export) -> None:
        for index in range(count):
            document_id, section_id = f"doc-{index // SECTIONS_PER_DOCUMENT}", f"sec-{index}"
            export.section(document_id, section_id)
            export.session(session_id(kind, index), document_id, section_id)
            export.messages(session_id(kind, index), messages)

    return build


def dir_bytes(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def journal_bytes(path: Path) -> int | None:
    """Bytes in files that look like a journal or write-ahead log (None if there are none)."""
    total, found = 0, False
    for folder, _dirs, files in os.walk(path):
        for name in files:
            if re.search(r"journal|wal", name, re.IGNORECASE):
                found = True
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
    return total if found else None


def copy_data(source: Dataset, target: Path) -> None:
    shutil.copytree(source.path / "data", target, ignore=shutil.ignore_patterns("LOCK", ".probe-*"))


# A small client ------------------------------------------------------------------


class Reply(msgspec.Struct):
    type: str
    reply_to: int | str | None = None
    code: str | None = None
    message: Any = None


class PageMessage(msgspec.Struct):
    seq: int


class Page(msgspec.Struct):
    messages: list[PageMessage]
    has_more: bool = False


decode_reply = msgspec.json.Decoder(Reply).decode
decode_page = msgspec.json.Decoder(Page).decode
encode = msgspec.json.Encoder().encode


class Client:
    """A WebSocket with request ids: `call` sends a request and waits for its reply; events are dropped."""

    def __init__(self, websocket):
        self.websocket = websocket
        self._next = 0
        self._waiting: dict[int, asyncio.Future[tuple[Reply, bytes]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, name: str) -> Client:
        from websockets.asyncio.client import connect

        websocket = await connect(
            f"{url}?name={name}",
            compression=None,
            max_size=256 * 2**20,
            ping_interval=None,
            open_timeout=60,
            close_timeout=5,
        )
        welcome = decode_reply(await asyncio.wait_for(websocket.recv(decode=False), 60))
        if welcome.type != "welcome":
            raise BenchError(f"expected welcome, got {welcome.type}")
        return cls(websocket)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.websocket.recv(decode=False)
                reply = decode_reply(data)
                waiter = self._waiting.pop(reply.reply_to, None) if isinstance(reply.reply_to, int) else None
                if waiter is not None and not waiter.done():
                    waiter.set_result((reply, data))
        except Exception:  # noqa: BLE001 - the waiters below learn that the connection is gone
            pass
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(BenchError("the connection closed"))

    async def call(self, kind: str, timeout: float = 120.0, **fields: Any) -> tuple[Reply, bytes]:
        self._next += 1
        request_id = self._next
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        await self.websocket.send(encode({"type": kind, "id": request_id, **fields}), text=True)
        try:
            reply, data = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise BenchError(f"no reply to {kind} within {timeout:.0f} s") from None
        if reply.type == "error":
            raise BenchError(f"{kind} failed: {reply.code}: {reply.message}")
        return reply, data

    async def close(self) -> None:
        await self.websocket.close()
        self._reader.cancel()


# Another client's pings, from its own process --------------------------------------


def pinger_main(url: str, interval: float, pipe) -> None:
    """Ping every `interval` s (open loop) until told "stop"; send back (sent, rtt) pairs."""
    try:
        pipe.send(asyncio.run(_pinger(url, interval, pipe)))
    except BaseException as error:  # noqa: BLE001 - reported to the driver
        pipe.send(f"{type(error).__name__}: {error}")


async def _pinger(url: str, interval: float, pipe) -> tuple[bytes, bytes, int]:
    from websockets.asyncio.client import connect

    websocket = await connect(f"{url}?name=pinger", compression=None, ping_interval=None, open_timeout=60)
    await websocket.recv()  # welcome
    sent_at: dict[int, float] = {}
    sent, rtts = array("d"), array("d")

    async def read() -> None:
        async for data in websocket:
            now = time.monotonic()
            reply = decode_reply(data)
            if reply.type == "pong" and reply.reply_to in sent_at:
                began = sent_at.pop(reply.reply_to)
                sent.append(began)
                rtts.append(now - began)

    reader = asyncio.create_task(read())
    pipe.send("ready")
    request_id = 0
    next_at = time.monotonic()
    while not pipe.poll():
        request_id += 1
        sent_at[request_id] = time.monotonic()
        await websocket.send(b'{"type":"ping","id":%d}' % request_id, text=True)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    deadline = time.monotonic() + 30
    while sent_at and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    unanswered = len(sent_at)
    reader.cancel()
    await websocket.close()
    return sent.tobytes(), rtts.tobytes(), unanswered


class Pinger:
    def __init__(self, url: str, interval: float = 0.005):
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=pinger_main, args=(url, interval, child), daemon=True)
        self.process.start()
        if not self.pipe.poll(60) or self.pipe.recv() != "ready":
            self.process.kill()
            raise BenchError("the pinger did not start")
        self.sent: list[float] = []
        self.rtts: list[float] = []
        self.unanswered = 0

    def stop(self) -> None:
        self.pipe.send("stop")
        if not self.pipe.poll(60):
            self.process.kill()
            raise BenchError("the pinger did not report")
        result = self.pipe.recv()
        self.process.join(10)
        if isinstance(result, str):
            raise BenchError(f"the pinger failed: {result}")
        self.sent, self.rtts = array("d", result[0]).tolist(), array("d", result[1]).tolist()
        self.unanswered = result[2]

    def during(self, begin: float, end: float) -> dict[str, float]:
        """Ping latency (ms) of pings in flight at any time in [begin, end]."""
        values = sorted(r for s, r in zip(self.sent, self.rtts, strict=True) if s <= end and s + r >= begin)
        return latency_summary(values)


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max in ms of sorted latencies in seconds."""
    if not values:
        return {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {
        "count": len(values),
        "p50_ms": percentile(values, 0.50) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "max_ms": values[-1] * 1000,
    }


# Write load, from worker processes -------------------------------------------------


def writer_main(url: str, clients: list[tuple[int, list[str]]], warmup_s: float, seconds: float, pipe) -> None:
    try:
        try:
            from uvloop import run  # as bench/loadgen.py: keep the clients cheap
        except ImportError:
            run = asyncio.run
        pipe.send(run(_writers(url, clients, warmup_s, seconds, pipe)))
    except BaseException as error:  # noqa: BLE001 - reported to the driver
        pipe.send(f"{type(error).__name__}: {error}")


async def _writers(url: str, clients: list[tuple[int, list[str]]], warmup_s: float, seconds: float, pipe):
    from websockets.asyncio.client import connect

    sockets = []
    for index, _ in clients:
        websocket = await connect(f"{url}?name=writer-{index}", compression=None, ping_interval=None, open_timeout=60)
        await websocket.recv()  # welcome
        sockets.append(websocket)
    pipe.send("ready")
    while not pipe.poll(0.01):
        await asyncio.sleep(0.01)
    start = pipe.recv()  # a time.monotonic() shared by the workers
    window_start, window_end = start + warmup_s, start + warmup_s + seconds
    sent, latencies = array("d"), array("d")
    errors: list[str] = []

    async def client(websocket, sessions: list[str]) -> None:
        suffixes = [b',"session_id":"%s","text":"%s"}' % (s.encode(), TEXT.encode()) for s in sessions]
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        request_id = 0
        while True:
            began = time.monotonic()
            if began >= window_end:
                return
            request_id += 1
            await websocket.send(
                b'{"type":"send_message","id":%d' % request_id + suffixes[request_id % len(suffixes)], text=True
            )
            data = await websocket.recv(decode=False)
            done = time.monotonic()
            reply = decode_reply(data)
            if reply.type != "message_ack" or reply.reply_to != request_id:
                errors.append(f"{reply.type} {reply.code} {reply.message}")
                return
            if began >= window_start:
                sent.append(began)
                latencies.append(done - began)

    await asyncio.gather(*(client(ws, sessions) for ws, (_, sessions) in zip(sockets, clients, strict=True)))
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return sent.tobytes(), latencies.tobytes(), errors


# Measuring -------------------------------------------------------------------------


class Run:
    """A scratch dir for one run's logs and copies; removed afterwards."""

    def __init__(self, root: Path, name: str):
        self.path = Path(tempfile.mkdtemp(prefix=f"run-{name}-", dir=root))

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def check_clean(server: Server, what: str) -> None:
    problems = server.errors()
    if problems:
        raise BenchError(f"{what}: the server logged errors:\n" + "\n".join(problems[:20]))


def curve_start(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    points = []
    datasets: list[Dataset | None] = [None]
    smaller = None
    for count in sorted(sizes.sessions):
        smaller = ctx.cache.sessions(count, smaller)
        datasets.append(smaller)
    for dataset in datasets:
        count = dataset.meta["sessions"] if dataset else 0
        runs = []
        for index in range(sizes.runs):
            with Run(ctx.scratch, "start") as run:
                data = dataset.path / "data" if dataset else run.path / "data"
                server = Server(ctx.tree, data, run.path / "server.log")
                try:
                    start_s = server.start()
                    time.sleep(0.5)
                    rss, hwm = server.status("VmRSS"), server.status("VmHWM")
                    cpu = server.cpu_s()
                finally:
                    code = server.stop()
                check_clean(server, f"start with {count:,} sessions")
                if code != 0:
                    raise BenchError(f"the server exited {code} on SIGTERM:\n{server.log()}")
            runs.append({"start_s": start_s, "rss_bytes": rss, "hwm_bytes": hwm, "cpu_s": cpu})
            say(f"  start, {count:,} sessions, run {index + 1}: {start_s:.3f} s, RSS {rss / 2**20:.1f} MiB")
        points.append({"sessions": count, "dataset": dataset.meta if dataset else None, "runs": runs,
                       **spread(runs, "start_s"), **spread(runs, "rss_bytes")})  # fmt: skip
    return {"points": points}


async def _history_once(url: str, sid: str, messages: int, warm_requests: int, pinger: Pinger, server: Server) -> dict:
    client = await Client.open(url, "history")
    try:
        await asyncio.sleep(0.3)  # the pinger's idle baseline
        rss_before = server.status("VmRSS")
        began = time.monotonic()
        _reply, data = await client.call("history", session_id=sid, limit=50)
        cold_end = time.monotonic()
        page = decode_page(data)
        if not page.messages or page.messages[-1].seq != messages or len(page.messages) != min(50, messages):
            raise BenchError(f"history of a {messages:,}-message session: unexpected page {data[:300]!r}")
        rss_after = server.status("VmRSS")
        await asyncio.sleep(0.3)
        warm, warm_begin = [], time.monotonic()
        picker = random.Random(messages)
        for index in range(warm_requests):
            fields = {"limit": 50} if index % 2 == 0 else {"limit": 50, "before_seq": picker.randint(51, messages)}
            started = time.monotonic()
            await client.call("history", session_id=sid, **fields)
            warm.append(time.monotonic() - started)
        warm_end = time.monotonic()
        await asyncio.sleep(0.2)
    finally:
        await client.close()
    return {
        "cold_ms": (cold_end - began) * 1000,
        "warm_ms": median(warm) * 1000,
        "warm_max_ms": max(warm) * 1000,
        "rss_before_bytes": rss_before,
        "rss_added_bytes": (rss_after - rss_before) if rss_after and rss_before else None,
        "_windows": ((began - 0.3, began - 0.02), (began, cold_end), (warm_begin, warm_end)),
    }


def curve_history(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    points = []
    for messages in sorted(sizes.messages):
        dataset = ctx.cache.history(messages)
        runs = []
        for index in range(sizes.runs):
            with Run(ctx.scratch, "history") as run:
                server = Server(ctx.tree, dataset.path / "data", run.path / "server.log")
                pinger = None
                try:
                    server.start()
                    pinger = Pinger(server.url)
                    result = asyncio.run(
                        _history_once(server.url, session_id(2, 0), messages, sizes.warm_requests, pinger, server)
                    )
                    pinger.stop()
                finally:
                    if pinger is not None and pinger.process.is_alive():
                        pinger.process.kill()
                    server.stop()
                check_clean(server, f"history of {messages:,} messages")
            idle, cold, warm = result.pop("_windows")
            result["ping_idle"] = pinger.during(*idle)
            result["ping_cold"] = pinger.during(*cold)
            result["ping_warm"] = pinger.during(*warm)
            result["pings_unanswered"] = pinger.unanswered
            for phase in ("idle", "cold", "warm"):
                for stat in ("p50_ms", "p99_ms", "max_ms"):
                    result[f"ping_{phase}_{stat}"] = result[f"ping_{phase}"][stat]
            runs.append(result)
            say(
                f"  history, {messages:,} messages, run {index + 1}: cold {result['cold_ms']:.1f} ms, "
                f"warm {result['warm_ms']:.2f} ms; other client's ping during the cold load: "
                f"p50 {result['ping_cold_p50_ms']:.1f} / max {result['ping_cold_max_ms']:.1f} ms"
            )
        stats = {}
        for name in ("cold_ms", "warm_ms", "warm_max_ms", "rss_added_bytes", "ping_cold_p50_ms", "ping_cold_p99_ms",
                     "ping_cold_max_ms", "ping_warm_max_ms", "ping_idle_max_ms", "ping_warm_p99_ms"):  # fmt: skip
            stats.update(spread(runs, name))
        points.append({"messages": messages, "dataset": dataset.meta, "runs": runs, **stats})
    return {"points": points}


async def _subscribe_sweep(url: str, sections: int, checkpoints: list[int], sizes: Sizes, server: Server) -> dict:
    connections = 4
    clients = [await Client.open(url, f"subscriber-{i}") for i in range(connections)]
    budget = sizes.subscribe_budget_s
    began = time.monotonic()
    loaded = 0
    points, skipped = [], []
    costs: list[tuple[int, float]] = []  # (sections loaded, seconds per subscribe)

    async def subscribe(first: int, end: int, deadline: float) -> int:
        """Subscribe to sections first..end-1 over every connection; return how many were done."""
        cursor = first

        async def one(client: Client) -> None:
            nonlocal cursor
            while cursor < end and time.monotonic() < deadline:
                index, cursor = cursor, cursor + 1
                await client.call(
                    "subscribe", document_id=f"doc-{index // SECTIONS_PER_DOCUMENT}", section_id=f"sec-{index}"
                )

        await asyncio.gather(*(one(client) for client in clients))
        return min(cursor, end) - first

    def predicted(target: int) -> float:
        """Seconds to go from `loaded` to `target` sections and measure there, if the cost per
        subscribe keeps growing linearly with the sections loaded (as fitted so far)."""
        if not costs:
            return 0.0
        (n1, c1), (n2, c2) = (costs[0], costs[-1]) if len(costs) > 1 else ((0, 0.0), costs[-1])
        slope = max(0.0, (c2 - c1) / (n2 - n1)) if n2 != n1 else 0.0
        base = c2 - slope * n2
        span = target + sizes.subscribe_block * sizes.subscribe_blocks
        return base * (span - loaded) + slope * (span**2 - loaded**2) / 2

    try:
        for checkpoint in checkpoints:
            elapsed = time.monotonic() - began
            if elapsed + predicted(checkpoint) > budget:
                skipped.append(checkpoint)
                continue
            hard_deadline = began + budget * 1.25
            loaded += await subscribe(loaded, checkpoint, hard_deadline)
            if loaded < checkpoint:
                skipped.append(checkpoint)
                break
            rates = []
            for _ in range(sizes.subscribe_blocks):
                started = time.monotonic()
                done = await subscribe(loaded, loaded + sizes.subscribe_block, hard_deadline)
                loaded += done
                rates.append(done / (time.monotonic() - started))
                if done < sizes.subscribe_block:
                    break
            if len(rates) < sizes.subscribe_blocks:
                skipped.append(checkpoint)
                break
            costs.append((checkpoint, 1 / median(rates)))
            point = {"sections_loaded": checkpoint, "runs": [{"rate": r} for r in rates], **spread([{"rate": r} for r in rates], "rate"),
                     "rss_bytes": server.status("VmRSS"), "elapsed_s": time.monotonic() - began}  # fmt: skip
            points.append(point)
            say(
                f"  subscribe, {checkpoint:,} sections loaded: {point['rate_median']:,.0f} subscribes/s "
                f"({min(rates):,.0f}–{max(rates):,.0f}), {point['elapsed_s']:.0f} s so far"
            )
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    skipped += [c for c in checkpoints if c not in skipped and all(p["sections_loaded"] != c for p in points)]
    return {"points": points, "skipped": sorted(set(skipped)), "sweep_s": time.monotonic() - began}


def curve_subscribe(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    checkpoints = sorted(sizes.sections)
    count = checkpoints[-1] + sizes.subscribe_block * sizes.subscribe_blocks
    dataset = ctx.cache.sections(count)
    with Run(ctx.scratch, "subscribe") as run:
        server = Server(ctx.tree, dataset.path / "data", run.path / "server.log", "--max-subscriptions", str(count + 1))
        try:
            server.start()
            result = asyncio.run(_subscribe_sweep(server.url, count, checkpoints, sizes, server))
        finally:
            server.stop(timeout=300)
        check_clean(server, "subscribe sweep")
    if result["skipped"]:
        say(f"  subscribe: not reached within the {sizes.subscribe_budget_s:.0f} s budget: {result['skipped']}")
    result["dataset"] = dataset.meta
    result["budget_s"] = sizes.subscribe_budget_s
    return result


def curve_write(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    points = []
    for count in sorted(sizes.write_sections):
        dataset = ctx.cache.write_sections(count)
        runs = []
        for index in range(sizes.runs if ctx.write_runs is None else ctx.write_runs):
            with Run(ctx.scratch, "write") as run:
                copy_data(dataset, run.path / "data")
                server = Server(ctx.tree, run.path / "data", run.path / "server.log")
                try:
                    server.start()
                    result = _write_once(server, min(count, ctx.write_into or count), sizes)
                finally:
                    server.stop(timeout=300)
                check_clean(server, f"writes to {count:,} sections")
            runs.append(result)
            say(
                f"  write, {count:,} sections, run {index + 1}: {result['rate']:,.0f} messages/s, "
                f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms"
            )
        stats = {}
        for name in ("p50_ms", "p99_ms", "p999_ms", "max_ms", "rate", "window_p99_ms", "window_max_ms"):
            values = [v for r in runs for v in (r[name] if isinstance(r[name], list) else [r[name]])]
            stats.update(spread([{name: v} for v in values], name))
        points.append({"sections": count, "dataset": dataset.meta, "runs": runs, **stats})
    return {"points": points, "clients": sizes.write_clients, "seconds": sizes.write_seconds}


def _write_once(server: Server, count: int, sizes: Sizes) -> dict[str, Any]:
    clients = sizes.write_clients
    sessions = [session_id(4, i) for i in range(count)]
    # Client i writes to sessions i, i + clients, … (or shares one when there are fewer sessions).
    plan = [(i, sessions[i::clients] or [sessions[i % count]]) for i in range(clients)]
    procs = 2
    ctx = multiprocessing.get_context("spawn")
    workers = []
    for part in range(procs):
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=writer_main,
            args=(server.url, plan[part::procs], sizes.write_warmup_s, sizes.write_seconds, child),
            daemon=True,
        )
        process.start()
        workers.append((process, parent))
    try:
        for _process, pipe in workers:
            if not pipe.poll(120):
                raise BenchError("a writer process did not connect")
            message = pipe.recv()
            if message != "ready":
                raise BenchError(f"a writer process failed: {message}")
        cpu_before = server.cpu_s()
        start = time.monotonic() + 0.2
        for _, pipe in workers:
            pipe.send(start)
        total = sizes.write_warmup_s + sizes.write_seconds
        sent, latencies = array("d"), array("d")
        for process, pipe in workers:
            if not pipe.poll(total + 120):
                raise BenchError("a writer process did not report")
            result = pipe.recv()
            if isinstance(result, str):
                raise BenchError(f"a writer process failed: {result}")
            if result[2]:
                raise BenchError(f"send_message got errors: {result[2][:5]}")
            sent.frombytes(result[0])
            latencies.frombytes(result[1])
            process.join(10)
        cpu = server.cpu_s()
    finally:
        for process, _ in workers:
            if process.is_alive():
                process.kill()
    window_start = start + sizes.write_warmup_s
    ordered = sorted(latencies)
    if not ordered:
        raise BenchError("no message was acknowledged inside the window")
    # Three equal windows, and the worst latency of each second (to see stalls come and go).
    windows = []
    for part in range(3):
        lo, hi = window_start + part * sizes.write_seconds / 3, window_start + (part + 1) * sizes.write_seconds / 3
        values = sorted(lat for s, lat in zip(sent, latencies, strict=True) if lo <= s < hi)
        if values:
            windows.append((percentile(values, 0.99) * 1000, values[-1] * 1000))
    per_second: dict[int, float] = {}
    for s, lat in zip(sent, latencies, strict=True):
        second = int(s - window_start)
        per_second[second] = max(per_second.get(second, 0.0), lat)
    return {
        "acks": len(ordered),
        "rate": len(ordered) / sizes.write_seconds,
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "p999_ms": percentile(ordered, 0.999) * 1000,
        "max_ms": ordered[-1] * 1000,
        "over_100ms": sum(1 for v in ordered if v > 0.1),
        "window_p99_ms": [w[0] for w in windows],
        "window_max_ms": [w[1] for w in windows],
        "max_ms_per_second": [
            round(per_second.get(s, float("nan")) * 1000, 2) for s in range(max(1, math.ceil(sizes.write_seconds)))
        ],
        "server_cpu": (cpu - cpu_before) / total if cpu is not None and cpu_before is not None else None,
        "rss_bytes": server.status("VmRSS"),
    }


async def _burst(url: str, sessions: list[str], total: int, then: Callable[[], None]) -> int:
    """Send `total` messages over one client per session, closed loop, then call `then` (the kill -9)
    right after the last acknowledgement; return how many were acknowledged."""
    clients = [await Client.open(url, f"burst-{i}") for i in range(len(sessions))]
    try:
        shares = [total // len(sessions) + (1 if i < total % len(sessions) else 0) for i in range(len(sessions))]

        async def send(client: Client, sid: str, count: int) -> int:
            for _ in range(count):
                await client.call("send_message", session_id=sid, text=TEXT)
            return count

        acked = sum(await asyncio.gather(*(send(c, s, n) for c, s, n in zip(clients, sessions, shares, strict=True))))
        then()
        return acked
    finally:
        then()
        await asyncio.gather(*(asyncio.wait_for(c.close(), 5) for c in clients), return_exceptions=True)


async def _create_sessions(url: str, count: int) -> list[str]:
    client = await Client.open(url, "creator")
    try:
        created = []
        for index in range(count):
            _reply, data = await client.call("create_session", document_id="doc-restart-new", section_id=f"new-{index}")
            created.append(json.loads(data)["session"]["session_id"])
        return created
    finally:
        await client.close()


async def _last_seqs(url: str, sessions: list[str]) -> list[int]:
    client = await Client.open(url, "checker")
    try:
        seqs = []
        for sid in sessions:
            _reply, data = await client.call("history", session_id=sid, limit=1)
            page = decode_page(data)
            seqs.append(page.messages[-1].seq if page.messages else 0)
        return seqs
    finally:
        await client.close()


def curve_restart(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    base_sections, base_messages = sizes.restart_base
    dataset = ctx.cache.restart_base(base_sections, base_messages)
    points = []
    for series in ("loaded", "new"):
        for total in sorted(sizes.journal_messages):
            runs = []
            for index in range(sizes.runs):
                with Run(ctx.scratch, "restart") as run:
                    data = run.path / "data"
                    copy_data(dataset, data)
                    before = dir_bytes(data)
                    server = Server(ctx.tree, data, run.path / "server.log")
                    restarted = Server(ctx.tree, data, run.path / "server.log")
                    again = Server(ctx.tree, data, run.path / "server.log")
                    try:
                        first_start = server.start()
                        if series == "loaded":
                            targets = [session_id(5, i) for i in range(base_sections)]
                            expected_base = base_messages
                        else:
                            targets = asyncio.run(_create_sessions(server.url, base_sections))
                            expected_base = 0
                        acked = asyncio.run(_burst(server.url, targets, total, server.kill))  # kill -9 at once
                        journal, written = journal_bytes(data), dir_bytes(data) - before
                        restart_s = restarted.start()
                        rss = restarted.status("VmRSS")
                        seqs = asyncio.run(_last_seqs(restarted.url, targets))
                        if restarted.stop() != 0:
                            raise BenchError(f"the restarted server did not stop cleanly:\n{restarted.log()}")
                        clean_s = again.start()
                    finally:
                        server.kill()
                        restarted.kill()
                        again.stop()
                    check_clean(again, "restart")
                expected = [
                    expected_base + total // len(targets) + (1 if i < total % len(targets) else 0)
                    for i in range(len(targets))
                ]
                if seqs != expected or acked != total:
                    raise BenchError(
                        f"after kill -9 and restart: last seqs {seqs[:5]}…, expected {expected[:5]}… (acked {acked})"
                    )
                runs.append({"first_start_s": first_start, "restart_s": restart_s, "clean_restart_s": clean_s,
                             "journal_bytes": journal, "written_bytes": written, "rss_after_restart_bytes": rss})  # fmt: skip
                say(
                    f"  restart, {series} sections, {total:,} messages journaled, run {index + 1}: "
                    f"after kill -9 {restart_s:.3f} s (clean {clean_s:.3f} s, journal "
                    f"{(journal or 0) / 2**20:.1f} MiB)"
                )
            stats = {}
            for name in ("restart_s", "clean_restart_s", "first_start_s", "journal_bytes", "written_bytes"):
                stats.update(spread(runs, name))
            points.append({"series": series, "messages": total, "runs": runs, **stats})
    return {"points": points, "dataset": dataset.meta, "base": {"sections": base_sections, "messages": base_messages}}


def spread(runs: Sequence[dict], name: str) -> dict[str, float | None]:
    values = [r[name] for r in runs if isinstance(r.get(name), int | float) and r[name] == r[name]]
    if not values:
        return {f"{name}_median": None, f"{name}_min": None, f"{name}_max": None}
    return {f"{name}_median": median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


# Reading the curves ----------------------------------------------------------------


def verdict(sizes: Sequence[float], values: Sequence[float]) -> str:
    """How the value changed from the first to the last point, against how much the data grew.

    Flat: within 25 % over the whole range; grows with the data: log-log slope of 0.5 or
    more (1 is proportional); else grows slowly.
    """
    pairs = [(s, v) for s, v in zip(sizes, values, strict=True) if s and v is not None and v == v and v > 0]
    if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
        return "—"
    (s1, v1), (s2, v2) = pairs[0], pairs[-1]
    ratio, grown = v2 / v1, s2 / s1
    slope = math.log(ratio) / math.log(grown)
    what = "flat" if ratio < 1.25 else "grows with the data" if slope >= 0.5 else "grows slowly"
    return f"{what} (×{ratio:.2f} for ×{grown:g} the data, log-log slope {slope:+.2f})"


def ms(value: float | None) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f}"


def secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def sp(point: dict, name: str, fmt: Callable[[Any], str]) -> str:
    if point.get(f"{name}_median") is None:
        return "—"
    low, high = point[f"{name}_min"], point[f"{name}_max"]
    if low == high:
        return fmt(point[f"{name}_median"])
    return f"{fmt(point[f'{name}_median'])} ({fmt(low)}–{fmt(high)})"


def tables(documents: dict[str, dict]) -> str:
    out = []
    if "start" in documents:
        points = documents["start"]["points"]
        rows = [[f"{p['sessions']:,}", sp(p, "start_s", secs), sp(p, "rss_bytes", mib)] for p in points]
        out.append("### start: start time and RSS against sessions stored\n")
        out.append(markdown_table(["sessions", "start s, median (min–max)", "RSS after start MiB"], rows))
        stored = [p for p in points if p["sessions"]]
        if len(stored) > 1:
            a, b = stored[0], stored[-1]
            per_session_us = (b["start_s_median"] - a["start_s_median"]) / (b["sessions"] - a["sessions"]) * 1e6
            per_session_b = (b["rss_bytes_median"] - a["rss_bytes_median"]) / (b["sessions"] - a["sessions"])
            x = [p["sessions"] for p in stored]
            out.append(
                f"\nstart time: {verdict(x, [p['start_s_median'] for p in stored])}, "
                f"{per_session_us:.2f} µs per session; RSS: "
                f"{verdict(x, [p['rss_bytes_median'] for p in stored])}, {per_session_b:,.0f} B per session "
                f"(from {a['sessions']:,} to {b['sessions']:,})"
            )
            empty = next((p for p in points if not p["sessions"]), None)
            if empty is not None:
                # The interpreter's own start and RSS are in every point: what the data adds is the rest.
                out.append(
                    "above an empty data dir: start time "
                    + verdict(x, [p["start_s_median"] - empty["start_s_median"] for p in stored])
                    + "; RSS "
                    + verdict(x, [p["rss_bytes_median"] - empty["rss_bytes_median"] for p in stored])
                )
    if "history" in documents:
        points = documents["history"]["points"]
        rows = [
            [f"{p['messages']:,}", sp(p, "cold_ms", ms), sp(p, "warm_ms", ms), sp(p, "ping_cold_p50_ms", ms),
             sp(p, "ping_cold_p99_ms", ms), sp(p, "ping_cold_max_ms", ms), sp(p, "ping_warm_max_ms", ms),
             sp(p, "rss_added_bytes", mib)]
            for p in points
        ]  # fmt: skip
        out.append("\n### history: a page of 50 against the section's size\n")
        out.append(markdown_table(
            ["messages in the section", "cold ms", "warm ms", "ping p50 ms during cold", "ping p99 ms during cold",
             "ping max ms during cold", "ping max ms during warm", "RSS added by the load MiB"], rows))  # fmt: skip
        x = [p["messages"] for p in points]
        out.append(
            f"\ncold: {verdict(x, [p['cold_ms_median'] for p in points])}; "
            f"warm: {verdict(x, [p['warm_ms_median'] for p in points])}; "
            f"ping max during cold: {verdict(x, [p['ping_cold_max_ms_median'] for p in points])}"
        )
    if "subscribe" in documents:
        document = documents["subscribe"]
        points = document["points"]
        rows = [[f"{p['sections_loaded']:,}", sp(p, "rate", lambda v: f"{v:,.0f}"), mib(p.get("rss_bytes")),
                 f"{p['elapsed_s']:.0f}"] for p in points]  # fmt: skip
        out.append("\n### subscribe: subscribes per second against sections already loaded\n")
        out.append(
            markdown_table(["sections loaded", "subscribes/s, median (min–max)", "RSS MiB", "s into the sweep"], rows)
        )
        x = [p["sections_loaded"] for p in points]
        note = f"\ncost per subscribe: {verdict(x, [1 / p['rate_median'] for p in points])}"
        if document.get("skipped"):
            note += f"; not reached within the {document['budget_s']:.0f} s budget: " + ", ".join(
                f"{c:,}" for c in document["skipped"]
            )
        out.append(note)
    if "write" in documents:
        document = documents["write"]
        points = document["points"]
        rows = [
            [f"{p['sections']:,}", sp(p, "rate", lambda v: f"{v:,.0f}"), sp(p, "p50_ms", ms), sp(p, "p99_ms", ms),
             sp(p, "max_ms", ms), sp(p, "window_p99_ms", ms), sp(p, "window_max_ms", ms)]
            for p in points
        ]  # fmt: skip
        out.append(
            f"\n### write: send_message latency against sections written ({document['clients']} clients, "
            f"{document['seconds']:g} s)\n"
        )
        out.append(markdown_table(
            ["sections written", "acks/s", "p50 ms", "p99 ms", "max ms", "p99 ms per third", "max ms per third"], rows))  # fmt: skip
        x = [p["sections"] for p in points]
        out.append(
            f"\np99: {verdict(x, [p['p99_ms_median'] for p in points])}; "
            f"max: {verdict(x, [p['max_ms_median'] for p in points])}"
        )
    if "restart" in documents:
        document = documents["restart"]
        points = document["points"]
        rows = [
            [p["series"], f"{p['messages']:,}", sp(p, "journal_bytes", mib), sp(p, "restart_s", secs),
             sp(p, "clean_restart_s", secs), sp(p, "first_start_s", secs)]
            for p in points
        ]  # fmt: skip
        base = document["base"]
        out.append(
            f"\n### restart: after kill -9, against messages written since start ({base['sections']} sections "
            f"of {base['messages']:,} messages stored; 'loaded': written into those, 'new': into {base['sections']} new sections)\n"
        )
        out.append(markdown_table(
            ["sections written", "messages since start", "journal MiB at the kill", "restart after kill -9 s",
             "clean restart s (after it)", "first start s (before)"], rows))  # fmt: skip
        for series in ("loaded", "new"):
            chosen = [p for p in points if p["series"] == series]
            x = [p["messages"] for p in chosen]
            extra = [p["restart_s_median"] - p["clean_restart_s_median"] for p in chosen]
            out.append(
                f"\n{series}: restart {verdict(x, [p['restart_s_median'] for p in chosen])}; "
                f"above a clean restart: " + ", ".join(f"{e * 1000:+.0f} ms" for e in extra)
            )
    return "\n".join(out)


# Plots -------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def _errorbar(axis, points: list[dict], x_key: str, name: str, k: int, label: str, scale: float = 1.0, **style) -> None:
    chosen = [p for p in points if p.get(f"{name}_median") is not None]
    if not chosen:
        return
    xs = [p[x_key] for p in chosen]
    meds = [p[f"{name}_median"] * scale for p in chosen]
    lows = [m - p[f"{name}_min"] * scale for m, p in zip(meds, chosen, strict=True)]
    highs = [p[f"{name}_max"] * scale - m for m, p in zip(meds, chosen, strict=True)]
    axis.errorbar(
        xs, meds, yerr=[lows, highs], color=COLORS[k % len(COLORS)], marker=MARKERS[k % len(MARKERS)],
        linewidth=2, markersize=6, capsize=4, label=label, **style,
    )  # fmt: skip


def _reference(axis, xs: list[float], y0: float, label: str = "∝ data (slope 1)", power: float = 1.0) -> None:
    """A dashed line through the first point that grows in proportion to the data."""
    if not xs or not y0 or y0 != y0:
        return
    axis.plot(xs, [y0 * (x / xs[0]) ** power for x in xs], color="#999999", linestyle="--", linewidth=1, label=label)


def _axes(axis, xs: list[int], xlabel: str, ylabel: str, logy: bool = True) -> None:
    log_axes(axis, xs, xlabel, ylabel, logy=logy, tick=_short_count)


def _short_count(x: int) -> str:
    return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1000:g}k" if x >= 1000 else f"{x:,}"


def plot(documents: dict[str, dict], out_dir: Path, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        path = out_dir / f"growth-{name}{suffix}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    def title(document: dict, runs: str | None = None) -> str:
        tree = document.get("tree", {})
        commit = (tree.get("commit") or "")[:7] + ("+dirty" if tree.get("dirty") else "")
        runs = runs or f"median of {document['settings']['runs']} runs, bars = min–max"
        return f"({runs}; server {commit})"

    if "start" in documents:
        document = documents["start"]
        points = [p for p in document["points"] if p["sessions"]]
        xs = [p["sessions"] for p in points]
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        _errorbar(axes[0], points, "sessions", "start_s", 0, "spawn → listening")
        _reference(axes[0], xs, points[0]["start_s_median"])
        _axes(axes[0], xs, "sessions stored", "start time, s (log)")
        _errorbar(axes[1], points, "sessions", "rss_bytes", 0, "VmRSS after start", scale=1 / 2**20)
        _reference(axes[1], xs, points[0]["rss_bytes_median"] / 2**20)
        _axes(axes[1], xs, "sessions stored", "RSS, MiB (log)")
        for axis in axes:
            axis.legend(loc="upper left", fontsize=9)
        figure.suptitle(f"Start against sessions stored {title(document)}", fontsize=12)
        save(figure, "start")
    if "history" in documents:
        document = documents["history"]
        points = document["points"]
        xs = [p["messages"] for p in points]
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        _errorbar(axes[0], points, "messages", "cold_ms", 0, "cold: first history (section not loaded)")
        _errorbar(axes[0], points, "messages", "warm_ms", 1, "warm: section loaded (median of requests)")
        _reference(axes[0], xs, points[0]["cold_ms_median"])
        _axes(axes[0], xs, "messages in the section", "history latency, ms (log)")
        _errorbar(axes[1], points, "messages", "ping_cold_max_ms", 0, "max during the cold load")
        _errorbar(axes[1], points, "messages", "ping_cold_p50_ms", 3, "p50 during the cold load")
        _errorbar(axes[1], points, "messages", "ping_warm_max_ms", 1, "max during warm requests")
        _axes(axes[1], xs, "messages in the section", "another client's ping, ms (log)")
        for axis in axes:
            axis.legend(loc="upper left", fontsize=9)
        figure.suptitle(f"history (a page of 50) against section size {title(document)}", fontsize=12)
        save(figure, "history")
    if "subscribe" in documents:
        document = documents["subscribe"]
        points = document["points"]
        if points:
            xs = [p["sections_loaded"] for p in points]
            figure, axis = plt.subplots(figsize=(7.5, 4.8))
            _errorbar(axis, points, "sections_loaded", "rate", 0, "subscribes per second")
            _reference(axis, xs, points[0]["rate_median"], "∝ 1 / sections loaded", power=-1)
            _axes(axis, xs, "sections already loaded (subscribed)", "subscribes per second (log)")
            axis.legend(loc="lower left", fontsize=9)
            skipped = document.get("skipped") or []
            note = (
                f"\nnot reached within the {document['budget_s']:.0f} s budget: "
                + ", ".join(f"{c:,}" for c in skipped)
                + " sections loaded"
                if skipped
                else ""
            )
            tree = document.get("tree", {})
            axis.set_title(
                f"Subscribe rate against sections loaded\n({document['settings']['subscribe_blocks']} blocks of "
                f"{document['settings']['subscribe_block']} per point, bars = min–max; server "
                f"{(tree.get('commit') or '')[:7]}){note}",
                fontsize=11,
            )
            save(figure, "subscribe")
    if "write" in documents:
        document = documents["write"]
        points = document["points"]
        runs = len(points[0]["runs"]) if points else 0
        xs = [p["sections"] for p in points]
        figure, axes = plt.subplots(1, 2, figsize=(12, 5.2))
        _errorbar(
            axes[0],
            points,
            "sections",
            "window_max_ms",
            0,
            f"max (median of 3 windows of {document['seconds'] / 3:.3g} s)",
        )
        _errorbar(
            axes[0],
            points,
            "sections",
            "window_p99_ms",
            1,
            f"p99 (median of 3 windows of {document['seconds'] / 3:.3g} s)",
        )
        _errorbar(axes[0], points, "sections", "p50_ms", 2, "p50")
        _axes(axes[0], xs, "sections written", "send_message latency, ms (log)")
        axes[0].legend(loc="upper left", fontsize=9)
        for k, point in enumerate((points[0], points[-1]) if len(points) > 1 else points[:1]):
            series = point["runs"][0]["max_ms_per_second"]
            axes[1].plot(range(len(series)), series, color=COLORS[k * 3 % len(COLORS)], linewidth=1.5,
                         label=f"{point['sections']:,} sections")  # fmt: skip
        axes[1].set_yscale("log")
        axes[1].set_xlabel("second of the window", fontsize=11)
        axes[1].set_ylabel("worst latency in that second, ms (log)", fontsize=11)
        axes[1].grid(True, alpha=0.3)
        axes[1].legend(loc="upper left", fontsize=9)
        figure.suptitle(
            f"send_message latency against sections written, {document['clients']} clients, closed loop, "
            f"{document['seconds']:g} s\n"
            + title(
                document,
                f"{runs} run{'s' if runs > 1 else ''} per point, bars = min–max over the thirds of the window",
            ),
            fontsize=12,
        )
        save(figure, "write")
    if "restart" in documents:
        document = documents["restart"]
        points = document["points"]
        base = document["base"]
        figure, axis = plt.subplots(figsize=(7.5, 4.8))
        for k, (series, label) in enumerate(
            (("loaded", f"kill -9, written into {base['sections']} stored sections of {base['messages']:,}"),
             ("new", f"kill -9, written into {base['sections']} new sections"))
        ):  # fmt: skip
            _errorbar(axis, [p for p in points if p["series"] == series], "messages", "restart_s", k, label)
        _errorbar(axis, [p for p in points if p["series"] == "loaded"], "messages", "clean_restart_s", 2,
                  "clean restart (SIGTERM first)", linestyle=":")  # fmt: skip
        xs = sorted({p["messages"] for p in points})
        _axes(axis, xs, "messages acknowledged since start (journal MiB at the kill)", "restart time, s", logy=False)
        journal = {p["messages"]: p.get("journal_bytes_median") for p in points if p["series"] == "loaded"}
        axis.set_xticklabels(
            [f"{x / 1000:g}k" + (f"\n{journal[x] / 2**20:.1f} MiB" if journal.get(x) else "") for x in xs]
        )
        axis.set_ylim(bottom=0)
        axis.legend(loc="upper left", fontsize=8)
        axis.set_title(f"Restart after kill -9 against the journal\n{title(document)}", fontsize=11)
        save(figure, "restart")
    return written


# The command -------------------------------------------------------------------------


@dataclass
class Context:
    sizes: Sizes
    tree: Tree
    cache: Cache
    scratch: Path
    write_runs: int | None
    write_into: int | None = None  # write curve: write into only this many of the stored sections


def int_list(text: str) -> tuple[int, ...]:
    return tuple(
        int(part.replace("_", "").replace("k", "000").replace("M", "000000")) for part in text.split(",") if part
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.growth",
        description="growth benchmarks: start, history, subscribe, write and restart costs against the data's size",
    )
    parser.add_argument(
        "--curve", default=",".join(CURVES), help=f"comma-separated, of {', '.join(CURVES)} (default all)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and short windows (results go to a temp dir)")
    parser.add_argument("--runs", type=int, help="runs per point (default 3; --quick 2)")
    parser.add_argument("--sessions", type=int_list, help="start curve: sessions stored (default 10k,30k,100k,300k,1M)")
    parser.add_argument("--messages", type=int_list, help="history curve: messages in the section (default 50k…1M)")
    parser.add_argument(
        "--sections", type=int_list, help="subscribe curve: sections loaded (default 1k,2k,5k,10k,20k,50k)"
    )
    parser.add_argument(
        "--subscribe-block", type=int, help="subscribes per measured block (default 200; 3 blocks a point)"
    )
    parser.add_argument("--subscribe-budget", type=float, help="seconds the subscribe sweep may take (default 300)")
    parser.add_argument(
        "--write-sections", type=int_list, help="write curve: sections written (default 10,100,500,2000)"
    )
    parser.add_argument("--write-seconds", type=float, help="write curve: measured window (default 60)")
    parser.add_argument("--write-warmup", type=float, help="write curve: warm-up before the window (default 3)")
    parser.add_argument("--write-clients", type=int, help="write curve: closed-loop clients (default 50)")
    parser.add_argument(
        "--write-runs",
        type=int,
        default=1,
        help="write curve: runs per point (default 1; its spread is over thirds of the window)",
    )
    parser.add_argument(
        "--write-into",
        type=int,
        help="write curve: write into only the first N sections of each data dir (does latency follow what is stored, or what is written?)",
    )
    parser.add_argument(
        "--journal-messages",
        type=int_list,
        help="restart curve: messages written before the kill (default 1k,4k,16k,40k)",
    )
    parser.add_argument("--restart-base", help="restart curve: SECTIONSxMESSAGES stored before (default 20x20000)")
    parser.add_argument("--git-rev", help="run the servers from `git archive REV` instead of the working tree")
    parser.add_argument("--cache-dir", type=Path, help="generated data dirs (default $TMPDIR/sectionchat-growth)")
    parser.add_argument(
        "--results-dir", type=Path, help=f"JSON (default {RESULTS_DIR.relative_to(ROOT)}; --quick: a temp dir)"
    )
    parser.add_argument(
        "--plots-dir", type=Path, help=f"PNGs (default {PLOTS_DIR.relative_to(ROOT)}; --quick: a temp dir)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and tables only")
    parser.add_argument(
        "--from-json", action="store_true", help="redraw the plots and print the tables from the JSON; run nothing"
    )
    return parser


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for name in (
        "runs",
        "sessions",
        "messages",
        "sections",
        "write_sections",
        "write_seconds",
        "write_clients",
        "journal_messages",
    ):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.subscribe_block is not None:
        changes["subscribe_block"] = args.subscribe_block
    if args.subscribe_budget is not None:
        changes["subscribe_budget_s"] = args.subscribe_budget
    if args.write_warmup is not None:
        changes["write_warmup_s"] = args.write_warmup
    if args.restart_base:
        sections, _, messages = args.restart_base.partition("x")
        changes["restart_base"] = (int(sections), int(messages))
    values = {**sizes.__dict__, **changes}
    return Sizes(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    curves = [c.strip() for c in args.curve.split(",") if c.strip()]
    unknown = [c for c in curves if c not in CURVES]
    if unknown:
        print(f"bench: unknown curve {', '.join(unknown)} (choose from {', '.join(CURVES)})", file=sys.stderr)
        return 2
    temp = Path(tempfile.gettempdir())
    cache_root = args.cache_dir or temp / "sectionchat-growth"
    default_out = cache_root / "quick-results" if args.quick else None
    results_dir = args.results_dir or default_out or RESULTS_DIR
    plots_dir = args.plots_dir or default_out or PLOTS_DIR
    name_suffix = "-quick" if args.quick else ""

    if args.from_json:
        documents = {}
        for curve in curves:
            path = results_dir / f"growth-{curve}{name_suffix}.json"
            if path.exists():
                documents[curve] = json.loads(path.read_text())
        print(tables(documents))
        if not args.no_plots:
            for path in plot(documents, plots_dir, name_suffix):
                print(f"plot: {path}")
        return 0

    sizes = sizes_from(args)
    began = time.monotonic()
    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=cache_root))
    documents: dict[str, dict] = {}
    try:
        tree = Tree.make(args.git_rev, cache_root)
        if tree.dirty:
            say("note: the working tree's server code has uncommitted changes; they are what is measured")
        cache = Cache(cache_root, tree)
        ctx = Context(sizes, tree, cache, scratch, args.write_runs, args.write_into)
        say(f"server code: {tree.path} ({tree.commit[:12] if tree.commit else '?'}), data dirs in {cache.root}")
        kind = filesystem_type(str(cache.root))
        if kind == "tmpfs":
            say(f"warning: {cache.root} is on tmpfs, where fsync costs nothing")
        for curve in curves:
            say(f"curve {curve}")
            curve_began = time.monotonic()
            load_before = os.getloadavg()
            made_before = len(cache.made)
            document = globals()[f"curve_{curve}"](ctx)
            generation = cache.made[made_before:]
            document.update(
                curve=curve,
                settings={k: v for k, v in sizes.__dict__.items()},
                quick=args.quick,
                tree=tree.describe(),
                generated=generation,
                curve_s=round(time.monotonic() - curve_began, 1),
                generation_s=round(sum(m["generate_s"] + m["import_s"] + m["settle_s"] for m in generation), 1),
                machine={
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "filesystem": kind,
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    # The machine is shared: how busy it was (1-minute load average) before and after.
                    "loadavg_before": round(load_before[0], 2),
                    "loadavg_after": round(os.getloadavg()[0], 2),
                },
            )
            documents[curve] = document
            results_dir.mkdir(parents=True, exist_ok=True)
            path = results_dir / f"growth-{curve}{name_suffix}.json"
            path.write_text(json.dumps(document, indent=1) + "\n")
            say(
                f"curve {curve}: {document['curve_s']:.0f} s (of which making data dirs {document['generation_s']:.0f} s) -> {path}"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(tables(documents))
    if not args.no_plots and documents:
        print()
        for path in plot(documents, plots_dir, name_suffix):
            print(f"plot: {path}")
    print(f"\nTotal {time.monotonic() - began:.0f} s.")
    return 0


if __name__ == "__main__":
    run_main(main)
