"""What keeps the file storage's costs from growing with the data: the session table and kept section states.

A start reads only the part of the session index that was not yet folded into
`sessions.tbl`, and a section loads from the state the chat logic last had the
storage keep, plus the records after it. Both are derived data: each test
checks the answers are the same as without them, and that a damaged or stale
one is noticed and passed over.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from test_chat import CollectingPeer

from protocol.messages import CreateSession, History, SendMessage, Subscribe
from server.chat import Chat
from server.core import SNAPSHOT_VERSION
from server.storage.base import SectionKey, SectionState, SessionCreatedRecord
from server.storage.file import FileStorage
from server.storage.sessiontable import TABLE_NAME
from server.transfer import export_document, import_lines

pytestmark = pytest.mark.timeout(60)

DOCS = ["doc", 'doc/2 \t"x"', "ünï"]


@asynccontextmanager
async def opened(root: Path, fold_after: int | None = None) -> AsyncIterator[FileStorage]:
    storage = FileStorage(root)
    if fold_after is not None:
        storage.fold_after = fold_after
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


async def _create_sessions(storage: FileStorage, count: int) -> dict[str, SectionKey]:
    chat, peer = Chat(storage, sessions_per_minute=0), CollectingPeer("alice")
    created = {}
    for n in range(count):
        key = SectionKey(DOCS[n % 3], f"section {n % 7}")
        await chat.handle(peer, CreateSession(id=n, document_id=key.document_id, section_id=key.section_id))
        created[peer.frames[-1]["session"]["session_id"]] = key
    return created


def _first_use(created: dict[str, SectionKey], document_id: str) -> list[SectionKey]:
    return list(dict.fromkeys(key for key in created.values() if key.document_id == document_id))


async def test_sessions_are_found_in_the_table_after_a_restart(tmp_path):
    """Folded sessions are found on disk; a start holds only the index's tail in memory."""
    async with opened(tmp_path, fold_after=10) as storage:
        created = await _create_sessions(storage, 95)
    assert (tmp_path / TABLE_NAME).exists()

    async with opened(tmp_path) as again:
        assert again.table.header.sessions >= 90 and len(again._tail) < 10  # the rest is on disk, not in memory
        for session_id, key in created.items():
            assert await again.find_section(session_id) == key
        assert await again.find_section("no-such-session") is None
        for document_id in DOCS:
            assert await again.document_sections(document_id) == _first_use(created, document_id)
        assert await again.document_sections("no-such-document") == []


@pytest.mark.parametrize("damage", ["garbled header", "torn", "covers more than the index"])
async def test_an_unusable_table_is_passed_over(tmp_path, damage):
    """A damaged table, or one that claims more of the index than there is, is not used: the whole index is read."""
    async with opened(tmp_path, fold_after=10) as storage:
        created = await _create_sessions(storage, 40)
    table = tmp_path / TABLE_NAME
    data = table.read_bytes()
    if damage == "garbled header":
        table.write_bytes(data[:20] + b"X" + data[21:])
    elif damage == "torn":
        table.write_bytes(data[:-7])
    else:
        index = tmp_path / "sessions.idx"
        index.write_bytes(index.read_bytes()[:100])

    async with opened(tmp_path) as again:
        if damage == "covers more than the index":
            assert again.table.header.sessions == 0
        else:
            assert again.table.header.sessions == 0 and len(again._tail) == len(created)
            for session_id, key in created.items():
                assert await again.find_section(session_id) == key
            for document_id in DOCS:
                assert await again.document_sections(document_id) == _first_use(created, document_id)


async def _conversation(storage: FileStorage) -> str:
    """33 records in doc/s: sessions (with idempotency keys), then messages with client_msg_ids; returns the last session's id."""
    chat, peer = Chat(storage, sessions_per_minute=0), CollectingPeer("alice")
    chat.sections.keep_state_after = 5
    for n in range(3):
        await chat.handle(peer, CreateSession(id=n, document_id="doc", section_id="s", idempotency_key=f"k{n}"))
    session_id = peer.frames[-1]["session"]["session_id"]
    for n in range(30):
        await chat.handle(peer, SendMessage(id=100 + n, session_id=session_id, text=f"text {n}", client_msg_id=f"c{n}"))
    await chat.close()
    return session_id


