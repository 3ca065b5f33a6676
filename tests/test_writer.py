"""The section writer driven by hand: a storage whose appends the test completes or fails.

No sockets: peers collect frames. The storage is a real implementation of the
Storage interface that holds each append until the test says how it ends, so
the test decides what is durable and when.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from test_chat import CollectingPeer

from protocol import errors
from protocol.errors import ChatError
from protocol.messages import CloseSession, CreateSession, SendMessage
from server.background import Background
from server.core import Draft, Rules, decide
from server.sections import SectionCache
from server.storage.base import SectionKey, SectionLog, StaleSection, StorageError, StoredRecord
from server.writer import Writer

KEY = SectionKey("doc", "sec")

pytestmark = pytest.mark.timeout(10)


class Append:
    """One append the writer made, waiting for the test."""

    def __init__(self, records: list[StoredRecord]):
        self.records = records
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def offsets(self) -> list[int]:
        return [record.offset for record in self.records]

    def complete(self) -> None:
        self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        self.done.set_exception(error)


class HandStorage:
    """Appends wait for the test; `stored` is what is durable, in order (another node may add to it)."""

    shared = False

    def __init__(self, *, pipelined: bool):
        self.pipelined = pipelined
        self.appends: asyncio.Queue[Append] = asyncio.Queue()
        self.stored: list[StoredRecord] = []
        self.load_error: StorageError | None = None

    async def next_append(self) -> Append:
        return await self.appends.get()

    async def load_section(self, key: SectionKey) -> SectionLog:
        if self.load_error is not None:
            raise self.load_error
        return SectionLog("epoch", [])

    async def read_after(self, key: SectionKey, offset: int) -> SectionLog:
        return SectionLog("epoch", self.stored[offset:])

    async def append(self, key: SectionKey, epoch: str, records: list[StoredRecord], erase: Sequence[int] = ()) -> None:
        append = Append(records)
        self.appends.put_nowait(append)
        await append.done
        self.stored.extend(records)

    async def keep_state(self, key, state) -> None:
        pass

    async def release(self, key) -> None:
        pass


class Rig:
    """A writer over a hand storage, with the events it announced."""

    def __init__(self, *, pipelined: bool = True):
        self.storage = HandStorage(pipelined=pipelined)
        self.background = Background()
        self.sections = SectionCache(self.storage, self.background)  # type: ignore[arg-type]
        self.announced: list[tuple[str, int, str | None]] = []  # (event type, offset, cause)
        self.writer = Writer(self.storage, self.sections, self.background, self._announce)  # type: ignore[arg-type]
        self.rules = Rules()
        self.alice = CollectingPeer("alice")

    def _announce(self, section, record, event, cause) -> None:
        self.announced.append((type(event).__name__, event.offset, cause and cause.user))

    @property
    def stream(self):
        return self.sections.section(KEY).stream

    def create(self, **fields) -> asyncio.Task[None]:
        request = CreateSession(document_id=KEY.document_id, section_id=KEY.section_id, **fields)
        return self._write(lambda draft: self.rules.create_session("alice", request, draft))

    def send(self, session_id: str, text: str = "hi") -> asyncio.Task[None]:
        request = SendMessage(session_id=session_id, text=text)
        return self._write(lambda draft: self.rules.send_message("alice", request, draft))

    def close(self, session_id: str) -> asyncio.Task[None]:
        request = CloseSession(session_id=session_id)
        return self._write(lambda draft: self.rules.close_session("alice", request, draft))

    def _write(self, plan) -> asyncio.Task[None]:
        return asyncio.create_task(self.writer.write(KEY, self.alice, plan))

    async def session(self) -> str:
        """A session stored through the writer (one append, completed)."""
        task = self.create()
        (await self.storage.next_append()).complete()
        await task
        return self.alice.last()["session"]["session_id"]


async def test_writes_queued_together_are_one_append_applied_only_once_durable():
    rig = Rig()
    tasks = [rig.create(), rig.create(), rig.create()]
    append = await rig.storage.next_append()
    assert append.offsets == [1, 2, 3]  # group commit: one append for the three
    await asyncio.sleep(0)
    assert rig.stream.offset == 0 and rig.alice.frames == [] and not any(t.done() for t in tasks)
    append.complete()
    await asyncio.gather(*tasks)
    assert rig.stream.offset == 3 and [f["type"] for f in rig.alice.frames] == ["session_created"] * 3
    assert [offset for _, offset, _ in rig.announced] == [1, 2, 3]
    assert rig.sections.section(KEY).pins == 0


async def test_the_next_batch_is_decided_on_top_of_the_one_in_flight():
    rig = Rig()
    session_id = await rig.session()
    first = rig.send(session_id, "one")
    append_1 = await rig.storage.next_append()
    second, third = rig.send(session_id, "two"), rig.send(session_id, "three")
    append_2 = await rig.storage.next_append()  # on its way before the first is durable
    assert append_1.offsets == [2] and append_2.offsets == [3, 4]
    assert [r.message.seq for r in append_2.records] == [2, 3]
    append_2.complete()  # durable first, but applied in order, after the first
    await asyncio.sleep(0)
    assert rig.stream.offset == 1 and not second.done()
    append_1.complete()
    await asyncio.gather(first, second, third)
    assert rig.stream.offset == 4 and [f["message"]["seq"] for f in rig.alice.frames[1:]] == [1, 2, 3]


async def test_a_failed_first_batch_fails_the_one_behind_it_and_nothing_is_applied():
    rig = Rig()
    session_id = await rig.session()
    first = rig.send(session_id, "one")
    append_1 = await rig.storage.next_append()
    second, refused = rig.send(session_id, "two"), rig.close("nobody")
    append_2 = await rig.storage.next_append()
    append_1.fail(StorageError("disk full"))
    append_2.fail(StorageError("an earlier append failed"))  # as a pipelining storage guarantees
    results = await asyncio.gather(first, second, refused, return_exceptions=True)
    assert [type(r) for r in results] == [StorageError, StorageError, ChatError]
    assert results[2].code == errors.NOT_FOUND  # a write refused in a failed batch keeps its own refusal
    assert rig.stream.offset == 1 and rig.stream.session(session_id).last_seq == 0
    assert len(rig.alice.frames) == 1 and len(rig.announced) == 1
    # Decided afresh from the stream: the failed offsets and seqs are taken again.
    retry = rig.send(session_id, "again")
    append_3 = await rig.storage.next_append()
    assert append_3.offsets == [2] and append_3.records[0].message.seq == 1
    append_3.complete()
    await retry
    assert rig.sections.section(KEY).pins == 0


async def test_nothing_new_is_decided_until_a_failed_batch_is_out():
    """Writes queued after a failure wait, then go out decided against the stream, not the failed draft."""
    rig = Rig()
    session_id = await rig.session()
    first = rig.send(session_id, "one")
    append_1 = await rig.storage.next_append()
    second = rig.send(session_id, "two")
    append_2 = await rig.storage.next_append()
    append_1.fail(StorageError("disk full"))
    await asyncio.sleep(0)
    late = rig.send(session_id, "late")
    await asyncio.sleep(0)
    assert rig.storage.appends.empty()  # the second batch is still out: nothing decided meanwhile
    append_2.fail(StorageError("an earlier append failed"))
    append_3 = await rig.storage.next_append()
    assert append_3.offsets == [2]
    append_3.complete()
    await late
    assert [type(r) for r in await asyncio.gather(first, second, return_exceptions=True)] == [StorageError] * 2


async def test_a_stale_section_catches_up_and_decides_again():
    rig = Rig(pipelined=False)
    session_id = await rig.session()
    task = rig.send(session_id, "mine")
    stale = await rig.storage.next_append()
    assert stale.offsets == [2]
    # Meanwhile another node stored two messages in the section (decided by the same rules).
    theirs = SendMessage(session_id=session_id, text="theirs")
    _, records = decide(Draft(rig.stream), [lambda d: rig.rules.send_message("bob", theirs, d)] * 2)
    rig.storage.stored.extend(records)
    stale.fail(StaleSection("section is at offset 3"))
    again = await rig.storage.next_append()
    assert again.offsets == [4] and again.records[0].message.seq == 3
    assert [(offset, cause) for _, offset, cause in rig.announced[1:]] == [(2, None), (3, None)]  # theirs, announced
    again.complete()
    await task
    assert rig.stream.offset == 4 and rig.alice.last()["message"]["seq"] == 3
    assert [r.offset for r in rig.storage.stored] == [1, 2, 3, 4]


async def test_a_requester_that_goes_away_mid_write_still_has_its_write_done():
    rig = Rig()
    session_id = await rig.session()
    task = rig.send(session_id, "then gone")
    append = await rig.storage.next_append()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    append.complete()
    await rig.background.drain()
    assert rig.stream.offset == 2 and rig.stream.session(session_id).last_seq == 1
    assert rig.alice.last()["type"] == "message_ack"  # sent to the connection, gone or not
    assert rig.sections.section(KEY).pins == 0


async def test_a_section_that_cannot_load_fails_every_waiting_write():
    rig = Rig()
    rig.storage.load_error = StorageError("cannot read the section")
    results = await asyncio.gather(rig.create(), rig.create(), return_exceptions=True)
    assert [str(r) for r in results] == ["cannot read the section"] * 2
    assert rig.sections.section(KEY).pins == 0 and rig.storage.appends.empty()
    rig.storage.load_error = None
    task = rig.create()
    (await rig.storage.next_append()).complete()
    await task
    assert rig.stream.offset == 1
