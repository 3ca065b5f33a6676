"""Revision 1.1's benchmarks run end to end, tiny: no timing assertions, only that they work and measure what they say.

- `bench.requests --operations edit_message,react`: a row each against the echo baseline;
- every edit and every reaction of the load generator is a stored write (alternating text A/B, on/off);
- the echo baseline answers them with sectionchat's reply shapes;
- `bench.summaries`: watchers get summaries of the busy section only, and the latest state.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from bench.harness import ServerProcess, remove, scratch_dir
from bench.loadgen import (
    DOCUMENT_ID,
    EDIT_TEXTS,
    REACTION,
    WorkerSpec,
    create_one_session,
    open_client,
    request_variants,
    run_worker,
    send_one_message,
)

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished


def table_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("| ")]


@pytest.mark.timeout(60)
def test_requests_benchmark_runs_edits_and_reactions_tiny(tmp_path: Path) -> None:
    out = tmp_path / "requests.json"
    finished = run_bench(
        "bench.requests", "--operations", "edit_message,react", "--runs", "1", "--clients", "2", "--seconds", "0.5",
        "--warmup", "0.1", "--busy-retries", "0", "--data-root", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    rows = table_rows(finished.stdout)
    assert rows[0].startswith("| request | clients | sectionchat"), finished.stdout
    assert any(row.startswith("| edit_message | 2 |") for row in rows), finished.stdout
    assert any(row.startswith("| react | 2 |") for row in rows), finished.stdout
    document = json.loads(out.read_text())
    assert document["source"]["start"]["commit"], document["source"]
    summaries = {s["operation"]: s for s in document["summaries"]}
    assert set(summaries) == {"edit_message", "react"}
    for summary in summaries.values():
        assert sorted(run["target"] for run in summary["runs"]) == ["durable", "echo", "sectionchat"]
        assert all(run["completed"] > 0 and run["source"]["commit"] for run in summary["runs"])
    assert not list(tmp_path.glob("sectionchat-bench-*"))


async def _request(websocket, frame: dict) -> dict:
    await websocket.send(msgspec.json.encode(frame), text=True)
    while True:
        reply = msgspec.json.decode(await websocket.recv(decode=False))
        if reply.get("reply_to") == frame["id"]:
            return reply


@pytest.mark.timeout(60)
def test_every_edit_and_reaction_is_a_stored_write(tmp_path: Path) -> None:
    """21 requests per client: 21 stored events after the session and its message; the 21st (odd) left A / on."""
    requests = 21
    scratch = scratch_dir(str(tmp_path))
    server = ServerProcess.sectionchat(scratch).start()

    async def scenario() -> None:
        for operation, client in (("edit_message", 0), ("react", 1)):
            spec = WorkerSpec(
                server.url, operation, [client], warmup_s=0.0, seconds=2.0, max_requests=requests, sections=2
            )
            result = await run_worker(spec, lambda: None)
            assert result.total == requests, result
        websocket = await open_client(server.url, 9)
        try:
            for client, check in ((0, "text"), (1, "reactions")):
                section = f"section-{client}"
                subscribed = await _request(
                    websocket,
                    {"type": "subscribe", "id": client + 1, "document_id": DOCUMENT_ID, "section_id": section},
                )
                assert subscribed["type"] == "subscribed", subscribed
                assert subscribed["offset"] == 2 + requests, subscribed  # session, message, then one event per request
                [session] = subscribed["sessions"]
                history = await _request(
                    websocket, {"type": "history", "id": 10 + client, "session_id": session["session_id"]}
                )
                [message] = history["messages"]
                if check == "text":
                    assert message["text"] == EDIT_TEXTS[0] and message["edited_at"], message
                else:
                    assert message["reactions"] == {REACTION: [f"bench-{client}"]}, message
        finally:
            await websocket.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
        server.close()  # and its log file
        remove(scratch)


def shape(value: object) -> object:
    """The keys and value types of a decoded JSON frame, recursively."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    return type(value).__name__