async def _answers(root, session_id: str) -> list:
    """What a fresh server answers about the section: history pages, retries, recovery, a new write."""
    async with opened(root) as storage:
        chat, peer = Chat(storage, sessions_per_minute=0, recovery_window=10), CollectingPeer("alice")
        await chat.handle(peer, History(id=1, session_id=session_id, limit=7))
        await chat.handle(peer, History(id=2, session_id=session_id, before_seq=12, limit=5))
        await chat.handle(peer, SendMessage(id=3, session_id=session_id, text="again", client_msg_id="c4"))
        await chat.handle(peer, CreateSession(id=4, document_id="doc", section_id="s", idempotency_key="k1"))
        await chat.handle(peer, Subscribe(id=5, document_id="doc", section_id="s", since_offset=27))
        await chat.handle(peer, SendMessage(id=7, session_id=session_id, text="new", client_msg_id="c-new"))
        kept = (await storage.load_section(SectionKey("doc", "s"))).state
        return [peer.frames, kept is not None]


async def test_a_section_loads_from_its_kept_state_as_if_every_record_were_replayed(tmp_path):
    """History, client_msg_id retries, idempotency keys and recovery by offset answer the same with and without the kept state."""
    async with opened(tmp_path / "kept") as storage:
        session_id = await _conversation(storage)
    states = list((tmp_path / "kept").rglob("*.state"))
    assert len(states) == 1
    shutil.copytree(tmp_path / "kept", tmp_path / "replayed")
    for state in (tmp_path / "replayed").rglob("*.state"):
        state.unlink()

    with_state, used = await _answers(tmp_path / "kept", session_id)
    without, _ = await _answers(tmp_path / "replayed", session_id)
    assert used
    # Everything but the new message's own id and time is the same.
    for frame in (with_state[-1], without[-1]):
        frame["message"].pop("message_id"), frame["message"].pop("sent_at")
    assert with_state == without
    assert [f["type"] for f in with_state[:5]] == ["history", "history", "message_ack", "session_created", "subscribed"]
    subscribed = with_state[4]
    assert subscribed["recovered"] and [e["offset"] for e in subscribed["events"]] == list(
        range(28, 34)
    )  # from the window


@pytest.mark.parametrize("damage", ["garbled", "torn", "another section's", "ahead of the file"])
async def test_a_kept_state_that_does_not_fit_is_passed_over(tmp_path, damage):
    """A kept state that is damaged, belongs elsewhere, or covers records the file does not have is not used."""
    async with opened(tmp_path) as storage:
        await _conversation(storage)
        chat, peer = Chat(storage, sessions_per_minute=0), CollectingPeer("bob")
        chat.sections.keep_state_after = 1
        await chat.handle(peer, CreateSession(id=1, document_id="doc", section_id="other"))
        other = peer.frames[-1]["session"]["session_id"]
        for n in range(3):
            await chat.handle(peer, SendMessage(id=2 + n, session_id=other, text="x"))
        await chat.close()
    small, state = sorted(tmp_path.rglob("*.state"), key=lambda p: p.stat().st_size)  # the conversation's is the bigger
    data = state.read_bytes()
    if damage == "garbled":
        state.write_bytes(data[:-30] + bytes([data[-30] ^ 1]) + data[-29:])
    elif damage == "torn":
        state.write_bytes(data[:-1])
    elif damage == "another section's":
        shutil.copy(small, state)
    else:
        log = state.with_suffix(".log")
        lines = log.read_bytes().splitlines(keepends=True)
        # As if the last records were never there (it cannot happen: this tests the check).
        log.write_bytes(b"".join(lines[:-3]))

    async with opened(tmp_path) as again:
        log = await again.load_section(SectionKey("doc", "s"))
        assert log.state is None
        records = log.records
        assert [r.offset for r in records] == list(range(1, len(records) + 1))
        assert sum(isinstance(r, SessionCreatedRecord) for r in records) == 3


