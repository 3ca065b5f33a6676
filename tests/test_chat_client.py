"""The Python client (client/chat.py) against real servers: typed calls, events, reconnect and recovery.

Network faults come from real causes: the server process killed (-9), stopped
(SIGSTOP) or terminated, its storage failing, and a TCP proxy between client
and server that can hold, cut or refuse connections. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import urllib.request
from pathlib import Path

import msgspec
import pytest
from conftest import NO_RATE_LIMITS, ServerProcess, until

from client.chat import (
    UNSET,
    Backoff,
    BadRequest,
    ChatError,
    ClientClosed,
    ClosedByServer,
    Conflict,
    ConnectionFailed,
    ConnectionLost,
    DocumentSummary,
    DocumentWatch,
    Forbidden,
    HandshakeRejected,
    Mentioned,
    Message,
    MessageDeleted,
    MessageEdited,
    MessageEvent,
    NotFound,
    Presence,
    RateLimited,
    ReactionEvent,
    ReadEvent,
    Resync,
    RetryInfo,
    SectionSummary,
    SectionSummaryEvent,
    Session,
    SessionClosed,
    SessionCreated,
    SessionListing,
    SessionMoved,
    SessionReopened,
    SessionUpdated,
    Subscription,
    TooLarge,
    TypingEvent,
    Unavailable,
    UnknownType,
    connect,
)
from server.app import running
from server.auth import mint_token
from server.config import Config

FAST = Backoff(initial=0.02, maximum=0.2)
STORED = (SessionCreated, MessageEvent, SessionClosed)


async def next_stored(events: Subscription, timeout: float = 10.0):
    """The next stored event (or Resync), skipping presence, typing and read markers."""
    while True:
        event = await events.next(timeout)
        if not isinstance(event, (Presence, TypingEvent, ReadEvent)):
            return event


async def stored_events(events: Subscription, count: int) -> list:
    return [await next_stored(events) for _ in range(count)]


class Proxy:
    """A TCP proxy in front of a server that can hold replies, cut connections or refuse new ones."""

    def __init__(self, target_port: int, receive_buffer: int | None = None):
        self.target_port = target_port
        self.receive_buffer = receive_buffer  # a small one makes a held connection back up quickly
        self.refusing = False
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def hold(self) -> None:
        """Stop passing bytes from the server to the client (requests still reach the server)."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Drop every open connection at once (what the client sees when a network path dies)."""
        for task in list(self._handlers):
            task.cancel()
        self._flowing.set()

    async def close(self) -> None:
        self.cut()
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            upstream = socket.socket()
            if self.receive_buffer is not None:
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            upstream.setblocking(False)
            await asyncio.get_running_loop().sock_connect(upstream, ("127.0.0.1", self.target_port))
            upstream_reader, upstream_writer = await asyncio.open_connection(sock=upstream)
        except OSError:
            upstream.close()
            writer.transport.abort()
            return
        self.accepted += 1
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer, False), self._pipe(upstream_reader, writer, True))
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(task)
            writer.transport.abort()
            upstream_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: bool) -> None:
        try:
            while data := await reader.read(65536):
                if held:
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        writer.transport.abort()


@pytest.fixture
async def proxy_to():
    proxies: list[Proxy] = []

    async def start(port: int, **options) -> Proxy:
        proxy = await Proxy(port, **options).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.close()


@pytest.fixture
def restarts(data_dir: Path):
    """restart(old) -> a new server process on the same port and data dir (stopped after the test)."""
    started: list[ServerProcess] = []

    def restart(old: ServerProcess, *args: str) -> ServerProcess:
        server = ServerProcess(data_dir, *NO_RATE_LIMITS, *args).start(port=old.port)
        started.append(server)
        return server

    yield restart
    for server in started:
        server.close()


