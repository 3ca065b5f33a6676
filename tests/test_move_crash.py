"""Moves under kill -9: sessions moving back and forth while messages are written to them, the server killed at random.

Real server processes, real sockets; on files (one node, killed and restarted)
and on Redis (two nodes: one is killed and restarted while the other goes on).
After every restart: each session is in exactly one section; every acknowledged
message is stored exactly once, in order, in its session; both sections' streams
recover from offset 0 gaplessly, with the session_moved events of every move
that was stored. Writes in flight at the kill are retried with their
client_msg_id, as a client would, and so are moves (a move of a whole section
is idempotent: what is left to move moves).
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from conftest import NO_RATE_LIMITS, ServerProcess
from websockets.exceptions import WebSocketException

from client import ScriptClient

ROUNDS = int(os.environ.get("SECTIONCHAT_CRASH_ROUNDS", "3"))
SEED = int(os.environ.get("SECTIONCHAT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
DOC = "moving"
SESSIONS = 4
GONE = (WebSocketException, EOFError, OSError, asyncio.TimeoutError)  # a node killed under a client


async def _connect(url: str, name: str) -> ScriptClient:
    for _ in range(200):
        try:
            return await ScriptClient.open(url, name=name, timeout=5)
        except OSError:
            await asyncio.sleep(0.05)  # the restarted node is not listening yet: a bounded retry, as a client would
    raise AssertionError(f"cannot connect to {url}")


async def _writer(urls: list[str], sid: str, acked: list[str], stop: asyncio.Event) -> None:
    """Messages to one session, each retried with its client_msg_id until acknowledged (or the round ends)."""
    n = len(acked)
    client: ScriptClient | None = None
    while not stop.is_set():
        cmid = f"{sid[:8]}-{n}"
        try:
            if client is None:
                client = await _connect(random.choice(urls), "writer")
            reply = await client.request("send_message", session_id=sid, text=cmid, client_msg_id=cmid, timeout=5)
        except GONE:
            client = None
            await asyncio.sleep(0.02)
            continue
        if reply["type"] == "message_ack":
            acked.append(cmid)
            n += 1
        elif reply.get("code") not in ("unavailable",):
            raise AssertionError(f"a write to a moving session was refused: {reply}")
    if client is not None:
        await client.close()


async def _mover(urls: list[str], stop: asyncio.Event, moved: list[int]) -> None:
    client: ScriptClient | None = None
    source, target = "a", "b"
    while not stop.is_set():
        try:
            if client is None:
                client = await _connect(random.choice(urls), "mover")
            reply = await client.request(
                "move_sessions", document_id=DOC, from_section_id=source, to_section_id=target, timeout=5
            )
        except GONE:
            client = None
            await asyncio.sleep(0.02)
            continue
        assert reply["type"] == "sessions_moved" or reply.get("code") == "unavailable", reply
        moved.append(len(reply.get("sessions", [])))
        source, target = target, source
    if client is not None:
        await client.close()


async def _verify(url: str, session_ids: list[str], acked: dict[str, list[str]]) -> None:
    async with ScriptClient.connect(url, name="checker") as checker:
        found: dict[str, str] = {}
        moves: dict[str, int] = {}
        for section in ("a", "b"):
            listed = await checker.call("list_sessions", document_id=DOC, section_id=section, limit=1000)
            for session in listed["sessions"]:
                assert session["session_id"] not in found, f"{session['session_id']} is in two sections"
                found[session["session_id"]] = section
            recovered = await checker.call("subscribe", document_id=DOC, section_id=section, since_offset=0)
            if recovered["recovered"]:  # else the start is past the recovery window (a kept state)
                offsets = [event["offset"] for event in recovered["events"]]
                assert offsets == list(range(1, recovered["offset"] + 1)), f"offsets of {section} not gapless"
                moves[section] = sum(1 for event in recovered["events"] if event["type"] == "session_moved")
        if len(moves) == 2:
            assert moves["a"] == moves["b"], f"session_moved events not in both streams: {moves}"
        assert sorted(found) == sorted(session_ids), "a session is in no section"
        for sid in session_ids:
            texts = []
            while True:
                page = await checker.call("history", session_id=sid, after_seq=len(texts), limit=200)
                texts += [m["text"] for m in page["messages"]]
                if not page["has_more"]:
                    break
            assert len(texts) == len(set(texts)), f"a message stored twice in {sid}"
            stored = set(texts)
            missing = [cmid for cmid in acked[sid] if cmid not in stored]
            assert not missing, f"acknowledged messages lost in {sid}: {missing[:5]}"
            assert texts[: len(acked[sid])] == acked[sid][: len(texts)] or set(acked[sid]) <= stored


async def _rounds(start_killed, urls_now, session_ids: list[str]) -> None:
    """ROUNDS of: writers and a mover against the nodes, a kill -9 at a random moment, a restart, a check."""
    rng = random.Random(SEED)
    acked: dict[str, list[str]] = {sid: [] for sid in session_ids}
    moved: list[int] = []  # sessions each acknowledged move moved
    for _ in range(ROUNDS):
        stop = asyncio.Event()
        urls = urls_now()
        tasks = [asyncio.create_task(_writer(urls, sid, acked[sid], stop)) for sid in session_ids]
        tasks.append(asyncio.create_task(_mover(urls, stop, moved)))
        await asyncio.sleep(rng.uniform(0.3, 1.2))  # the kill comes at a random moment of the writes and moves
        start_killed()
        await asyncio.sleep(0.3)  # and the clients go on against what is left, then retry
        stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        await _verify(urls_now()[0], session_ids, acked)
    assert all(acked.values()), "no message was acknowledged in some session"
    assert sum(moved) >= ROUNDS, f"too few moves to prove anything: {moved}"
    print(f"{sum(map(len, acked.values()))} messages and {len(moved)} moves ({sum(moved)} sessions) acknowledged")


async def _sessions(url: str) -> list[str]:
    async with ScriptClient.connect(url, name="setup") as setup:
        return [
            (await setup.call("create_session", document_id=DOC, section_id="a"))["session"]["session_id"]
            for _ in range(SESSIONS)
        ]


@pytest.mark.timeout(240)
async def test_moves_and_writes_survive_kill_9_on_files(data_dir):
    print(f"SECTIONCHAT_CRASH_SEED={SEED}")
    server = ServerProcess(data_dir, *NO_RATE_LIMITS).start()
    try:
        session_ids = await _sessions(server.url)

        def restart() -> None:
            nonlocal server
            server.kill()
            server.close()
            server = ServerProcess(data_dir, *NO_RATE_LIMITS).start(server.port)

        await _rounds(restart, lambda: [server.url], session_ids)
    finally:
        server.close()


@pytest.mark.timeout(240)
async def test_moves_and_writes_survive_kill_9_of_one_of_two_nodes_on_redis(data_dir, redis_server):
    print(f"SECTIONCHAT_CRASH_SEED={SEED}")
    args = (*NO_RATE_LIMITS, "--storage", redis_server.url, "--presence-ttl-s", "1.5")
    nodes = [ServerProcess(data_dir / "one", *args).start(), ServerProcess(data_dir / "two", *args).start()]
    try:
        session_ids = await _sessions(nodes[0].url)

        def restart() -> None:
            nodes[0].kill()
            nodes[0].close()
            nodes[0] = ServerProcess(data_dir / "one", *args).start(nodes[0].port)

        await _rounds(restart, lambda: [node.url for node in nodes], session_ids)
    finally:
        for node in nodes:
            node.close()