@pytest.mark.timeout(60)
def test_echo_answers_edits_and_reactions_with_sectionchat_reply_shapes(tmp_path: Path) -> None:
    async def replies(url: str) -> dict[str, dict]:
        websocket = await open_client(url, 3)
        try:
            session_id = await create_one_session(websocket, 3, 10)
            await send_one_message(websocket, 3, session_id)
            found = {}
            for operation in ("edit_message", "react"):
                prefix, suffixes = request_variants(operation, 3, 10, session_id)
                for request_id in (1, 2):
                    await websocket.send(prefix + str(request_id).encode() + suffixes[request_id & 1], text=True)
                    found[f"{operation} {request_id}"] = msgspec.json.decode(await websocket.recv(decode=False))
            return found
        finally:
            await websocket.close()

    shapes = {}
    for target in ("sectionchat", "echo"):
        scratch = scratch_dir(str(tmp_path))
        server = ServerProcess.sectionchat(scratch) if target == "sectionchat" else ServerProcess.echo(scratch)
        server.start()
        try:
            found = asyncio.run(replies(server.url))
        finally:
            server.stop()
            server.close()  # and its log file
            remove(scratch)
        assert found["react 1"]["on"] is True and found["react 2"]["on"] is False, found
        assert found["edit_message 1"]["message"]["text"] == EDIT_TEXTS[0], found
        assert found["edit_message 2"]["message"]["text"] == EDIT_TEXTS[1], found
        shapes[target] = {name: shape(frame) for name, frame in found.items()}
    assert shapes["echo"] == shapes["sectionchat"]


@pytest.mark.timeout(60)
def test_summaries_benchmark_runs_tiny(tmp_path: Path) -> None:
    """20 watchers, one run of each kind: summaries of the busy section only, everyone gets the latest state."""
    out = tmp_path / "summaries.json"
    finished = run_bench(
        "bench.summaries", "--watchers", "20", "--procs", "2", "--runs", "1", "--seconds", "1.5", "--warmup", "0.2",
        "--settle", "0.1", "--idle-sections", "2", "--idle-control", "--busy-retries", "0", "--data-root", str(tmp_path),
        "--json", str(out),
    )  # fmt: skip
    rows = table_rows(finished.stdout)
    assert rows[0].startswith("| run | summary frames / watcher / s"), finished.stdout
    for name in ("20 watchers", "20 connections, not watching", "no watcher"):
        assert any(row.startswith(f"| {name} |") for row in rows), finished.stdout
    document = json.loads(out.read_text())
    runs = {run["kind"]: run for run in document["runs"]}
    assert set(runs) == {"watch", "idle", "none"}
    watch = runs["watch"]
    assert watch["initial_sections"] == 3, watch  # the busy section and the two idle ones
    assert watch["other_frames"] == 0 and watch["final_missing"] == 0 and not watch["closed"], watch
    assert watch["final_within"] == 1.0, watch
    assert watch["frames_per_watcher_s_max"] is not None and watch["frames_per_watcher_s_max"] > 0, watch
    assert all(run["messages"] == round(100 * 1.7) and run["server_cpu"] is not None for run in runs.values())
    assert document["summaries"]["watch"]["cpu_per_1000_watchers_pct_of_core"] is not None
    assert not list(tmp_path.glob("sectionchat-bench-*"))
    again = run_bench("bench.summaries", "--from-json", str(out))  # the table again, from the saved runs
    assert table_rows(again.stdout) == rows


@pytest.mark.timeout(40)
def test_summaries_has_help_as_module_and_script() -> None:
    for command in (
        [sys.executable, "-m", "bench.summaries", "--help"],
        [sys.executable, "bench/summaries.py", "--help"],
    ):
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert finished.returncode == 0, finished.stderr
        assert "usage:" in finished.stdout and "--watchers" in finished.stdout
