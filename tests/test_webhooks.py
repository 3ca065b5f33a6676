"""Webhooks from the durable stream: real receivers (aiohttp servers) that verify every signature with the
standardwebhooks package, a real server, real outages and a kill -9."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import defaultdict

import pytest
from aiohttp import web
from conftest import NO_RATE_LIMITS, ServerProcess
from standardwebhooks.webhooks import Webhook

from client import ScriptClient
from server.app import running
from server.config import Config

pytestmark = pytest.mark.timeout(90)

SECRET = "whsec_" + base64.b64encode(b"a webhook secret of 32 bytes!!!!").decode()


class Receiver:
    """A webhook receiver on a free port: verifies, records, and fails on request."""

    def __init__(self) -> None:
        self.verifier = Webhook(SECRET)
        self.events: list[dict] = []
        self.ids: dict[tuple[str, int], set[str]] = defaultdict(set)  # (section, offset) -> webhook-ids seen
        self.fail: dict[str, int] = {}  # section id -> attempts still to refuse with 500
        self.attempts: list[tuple[str, int]] = []
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        payload = self.verifier.verify(data, dict(request.headers))  # raises on a bad signature
        where = (payload.get("section_id", ""), payload.get("offset", 0))  # document_deleted has neither
        self.attempts.append(where)
        if self.fail.get(where[0], 0) > 0:
            self.fail[where[0]] -= 1
            return web.Response(status=500)
        self.events.append(payload)
        self.ids[where].add(request.headers["webhook-id"])
        self.arrived.set()
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def until(self, predicate, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.arrived.clear()
                await self.arrived.wait()

    def offsets(self, section: str) -> list[int]:
        """The section's delivered offsets in the order they first came (a repeat is allowed: at least once)."""
        return list(dict.fromkeys(e["offset"] for e in self.events if e["section_id"] == section))


@pytest.fixture
async def receiver():
    started = await Receiver().start()
    yield started
    await started.stop()


async def test_every_stored_event_is_posted_signed_in_offset_order(receiver, data_dir):
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, webhooks=(receiver.url,), webhook_secret=SECRET)
    async with running(config) as app, ScriptClient.connect(app.url, name="alice") as alice:
        sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
        for n in range(5):
            await alice.call("send_message", session_id=sid, text=f"m{n}", mentions=["bob"])
        await alice.call("delete_message", session_id=sid, seq=1)
        await alice.call("mark_read", session_id=sid, seq=3)  # not an event: no webhook
        await receiver.until(lambda: receiver.offsets("s") == list(range(1, 8)))
        first, *_, last = receiver.events
        assert first["type"] == "session_created" and first["session"]["session_id"] == sid
        assert (first["document_id"], first["section_id"], first["epoch"]) == ("d", "s", last["epoch"])
        assert last["type"] == "message_deleted" and last["message"]["text"] == ""
        assert all(len(ids) == 1 for ids in receiver.ids.values())
        assert len({next(iter(ids)) for ids in receiver.ids.values()}) == 7  # one id per event


async def test_a_failing_section_is_retried_while_the_others_go_on(receiver, data_dir):
    receiver.fail["stuck"] = 2  # refused twice (backoff 1 s, then 2 s), then taken
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, webhooks=(receiver.url,), webhook_secret=SECRET)
    async with running(config) as app, ScriptClient.connect(app.url, name="alice") as alice:
        await alice.call("create_session", document_id="d", section_id="stuck")
        await alice.call("create_session", document_id="d", section_id="stuck")
        await alice.call("create_session", document_id="d", section_id="fine")
        await receiver.until(lambda: receiver.offsets("fine") == [1], timeout=10)
        assert receiver.offsets("stuck") == []  # still retrying its first event
        await receiver.until(lambda: receiver.offsets("stuck") == [1, 2], timeout=20)
        assert receiver.attempts.count(("stuck", 1)) == 3 and receiver.attempts.count(("stuck", 2)) == 1
        assert b"sectionchat_webhook_failures" in app.metrics.render()


