"""Redis faults: `unavailable` means nothing is stored, ever; an unknown outcome is found out or said.

The faults are real: a redis-server stopped with SIGSTOP (it keeps what it was
sent in its socket buffers and runs it when continued), and a TCP relay on real
sockets between a node and Redis that holds a connection's requests back (a
stalled server, seen from the network) or drops its replies (a connection
that breaks after Redis ran the command).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as redis
from conftest import http_get
from websockets.exceptions import ConnectionClosed

from client import ScriptClient
from protocol.messages import Message, Session
from server.storage import redis as redis_storage
from server.storage.base import (
    MessageRecord,
    OutcomeUnknown,
    SectionKey,
    SessionCreatedRecord,
    StaleSection,
    StorageError,
    StoredRecord,
)
from server.storage.redis import RedisStorage, fence_key, section_keys

_decode_record = msgspec.json.Decoder(StoredRecord).decode

KEY = SectionKey("doc", "intro")

# Longer than every client timeout of the Redis backend: reads (connect, then a
# read retried once), writes (a reply, then the resolution), health checks.
STALL_S = 1.0 + max(
    redis_storage.CONNECT_TIMEOUT_S + 2 * redis_storage.READ_TIMEOUT_S,
    redis_storage.WRITE_TIMEOUT_S + redis_storage.RESOLVE_BUDGET_S,
    redis_storage.CHECK_TIMEOUT_S,
)
# The longest a write may wait for its answer: an earlier write's outcome, a
# connection's handshake, its own reply, its resolution (and some slack).
WRITE_ANSWER_S = 2 * redis_storage.RESOLVE_BUDGET_S + 2 * redis_storage.WRITE_TIMEOUT_S + 3.0


def session(session_id: str) -> Session:
    return Session(session_id, KEY.document_id, KEY.section_id, None, "alice", "2026-11-25T08:00:00.000Z", False, 0)


def message(seq: int, message_id: str) -> Message:
    return Message("s1", seq, message_id, "alice", f"text {seq}", None, "2026-11-25T08:00:00.000Z")


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Link:
    """One relayed connection: client <-> relay <-> Redis."""

    def __init__(self, client: Streams, upstream: Streams):
        self.client_reader, self.client_writer = client
        self.up_reader, self.up_writer = upstream
        self.hold = False  # keep the client's bytes here, as a stalled server's socket buffer does
        self.mute = False  # drop Redis's replies, as a connection that broke after Redis ran the command
        self.held = bytearray()
        self.client_gone = False
        self.late_replies = bytearray()  # what Redis answered once the client could no longer hear it
        self.replied = asyncio.Event()
        self.tasks = [asyncio.create_task(self._requests()), asyncio.create_task(self._replies())]

    async def _requests(self) -> None:
        try:
            while data := await self.client_reader.read(65536):
                if self.hold:
                    self.held += data
                else:
                    self.up_writer.write(data)
                    await self.up_writer.drain()
        except (ConnectionError, OSError):
            pass
        self.client_gone = True
        if not self.hold:
            self.up_writer.close()

    async def _replies(self) -> None:
        try:
            while data := await self.up_reader.read(65536):
                if self.mute or self.client_gone:
                    self.late_replies += data
                    self.replied.set()
                else:
                    self.client_writer.write(data)
                    await self.client_writer.drain()
        except (ConnectionError, OSError):
            pass
        self.client_writer.close()

    async def release(self) -> None:
        """Let what was held reach Redis now, after the client gave up on it."""
        self.hold = False
        if self.held:
            self.up_writer.write(bytes(self.held))
            self.held.clear()
            await self.up_writer.drain()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.client_writer.close()
        self.up_writer.close()


class Relay:
    """A TCP relay to Redis whose current connections can be stalled or muted."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.links: list[Link] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.links.append(Link((reader, writer), upstream))

    def current(self) -> list[Link]:
        return list(self.links)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for link in self.links:
            link.close()
        await asyncio.gather(*(task for link in self.links for task in link.tasks), return_exceptions=True)