async def test_damaged_positions_in_a_kept_state_are_found_and_passed_over(tmp_path):
    """Positions are not read at a load (that would cost a read of them all): a page read checks what it finds."""
    async with opened(tmp_path) as storage:
        session_id = await _conversation(storage)
    [state] = tmp_path.rglob("*.state")
    data = bytearray(state.read_bytes())
    data[8 * 4 : 8 * 6] = bytes(16)  # where records 5 and 6 start: garbage
    state.write_bytes(bytes(data))

    async with opened(tmp_path) as again:
        chat, peer = Chat(again, sessions_per_minute=0, recovery_window=5), CollectingPeer("alice")
        await chat.handle(peer, History(id=1, session_id=session_id, limit=30))
        page = peer.frames[-1]
        assert page["type"] == "history" and [m["seq"] for m in page["messages"]] == list(range(1, 31))
        assert not state.exists()  # and the next load replays the section


async def test_an_import_leaves_kept_states_and_imports_again_without_reusing_offsets(tmp_path):
    """After `import` a section loads from a kept state; importing into a section that has one skips what is there."""
    async with opened(tmp_path / "source") as source:
        session_id = await _conversation(source)
        out = io.BytesIO()
        await export_document(source, "doc", out, progress=False)
    exported = out.getvalue().splitlines()

    async with opened(tmp_path / "target") as target:
        assert await import_lines(target, exported, progress=False) == (33, 0)
        log = await target.load_section(SectionKey("doc", "s"))
        assert log.state is not None and log.state.offset == 33 and log.records == []
        await target.release(SectionKey("doc", "s"))
        # Again, plus a session the target does not have: only that one is new, at the next offsets.
        [created] = [line for line in exported if b'"session_created"' in line and session_id.encode() in line]
        extra = created.replace(session_id.encode(), b"another-session")
        assert await import_lines(target, [*exported, extra], progress=False) == (1, 33)
        everything = await target.read_after(SectionKey("doc", "s"), 0)
        assert [r.offset for r in everything.records] == list(range(1, 35))
        assert (await target.load_section(SectionKey("doc", "s"))).state.offset == 34


async def test_a_busy_section_has_its_state_kept_without_leaving_memory(tmp_path):
    """A section in use all the time still gets a kept state now and then, so a load after a crash replays little."""
    async with opened(tmp_path) as storage:  # no chat.close() before it closes: as if the server were killed
        chat, peer = Chat(storage, sessions_per_minute=0), CollectingPeer("alice")
        chat.sections.keep_state_every = 10
        await chat.handle(peer, CreateSession(id=1, document_id="doc", section_id="s"))
        session_id = peer.frames[-1]["session"]["session_id"]
        for n in range(25):
            await chat.handle(peer, SendMessage(id=2 + n, session_id=session_id, text=f"text {n}"))
        await chat.drain()
        assert chat.sections.get(SectionKey("doc", "s")).kept_offset >= 20
    async with opened(tmp_path) as again:
        log = await again.load_section(SectionKey("doc", "s"))
        assert log.state is not None and log.state.offset >= 20 and len(log.records) == 26 - log.state.offset


async def test_a_state_kept_by_an_earlier_version_is_passed_over_and_the_section_replayed(tmp_path):
    """A 1.0 state lacks the unread tallies: the load replays the records instead, and keeps a new state."""
    key = SectionKey("doc", "s")
    async with opened(tmp_path) as storage:
        chat, alice = Chat(storage, sessions_per_minute=0), CollectingPeer("alice")
        await chat.handle(alice, CreateSession(id=1, document_id="doc", section_id="s"))
        session_id = alice.frames[-1]["session"]["session_id"]
        for n in range(3):
            await chat.handle(alice, SendMessage(id=2 + n, session_id=session_id, text=f"text {n}"))
        await chat.drain()
        # What a 1.0 server kept: the same snapshot without the tallies, version 1.
        old = msgspec.msgpack.encode([[], [], [], 1])
        await storage.keep_state(key, SectionState(4, old))
    async with opened(tmp_path) as storage:
        chat, bob = Chat(storage, sessions_per_minute=0), CollectingPeer("bob")
        chat.sections.keep_state_after = 1
        await chat.handle(bob, Subscribe(id=1, document_id="doc", section_id="s"))
        reply = bob.frames[-1]
        assert reply["unread"] == {session_id: 3} and [s["last_seq"] for s in reply["sessions"]] == [3]
        kept = (await storage.load_section(key)).state
        assert (
            kept is not None and msgspec.msgpack.decode(kept.data)[3] == SNAPSHOT_VERSION
        )  # sessions, keys, reads, version, ...
