"""What operators use: metrics, health, logs, configuration, export and import."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys

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


async def test_healthz_reports_storage(server_process):
    """/healthz is 503 while the data dir cannot be written, and 200 again when it can."""
    server = server_process()
    status, _, body = await http_get(server.port, "/healthz")
    assert status == 200 and json.loads(body)["storage"] == "ok"
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    status, _, body = await http_get(server.port, "/healthz")
    assert status == 503 and json.loads(body)["status"] == "unhealthy"
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert (await http_get(server.port, "/healthz"))[0] == 200


async def test_healthz_reports_redis(server_process, redis_server):
    """/healthz is 503 while Redis is down."""
    server = server_process("--storage", redis_server.url)
    assert (await http_get(server.port, "/healthz"))[0] == 200
    redis_server.stop()
    status, _, body = await http_get(server.port, "/healthz")
    assert status == 503 and "Redis" in json.loads(body)["storage"]
    redis_server.start()
    assert (await http_get(server.port, "/healthz"))[0] == 200


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
    toml.write_text('port = 1111\nrate-limit = 5\nmax_text_chars = 100\nauth_secret = "s3cret"\nallowed_origins = ["https://a.example"]\n')
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
        [sys.executable, "-m", "server", "config", "--config", str(toml)], cwd=ROOT, capture_output=True, text=True,
        timeout=30, env={"SECTIONCHAT_PORT": "not-a-number"},
    )
    assert bad.returncode != 0 and "SECTIONCHAT_PORT" in bad.stderr


async def make_document(url: str) -> None:
    async with ScriptClient.connect(url, name="alice") as alice, ScriptClient.connect(url, name="bob") as bob:
        for section in ("intro", "../../etc/passwd", "ünïcødé"):
            a = (await alice.call("create_session", document_id="spec-7", section_id=section, title="T", idempotency_key="k"))
            b = (await bob.call("create_session", document_id="spec-7", section_id=section))
            for n in range(5):
                await alice.call("send_message", session_id=a["session"]["session_id"], text=f"a{n}", client_msg_id=f"c{n}")
                await bob.call("send_message", session_id=b["session"]["session_id"], text=f"b{n}\nline two")
            await alice.call("close_session", session_id=a["session"]["session_id"])
        await alice.call("create_session", document_id="other-doc", section_id="x")


def sectionchat(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, input=stdin, timeout=60)


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
    assert b"imported 39 records" in imported.stderr
    again = await asyncio.to_thread(sectionchat, "import", "-", "--data-dir", str(copy_dir), stdin=first.stdout)
    assert b"imported 0 records; skipped 39" in again.stderr
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
        assert reply["recovered"] is True and len(reply["events"]) == 12


def test_import_rejects_garbage(tmp_path):
    """An import file that is not an export fails with one clear line."""
    result = sectionchat("import", "-", "--data-dir", str(tmp_path / "d"), stdin=b'{"hello": 1}\n')
    assert result.returncode == 1
    assert result.stderr.decode().startswith("sectionchat: line 1:")