@pytest.fixture
async def relay(redis_server) -> AsyncIterator[Relay]:
    relay = await Relay(redis_server.port).start()
    yield relay
    await relay.close()


@pytest.fixture
async def raw(redis_server) -> AsyncIterator[redis.Redis]:
    """A plain client straight to Redis, to look at what is really stored."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def stopped(redis_server):
    """stop() / cont() the redis-server with SIGSTOP / SIGCONT; it is always continued at the end."""

    class Stopper:
        def stop(self) -> None:
            os.kill(redis_server.process.pid, signal.SIGSTOP)

        def cont(self) -> None:
            os.kill(redis_server.process.pid, signal.SIGCONT)

    stopper = Stopper()
    yield stopper
    if redis_server.running:
        stopper.cont()


async def stored(raw: redis.Redis) -> list[int]:
    """The offsets of the section's records, as Redis holds them."""
    meta, log = section_keys(KEY)
    offset = int(await raw.hget(meta, "offset") or 0)
    records = [_decode_record(line) for line in await raw.lrange(log, 0, -1)]
    assert len(records) == offset
    return [record.offset for record in records]


@pytest.mark.timeout(30)
async def test_append_that_reaches_redis_after_the_refusal_never_runs(relay, raw):
    """The issue's case, made exact: the node gave up on an append; Redis receives it only afterwards.

    The node must have fenced it off before answering `unavailable`: when it
    does reach Redis, it refuses, and the next write takes its offset.
    """
    storage = RedisStorage(relay.url, write_timeout_s=0.5, resolve_budget_s=10.0)
    await storage.open()
    try:
        await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1"))])
        stalled = relay.current()
        for link in stalled:
            link.hold = True
        started = time.monotonic()
        with pytest.raises(StorageError) as refused:
            await storage.append(KEY, "e", [MessageRecord(offset=2, message=message(1, "m-late"))])
        assert not isinstance(refused.value, OutcomeUnknown)  # Redis answered the resolution: the outcome is known
        assert time.monotonic() - started < 5
        for link in stalled:
            await link.release()
        [late] = [link for link in stalled if link.client_gone]
        await asyncio.wait_for(late.replied.wait(), 10)
        assert b"fenced" in late.late_replies
        assert await stored(raw) == [1]
        # The section goes on from offset 1, and the fence is gone with the next append.
        await storage.append(KEY, "e", [MessageRecord(offset=2, message=message(1, "m-next"))])
        log = await storage.load_section(KEY)
        assert [r.message.message_id for r in log.records[1:]] == ["m-next"]
        assert await raw.exists(fence_key(KEY)) == 0
    finally:
        await storage.close()


@pytest.mark.timeout(30)
async def test_append_whose_reply_is_lost_is_acknowledged_once(relay, raw):
    """Redis ran the append but the reply never came back: the node finds it stored and acknowledges it."""
    storage = RedisStorage(relay.url, write_timeout_s=0.5, resolve_budget_s=10.0)
    await storage.open()
    try:
        await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1"))])
        muted = relay.current()
        for link in muted:
            link.mute = True
        await storage.append(KEY, "e", [MessageRecord(offset=2, message=message(1, "m-1"))])  # no exception: stored
        assert any(link.replied.is_set() for link in muted)  # Redis did answer, into the void
        for link in muted:
            link.mute = False
        await storage.append(KEY, "e", [MessageRecord(offset=3, message=message(2, "m-2"))])
        log = await storage.load_section(KEY)
        assert [r.offset for r in log.records] == [1, 2, 3]
        assert [r.message.message_id for r in log.records[1:]] == ["m-1", "m-2"]
    finally:
        await storage.close()


