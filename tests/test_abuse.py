"""Misbehaving clients and shutdown under load: nobody else suffers, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import statistics
import time

import msgspec
import pytest
from conftest import scrape
from websockets.exceptions import ConnectionClosed

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
        port=0,
        data_dir=str(data_dir),
        rate_limit=0,
        sessions_per_minute=0,
        max_outgoing_bytes=256 * 1024,
        recovery_window=100_000,
    )
    async with running(config) as app:
        setup = await ScriptClient.open(app.url, name="setup")
        sids = [
            (await setup.call("create_session", document_id="d", section_id=f"s{n}"))["session"]["session_id"]
            for n in range(4)
        ]
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
            sid = (await client.call("create_session", document_id="term", section_id=f"s{n % 2}"))["session"][
                "session_id"
            ]
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


PAD = "x" * 60_000  # close to the 64 KiB frame limit, like the flood the issue measured


def malformed_frames(n: int) -> str | bytes:
    """The kinds of bad frame in turn: not JSON, binary in JSON mode, bad fields, unknown type."""
    kind = n % 4
    if kind == 0:
        return "{" + PAD
    if kind == 1:
        return PAD.encode()
    if kind == 2:
        return msgspec.json.encode({"type": "send_message", "id": n, "session_id": 7, "text": PAD}).decode()
    return msgspec.json.encode({"type": "no_such_request", "id": n, "pad": PAD}).decode()


@pytest.mark.timeout(60)
async def test_malformed_frames_count_against_the_rate_limit(data_dir):
    """A flood of malformed frames is rate limited like requests (rate_limited, then 1008); a polite client is untouched."""
    rate = 5
    async with running(Config(port=0, data_dir=str(data_dir), rate_limit=rate)) as app:
        polite = await ScriptClient.open(app.url, name="polite")
        flooder = await ScriptClient.open(app.url, name="flooder")
        started = time.monotonic()
        sent = 0
        try:
            while sent < 5000:
                await flooder.send_raw(malformed_frames(sent))
                sent += 1
        except ConnectionClosed:
            pass
        assert await flooder.wait_closed() == 1008
        elapsed = time.monotonic() - started
        await flooder.close()
        replies = flooder.take_events()
        assert (await polite.request("ping"))["type"] == "pong"
        await polite.close()
        closes = app.metrics.registry.get_sample_value("sectionchat_rate_limit_disconnects_total")
    print(f"\nflood cut off after {sent} frames in {elapsed:.2f} s; {len(replies)} replies")
    assert sent < 5000, "the flood was never cut off"
    codes = [reply["code"] for reply in replies]
    assert all(reply["type"] == "error" for reply in replies)
    # Within the burst, malformed frames are decoded and answered for what they are...
    assert set(codes[:rate]) <= {"bad_request", "unknown_type"} and len(set(codes[:rate])) == 2
    # ...past it they are refused unread, as rate_limited (temporary), with the id when the frame has one...
    limited = [reply for reply in replies if reply["code"] == "rate_limited"]
    assert limited and all(reply["temporary"] is True for reply in limited)
    assert {reply.get("reply_to") for reply in limited} - {None} <= set(range(sent))
    assert any("reply_to" in reply for reply in limited)
    # ...and only a token's worth of them per 1/rate s was decoded at all.
    decoded = len(codes) - len(limited)
    assert decoded <= rate + rate * elapsed + 1
    assert closes == 1


@pytest.mark.timeout(60)
async def test_malformed_frames_within_the_rate_are_answered(data_dir):
    """Below the rate nothing changes: every malformed frame gets its own error, and the connection stays open."""
    async with running(Config(port=0, data_dir=str(data_dir), rate_limit=20)) as app:
        async with ScriptClient.connect(app.url, name="clumsy") as clumsy:
            for n in range(8):
                await clumsy.send_raw(malformed_frames(n))
            replies = [await clumsy.next_event("error") for _ in range(8)]
            assert (await clumsy.request("ping"))["type"] == "pong"
    assert [reply["code"] for reply in replies] == ["bad_request", "bad_request", "bad_request", "unknown_type"] * 2
    assert [reply.get("reply_to") for reply in replies] == [None, None, 2, 3, None, None, 6, 7]
