"""What operators use: metrics, health, logs, configuration, export and import."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, http_get, resolved_config, scrape

from client import ScriptClient


async def test_metrics_follow_traffic(app, connect):
    """Metric values change as connections, sessions, messages, deliveries and errors happen."""
    before = await scrape(app.port)
    async with connect("alice") as alice, connect("bob") as bob:
        await bob.call("subscribe", document_id="d", section_id="s")
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        for n in range(3):
            await alice.call("send_message", session_id=sid, text=str(n))
        await alice.request("get_session", session_id="missing")
        await bob.next_events("message", 3)
        during = await scrape(app.port)
    after = await scrape(app.port)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return during.get(key, 0) - before.get(key, 0)

    assert during[("sectionchat_connections", ())] == 2
    assert during[("sectionchat_subscriptions", ())] == 1
    assert delta("sectionchat_sessions_created_total") == 1
    assert delta("sectionchat_messages_stored_total") == 3
    assert delta("sectionchat_events_delivered_total") == 4
    assert delta("sectionchat_errors_total", code="not_found") == 1
    assert delta("sectionchat_request_seconds_count", type="send_message") == 3
    assert delta("sectionchat_storage_write_seconds_count") >= 4
    assert delta("sectionchat_fsync_batch_size_count") >= 4
    assert after[("sectionchat_connections", ())] == 0
    assert after[("sectionchat_subscriptions", ())] == 0


async def healthz_becomes(port: int, wanted: int, timeout: float = 20.0) -> tuple[dict, float]:
    """Ask /healthz until it answers `wanted` (it changes with the next storage check); its document and how long it took."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            status, _, body = await http_get(port, "/healthz")
            if status == wanted:
                return json.loads(body), time.monotonic() - started
            await asyncio.sleep(0.02)  # nothing signals a check's outcome to a client: poll


@pytest.mark.timeout(60)
async def test_healthz_reports_storage(server_process):
    """/healthz follows the storage checks: 503 with the reason once writes cannot be acknowledged, 200 once they can."""
    server = server_process("--health-check-interval-s", "0.2")
    status, _, body = await http_get(server.port, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "serving", "storage": "ok", "connections": 0}
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    async with ScriptClient.connect(server.url, name="alice") as alice:
        failed = await alice.request("create_session", document_id="d", section_id="s")
        assert failed["code"] == "unavailable"
        document, waited = await healthz_becomes(server.port, 503)
    assert document["status"] == "unhealthy" and document["storage"]
    assert waited < 10
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    document, _ = await healthz_becomes(server.port, 200)
    assert document["storage"] == "ok"
    async with ScriptClient.connect(server.url, name="alice") as alice:
        assert (await alice.call("create_session", document_id="d", section_id="s"))["session"]["last_seq"] == 0


async def test_healthz_reports_redis(server_process, redis_server):
    """/healthz is 503 while Redis is down."""
    server = server_process("--storage", redis_server.url, "--health-check-interval-s", "0.2")
    assert (await http_get(server.port, "/healthz"))[0] == 200
    redis_server.stop()
    document, _ = await healthz_becomes(server.port, 503)
    assert "Redis" in document["storage"]
    redis_server.start()
    await healthz_becomes(server.port, 200)


SYNC_CALLS = re.compile(
    r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync|sync_file_range|syncfs|sync)\s*$", re.MULTILINE
)
SYNC_SYSCALLS = "trace=fsync,fdatasync,sync_file_range,syncfs,sync"


async def syncs_during(pid: int, work, summary_path) -> int:
    """How many fsync, fdatasync (or other sync) calls the process (every thread) makes while `work()` runs, counted by strace."""
    tracer = await asyncio.create_subprocess_exec(
        "strace",
        "-f",
        "-c",
        "-e",
        SYNC_SYSCALLS,
        "-o",
        str(summary_path),
        "-p",
        str(pid),
        stderr=asyncio.subprocess.PIPE,
    )
    assert tracer.stderr is not None
    try:
        attached = await asyncio.wait_for(tracer.stderr.readline(), 10)  # "Process N attached with M threads"
        assert b"attached" in attached, attached
        await work()
    finally:
        tracer.send_signal(signal.SIGINT)  # detach and write the summary
        await asyncio.wait_for(tracer.wait(), 10)
    return sum(int(calls) for calls, _ in SYNC_CALLS.findall(summary_path.read_text()))