def slow_consumer_disconnects(server: ServerProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        found = re.search(r"^sectionchat_slow_consumer_disconnects_total (\S+)$", response.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def set_file_size_limit(pid: int, limit: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


# Typed methods ------------------------------------------------------------------


async def test_every_method_returns_protocol_types(app):
    async with connect(app.url, name="alice") as chat:
        assert chat.user == "alice" and chat.limits.max_text_chars == 8000 and chat.connected
        session = await chat.create_session("spec-7", "intro", title="Wording")
        assert isinstance(session, Session)
        assert (session.document_id, session.section_id, session.title, session.created_by) == (
            "spec-7",
            "intro",
            "Wording",
            "alice",
        )
        keyed = await chat.create_session("spec-7", "intro", idempotency_key="k1")
        assert await chat.create_session("spec-7", "intro", idempotency_key="k1") == keyed
        other = await chat.create_session("spec-7", "outro")

        first = await chat.send_message(session.session_id, "hello")
        assert isinstance(first, Message) and first.seq == 1 and first.author == "alice" and first.text == "hello"
        assert len(first.client_msg_id) == 36  # a uuid4 the client made up
        again = await chat.send_message(session.session_id, "hello?", client_msg_id="c-2")
        assert await chat.send_message(session.session_id, "hello?", client_msg_id="c-2") == again
        for n in range(3, 8):
            await chat.send_message(session.session_id, f"m{n}")

        page = await chat.history(session.session_id, limit=3)
        assert [m.seq for m in page.messages] == [5, 6, 7] and page.has_more
        page = await chat.history(session.session_id, before_seq=5, limit=3)
        assert [m.seq for m in page.messages] == [2, 3, 4] and page.has_more
        page = await chat.history(session.session_id, after_seq=5)
        assert [m.seq for m in page.messages] == [6, 7] and not page.has_more
        assert [m.seq async for m in chat.messages(session.session_id, after_seq=1, page_size=2)] == [2, 3, 4, 5, 6, 7]

        assert [s.session_id for s in await chat.list_sessions("spec-7", "intro")] == [
            session.session_id,
            keyed.session_id,
        ]
        assert {s.session_id for s in await chat.list_sessions("spec-7")} == {
            session.session_id,
            keyed.session_id,
            other.session_id,
        }
        fetched = await chat.get_session(session.session_id)
        assert fetched.last_seq == 7 and not fetched.closed

        await chat.typing(session.session_id)
        assert await chat.ping() >= 0
        closed = await chat.close_session(session.session_id)
        assert closed.closed and closed.session_id == session.session_id
        events = await chat.subscribe("spec-7", "intro")
        assert events.snapshot.offset == 10 and {s.session_id for s in events.snapshot.sessions} == {
            session.session_id,
            keyed.session_id,
        }
    # Leaving the block closes everything cleanly.
    assert not chat.connected
    assert [event async for event in events] == []
    with pytest.raises(ClientClosed):
        await chat.ping()


async def test_server_errors_are_typed_exceptions(app):
    async with connect(app.url, name="alice") as chat:
        with pytest.raises(NotFound) as caught:
            await chat.get_session("no-such-session")
        assert (
            caught.value.code == "not_found"
            and caught.value.temporary is False
            and "no-such-session" in caught.value.message
        )
        assert isinstance(caught.value, ChatError)
        with pytest.raises(NotFound):
            await chat.send_message("no-such-session", "hi")

        session = await chat.create_session("d", "s")
        with pytest.raises(TooLarge) as caught:
            await chat.send_message(session.session_id, "x" * 8001)
        assert caught.value.code == "too_large" and "8000" in caught.value.message
        with pytest.raises(BadRequest):
            await chat.history(session.session_id, before_seq=5, after_seq=1)
        with pytest.raises(BadRequest):
            await chat.history(session.session_id, limit=500)
        with pytest.raises(UnknownType) as caught:
            await chat.request("frobnicate")
        assert caught.value.code == "unknown_type"

        await chat.close_session(session.session_id)
        with pytest.raises(Conflict):
            await chat.send_message(session.session_id, "too late")
        with pytest.raises(Conflict):
            await chat.close_session(session.session_id)
        with pytest.raises(Conflict):
            await chat.typing(session.session_id)

        # A frame over max_frame_bytes would get the connection closed with 1009: refused before sending.
        with pytest.raises(TooLarge) as caught:
            await chat.send_message(session.session_id, "x" * 70_000)
        assert "max_frame_bytes" in caught.value.message
        assert await chat.ping() >= 0 and chat.reconnects == 0


async def test_token_mode_forbidden_and_rejected_handshakes(data_dir):
    secret = "a-secret-of-at-least-32-bytes-for-hs256"
    config = Config(port=0, data_dir=str(data_dir), auth_secret=secret, rate_limit=0, sessions_per_minute=0)
    async with running(config) as app:
        tokens = iter([mint_token(secret, "carol", ["allowed"])])
        async with connect(app.url, token=lambda: next(tokens)) as chat:
            assert chat.user == "carol"
            await chat.create_session("allowed", "s")
            with pytest.raises(Forbidden):
                await chat.create_session("secret-doc", "s")
            with pytest.raises(Forbidden):
                await chat.subscribe("secret-doc", "s")
        with pytest.raises(HandshakeRejected) as caught:
            await connect(app.url, token="not-a-token")
        assert caught.value.status == 401
        with pytest.raises(HandshakeRejected) as caught:
            await connect(app.url, token=mint_token("another-secret-of-at-least-32-bytes", "carol"))
        assert caught.value.status == 401
        url = app.url
    with pytest.raises(ConnectionFailed):  # nothing listens there any more
        await connect(url, name="alice", open_timeout=2)


async def test_bad_name_is_rejected_at_the_handshake(app):
    with pytest.raises(HandshakeRejected) as caught:
        await connect(app.url, name="bad\nname")
    assert caught.value.status == 400


async def test_concurrent_requests_share_one_connection(app):
    async with connect(app.url, name="alice") as chat:
        session = await chat.create_session("d", "s")
        sent = await asyncio.gather(*(chat.send_message(session.session_id, f"m{n}") for n in range(40)))
        assert sorted(m.seq for m in sent) == list(range(1, 41))
        assert [m.text for m in sent] == [f"m{n}" for n in range(40)]  # each caller got its own reply
        pages, info, sessions = await asyncio.gather(
            asyncio.gather(*(chat.history(session.session_id, after_seq=n, limit=1) for n in range(40))),
            chat.get_session(session.session_id),
            chat.list_sessions("d"),
        )
        assert [p.messages[0].seq for p in pages] == list(range(1, 41))
        assert info.last_seq == 40 and sessions == [info]


# Subscriptions ------------------------------------------------------------------


async def test_subscription_yields_typed_events_from_other_users(app):
    async with (
        connect(app.url, name="alice") as alice,
        connect(app.url, name="bob", format="msgpack") as bob,
        alice.subscribe("spec-7", "intro") as events,
    ):
        assert events.snapshot.presence == ["alice"] and events.snapshot.sessions == [] and events.offset == 0
        async with bob.subscribe("spec-7", "intro"):
            joined = await events.next(5)
            assert joined == Presence(document_id="spec-7", section_id="intro", joined=["bob"], left=[])
            assert events.presence == {"alice", "bob"}
            session = await bob.create_session("spec-7", "intro", title="Wording")
            message = await bob.send_message(session.session_id, "hello")
            await bob.typing(session.session_id)
            own = await alice.send_message(session.session_id, "alice's own")
            await bob.close_session(session.session_id)

            created = await events.next(5)
            assert isinstance(created, SessionCreated) and created.session == session and created.offset == 1
            assert await events.next(5) == MessageEvent(message=message, offset=2)
            assert await events.next(5) == TypingEvent(session_id=session.session_id, user="bob")
            # alice's own message (offset 3) is her reply, not an event.
            closed = await events.next(5)
            assert isinstance(closed, SessionClosed) and closed.offset == 4 and closed.session.closed
            assert own.author == "alice" and events.offset == 4
        assert await events.next(5) == Presence(document_id="spec-7", section_id="intro", joined=[], left=["bob"])

        # A second subscription to the same section starts at its own snapshot; both see what follows.
        second = await alice.subscribe("spec-7", "intro")
        assert second.snapshot.offset == 4
        later = await bob.create_session("spec-7", "intro")
        assert (await events.next(5)).session == later
        assert (await second.next(5)).session == later
        await second.unsubscribe()
        assert [event async for event in second] == []
        # The first one still receives events after the second is gone.
        await bob.close_session(later.session_id)
        assert (await events.next(5)).offset == 6


async def test_subscribe_since_offset_recovers_or_resyncs(app):
    async with connect(app.url, name="alice") as alice, connect(app.url, name="bob") as bob:
        first = await alice.subscribe("d", "s")
        session = await bob.create_session("d", "s")
        for n in range(3):
            await bob.send_message(session.session_id, f"m{n}")
        assert [e.offset for e in await stored_events(first, 4)] == [1, 2, 3, 4]
        await first.unsubscribe()
        resumed = await alice.subscribe("d", "s", since_offset=2, epoch=first.epoch)
        assert [e.offset for e in resumed.pending()] == [3, 4] and resumed.offset == 4
        await resumed.unsubscribe()
        stale = await alice.subscribe("d", "s", since_offset=2, epoch="another-epoch")
        resync = await stale.next(5)
        assert isinstance(resync, Resync) and resync.reason == "epoch_changed" and resync.snapshot.offset == 4


# Reconnect and recovery -------------------------------------------------------------


async def test_kill_9_then_recovery_yields_every_event_once(server_process, restarts, proxy_to):
    server = server_process()
    proxy = await proxy_to(server.port)
    async with (
        connect(proxy.url, name="alice", backoff=FAST) as alice,
        connect(server.url, name="bob", backoff=FAST) as bob,
    ):
        events = await alice.subscribe("spec-7", "intro")
        session = await bob.create_session("spec-7", "intro")
        for n in range(3):
            await bob.send_message(session.session_id, f"before {n}")
        assert [e.offset for e in await stored_events(events, 4)] == [1, 2, 3, 4]
        own = await alice.send_message(session.session_id, "alice, just before the crash")  # offset 5, no event

        proxy.refusing = True  # alice stays away until bob has written
        server.kill()
        restarted = restarts(server)
        proxy.target_port = restarted.port
        sent = [await bob.send_message(session.session_id, f"during {n}") for n in range(5)]
        assert bob.reconnects == 1
        second = await bob.create_session("spec-7", "intro", title="opened while alice was away")
        sent.append(await bob.send_message(second.session_id, "in the new session"))
        proxy.refusing = False

        recovered = await stored_events(events, 7)
        assert [e.offset for e in recovered] == [6, 7, 8, 9, 10, 11, 12]
        assert [e.message for e in recovered if isinstance(e, MessageEvent)] == sent
        assert recovered[5].session == second
        assert events.recovered_events == 7 and events.resubscriptions == 1 and alice.reconnects == 1
        # Live events continue after the recovered ones, without a gap or a repeat.
        after = await bob.send_message(second.session_id, "after")
        assert await next_stored(events) == MessageEvent(message=after, offset=13)
        history = await alice.history(session.session_id)
        assert [m.text for m in history.messages] == [
            *(f"before {n}" for n in range(3)),
            own.text,
            *(f"during {n}" for n in range(5)),
        ]
        assert events.pending() == []


async def test_sigterm_restart_delivers_every_event_once(server_process, restarts):
    server = server_process()
    async with (
        connect(server.url, name="alice", backoff=FAST) as alice,
        connect(server.url, name="bob", backoff=FAST) as bob,
        connect(server.url, backoff=FAST) as anonymous,
    ):
        assigned = anonymous.user
        events = await alice.subscribe("d", "s")
        session = await bob.create_session("d", "s")
        await bob.send_message(session.session_id, "one")
        assert [e.offset for e in await stored_events(events, 2)] == [1, 2]
        assert (
            await asyncio.to_thread(server.terminate) == 0
        )  # closes every connection with 1001 (the loop must run to answer)
        restarts(server)
        for n in range(4):
            await bob.send_message(session.session_id, f"after restart {n}")
        await bob.close_session(session.session_id)
        rest = await stored_events(events, 5)
        assert [e.offset for e in rest] == [3, 4, 5, 6, 7]
        assert [e.message.text for e in rest[:4]] == [f"after restart {n}" for n in range(4)]
        assert isinstance(rest[4], SessionClosed)
        assert alice.reconnects == 1 and bob.reconnects == 1
        # A client without a name keeps the one the server gave it (idempotency keys are per user).
        await anonymous.ping()
        assert anonymous.reconnects == 1 and anonymous.user == assigned and assigned.startswith("anon-")


async def test_lost_ack_is_retried_and_stored_once(server_process, proxy_to):
    """The server stores a message but its ack never arrives: the retry returns the original, not a copy."""
    server = server_process()
    proxy = await proxy_to(server.port)
    retries: list[RetryInfo] = []
    async with (
        connect(proxy.url, name="alice", backoff=FAST, on_retry=retries.append) as alice,
        connect(server.url, name="bob") as bob,
    ):
        events = await alice.subscribe("d", "s")
        watching = await bob.subscribe("d", "s")
        session = await bob.create_session("d", "s")
        assert (await next_stored(events)).session == session

        proxy.hold()
        sending = asyncio.create_task(alice.send_message(session.session_id, "exactly once"))
        stored = await next_stored(watching)  # bob sees it stored; alice's ack is held in the proxy
        assert stored.message.text == "exactly once" and not sending.done()
        proxy.cut()

        message = await asyncio.wait_for(sending, 10)
        assert message == stored.message
        assert [(r.request, type(r.reason)) for r in retries] == [("send_message", ConnectionLost)]
        history = await bob.history(session.session_id)
        assert [m.message_id for m in history.messages] == [message.message_id]
        # Recovery brought alice's own message back (offset 2): it is not yielded; bob's next one is.
        reply = await bob.send_message(session.session_id, "from bob")
        assert await next_stored(events) == MessageEvent(message=reply, offset=3)
        assert events.resubscriptions == 1 and alice.reconnects == 1


async def test_requests_in_flight_at_a_crash(server_process, restarts):
    """Keyed writes and reads in flight when the server dies are retried; an unkeyed create is ConnectionLost."""
    server = server_process()
    async with connect(server.url, name="alice", backoff=FAST) as alice:
        session = await alice.create_session("d", "s")
        os.kill(server.process.pid, signal.SIGSTOP)  # requests reach the socket, nothing answers
        send = asyncio.create_task(alice.send_message(session.session_id, "in flight"))
        keyed = asyncio.create_task(alice.create_session("d", "s", idempotency_key="once"))
        unkeyed = asyncio.create_task(alice.create_session("d", "s", title="unkeyed"))
        read = asyncio.create_task(alice.get_session(session.session_id))
        await until(lambda: alice.in_flight == 4)
        server.kill()
        with pytest.raises(ConnectionLost):
            await unkeyed
        restarts(server)
        message, created, fetched = await asyncio.wait_for(asyncio.gather(send, keyed, read), 10)
        assert message.seq == 1 and fetched.session_id == session.session_id
        assert [m.message_id for m in (await alice.history(session.session_id)).messages] == [message.message_id]
        sessions = await alice.list_sessions("d", "s")
        assert [s.session_id for s in sessions] == [session.session_id, created.session_id]
        assert await alice.create_session("d", "s", idempotency_key="once") == created


async def test_unavailable_is_retried_until_stored_once(server_process):
    server = server_process()
    refused = asyncio.Event()

    def on_retry(info: RetryInfo) -> None:
        if isinstance(info.reason, Unavailable):
            refused.set()

    async with connect(server.url, name="alice", backoff=FAST, on_retry=on_retry) as alice:
        session = await alice.create_session("d", "s")
        set_file_size_limit(server.process.pid, 1)  # every write now fails: `unavailable`
        sending = asyncio.create_task(alice.send_message(session.session_id, "eventually"))
        await asyncio.wait_for(refused.wait(), 10)
        set_file_size_limit(server.process.pid, resource.RLIM_INFINITY)
        message = await asyncio.wait_for(sending, 10)
        history = await alice.history(session.session_id)
        assert [m.message_id for m in history.messages] == [message.message_id]

        # When the next retry would pass the deadline, the temporary error itself is raised.
        set_file_size_limit(server.process.pid, 1)
        with pytest.raises(Unavailable) as caught:
            await alice.send_message(session.session_id, "never", timeout=3.0)
        assert caught.value.temporary and caught.value.request == "send_message"
        set_file_size_limit(server.process.pid, resource.RLIM_INFINITY)
        assert [m.text for m in (await alice.history(session.session_id)).messages] == ["eventually"]


async def test_wiped_storage_yields_resync(server_process, restarts, data_dir):
    server = server_process()
    async with (
        connect(server.url, name="alice", backoff=FAST) as alice,
        connect(server.url, name="bob", backoff=FAST) as bob,
    ):
        events = await alice.subscribe("d", "s")
        old_epoch = events.epoch
        session = await bob.create_session("d", "s")
        await bob.send_message(session.session_id, "lost soon")
        assert [e.offset for e in await stored_events(events, 2)] == [1, 2]
        server.kill()
        shutil.rmtree(data_dir)
        restarts(server)
        resync = await next_stored(events)
        assert isinstance(resync, Resync) and resync.reason == "epoch_changed"
        assert resync.snapshot.offset == 0 and resync.snapshot.sessions == [] and resync.snapshot.epoch != old_epoch
        # The new stream starts again at offset 1, and is yielded.
        fresh = await bob.create_session("d", "s")
        event = await next_stored(events)
        assert isinstance(event, SessionCreated) and event.session == fresh and event.offset == 1


async def test_missing_more_than_the_recovery_window_yields_resync(server_process, proxy_to):
    server = server_process("--recovery-window", "2")
    proxy = await proxy_to(server.port)
    async with connect(proxy.url, name="alice", backoff=FAST) as alice, connect(server.url, name="bob") as bob:
        events = await alice.subscribe("d", "s")
        session = await bob.create_session("d", "s")
        assert (await next_stored(events)).offset == 1
        proxy.refusing = True
        proxy.cut()
        for n in range(5):
            await bob.send_message(session.session_id, f"missed {n}")
        proxy.refusing = False
        resync = await next_stored(events)
        assert isinstance(resync, Resync) and resync.reason == "window_exceeded" and resync.snapshot.offset == 6
        assert resync.snapshot.sessions[0].last_seq == 5 and events.snapshot is resync.snapshot
        after = await bob.send_message(session.session_id, "after")
        assert await next_stored(events) == MessageEvent(message=after, offset=7)


async def test_slow_consumer_close_reconnects_and_recovers(server_process, proxy_to):
    """Closed with 4008 for not keeping up, the client reconnects and recovers every event once."""
    server = server_process("--max-outgoing-bytes", "16384")
    proxy = await proxy_to(server.port, receive_buffer=4096)
    async with connect(proxy.url, name="alice", backoff=FAST) as alice, connect(server.url, name="bob") as bob:
        events = await alice.subscribe("d", "s")
        session = await bob.create_session("d", "s")
        assert (await next_stored(events)).offset == 1
        proxy.hold()  # alice stops reading: her queue on the server grows until it closes her with 4008
        sent = 0
        while await asyncio.to_thread(slow_consumer_disconnects, server) < 1:
            assert sent < 3000, "the server never closed the slow consumer"
            await asyncio.gather(*(bob.send_message(session.session_id, "x" * 7000) for _ in range(100)))
            sent += 100
        proxy.release()
        offsets = [event.offset for event in await stored_events(events, sent)]
        assert offsets == list(range(2, sent + 2))
        assert alice.reconnects >= 1 and events.recovered_events > 0


async def test_policy_close_is_reported_not_reconnected(server_process):
    server = server_process("--rate-limit", "1")
    async with connect(server.url, name="alice", backoff=FAST) as alice:
        events = await alice.subscribe("d", "s")
        results = await asyncio.gather(*(alice.ping() for _ in range(40)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures and all(isinstance(f, (ClosedByServer, RateLimited)) for f in failures), failures
        assert isinstance(alice.failure, ClosedByServer) and alice.failure.code == 1008
        assert not alice.connected and alice.reconnects == 0
        with pytest.raises(ClosedByServer):
            await alice.ping()
        with pytest.raises(ClosedByServer):
            await events.next(5)


# Conversations (revision 1.1) ----------------------------------------------------


async def test_conversation_methods_return_protocol_types(app):
    async with connect(app.url, name="alice") as alice, connect(app.url, name="bob") as bob:
        assert alice.roles == []  # open mode has no moderators
        anchor = {"quote": "must", "range": [3, 17], "nested": {"ok": True}}
        session = await alice.create_session("spec-7", "intro", title="Wording", metadata=anchor)
        sid = session.session_id
        assert session.metadata == anchor and session.last_activity_at == session.created_at
        first = await alice.send_message(sid, "ask bob", mentions=["bob", "bob", "carol"])
        assert first.mentions == ["bob", "carol"] and first.edited_at is None and first.reactions == {}
        second = await bob.send_message(sid, "sure")
        with pytest.raises(TypeError):
            await alice.send_message(sid, "one string is not a list", mentions="bob")

        # Edits: only the author's; an edit that changes nothing returns the message as it is.
        edited = await alice.edit_message(sid, 1, "ask carol", ["carol"])
        assert (edited.message_id, edited.text, edited.mentions) == (first.message_id, "ask carol", ["carol"])
        assert edited.edited_at is not None and edited.sent_at == first.sent_at
        assert await alice.edit_message(sid, 1, "ask carol") == edited  # mentions absent: kept
        with pytest.raises(Forbidden):
            await bob.edit_message(sid, 1, "mine now")
        with pytest.raises(NotFound):
            await alice.edit_message(sid, 9, "no such seq")
        with pytest.raises(BadRequest):
            await alice.edit_message(sid, 0, "seq 0")

        # Reactions, in the order given; a repeat changes nothing.
        thumbs = await bob.react(sid, 1, "👍")
        assert isinstance(thumbs, ReactionEvent)
        assert (thumbs.session_id, thumbs.seq, thumbs.reaction, thumbs.user, thumbs.on) == (sid, 1, "👍", "bob", True)
        assert thumbs.offset is None and thumbs.at >= edited.edited_at
        await alice.react(sid, 1, "👍")
        await bob.react(sid, 1, "🎉")
        assert not (await bob.react(sid, 1, "🎉", on=False)).on
        assert not (await bob.react(sid, 1, "🎉", on=False)).on
        assert (await alice.history(sid)).messages[0].reactions == {"👍": ["bob", "alice"]}

        # Read state: sending moves the sender's marker; mark_read only moves it forward.
        listing = await alice.list_sessions("spec-7")
        assert isinstance(listing, SessionListing) and listing == [await alice.get_session(sid)]
        assert (listing.read, listing.unread, listing.next_cursor) == ({sid: 1}, {sid: 1}, None)
        assert await alice.mark_read(sid, 2) == 2
        assert await alice.mark_read(sid, 0) == 2  # at or below the marker: the current one
        with pytest.raises(BadRequest):
            await alice.mark_read(sid, 3)  # past last_seq
        listing = await alice.list_sessions("spec-7", "intro")
        assert (listing.read, listing.unread) == ({sid: 2}, {sid: 0})

        # Deletes: a tombstone in place, returned again on a repeat; a deleted message is not edited or reacted to.
        tombstone = await bob.delete_message(sid, 2)
        assert (tombstone.message_id, tombstone.seq, tombstone.author) == (second.message_id, 2, "bob")
        assert tombstone.text == "" and tombstone.deleted_at is not None and tombstone.reactions == {}
        assert await bob.delete_message(sid, 2) == tombstone
        assert [m.seq for m in (await alice.history(sid)).messages] == [1, 2]
        with pytest.raises(Conflict):
            await bob.edit_message(sid, 2, "back")
        with pytest.raises(Conflict):
            await alice.react(sid, 2, "👍")
        with pytest.raises(Forbidden):
            await bob.delete_message(sid, 1)

        # Updates: UNSET leaves a field, None clears it; only the creator's.
        renamed = await alice.update_session(sid, title="Wording, v2")
        assert (renamed.title, renamed.metadata) == ("Wording, v2", anchor)
        assert renamed.last_activity_at >= tombstone.deleted_at
        assert await alice.update_session(sid) == renamed  # nothing to change
        assert await alice.update_session(sid, title=UNSET, metadata={"quote": "shall"}) == await alice.get_session(sid)
        cleared = await alice.update_session(sid, title=None, metadata=None)
        assert (cleared.title, cleared.metadata) == (None, None)
        with pytest.raises(Forbidden):
            await bob.update_session(sid, title="bob's")
        with pytest.raises(TooLarge):
            await alice.update_session(sid, metadata={"blob": "x" * 5000})
        with pytest.raises(TooLarge):
            await alice.create_session("spec-7", "intro", metadata={"blob": "x" * 5000})

        # Close and reopen: reopening an open session (not retried) is Conflict.
        closed = await bob.close_session(sid)
        with pytest.raises(Conflict):
            await alice.react(sid, 1, "👀")  # no reactions in a closed session
        assert (await alice.update_session(sid, title="while closed")).closed
        assert (await alice.delete_message(sid, 1)).deleted_at is not None  # erasure works when closed
        reopened = await bob.reopen_session(sid)
        assert not reopened.closed and reopened.last_activity_at >= closed.last_activity_at
        with pytest.raises(Conflict):
            await bob.reopen_session(sid)

        # list_sessions: filters, order by activity, pages.
        others = [await bob.create_session("spec-7", "intro", title=f"other {n}") for n in range(3)]
        await bob.close_session(others[1].session_id)
        await bob.send_message(others[0].session_id, "now the most recently active")
        created_order = [sid, *(o.session_id for o in others)]
        assert [s.session_id for s in await bob.list_sessions("spec-7")] == created_order
        assert [s.session_id for s in await bob.list_sessions("spec-7", closed=True)] == [others[1].session_id]
        assert [s.session_id for s in await bob.list_sessions("spec-7", "intro", closed=False)] == [
            sid,
            others[0].session_id,
            others[2].session_id,
        ]
        by_activity = await bob.list_sessions("spec-7", order="activity")
        activity = [s.last_activity_at for s in by_activity]
        assert activity == sorted(activity, reverse=True) and {s.session_id for s in by_activity} == set(created_order)
        latest = next(s for s in by_activity if s.session_id == others[0].session_id)
        assert latest.last_activity_at == by_activity[0].last_activity_at  # first (or tied for first, same ms)
        page = await bob.list_sessions("spec-7", limit=3)
        assert [s.session_id for s in page] == created_order[:3] and page.next_cursor is not None
        assert set(page.read) == set(page.unread) == set(created_order[:3])
        rest = await bob.list_sessions("spec-7", cursor=page.next_cursor)
        assert [s.session_id for s in rest] == created_order[3:] and rest.next_cursor is None
        with pytest.raises(BadRequest):
            await bob.list_sessions("spec-7", closed=True, cursor=page.next_cursor)  # handed out for other fields
        with pytest.raises(BadRequest):
            await bob.list_sessions("spec-7", limit=1001)


async def test_moderators_change_what_others_wrote(data_dir):
    secret = "a-secret-of-at-least-32-bytes-for-hs256"
    config = Config(port=0, data_dir=str(data_dir), auth_secret=secret, rate_limit=0, sessions_per_minute=0)
    async with running(config) as app:
        async with (
            connect(app.url, token=mint_token(secret, "mod", roles=["moderator"])) as moderator,
            connect(app.url, token=mint_token(secret, "bob")) as bob,
        ):
            assert moderator.roles == ["moderator"] and bob.roles == []
            session = await bob.create_session("d", "s", title="bob's")
            await bob.send_message(session.session_id, "spam")
            edited = await moderator.edit_message(session.session_id, 1, "[removed by a moderator]")
            assert edited.author == "bob" and edited.text == "[removed by a moderator]"
            assert (await moderator.update_session(session.session_id, title="moderated")).title == "moderated"
            assert (await moderator.delete_message(session.session_id, 1)).deleted_at is not None
            theirs = await moderator.create_session("d", "s")
            with pytest.raises(Forbidden):
                await bob.update_session(theirs.session_id, title="not bob's")


async def test_subscription_yields_conversation_events_in_order(app):
    async with (
        connect(app.url, name="alice") as alice,
        connect(app.url, name="alice") as alice_elsewhere,
        connect(app.url, name="bob") as bob,
    ):
        session = await bob.create_session("d", "s", title="t")  # offset 1
        sid = session.session_id
        await bob.send_message(sid, "hello")  # 2
        await alice.send_message(sid, "from alice")  # 3
        mentions = alice.mentions()
        events = await alice.subscribe("d", "s")
        assert events.snapshot.offset == 3 and events.read == {sid: 2} and events.snapshot.unread == {sid: 0}

        edited = await bob.edit_message(sid, 1, "hello, edited", ["alice"])  # 4
        reaction = await bob.react(sid, 2, "👍")  # 5
        await alice.react(sid, 1, "👀")  # 6: alice's own, not an event for her
        await alice.edit_message(sid, 2, "from alice, edited")  # 7: her own
        updated = await bob.update_session(sid, title="renamed", metadata={"anchor": 42})  # 8
        closed = await bob.close_session(sid)  # 9
        reopened = await bob.reopen_session(sid)  # 10
        tombstone = await bob.delete_message(sid, 1)  # 11
        latest = await bob.send_message(sid, "one more, alice?", mentions=["alice"])  # 12
        assert await alice_elsewhere.mark_read(sid, 3) == 3  # alice read it in another tab: a `read` event
        await alice.close_session(sid)  # 13: her own
        again = await bob.reopen_session(sid)  # 14

        received = [await events.next(5) for _ in range(9)]
        assert received == [
            MessageEdited(message=edited, offset=4),
            msgspec.structs.replace(reaction, offset=5, reply_to=None),
            SessionUpdated(session=updated, offset=8),
            SessionClosed(session=closed, offset=9),
            SessionReopened(session=reopened, offset=10),
            MessageDeleted(message=tombstone, offset=11),
            MessageEvent(message=latest, offset=12),
            ReadEvent(session_id=sid, seq=3),
            SessionReopened(session=again, offset=14),
        ]
        assert events.offset == 14 and events.read == {sid: 3} and events.pending() == []
        # Mentions come on the client's mention feed, subscribed or not (an edit notifies those it adds).
        first, second = await mentions.next(5), await mentions.next(5)
        assert first == Mentioned(document_id="d", section_id="s", message=edited)
        assert second == Mentioned(document_id="d", section_id="s", message=latest)
        mentions.close()
        assert [m async for m in mentions] == []

        # Recovery from an offset yields the same events, with redacted ones served as the tombstone.
        replay = await alice.subscribe("d", "s", since_offset=3, epoch=events.epoch)
        recovered = replay.pending()
        assert [e.offset for e in recovered] == [4, 5, 8, 9, 10, 11, 12, 14]  # alice's own 6, 7, 13 left out
        assert recovered[0] == MessageEdited(message=tombstone, offset=4)


async def test_conversation_events_recovered_after_kill_9(server_process, restarts, proxy_to):
    server = server_process()
    proxy = await proxy_to(server.port)
    async with (
        connect(proxy.url, name="alice", backoff=FAST) as alice,
        connect(server.url, name="bob", backoff=FAST) as bob,
    ):
        events = await alice.subscribe("d", "s")
        session = await bob.create_session("d", "s")
        sid = session.session_id
        await bob.send_message(sid, "one")
        await bob.send_message(sid, "two")
        assert [e.offset for e in await stored_events(events, 3)] == [1, 2, 3]
        # alice's own writes just before the crash (offsets 4-6) come back in recovery; they are not yielded.
        await alice.react(sid, 1, "👀")
        await alice.send_message(sid, "alice's")
        await alice.edit_message(sid, 3, "alice's, edited")

        proxy.refusing = True  # alice stays away until bob has written
        server.kill()
        restarted = restarts(server)
        proxy.target_port = restarted.port
        written = [
            await bob.edit_message(sid, 1, "one, edited"),  # 7
            await bob.react(sid, 2, "👍"),  # 8
            await bob.edit_message(sid, 2, "two, edited"),  # 9: served redacted, since...
            await bob.delete_message(sid, 2),  # 10: ...bob deletes it
            await bob.update_session(sid, title="renamed"),  # 11
            await bob.close_session(sid),  # 12
            await bob.reopen_session(sid),  # 13
            await bob.react(sid, 1, "👍"),  # 14
            await bob.react(sid, 1, "👍", on=False),  # 15
        ]
        assert bob.reconnects == 1
        proxy.refusing = False

        recovered = await stored_events(events, 9)
        assert [e.offset for e in recovered] == list(range(7, 16))
        assert [type(e) for e in recovered] == [
            MessageEdited,
            ReactionEvent,
            MessageEdited,
            MessageDeleted,
            SessionUpdated,
            SessionClosed,
            SessionReopened,
            ReactionEvent,
            ReactionEvent,
        ]
        assert recovered[0].message == written[0]
        assert recovered[2].message == written[3] and recovered[2].message.text == ""  # the tombstone in its place
        assert recovered[3].message == written[3]
        assert [recovered[n].session for n in (4, 5, 6)] == written[4:7]
        assert [(e.user, e.reaction, e.on, e.at) for e in (recovered[1], recovered[7], recovered[8])] == [
            (r.user, r.reaction, r.on, r.at) for r in (written[1], written[7], written[8])
        ]
        assert events.recovered_events == 9 and events.resubscriptions == 1 and alice.reconnects == 1
        # Live events go on right after the recovered ones.
        live = await bob.edit_message(sid, 1, "one, edited again")
        assert await next_stored(events) == MessageEdited(message=live, offset=16)
        final = (await alice.history(sid)).messages
        assert [m.text for m in final] == ["one, edited again", "", "alice's, edited"]
        assert final[0].reactions == {"👀": ["alice"]}


async def test_conversation_writes_whose_replies_are_lost_take_effect_once(server_process, proxy_to):
    """Each write is stored, its reply is held in the proxy, the connection is cut: the retry finds it stored."""
    server = server_process()
    proxy = await proxy_to(server.port)
    retries: list[RetryInfo] = []
    async with (
        connect(proxy.url, name="alice", backoff=FAST, on_retry=retries.append) as alice,
        connect(server.url, name="bob") as bob,
        connect(server.url, name="carol") as carol,
    ):
        events = await alice.subscribe("d", "s")
        watching = await bob.subscribe("d", "s")
        session = await alice.create_session("d", "s")  # 1
        sid = session.session_id
        shut = await alice.create_session("d", "s")  # 2
        await alice.close_session(shut.session_id)  # 3
        await bob.send_message(sid, "bob's")  # 4
        await alice.send_message(sid, "alice's")  # 5
        await alice.send_message(sid, "doomed")  # 6
        await bob.send_message(sid, "unread by alice")  # 7
        assert [e.offset for e in await stored_events(watching, 5)] == [1, 2, 3, 5, 6]
        assert [e.offset for e in await stored_events(events, 2)] == [4, 7]

        proxy.hold()
        writes = [
            asyncio.create_task(alice.mark_read(sid, 4)),  # first: the server handles alice's requests in order
            asyncio.create_task(alice.edit_message(sid, 2, "alice's, edited")),  # 8
            asyncio.create_task(alice.react(sid, 1, "👍")),  # 9
            asyncio.create_task(alice.update_session(sid, title="t2", metadata={"anchor": 1})),  # 10
            asyncio.create_task(alice.reopen_session(shut.session_id)),  # 11
            asyncio.create_task(alice.delete_message(sid, 3)),  # 12
        ]
        stored = await stored_events(watching, 5)  # bob sees each stored; alice's replies are held
        assert [e.offset for e in stored] == [8, 9, 10, 11, 12] and not any(w.done() for w in writes)
        proxy.cut()

        marker, edited, reaction, updated, reopened, tombstone = await asyncio.wait_for(asyncio.gather(*writes), 10)
        assert sorted(r.request for r in retries) == sorted(
            ["mark_read", "edit_message", "react", "update_session", "reopen_session", "delete_message"]
        )
        assert all(isinstance(r.reason, ConnectionLost) for r in retries)
        assert marker == 4
        assert edited == stored[0].message  # the retry found the edit made: same edited_at
        assert (reaction.user, reaction.reaction, reaction.on) == ("alice", "👍", True)
        assert (updated.title, updated.metadata) == ("t2", {"anchor": 1})
        assert not reopened.closed and reopened.session_id == shut.session_id  # retried reopen: not a Conflict
        assert tombstone == stored[4].message

        # Nothing was stored twice: the section's whole stream, as a newcomer recovers it.
        everything = await carol.subscribe("d", "s", since_offset=0)
        assert [type(e).__name__ for e in everything.pending()] == [
            "SessionCreated",
            "SessionCreated",
            "SessionClosed",
            *["MessageEvent"] * 4,
            "MessageEdited",
            "ReactionEvent",
            "SessionUpdated",
            "SessionReopened",
            "MessageDeleted",
        ]
        assert (await carol.history(sid)).messages[0].reactions == {"👍": ["alice"]}
        listing = await alice.list_sessions("d", "s")
        assert listing.read[sid] == 4 and listing.unread[sid] == 0
        # Recovery brought alice's own writes back (offsets 8-12): none is yielded; bob's next message is.
        reply = await bob.send_message(sid, "after")
        assert await next_stored(events) == MessageEvent(message=reply, offset=13)
        assert events.resubscriptions == 1 and alice.reconnects == 1 and events.pending() == []


async def test_conversation_writes_in_flight_at_a_crash_or_made_while_down(server_process, restarts):
    server = server_process()
    async with (
        connect(server.url, name="alice", backoff=FAST) as alice,
        connect(server.url, name="bob", backoff=FAST) as bob,
    ):
        session = await alice.create_session("d", "s")
        sid = session.session_id
        shut = await alice.create_session("d", "s")
        await alice.close_session(shut.session_id)
        await bob.send_message(sid, "bob's")  # seq 1
        await alice.send_message(sid, "alice's")  # 2
        await alice.send_message(sid, "doomed")  # 3
        await bob.send_message(sid, "unread")  # 4
        stream = await bob.subscribe("d", "s")
        before = stream.offset

        os.kill(server.process.pid, signal.SIGSTOP)  # requests reach the socket, nothing answers
        in_flight = [
            asyncio.create_task(alice.edit_message(sid, 2, "alice's, edited", ["bob"])),
            asyncio.create_task(alice.react(sid, 1, "🎉")),
            asyncio.create_task(alice.mark_read(sid, 4)),
        ]
        await until(lambda: alice.in_flight == 3)
        server.kill()
        await until(lambda: not alice.connected)
        while_down = [
            asyncio.create_task(alice.update_session(sid, metadata={"anchor": "p3"})),
            asyncio.create_task(alice.reopen_session(shut.session_id)),
            asyncio.create_task(alice.delete_message(sid, 3)),
        ]
        restarts(server)
        edited, reaction, marker, updated, reopened, tombstone = await asyncio.wait_for(
            asyncio.gather(*in_flight, *while_down), 15
        )
        assert edited.text == "alice's, edited" and edited.mentions == ["bob"]
        assert reaction.on and marker == 4 and updated.metadata == {"anchor": "p3"}
        assert not reopened.closed and tombstone.text == ""
        # Each took effect once: bob's subscription yields exactly these five stored events, then bob's next.
        got = await stored_events(stream, 5)
        assert sorted(type(e).__name__ for e in got) == sorted(
            ["MessageEdited", "ReactionEvent", "SessionUpdated", "SessionReopened", "MessageDeleted"]
        )
        assert [e.offset for e in got] == list(range(before + 1, before + 6))
        after = await alice.send_message(sid, "after")
        assert await next_stored(stream) == MessageEvent(message=after, offset=before + 6)
        listing = await alice.list_sessions("d", "s")
        assert listing.read[sid] == 5 and (await bob.get_session(shut.session_id)).closed is False


# Watching documents ----------------------------------------------------------------


async def test_watch_document_delivers_live_summaries(app):
    async with connect(app.url, name="alice") as alice, connect(app.url, name="bob") as bob:
        intro = await bob.create_session("doc", "intro")
        await bob.send_message(intro.session_id, "hi alice", mentions=["alice"])
        async with alice.watch_document("doc") as watch:
            assert isinstance(watch, DocumentWatch) and isinstance(watch.summary, DocumentSummary)
            [summary] = watch.summary.sections
            assert (summary.section_id, summary.sessions, summary.open_sessions, summary.messages) == (
                "intro",
                1,
                1,
                1,
            )
            assert (summary.unread, summary.mentions) == (1, 1) and watch.sections == {"intro": summary}

            outro = await bob.create_session("doc", "outro")
            event = await watch.next(5)
            assert event == SectionSummaryEvent(
                document_id="doc",
                summary=SectionSummary(
                    section_id="outro",
                    sessions=1,
                    open_sessions=1,
                    messages=0,
                    last_activity_at=outro.created_at,
                    unread=0,
                    mentions=0,
                ),
            )
            await bob.send_message(intro.session_id, "and again, alice", mentions=["alice"])
            event = await watch.next(5)
            assert event.summary.section_id == "intro" and (event.summary.unread, event.summary.mentions) == (2, 2)
            # Reading changes only the reader's summary; the watcher hears of it too.
            await alice.mark_read(intro.session_id, 2)
            event = await watch.next(5)
            assert (event.summary.section_id, event.summary.unread, event.summary.mentions) == ("intro", 0, 0)
            await bob.close_session(outro.session_id)
            event = await watch.next(5)
            assert (event.summary.section_id, event.summary.open_sessions) == ("outro", 0)
            assert set(watch.sections) == {"intro", "outro"} and watch.sections["outro"] == event.summary

            # A second watch of the same document starts at its own summary; both get what follows.
            second = await alice.watch_document("doc")
            assert {s.section_id for s in second.summary.sections} == {"intro", "outro"}
            await bob.reopen_session(outro.session_id)
            assert (await watch.next(5)).summary.open_sessions == 1
            assert (await second.next(5)).summary.open_sessions == 1
            await second.unwatch()
            assert [e async for e in second] == []
        # Leaving the block unwatched it.
        assert watch.closed and [e async for e in watch] == []
        again = await alice.watch_document("doc")
        await alice.unwatch_document("doc")
        assert again.closed and [e async for e in again] == []


async def test_watch_document_catches_up_after_reconnect(server_process, proxy_to):
    server = server_process()
    proxy = await proxy_to(server.port)
    async with connect(proxy.url, name="alice", backoff=FAST) as alice, connect(server.url, name="bob") as bob:
        intro = await bob.create_session("doc", "intro")
        watch = await alice.watch_document("doc")
        mentions = alice.mentions()
        assert [(s.section_id, s.unread) for s in watch.summary.sections] == [("intro", 0)]

        proxy.refusing = True
        proxy.cut()
        await until(lambda: not alice.connected)
        missed = await bob.send_message(intro.session_id, "while you were away", mentions=["alice"])
        outro = await bob.create_session("doc", "outro")
        proxy.refusing = False

        caught_up = sorted([await watch.next(10), await watch.next(10)], key=lambda e: e.summary.section_id)
        assert [e.summary.section_id for e in caught_up] == ["intro", "outro"]
        assert (caught_up[0].summary.messages, caught_up[0].summary.unread, caught_up[0].summary.mentions) == (1, 1, 1)
        assert caught_up[0].summary.last_activity_at == missed.sent_at
        assert caught_up[1].summary.last_activity_at == outro.created_at
        assert watch.rewatches == 1 and alice.reconnects == 1
        assert {s.section_id for s in watch.summary.sections} == {"intro", "outro"}
        assert mentions.pending() == []  # mentions are not stored: the one made while away is in the counts only
        # Live summaries go on after the reconnect.
        await bob.send_message(outro.session_id, "live")
        event = await watch.next(5)
        assert (event.summary.section_id, event.summary.messages, event.summary.unread) == ("outro", 1, 1)


async def test_move_sessions_and_session_moved_in_both_subscriptions(app):
    """The Python client moves sessions and hands each stream's `session_moved` to that section's subscription."""
    async with (
        connect(app.url, name="alice") as alice,
        connect(app.url, name="bob") as bob,
        bob.subscribe("doc", "intro") as old,
        bob.subscribe("doc", "overview") as new,
    ):
        session = await alice.create_session("doc", "intro")
        await alice.send_message(session.session_id, "before")
        assert isinstance(await old.next(5), SessionCreated) and isinstance(await old.next(5), MessageEvent)
        [moved] = await alice.move_sessions("doc", "intro", "overview")
        assert moved.section_id == "overview" and moved.last_seq == 1
        out, into = await old.next(5), await new.next(5)
        assert isinstance(out, SessionMoved) and isinstance(into, SessionMoved)
        assert (out.offset, into.offset) == (3, 1) and out.session == into.session == moved
        after = await alice.send_message(session.session_id, "after")
        assert await new.next(5) == MessageEvent(message=after, offset=2)  # the target's stream now
        assert [m.text for m in (await bob.history(session.session_id)).messages] == ["before", "after"]
        assert await alice.move_sessions("doc", "intro", "overview", [session.session_id]) == [
            await bob.get_session(session.session_id)
        ]  # a retry answers the same
        with pytest.raises(BadRequest):
            await alice.move_sessions("doc", "overview", "overview")
