"""One storage suite, run on both backends: files and Redis."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import get_args

import msgspec
import pytest
from conftest import redis_values, until

from protocol.messages import Message, Session
from server.storage.base import (
    MessageDeletedRecord,
    MessageEditedRecord,
    MessageRecord,
    Part,
    ReactionRecord,
    ReadRecord,
    SectionKey,
    SessionClosedRecord,
    SessionCreatedRecord,
    SessionMovedRecord,
    SessionReopenedRecord,
    SessionUpdatedRecord,
    StaleSection,
    StorageError,
    StoredRecord,
    erased,
)
from server.storage.file import FileStorage
from server.storage.redis import RedisStorage

KEY = SectionKey("doc", "intro")


@pytest.fixture(params=["file", "redis"])
async def storage(request, tmp_path):
    if request.param == "file":
        backend = FileStorage(tmp_path / "data")
    else:
        backend = RedisStorage(request.getfixturevalue("redis_server").url)
    await backend.open()
    yield backend
    await backend.close()


def session(session_id: str, key: SectionKey = KEY) -> Session:
    return Session(session_id, key.document_id, key.section_id, None, "alice", "2026-11-25T08:00:00.000Z", False, 0)


def message(session_id: str, seq: int) -> Message:
    return Message(session_id, seq, f"m-{session_id}-{seq}", "alice", f"text {seq}", None, "2026-11-25T08:00:00.000Z")


async def test_a_new_section_is_empty(storage):
    """A section nothing was stored in has no epoch and no records."""
    log = await storage.load_section(KEY)
    assert log.epoch is None and log.records == []


async def test_append_then_load(storage):
    """Records come back in order, with the epoch of the first append."""
    await storage.load_section(KEY)
    records = [
        SessionCreatedRecord(offset=1, session=session("s1"), idempotency_key="k"),
        MessageRecord(offset=2, message=message("s1", 1)),
    ]
    await storage.append(KEY, "epoch-1", records[:1])
    await storage.append(KEY, "epoch-ignored", records[1:])
    closed = SessionClosedRecord(offset=3, session=session("s1"))
    await storage.append(KEY, "epoch-ignored", [closed])
    log = await storage.load_section(KEY)
    assert log.epoch == "epoch-1"
    assert log.records == [*records, closed]
    assert (await storage.read_after(KEY, 1)).records == [records[1], closed]
    assert (await storage.read_after(KEY, 3)).records == []


async def test_records_are_read_by_offset(storage):
    """A page of records is read by offset from a loaded section, including ones appended since it was loaded."""
    await storage.load_section(KEY)
    records = [SessionCreatedRecord(offset=1, session=session("s1"))] + [
        MessageRecord(offset=n + 1, message=message("s1", n)) for n in range(1, 6)
    ]
    await storage.append(KEY, "e", records[:3])
    await storage.load_section(KEY)
    await storage.append(KEY, "e", records[3:])
    assert await storage.read_records(KEY, [6, 2, 4]) == [records[5], records[1], records[3]]


async def test_sessions_are_found_and_listed(storage):
    """find_section locates a session; document_sections lists sections in first-use order."""
    other = SectionKey("doc", "later")
    for key, sid in ((KEY, "s1"), (other, "s2"), (KEY, "s3")):
        log = await storage.load_section(key)
        await storage.append(key, "e", [SessionCreatedRecord(offset=len(log.records) + 1, session=session(sid, key))])
    assert await storage.find_section("s2") == other
    assert await storage.find_section("s3") == KEY
    assert await storage.find_section("nope") is None
    assert await storage.document_sections("doc") == [KEY, other]
    assert await storage.document_sections("other-doc") == []


async def test_ids_are_data(storage):
    """Hostile ids round-trip and never collide."""
    keys = [
        SectionKey("../../etc/passwd", "/"),
        SectionKey("..", ".."),
        SectionKey("a\x85b", "文档 ✓"),
        SectionKey("x" * 128, "y"),
    ]
    for n, key in enumerate(keys):
        await storage.load_section(key)
        await storage.append(key, "e", [SessionCreatedRecord(offset=1, session=session(f"s{n}", key))])
    for n, key in enumerate(keys):
        assert [r.session.session_id for r in (await storage.load_section(key)).records] == [f"s{n}"]


async def test_concurrent_appends_to_different_sections(storage):
    """Appends to many sections at once all land."""
    keys = [SectionKey("doc", f"s{n}") for n in range(20)]
    for key in keys:
        await storage.load_section(key)
    await asyncio.gather(
        *(
            storage.append(key, "e", [SessionCreatedRecord(offset=1, session=session(key.section_id, key))])
            for key in keys
        )
    )
    for key in keys:
        assert len((await storage.load_section(key)).records) == 1


async def test_survives_reopening(storage, tmp_path, request):
    """What was appended is there after the backend is closed and opened again."""
    await storage.load_section(KEY)
    await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1"))])
    await storage.close()
    again = FileStorage(tmp_path / "data") if isinstance(storage, FileStorage) else RedisStorage(storage.url)
    await again.open()
    try:
        assert [r.offset for r in (await again.load_section(KEY)).records] == [1]
        assert await again.find_section("s1") == KEY
    finally:
        await again.close()
    await storage.open()


async def test_stale_append_is_refused(redis_server):
    """Two nodes appending after the same offset: one wins, the other gets StaleSection."""
    first, second = RedisStorage(redis_server.url), RedisStorage(redis_server.url)
    await first.open()
    await second.open()
    try:
        await first.append(KEY, "e1", [SessionCreatedRecord(offset=1, session=session("s1"))])
        with pytest.raises(StaleSection):
            await second.append(KEY, "e2", [SessionCreatedRecord(offset=1, session=session("s2"))])
        # A retry of an append that did land (its reply was lost) succeeds quietly.
        await first.append(KEY, "e1", [SessionCreatedRecord(offset=1, session=session("s1"))])
        log = await second.load_section(KEY)
        assert log.epoch == "e1" and [r.session.session_id for r in log.records] == ["s1"]
    finally:
        await first.close()
        await second.close()


async def test_redis_down_is_a_storage_error(redis_server):
    """With Redis gone, every call raises StorageError, and works again when it is back."""
    storage = RedisStorage(redis_server.url)
    await storage.open()
    try:
        redis_server.stop()
        with pytest.raises(StorageError):
            await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1"))])
        with pytest.raises(StorageError):
            await storage.load_section(KEY)
        redis_server.start()
        await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1"))])
        assert len((await storage.load_section(KEY)).records) == 1
    finally:
        await storage.close()


async def test_unreachable_redis_at_open(redis_server):
    """open() names the problem when Redis cannot be reached."""
    redis_server.stop()
    storage = RedisStorage(redis_server.url)
    with pytest.raises(StorageError, match="cannot reach Redis"):
        await storage.open()
    await storage.close()


async def test_a_format_1_data_dir_is_migrated_on_open(tmp_path):
    """A data dir of the single-journal layout: what its journal holds beyond the files is put back, then the new layout takes over."""
    import msgspec

    from server.storage.file import SectionHeader, _name

    data = tmp_path / "data"
    path = data / "sections" / _name(KEY.document_id) / f"{_name(KEY.section_id)}.log"
    path.parent.mkdir(parents=True)
    records = [
        SessionCreatedRecord(offset=1, session=session("s1")),
        MessageRecord(offset=2, message=message("s1", 1)),
        SessionCreatedRecord(offset=3, session=session("s2")),
        MessageRecord(offset=4, message=message("s2", 1)),
    ]
    encode = msgspec.json.encode
    # The files lost the last two records (a power cut); the old journal still has all four.
    path.write_bytes(b"".join(encode(item) + b"\n" for item in [SectionHeader("e1", *KEY), *records[:2]]))
    (data / "sessions.idx").write_bytes(encode(["s1", *KEY]) + b"\n")
    (data / "journal").write_bytes(encode([*KEY, "e1", records]) + b"\n" + b'["torn')
    storage = FileStorage(data)
    await storage.open()
    try:
        log = await storage.load_section(KEY)
        assert log.epoch == "e1" and log.records == records
        assert await storage.find_section("s2") == KEY
        await storage.append(KEY, "e1", [MessageRecord(offset=5, message=message("s2", 2))])
    finally:
        await storage.close()
    assert (data / "FORMAT").read_bytes() == b"2\n" and (data / "journal").is_dir()
    again = FileStorage(data)
    await again.open()
    try:
        assert [r.offset for r in (await again.load_section(KEY)).records] == [1, 2, 3, 4, 5]
    finally:
        await again.close()


async def test_every_record_kind_round_trips(storage, tmp_path, request):
    """The records of revision 1.1 are stored, read by offset and reloaded like the others, on both backends."""
    sent = message("s1", 1)
    edited = msgspec.structs.replace(sent, text="edited", mentions=["bob"], edited_at="2026-11-25T08:00:01.000Z")
    reacted = msgspec.structs.replace(edited, reactions={"👍": ["bob", "carol"]})
    tombstone = msgspec.structs.replace(
        reacted, text="", mentions=[], reactions={}, deleted_at="2026-11-25T08:00:03.000Z"
    )
    annotated = msgspec.structs.replace(session("s1"), metadata={"anchor": {"quote": "naïve", "at": [1, 2.5]}})
    records = [
        SessionCreatedRecord(offset=1, session=annotated, idempotency_key="k"),
        MessageRecord(offset=2, message=sent),
        MessageEditedRecord(offset=3, message=edited, mentioned=["bob"]),
        ReactionRecord(offset=4, message=reacted, reaction="👍", user="carol", on=True, at="2026-11-25T08:00:02.000Z"),
        MessageDeletedRecord(offset=5, message=tombstone),
        SessionUpdatedRecord(offset=6, session=msgspec.structs.replace(annotated, title="T", metadata=None)),
        SessionClosedRecord(offset=7, session=msgspec.structs.replace(annotated, closed=True)),
        SessionReopenedRecord(offset=8, session=annotated),
        ReadRecord(offset=9, session_id="s1", user="bob", seq=1),  # stored in a read stream; storage takes any kind
        SessionMovedRecord(
            offset=10, session=annotated, from_section_id="other", to_section_id="intro", state=b"\x00\xffstate"
        ),
    ]
    assert {type(r) for r in records} == set(get_args(StoredRecord))
    await storage.load_section(KEY)
    await storage.append(KEY, "e", records[:4])
    await storage.append(KEY, "e", records[4:])
    assert await storage.read_records(KEY, [5, 3, 9]) == [records[4], records[2], records[8]]
    assert (await storage.load_section(KEY)).records == records
    await storage.close()
    again = FileStorage(tmp_path / "data") if isinstance(storage, FileStorage) else RedisStorage(storage.url)
    await again.open()
    try:
        assert (await again.load_section(KEY)).records == records
    finally:
        await again.close()
    await storage.open()  # for the fixture's close


def _versions_of_a_secret(seq: int, offset: int, text: str) -> list[StoredRecord]:
    """A message, its edit and a reaction to it, at `offset` and on: every one carries text to erase."""
    sent = msgspec.structs.replace(message("s1", seq), text=text, mentions=["bob"])
    edited = msgspec.structs.replace(sent, text=text + " (edited)", edited_at="2026-11-25T08:00:01.000Z")
    reacted = msgspec.structs.replace(edited, reactions={"👍": ["bob"]})
    return [
        MessageRecord(offset=offset, message=sent),
        MessageEditedRecord(offset=offset + 1, message=edited, mentioned=["bob"]),
        ReactionRecord(offset=offset + 2, message=reacted, reaction="👍", user="bob", on=True, at=edited.edited_at),
    ]


def _deleted(record: StoredRecord, offset: int) -> MessageDeletedRecord:
    tombstone = msgspec.structs.replace(
        record.message, text="", mentions=[], reactions={}, deleted_at="2026-11-25T08:00:09.000Z"
    )
    return MessageDeletedRecord(offset=offset, message=tombstone)


def _files_of(root: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())


async def stored_bytes(storage) -> bytes:
    """Everything the backend holds, as bytes: every file of the data dir, or every value in Redis."""
    if isinstance(storage, FileStorage):
        return _files_of(storage.root)
    return await redis_values(storage.url)


async def test_a_delete_erases_the_text_of_every_earlier_version(storage, tmp_path):
    """Erasing earlier records (and records of the same append) leaves their offsets and ids and drops their text."""
    first = _versions_of_a_secret(1, 2, "secret one")
    later = _versions_of_a_secret(2, 7, "secret two")
    records = [
        SessionCreatedRecord(offset=1, session=session("s1")),
        *first,
        MessageRecord(offset=5, message=msgspec.structs.replace(message("s1", 3), text="kept")),
        _deleted(first[-1], 6),
        *later,
        _deleted(later[-1], 10),
    ]
    await storage.load_section(KEY)
    await storage.append(KEY, "e", records[:5])
    await storage.append(
        KEY, "e", [records[5]], erase=[("intro", 2), ("intro", 3), ("intro", 4)]
    )  # erased where stored
    await storage.append(KEY, "e", records[6:], erase=[("intro", 7), ("intro", 8), ("intro", 9)])  # stored erased
    expected = [erased(r) if r.offset in (2, 3, 4, 7, 8, 9) else r for r in records]
    assert expected[1].message.text == "" and expected[1].message.message_id == first[0].message.message_id
    assert (await storage.read_after(KEY, 0)).records == expected
    assert await storage.read_records(KEY, [3, 5, 8]) == [expected[2], expected[4], expected[7]]
    await storage.close()  # files: the final checkpoint deletes the journal, which held the text
    assert b"secret" not in await stored_bytes(storage) and b"kept" in await stored_bytes(storage)
    again = FileStorage(tmp_path / "data") if isinstance(storage, FileStorage) else RedisStorage(storage.url)
    await again.open()
    try:
        assert (await again.load_section(KEY)).records == expected
    finally:
        await again.close()
    await storage.open()  # for the fixture's close


@pytest.mark.parametrize("crash", [False, True], ids=["running", "kill-9"])
async def test_erased_text_leaves_the_journal_while_running_and_across_a_crash(tmp_path, crash):
    """Files: the journal segment that held the text is sealed and checkpointed within a second; a kill -9 before that loses nothing and keeps nothing."""
    root = tmp_path / "data"
    storage = FileStorage(root)
    await storage.open()
    first = _versions_of_a_secret(1, 2, "secret one")
    await storage.load_section(KEY)
    await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1")), *first])
    await storage.append(KEY, "e", [_deleted(first[-1], 5)], erase=[("intro", o) for o in (2, 3, 4)])
    if crash:
        storage.journal.abandon()  # kill -9: the segment with the text is still there
        os.close(storage._lock_fd)
        assert b"secret" in await stored_bytes(storage)
        storage = FileStorage(root)
        await storage.open()  # the journal is replayed, then deleted
    else:
        await until(lambda: b"secret" not in _files_of(root), timeout=10)
    assert b"secret" not in await stored_bytes(storage)
    log = await storage.read_after(KEY, 0)
    assert [r.offset for r in log.records] == [1, 2, 3, 4, 5] and log.records[1] == erased(first[0])
    await storage.close()


async def test_redis_data_of_the_per_section_key_layout_is_renamed_on_open(redis_server):
    """Format 1 gave each section its own hash tag; format 2 the document's (a move's script touches two sections)."""
    import redis.asyncio

    from server.storage.redis import _hash

    records = [SessionCreatedRecord(offset=1, session=session("s1")), MessageRecord(offset=2, message=message("s1", 1))]
    old = f"sc:{{{_hash(KEY.document_id, KEY.section_id)}}}"
    raw = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await raw.hset(
            f"{old}:meta",
            mapping={"document_id": KEY.document_id, "section_id": KEY.section_id, "epoch": "e1", "offset": 2},
        )
        await raw.rpush(f"{old}:log", *(msgspec.json.encode(r) for r in records))
        for _ in range(2):  # a second open finds nothing left to rename
            storage = RedisStorage(redis_server.url)
            await storage.open()
            try:
                log = await storage.load_section(KEY)
                assert (log.epoch, log.records) == ("e1", records)
            finally:
                await storage.close()
        assert await raw.exists(f"{old}:meta", f"{old}:log") == 0 and await raw.get("sc:format") == b"2"
    finally:
        await raw.aclose()


async def test_append_parts_stores_every_part_or_none(storage):
    """A move's parts: two sections (and a read stream) of one document in one atomic append."""
    other = SectionKey("doc", "other")
    for key in (KEY, other):
        await storage.load_section(key)
    await storage.append(KEY, "e", [SessionCreatedRecord(offset=1, session=session("s1"))])
    moved = msgspec.structs.replace(session("s1"), section_id="other")
    out = SessionMovedRecord(offset=2, session=moved, from_section_id="intro", to_section_id="other")
    into = msgspec.structs.replace(out, offset=1, state=b"state")
    if isinstance(storage, RedisStorage):  # another node wrote to the target first: nothing of the move lands
        await storage.append(other, "f", [SessionCreatedRecord(offset=1, session=session("s2", other))])
        with pytest.raises(StaleSection):
            await storage.append_parts([Part(KEY, "e", [out]), Part(other, "f", [into])])
        assert [r.offset for r in (await storage.read_after(KEY, 0)).records] == [1]
        into = msgspec.structs.replace(into, offset=2)
    await storage.append_parts([Part(KEY, "e", [out]), Part(other, "f", [into])])
    assert (await storage.read_after(KEY, 0)).records[-1] == out
    assert (await storage.read_after(other, 0)).records[-1] == into
    assert await storage.find_section("s1") in (other, KEY)  # the index may lag a move: the source forwards