@pytest.mark.timeout(60)
async def test_healthz_costs_no_fsync(server_process, tmp_path):
    """Hundreds of /healthz calls (GET and HEAD) make no fsync or fdatasync: they report the last check, they do not probe."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (Debian package strace)")
    # Checks far apart, so that none falls inside the measurement.
    server = server_process("--health-check-interval-s", "3600")
    pid = server.process.pid

    async def ask_health() -> None:
        for n in range(300):
            status, _, _ = await http_get(server.port, "/healthz") if n % 2 else await head_healthz(server.port)
            assert status == 200

    async def write() -> None:
        async with ScriptClient.connect(server.url, name="alice") as alice:
            await alice.call("create_session", document_id="d", section_id="s")

    assert await syncs_during(pid, ask_health, tmp_path / "health.strace") == 0
    # The same count sees the syncs of a write: the tracer was not blind.
    assert await syncs_during(pid, write, tmp_path / "write.strace") >= 1


async def head_healthz(port: int) -> tuple[int, None, None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    return int(raw.split(b" ", 2)[1]), None, None


@pytest.mark.timeout(60)
async def test_json_logs(server_process):
    """--log-format json: every line parses; connections log their close code; no message bodies."""
    server = server_process("--log-format", "json")
    async with ScriptClient.connect(server.url, name="alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        await alice.call("send_message", session_id=sid, text="a secret message body")
    # The close is logged once the server has seen it; SIGTERM flushes everything.
    assert server.terminate() == 0
    lines = server.output.decode().splitlines()
    entries = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("listening on 127.0.0.1:") for m in messages)
    assert any("opened by alice" in m for m in messages)
    assert any(m.endswith("closed (code 1000)") for m in messages)
    assert "a secret message body" not in server.output.decode()


@pytest.mark.timeout(60)
def test_config_precedence(tmp_path):
    """Command line > environment > TOML file > default; secrets are masked."""
    toml = tmp_path / "sectionchat.toml"
    toml.write_text(
        'port = 1111\nrate-limit = 5\nmax_text_chars = 100\nauth_secret = "s3cret"\nallowed_origins = ["https://a.example"]\n'
    )
    env = {"SECTIONCHAT_RATE_LIMIT": "7", "SECTIONCHAT_MAX_TEXT_CHARS": "200"}
    resolved = resolved_config("--config", str(toml), "--max-text-chars", "300", env=env)
    assert resolved["port"] == "1111"  # file
    assert resolved["rate_limit"] == "7.0"  # env over file
    assert resolved["max_text_chars"] == "300"  # command line over env
    assert resolved["host"] == '"127.0.0.1"'  # default
    assert resolved["auth_secret"] == '"********"'
    assert resolved["allowed_origins"] == '["https://a.example"]'
    assert "s3cret" not in json.dumps(resolved)
    bad = subprocess.run(
        [sys.executable, "-m", "server", "config", "--config", str(toml)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"SECTIONCHAT_PORT": "not-a-number"},
    )
    assert bad.returncode != 0 and "SECTIONCHAT_PORT" in bad.stderr


async def make_document(url: str) -> None:
    async with ScriptClient.connect(url, name="alice") as alice, ScriptClient.connect(url, name="bob") as bob:
        for section in ("intro", "../../etc/passwd", "ünïcødé"):
            a = await alice.call(
                "create_session", document_id="spec-7", section_id=section, title="T", idempotency_key="k"
            )
            b = await bob.call("create_session", document_id="spec-7", section_id=section)
            for n in range(5):
                await alice.call(
                    "send_message", session_id=a["session"]["session_id"], text=f"a{n}", client_msg_id=f"c{n}"
                )
                await bob.call("send_message", session_id=b["session"]["session_id"], text=f"b{n}\nline two")
            if section == "intro":  # revision 1.1: every kind of change, and a read marker
                sid = a["session"]["session_id"]
                await alice.call("edit_message", session_id=sid, seq=1, text="a0, edited", mentions=["bob"])
                await bob.call("react", session_id=sid, seq=1, reaction="👍")
                await alice.call("delete_message", session_id=sid, seq=2)
                await alice.call("update_session", session_id=sid, metadata={"anchor": "¶3"})
                await bob.call("mark_read", session_id=sid, seq=3)
            await alice.call("close_session", session_id=a["session"]["session_id"])
        await alice.call("create_session", document_id="other-doc", section_id="x")


def sectionchat(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, input=stdin, timeout=60
    )


@pytest.mark.timeout(90)
async def test_export_import_round_trip(server_process, data_dir, tmp_path, redis_server):
    """export -> import (into files, and into Redis) -> export gives the same lines; importing twice adds nothing."""
    server = server_process()
    await make_document(server.url)
    first = await asyncio.to_thread(sectionchat, "export", "--document", "spec-7", "--data-dir", str(data_dir))
    assert first.returncode == 0, first.stderr  # beside the running server
    lines = first.stdout.splitlines()
    assert json.loads(lines[0]) == {"kind": "sectionchat-export", "version": 1, "document_id": "spec-7"}
    assert sum(json.loads(line)["kind"] == "message" for line in lines) == 30
    server.stop()

    copy_dir = tmp_path / "copy"
    imported = await asyncio.to_thread(sectionchat, "import", "-", "--data-dir", str(copy_dir), stdin=first.stdout)
    assert imported.returncode == 0, imported.stderr
    assert b"imported 44 records" in imported.stderr  # 39 of 1.0, 4 changes, 1 read marker
    again = await asyncio.to_thread(sectionchat, "import", "-", "--data-dir", str(copy_dir), stdin=first.stdout)
    assert b"imported 0 records; skipped 44" in again.stderr
    second = await asyncio.to_thread(sectionchat, "export", "--document", "spec-7", "--data-dir", str(copy_dir))
    assert second.stdout == first.stdout

    into_redis = await asyncio.to_thread(sectionchat, "import", "-", "--storage", redis_server.url, stdin=first.stdout)
    assert into_redis.returncode == 0, into_redis.stderr
    from_redis = await asyncio.to_thread(sectionchat, "export", "--document", "spec-7", "--storage", redis_server.url)
    assert from_redis.stdout == first.stdout

    # The imported data is served: a client recovers across the migration by offset and epoch.
    restarted = server_process("--storage", redis_server.url)
    async with ScriptClient.connect(restarted.url, name="carol") as carol:
        listed = await carol.call("list_sessions", document_id="spec-7")
        assert len(listed["sessions"]) == 6
        section = json.loads(lines[1])
        reply = await carol.call(
            "subscribe", document_id="spec-7", section_id=section["section_id"], since_offset=1, epoch=section["epoch"]
        )
        assert reply["recovered"] is True and len(reply["events"]) == 16
        assert {e["type"] for e in reply["events"]} >= {
            "message_edited",
            "reaction",
            "message_deleted",
            "session_updated",
        }
    async with ScriptClient.connect(restarted.url, name="bob") as bob:
        listed = await bob.call("list_sessions", document_id="spec-7", section_id="intro")
        alices = next(s["session_id"] for s in listed["sessions"] if s["created_by"] == "alice")
        assert listed["read"][alices] == 3 and listed["sessions"][0]["metadata"] == {"anchor": "¶3"}


def test_import_rejects_garbage(tmp_path):
    """An import file that is not an export fails with one clear line."""
    result = sectionchat("import", "-", "--data-dir", str(tmp_path / "d"), stdin=b'{"hello": 1}\n')
    assert result.returncode == 1
    assert result.stderr.decode().startswith("sectionchat: line 1:")


def connected_while_stopped(port: int, attempts: int, wait_s: float) -> int:
    """Connect `attempts` sockets to a server that cannot accept (SIGSTOPped): how many the kernel queued for it."""
    sockets = [socket.socket() for _ in range(attempts)]
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        pending, done = set(sockets), 0
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], max(0.0, deadline - time.monotonic()))
            for sock in writable:
                pending.discard(sock)
                done += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        return done
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("backlog", "expected"), [(None, 300), ("50", 51)])
def test_listen_backlog_holds_a_reconnect_storm(server_process, backlog, expected):
    """The kernel queues --listen-backlog connections (default 2,048) while the server is busy; asyncio's 100 would drop SYNs.

    With the server stopped, 300 connects: all are queued by default; with a backlog of 50, only 51 are.
    """
    server = server_process(*(("--listen-backlog", backlog) if backlog else ()))
    server.process.send_signal(signal.SIGSTOP)
    try:
        # A connect the kernel queues completes at once on loopback; one it drops stays unanswered.
        wait_s = 10.0 if backlog is None else 1.0
        assert connected_while_stopped(server.port, 300, wait_s) == expected
    finally:
        server.process.send_signal(signal.SIGCONT)
