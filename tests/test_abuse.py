"""Misbehaving clients and shutdown under load: nobody else suffers, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from conftest import scrape

from client import ScriptClient
from server.app import running
from server.config import Config

BIG_TEXT = "x" * 8000


async def publish(url: str, name: str, sid: str, count: int) -> list[dict]:
    async with ScriptClient.connect(url, name=name) as publisher:
        return [(await publisher.call("send_message", session_id=sid, text=BIG_TEXT))["message"] for _ in range(count)]


@pytest.mark.timeout(120)
async def test_slow_consumer_is_closed_with_4008_and_recovers(data_dir):
    """A subscriber that stops reading is closed with 4008; others get everything; it recovers on reconnect."""
    config = Config(
        port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0,
        max_outgoing_bytes=256 * 1024, recovery_window=100_000,
    )
    async with running(config) as app:
        setup = await ScriptClient.open(app.url, name="setup")
        sids = [(await setup.call("create_session", document_id="d", section_id=f"s{n}"))["session"]["session_id"] for n in range(4)]
        await setup.close()
        slow = await ScriptClient.open(app.url, name="slow")
        fast = await ScriptClient.open(app.url, name="fast")
        snapshots = {}
        for n in range(4):
            snapshots[n] = await slow.call("subscribe", document_id="d", section_id=f"s{n}")
            await fast.call("subscribe", document_id="d", section_id=f"s{n}")
        slow.websocket.transport.pause_reading()

        published: list[dict] = []
        while not app.metrics.registry.get_sample_value("sectionchat_slow_consumer_disconnects_total"):
            assert len(published) < 20_000, "the slow reader was never closed"
            batches = await asyncio.gather(*(publish(app.url, f"p{n}", sids[n], 25) for n in range(4)))
            published.extend(m for batch in batches for m in batch)

        # The fast subscriber got every message, in order per section.
        received = await fast.next_events("message", len(published), timeout=30)
        assert sorted(e["message"]["message_id"] for e in received) == sorted(m["message_id"] for m in published)

        slow.websocket.transport.resume_reading()
        assert await slow.wait_closed(timeout=30) == 4008
        seen = {}
        for event in slow.events:
            if "offset" in event:
                seen[event["message"]["session_id"]] = event["offset"]
        await slow.close()
        await fast.close()

        async with ScriptClient.connect(app.url, name="slow") as again:
            recovered_ids = []
            for n in range(4):
                since = seen.get(sids[n], snapshots[n]["offset"])
                reply = await again.call(
                    "subscribe", document_id="d", section_id=f"s{n}", since_offset=since, epoch=snapshots[n]["epoch"]
                )
                assert reply["recovered"] is True
                recovered_ids += [e["message"]["message_id"] for e in reply["events"]]
        got = recovered_ids + [e["message"]["message_id"] for e in slow.events if e.get("type") == "message"]
        assert sorted(got) == sorted(m["message_id"] for m in published)


@pytest.mark.timeout(120)
async def test_polite_client_keeps_working_under_abuse(data_dir):
    """While one client floods and another stops reading, a polite client's requests all complete."""
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0, max_outgoing_bytes=256 * 1024)
    async with running(config) as app:
        stalled = await ScriptClient.open(app.url, name="stalled")
        await stalled.call("subscribe", document_id="noisy", section_id="s")
        stalled.websocket.transport.pause_reading()
        flooder = await ScriptClient.open(app.url, name="flooder")
        noisy = (await flooder.call("create_session", document_id="noisy", section_id="s"))["session"]["session_id"]
        stop = asyncio.Event()

        async def flood() -> int:
            sent = 0
            while not stop.is_set():
                await flooder.send({"type": "send_message", "session_id": noisy, "text": BIG_TEXT})
                await flooder.send({"type": "ping"})
                sent += 2
                if sent % 200 == 0:
                    await flooder.call("ping")  # keep our own backlog bounded
            return sent

        flooding = asyncio.create_task(flood())
        latencies = {"create_session": [], "send_message": []}
        async with ScriptClient.connect(app.url, name="polite") as polite:
            for _ in range(100):
                started = time.perf_counter()
                sid = (await polite.call("create_session", document_id="calm", section_id="s"))["session"]["session_id"]
                latencies["create_session"].append(time.perf_counter() - started)
                started = time.perf_counter()
                await polite.call("send_message", session_id=sid, text="still here")
                latencies["send_message"].append(time.perf_counter() - started)
        stop.set()
        flooded = await flooding
        await flooder.close()
        stalled.websocket.transport.resume_reading()
        await stalled.close()
    for request, values in latencies.items():
        values.sort()
        print(
            f"\npolite {request} under abuse ({flooded} flood frames): "
            f"p50 {statistics.median(values) * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms"
        )
    assert len(latencies["send_message"]) == 100


@pytest.mark.timeout(90)
async def test_sigterm_under_load_loses_nothing(server_process):
    """SIGTERM while writers are busy: writes in flight finish, clients get 1001, every ack survives."""
    server = server_process()
    acknowledged: dict[str, list[dict]] = {}
    codes: list[int | None] = []
    enough = asyncio.Event()

    async def writer(n: int) -> None:
        client = await ScriptClient.open(server.url, name=f"w{n}")
        try:
            sid = (await client.call("create_session", document_id="term", section_id=f"s{n % 2}"))["session"]["session_id"]
            acknowledged[sid] = []
            while True:
                ack = await client.call("send_message", session_id=sid, text=str(len(acknowledged[sid])))
                acknowledged[sid].append(ack["message"])
                if sum(map(len, acknowledged.values())) >= 100:
                    enough.set()
        except Exception:
            pass
        finally:
            codes.append(await client.wait_closed())

    writers = [asyncio.create_task(writer(n)) for n in range(6)]
    await asyncio.wait_for(enough.wait(), 30)
    server.process.send_signal(15)
    await asyncio.wait_for(asyncio.gather(*writers), 30)
    assert server.process.wait(20) == 0
    assert codes == [1001] * 6

    restarted = server_process()
    async with ScriptClient.connect(restarted.url, name="checker") as checker:
        for sid, messages in acknowledged.items():
            history = await checker.call("history", session_id=sid, limit=200)
            assert history["messages"][: len(messages)] == messages
            assert len(history["messages"]) == len(messages)  # nothing stored without its ack going out


@pytest.mark.timeout(120)
async def test_slow_consumer_on_the_production_event_loop(server_process):
    """The 4008 close works the same on the server as operators run it (uvloop)."""
    server = server_process("--max-outgoing-bytes", str(256 * 1024))
    setup = await ScriptClient.open(server.url, name="setup")
    sid = (await setup.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
    await setup.close()
    slow = await ScriptClient.open(server.url, name="slow")
    await slow.call("subscribe", document_id="d", section_id="s")
    slow.websocket.transport.pause_reading()
    closed = ("sectionchat_slow_consumer_disconnects_total", ())
    while not (await scrape(server.port)).get(closed):
        await asyncio.gather(*(publish(server.url, f"p{n}", sid, 25) for n in range(4)))
    slow.websocket.transport.resume_reading()
    assert await slow.wait_closed(timeout=30) == 4008
    await slow.close()