async def test_sections_progress_and_leases_for_consumers_of_the_stream(storage, tmp_path):
    """What webhooks keep through the storage: every section, their progress (surviving a reopen), leases."""
    keys = [KEY, SectionKey("doc", "other"), SectionKey("another doc", "x")]
    for n, key in enumerate(keys):
        await storage.load_section(key)
        await storage.append(key, "e", [SessionCreatedRecord(offset=1, session=session(f"s{n}", key))])
    assert sorted(await storage.all_sections()) == sorted(keys)
    progress = {KEY: ("e", 1), keys[2]: ("e2", 7)}
    await storage.save_progress("webhook http://x/", progress)
    await storage.save_progress("webhook http://x/", {**progress, KEY: ("e", 2)})
    assert await storage.load_progress("webhook http://y/") == {}
    await storage.close()
    again = FileStorage(tmp_path / "data") if isinstance(storage, FileStorage) else RedisStorage(storage.url)
    await again.open()
    try:
        assert await again.load_progress("webhook http://x/") == {KEY: ("e", 2), keys[2]: ("e2", 7)}
        assert sorted(await again.all_sections()) == sorted(keys)  # from the table and the index after it
        assert await again.lease("w", KEY, "node-1", 5.0)
        assert await again.lease("w", KEY, "node-1", 5.0)  # renewed by its holder
        assert await again.lease("w", KEY, "node-2", 5.0) is isinstance(again, FileStorage)  # files: one process
    finally:
        await again.close()
    await storage.open()