@pytest.mark.timeout(30)
async def test_stall_past_the_budget_is_outcome_unknown_and_blocks_the_section(redis_server, stopped, raw):
    """Redis stopped past every timeout: the write is OutcomeUnknown (never plain `unavailable`), within
    its bound; the section takes no new append until that outcome is known; after SIGCONT the truth wins."""
    storage = RedisStorage(redis_server.url, write_timeout_s=0.3, resolve_budget_s=0.6, check_timeout_s=0.3)
    await storage.open()
    try:
        await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1"))])
        stopped.stop()
        started = time.monotonic()
        with pytest.raises(OutcomeUnknown):
            await storage.append(KEY, "e", [MessageRecord(offset=2, message=message(1, "m-unknown"))])
        assert time.monotonic() - started < 0.3 + 0.6 + 1.0
        started = time.monotonic()
        with pytest.raises(StorageError) as refused:
            await storage.check()
        assert "cannot reach Redis" in str(refused.value) and time.monotonic() - started < 1.0
        # Another write to the section is refused without being sent: `unavailable` is true for it.
        with pytest.raises(StorageError) as refused:
            await storage.append(KEY, "e", [MessageRecord(offset=2, message=message(1, "m-refused"))])
        assert not isinstance(refused.value, OutcomeUnknown)
        stopped.cont()
        # Redis now runs what it was sent, in its own order; the next append first learns the outcome.
        try:
            await storage.append(KEY, "e", [MessageRecord(offset=2, message=message(1, "m-after"))])
            winner = "m-after"  # the unknown one was fenced off before it ran
        except StaleSection:
            winner = "m-unknown"  # it had run: the chat would catch up and decide again
            await storage.append(KEY, "e", [MessageRecord(offset=3, message=message(2, "m-after"))])
        log = await storage.load_section(KEY)
        ids = [r.message.message_id for r in log.records[1:]]
        assert ids == ([winner] if winner == "m-after" else ["m-unknown", "m-after"])
        assert "m-refused" not in ids
        await storage.check()
        # Whatever else Redis still held (resolutions, the append itself) changes nothing now.
        await raw.ping()
        assert [r.message.message_id for r in (await storage.load_section(KEY)).records[1:]] == ids
    finally:
        stopped.cont()
        await storage.close()


@pytest.fixture
def nodes(server_process, redis_server):
    def start(count: int = 2):
        return [server_process("--storage", redis_server.url, "--presence-ttl-s", "1.5") for _ in range(count)]

    return start


