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

    def __init__(self, user: str):
        self.user = user
        self.connection_id = user
        self.frames: list[dict] = []

    def send(self, data: bytes) -> None:
        self.frames.append(msgspec.json.decode(data))

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
