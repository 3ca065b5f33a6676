"""The chat logic without sockets: peers that collect frames, real file storage."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from protocol import JSON
from protocol.messages import CreateSession, History, SendMessage, Subscribe
from server.chat import Chat
from server.storage.file import FileStorage


class CollectingPeer:
    """A Peer whose frames are kept, decoded, in a list."""

    codec = JSON
    documents = None
    moderator = False

    def __init__(self, user: str):
        self.user = user
        self.connection_id = user
        self.frames: list[dict] = []
        self.closed: int | None = None

    def send(self, data: bytes) -> None:
        self.frames.append(msgspec.json.decode(data))

    def close(self, code: int, reason: str) -> None:
        self.closed = code

    def stored(self, records: int) -> None:
        pass

    def last(self) -> dict:
        return self.frames[-1]


@pytest.fixture
async def storage(tmp_path):
    storage = FileStorage(tmp_path / "data")
    await storage.open()
    yield storage
    await storage.close()


async def test_idle_sections_leave_memory_and_come_back(storage):
    """Evicted sections are loaded back on demand with everything in them."""
    chat = Chat(storage, section_idle_s=0)
    alice = CollectingPeer("alice")
    for n in range(5):
        await chat.handle(alice, CreateSession(document_id="d", section_id=f"s{n}"))
    sid = alice.last()["session"]["session_id"]
    await chat.handle(alice, SendMessage(session_id=sid, text="remember me"))
    assert chat.cached_sections == 5
    assert await chat.evict_idle() == 5
    assert chat.cached_sections == 0
    await chat.handle(alice, History(session_id=sid))
    assert [m["text"] for m in alice.last()["messages"]] == ["remember me"]
    assert chat.cached_sections == 1


async def test_subscribed_sections_stay_in_memory(storage):
    """A section with subscribers is never evicted."""
    chat = Chat(storage, section_idle_s=0)
    peer = CollectingPeer("alice")
    await chat.handle(peer, Subscribe(document_id="d", section_id="s"))
    assert await chat.evict_idle() == 0
    chat.disconnect(peer)
    assert await chat.evict_idle() == 1


async def test_cap_on_cached_sections(storage):
    """Over the cap, the least recently used idle sections leave first."""
    chat = Chat(storage, section_idle_s=3600, max_cached_sections=2)
    peer = CollectingPeer("alice")
    for n in range(4):
        await chat.handle(peer, CreateSession(document_id="d", section_id=f"s{n}"))
    assert await chat.evict_idle() == 2
    assert chat.cached_sections == 2


async def test_cancelled_request_still_completes_its_write(storage):
    """A handler cancelled mid-write (its client vanished) leaves memory and disk in agreement."""
    chat = Chat(storage)
    alice = CollectingPeer("alice")
    await chat.handle(alice, CreateSession(document_id="d", section_id="s"))
    sid = alice.last()["session"]["session_id"]
    tasks = [asyncio.create_task(chat.handle(alice, SendMessage(session_id=sid, text=str(n)))) for n in range(10)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await chat.drain()
    await chat.handle(alice, History(session_id=sid))
    in_memory = alice.last()["messages"]
    assert [m["seq"] for m in in_memory] == list(range(1, 11))
    reloaded = Chat(storage)
    bob = CollectingPeer("bob")
    await reloaded.handle(bob, History(session_id=sid))
    assert bob.last()["messages"] == in_memory


async def test_history_and_retries_beyond_the_recovery_window_read_from_storage(storage):
    """Only the recovery window of messages is in memory: older pages and originals of retries come from storage."""
    chat = Chat(storage, recovery_window=3, section_idle_s=0)
    alice = CollectingPeer("alice")
    await chat.handle(alice, CreateSession(document_id="d", section_id="s"))
    sid = alice.last()["session"]["session_id"]
    acked = []
    for n in range(10):
        await chat.handle(alice, SendMessage(id=n, session_id=sid, text=f"m{n}", client_msg_id=f"c{n}"))
        acked.append(alice.last()["message"])
    for evict in (False, True):
        if evict:
            assert await chat.evict_idle() == 1  # and loaded back
        await chat.handle(alice, History(session_id=sid, limit=4))
        assert alice.last()["messages"] == acked[6:] and alice.last()["has_more"] is True
        await chat.handle(alice, History(session_id=sid, before_seq=7, limit=4))
        assert alice.last()["messages"] == acked[2:6]
        await chat.handle(alice, History(session_id=sid, after_seq=0, limit=200))
        assert alice.last()["messages"] == acked and alice.last()["has_more"] is False
        await chat.handle(alice, SendMessage(id="again", session_id=sid, text="m0", client_msg_id="c0"))
        assert alice.last() == {"type": "message_ack", "reply_to": "again", "message": acked[0]}
    await chat.handle(alice, History(session_id=sid, limit=200))
    assert len(alice.last()["messages"]) == 10  # the retries stored nothing


class BrokenPeer(CollectingPeer):
    """A peer whose sends raise once it is broken, as a bug in a transport would make them."""

    broken = False

    def send(self, data: bytes) -> None:
        if self.broken:
            raise RuntimeError("this connection's transport is broken")
        super().send(data)


@pytest.mark.timeout(30)
async def test_one_peer_whose_send_raises_never_stops_a_fan_out(storage):
    """Every other subscriber still gets the event; the broken one is closed with 1011."""
    chat = Chat(storage)
    writer, broken = CollectingPeer("writer"), BrokenPeer("broken")
    watchers = [CollectingPeer(f"watcher-{n}") for n in range(3)]
    for peer in [watchers[0], broken, *watchers[1:]]:
        await chat.handle(peer, Subscribe(document_id="d", section_id="s"))
    broken.broken = True
    await chat.handle(writer, CreateSession(document_id="d", section_id="s"))
    assert writer.last()["type"] == "session_created"
    for watcher in watchers:
        assert watcher.last()["type"] == "session_created"
    assert broken.closed == 1011 and writer.closed is None


class CodecThatFails:
    """A codec that cannot carry any frame (as msgpack cannot carry some values JSON can)."""

    binary = True

    def encode(self, frame) -> bytes:
        raise OverflowError("cannot encode this frame")


@pytest.mark.timeout(30)
async def test_a_frame_one_codec_cannot_carry_closes_only_its_connections(storage):
    chat = Chat(storage)
    writer, odd, watcher = CollectingPeer("writer"), CollectingPeer("odd"), CollectingPeer("watcher")
    for peer in (odd, watcher):
        await chat.handle(peer, Subscribe(document_id="d", section_id="s"))
    odd.codec = CodecThatFails()
    await chat.handle(writer, CreateSession(document_id="d", section_id="s"))
    assert writer.last()["type"] == "session_created" and watcher.last()["type"] == "session_created"
    assert odd.closed == 1011
    await chat.handle(writer, SendMessage(session_id=writer.last()["session"]["session_id"], text="on we go"))
    assert writer.last()["type"] == "message_ack" and watcher.last()["type"] == "message"