@pytest.mark.timeout(60)
async def test_sigstop_of_redis_with_concurrent_writers_on_two_nodes(nodes, redis_server, stopped):
    """Redis is SIGSTOPped for longer than every client timeout while writers on two nodes keep writing.

    Afterwards: every acknowledged message is stored exactly once, every one
    answered `unavailable` is not stored at all (although Redis ran whatever
    was queued when it resumed), a 1011 close (outcome unknown) is resolved by
    retrying with the same client_msg_id, offsets and seqs are gapless, /healthz
    answered at once throughout, and both nodes accept writes again unrestarted.
    """
    a, b = nodes(2)
    sections = ["s0", "s1", "s2"]
    sids: dict[str, str] = {}
    async with ScriptClient.connect(a.url, name="setup") as setup:
        for section in sections:
            created = await setup.call("create_session", document_id="d", section_id=section)
            sids[section] = created["session"]["session_id"]

    acked: dict[str, dict] = {}  # client_msg_id -> the message acknowledged
    refused: set[str] = set()  # answered `unavailable` (never retried)
    unknown: set[str] = set()  # the connection was closed with 1011 (retried until acknowledged)
    ready = [asyncio.Event() for _ in range(12)]
    stalled, resumed, first_unknown = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def writer(index: int, url: str, section: str) -> None:
        client = await ScriptClient.open(url, name=f"w{index}")
        try:
            numbers, before, after = itertools.count(), 0, 0
            cmid = f"w{index}-{next(numbers)}"
            while after < 5:
                if before == 5 and not ready[index].is_set():
                    ready[index].set()
                    await stalled.wait()
                    if index >= 6:
                        # Writers 6-11 share a node and section with writers 0-5; they write once the
                        # first writes of the stall are known to be unknown, so theirs come after.
                        try:
                            await asyncio.wait_for(first_unknown.wait(), STALL_S)
                        except TimeoutError:
                            pass  # the assertions below will say what went wrong
                try:
                    # Bounded: a write is answered within seconds, however long Redis is stopped.
                    reply = await client.request(
                        "send_message", session_id=sids[section], text=cmid, client_msg_id=cmid, timeout=WRITE_ANSWER_S
                    )
                except ConnectionClosed:
                    assert client.websocket.close_code == 1011
                    unknown.add(cmid)
                    first_unknown.set()
                    await client.close()
                    client = await ScriptClient.open(url, name=f"w{index}")
                    continue  # the same client_msg_id again, until the outcome is known
                if reply["type"] == "message_ack":
                    acked[cmid] = reply["message"]
                    before += not stalled.is_set()
                    after += resumed.is_set()
                else:
                    assert reply["code"] == "unavailable" and reply["temporary"] is True, reply
                    if cmid in unknown:
                        # This attempt stored nothing, but the first one may still land: keep asking.
                        await asyncio.sleep(0.1)  # a client's retry backoff
                        continue
                    refused.add(cmid)
                cmid = f"w{index}-{next(numbers)}"
        finally:
            await client.close()

    placements = [(i, (a, b)[i % 2].url, sections[i % 3]) for i in range(12)]
    tasks = [asyncio.create_task(writer(*placement)) for placement in placements]
    try:
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in ready)), 30)
        stopped.stop()
        stalled.set()
        stall_started = time.monotonic()
        # /healthz never hangs, and says 503 while Redis cannot take a write.
        unhealthy = False
        while time.monotonic() - stall_started < STALL_S:
            async with asyncio.timeout(redis_storage.CHECK_TIMEOUT_S + 1):
                status, _, _ = await http_get(a.port, "/healthz")
            unhealthy |= status == 503
            await asyncio.sleep(0.5)  # a load balancer's probe interval
        assert unhealthy
        stopped.cont()
        resumed.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 40)
    finally:
        stopped.cont()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert refused and unknown, "the stall should have cost writes of both kinds"
    assert unknown <= set(acked)
    truth = RedisStorage(redis_server.url)
    try:
        for section in sections:
            log = await truth.load_section(SectionKey("d", section))  # raises on an offset gap or reordering
            assert [r.offset for r in log.records] == list(range(1, len(log.records) + 1))
            messages = [r.message for r in log.records if isinstance(r, MessageRecord)]
            assert [m.seq for m in messages] == list(range(1, len(messages) + 1))
            stored_ids = Counter(m.client_msg_id for m in messages)
            assert max(stored_ids.values()) == 1, "a write stored twice"
            assert not refused & set(stored_ids), "a write answered `unavailable` was stored"
            mine = {cmid: ack for cmid, ack in acked.items() if ack["session_id"] == sids[section]}
            assert set(mine) <= set(stored_ids), "an acknowledged write is missing"
            for m in messages:
                if m.client_msg_id in mine:
                    assert mine[m.client_msg_id]["message_id"] == m.message_id
            # Each node serves that same stream (once it has heard of the last events).
            for node in (a, b):
                async with ScriptClient.connect(node.url, name="checker") as checker:
                    async with asyncio.timeout(10):
                        while True:
                            reply = await checker.call("subscribe", document_id="d", section_id=section, since_offset=0)
                            if reply["offset"] == len(log.records):
                                break
                            await checker.call("unsubscribe", document_id="d", section_id=section)
                            await asyncio.sleep(0.05)
                    assert [e["offset"] for e in reply["events"]] == [r.offset for r in log.records]
                    assert [e["message"]["message_id"] for e in reply["events"] if e["type"] == "message"] == [
                        m.message_id for m in messages
                    ]
    finally:
        await truth.close()
    # Both nodes take writes again and report healthy, without a restart.
    for node in (a, b):
        async with ScriptClient.connect(node.url, name="after") as client:
            await client.call("send_message", session_id=sids["s0"], text="after")
        async with asyncio.timeout(10):
            while (await http_get(node.port, "/healthz"))[0] != 200:
                await asyncio.sleep(0.1)