async def test_events_stored_while_the_receiver_and_then_the_server_were_down_are_all_delivered(receiver, data_dir):
    args = (*NO_RATE_LIMITS, "--webhook", receiver.url, "--webhook-secret", SECRET)
    server = ServerProcess(data_dir, *args).start()
    try:
        async with ScriptClient.connect(server.url, name="alice") as alice:
            sid = (await alice.call("create_session", document_id="d", section_id="s"))["session"]["session_id"]
            await receiver.until(lambda: receiver.offsets("s") == [1])
            await receiver.stop()  # the receiver is down: the server keeps every event for it
            for n in range(30):
                await alice.call("send_message", session_id=sid, text=f"m{n}")
            await alice.call("delete_message", session_id=sid, seq=1)  # deleted before it is delivered
        server.kill()  # and the server dies before it could deliver them
        server.close()
        await receiver.start()  # same port
        server = ServerProcess(data_dir, *args).start(server.port)
        await receiver.until(lambda: receiver.offsets("s") == list(range(1, 33)))
        texts = [e["message"]["text"] for e in receiver.events if e["type"] == "message"]
        assert texts[0] == "" and receiver.events[-1]["type"] == "message_deleted"  # served redacted, from storage
        assert sorted(set(texts[1:]), key=lambda t: int(t[1:])) == [f"m{n}" for n in range(1, 30)]
    finally:
        server.close()


async def test_two_nodes_on_redis_deliver_every_event_and_one_takes_over_from_a_dead_one(
    receiver, data_dir, redis_server
):
    args = (*NO_RATE_LIMITS, "--storage", redis_server.url, "--webhook", receiver.url, "--webhook-secret", SECRET)
    one, two = ServerProcess(data_dir / "one", *args).start(), ServerProcess(data_dir / "two", *args).start()
    try:
        async with ScriptClient.connect(one.url, name="a") as a, ScriptClient.connect(two.url, name="b") as b:
            sessions = [(await c.call("create_session", document_id="d", section_id=f"s{n}"))["session"]["session_id"]
                        for n, c in enumerate((a, b, a, b))]  # fmt: skip
            for sid in sessions:
                await a.call("send_message", session_id=sid, text="hi")
            await receiver.until(lambda: all(receiver.offsets(f"s{n}") == [1, 2] for n in range(4)))
        one.kill()  # whatever it held, the other node takes over within a lease and a rescan
        async with ScriptClient.connect(two.url, name="b") as b:
            for sid in sessions:
                await b.call("send_message", session_id=sid, text="after")
        await receiver.until(lambda: all(receiver.offsets(f"s{n}") == [1, 2, 3] for n in range(4)), timeout=40)
        assert json.dumps(receiver.events)  # every payload was verified on arrival
    finally:
        one.close()
        two.close()


def test_a_webhook_without_a_secret_is_a_startup_error(data_dir):
    from client.process import NotListening

    server = ServerProcess(data_dir, "--webhook", "http://127.0.0.1:9/hook")
    with pytest.raises(NotListening) as refused:
        server.start(timeout=10)
    assert "--webhook needs --webhook-secret" in str(refused.value)
    server.close()


async def test_an_event_stored_while_a_section_saves_its_progress_is_still_delivered(receiver, data_dir):
    """The last event of a burst comes while the section's delivery saves its progress: it must not wait for another."""
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, webhooks=(receiver.url,), webhook_secret=SECRET)
    async with running(config) as app, ScriptClient.connect(app.url, name="alice") as alice:
        for n in range(10):
            sid = (await alice.call("create_session", document_id="d", section_id=f"s{n}"))["session"]["session_id"]
            await alice.call("send_message", session_id=sid, text="the last event for now")
            await receiver.until(lambda n=n: receiver.offsets(f"s{n}") == [1, 2], timeout=10)


async def test_deleting_a_document_drops_its_undelivered_events_and_sends_document_deleted(receiver, data_dir):
    receiver.fail["s"] = 1000  # its events never get through before the deletion
    config = Config(
        port=0, data_dir=str(data_dir), rate_limit=0, webhooks=(receiver.url,), webhook_secret=SECRET,
        api_keys=("k",), api_port=0,
    )  # fmt: skip
    async with running(config) as app, ScriptClient.connect(app.url, name="alice") as alice:
        await alice.call("create_session", document_id="d", section_id="s")
        async with asyncio.timeout(10):
            while not receiver.attempts:
                await asyncio.sleep(0.02)  # a bounded poll: the first refused attempt has no event of its own
        sessions, _ = await app.chat.delete_document("d")
        assert sessions == 1
        await receiver.until(lambda: any(e["type"] == "document_deleted" for e in receiver.events), timeout=10)
        assert [e for e in receiver.events if e["type"] != "document_deleted"] == []
        assert receiver.events[-1] == {"type": "document_deleted", "document_id": "d"}
