# Each section's writer: the one task that decides, stores and applies the
# section's writes, in order, holding the section's lock.
#
# Rules kept here:
# - Writes that queue up while a batch is being stored go out together as the
#   next batch: one append, one fsync for all of them (group commit).
# - With a pipelining storage the next batch is decided (on a Draft carrying
#   the one in flight) and on its way while the previous one is synced. A
#   failed batch fails every later one (the storage guarantees it): nothing
#   new is decided until they are all out.
# - A batch is applied, replied to and announced only once it is durable, in
#   the order it was decided, in one synchronous step, so every peer sees a
#   section's events in offset order.
# - StaleSection (another node wrote first): catch up with what it stored and
#   decide the same writes again.
# - A write runs to its end even if the one who asked for it goes away: half
#   an operation would leave memory and disk apart.
# - A move holds the writers of every section it touches (both sections and
#   their read streams), taken in one fixed order so that two moves never
#   wait for each other in a circle; a writer with a move waiting stores what
#   is in flight, then lets the move go first. Writes queued meanwhile are
#   decided after the move, against the streams it left.

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, NamedTuple

from protocol.errors import ChatError

from .background import Background
from .core import Draft, Event, MovePlan, Plan, Stream, decide
from .peer import Peer, reply
from .storage.base import (
    Part,
    ReadRecord,
    SectionKey,
    StaleSection,
    Storage,
    StorageError,
    StoredRecord,
    reads_key,
)

if TYPE_CHECKING:
    from .sections import Section, SectionCache


class QueuedWrite(NamedTuple):
    """A write waiting for its section's writer."""

    peer: Peer
    plan: Callable[[Draft], Plan]
    outcome: asyncio.Future[None]


class Batch(NamedTuple):
    """Writes decided together and stored with one append."""

    writes: list[QueuedWrite]
    decided: list[Plan | ChatError]  # one per write
    records: list[StoredRecord]
    store: asyncio.Future[None] | None  # the append in flight; None when nothing is written


class Writes:
    """A section's writes waiting for its writer, and the writer."""

    __slots__ = ("queue", "task", "wakeup")

    def __init__(self) -> None:
        self.queue: list[QueuedWrite] = []
        self.task: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None  # set when a write is queued


# Announce a durable record's event to the section (all but `cause`, the peer whose write stored it).
Announce = Callable[["Section", StoredRecord, Event, Peer | None], None]


class Writer:
    def __init__(
        self,
        storage: Storage,
        sections: SectionCache,
        background: Background,
        announce: Announce,
        stored: Callable[[Section, list[StoredRecord]], None] = lambda section, records: None,
    ):
        self.storage = storage
        self.sections = sections
        self.background = background
        self._announce = announce
        self._stored = stored  # after a batch is applied
        # Batches a section may have in flight: two when the storage keeps
        # appends in order and fails every later one after a failure.
        self.depth = 2 if storage.pipelined else 1

    async def write(self, key: SectionKey, peer: Peer, plan: Callable[[Draft], Plan]) -> None:
        """Queue a write for its section's writer and wait for its outcome (the reply has gone to `peer`)."""
        section = self.sections.section(key)
        section.pins += 1  # released by the writer once this write is done
        writes = section.writes
        outcome = asyncio.get_running_loop().create_future()
        writes.queue.append(QueuedWrite(peer, plan, outcome))
        if writes.wakeup is not None and not writes.wakeup.done():
            writes.wakeup.set_result(None)
        if writes.task is None:
            writes.task = self.background.spawn(self._run(section))
        await outcome  # if this is cancelled, the writer still does the write (see _settle)

    async def _run(self, section: Section) -> None:
        """Store the section's queued writes in batches, in order, with up to `depth` batches in flight."""
        writes = section.writes
        in_flight: deque[Batch] = deque()
        try:
            async with self.sections.locked(section.key):
                draft, failed = Draft(section.stream), False
                while writes.queue or in_flight:
                    if section.movers and not in_flight:
                        break  # a move waits for this section: it goes first (the rest are decided after it)
                    while writes.queue and not failed and len(in_flight) < self.depth and not section.movers:
                        queued, writes.queue = writes.queue, []
                        in_flight.append(self._decide(section, draft, queued))
                    if not in_flight:
                        continue
                    head = in_flight[0]
                    if head.store is not None and not head.store.done():
                        more_allowed = not failed and len(in_flight) < self.depth and not section.movers
                        await self._wait(writes, head.store, more_allowed=more_allowed)
                        continue
                    in_flight.popleft()
                    try:
                        if head.store is not None:
                            head.store.result()
                    except StaleSection:
                        # Another node wrote first (one batch in flight at most): learn what it wrote, decide again.
                        await self.catch_up(section)
                        writes.queue[:0] = head.writes
                    except StorageError as error:
                        _fail(head, error)
                        section.pins -= len(head.writes)
                        failed = True
                    else:
                        self._finish(section, head)
                    if not in_flight:
                        draft, failed = Draft(section.stream), False
        except Exception as error:
            # Loading failed (StorageError), or a bug: whoever waits must hear of it.
            left = [write for batch in in_flight for write in batch.writes] + writes.queue
            for write in left:
                _settle(write.outcome, error)
            section.pins -= len(left)
            writes.queue = []
        finally:
            writes.task = None
            if writes.queue:  # left for a move: decided once it is done
                writes.task = self.background.spawn(self._run(section))

    async def move(
        self,
        peer: Peer,
        source: SectionKey,
        target: SectionKey,
        plan: Callable[[Stream, Stream, Stream, Stream], MovePlan],
    ) -> None:
        """Decide a move on the four streams it touches, store it atomically, apply, reply, announce."""
        keys = (source, target, reads_key(source), reads_key(target))
        while True:
            async with self.holding(keys):
                sections = [self.sections.section(key) for key in keys]
                decided = plan(*(section.stream for section in sections))
                parts = [
                    Part(key, self.sections.section(key).stream.epoch, records)
                    for key, records in decided.records.items()
                ]
                if parts:
                    try:
                        await self.storage.append_parts(parts)
                    except StaleSection:
                        for section in sections:  # another node wrote first: catch up, decide again
                            await self.catch_up(section)
                        continue
                applied = [(self.sections.section(part.key), part.records) for part in parts]
                events = [[section.stream.apply(record) for record in records] for section, records in applied]
                reply(peer, decided.reply)
                peer.stored(sum(len(records) for _, records in applied))
                for (section, records), announced in zip(applied, events, strict=True):
                    for record, event in zip(records, announced, strict=True):
                        if not isinstance(record, ReadRecord):  # markers that moved are news to nobody
                            self._announce(section, record, event, peer)
                    self._stored(section, records)
                return

    @asynccontextmanager
    async def holding(self, keys: Iterable[SectionKey]) -> AsyncIterator[None]:
        """Every one of these sections' writers (a move, a document's deletion), taken in one order for all."""
        async with AsyncExitStack() as held:
            for key in sorted(set(keys)):  # one order for everyone: none waits for another in a circle
                await held.enter_async_context(self._take(key))
            yield

    @asynccontextmanager
    async def _take(self, key: SectionKey) -> AsyncIterator[None]:
        """The section's lock for a move: its writer, if busy, stores what is in flight and lets the move go first."""
        section = self.sections.section(key)
        section.movers += 1  # until the lock is ours (the writer checks it between batches)
        wakeup = section.writes.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)  # a writer waiting for more writes: stop waiting
        waiting = True
        try:
            async with self.sections.locked(key):
                section.movers, waiting = section.movers - 1, False
                yield
        finally:
            if waiting:  # cancelled before it got the lock
                section.movers -= 1

    def _decide(self, section: Section, draft: Draft, writes: list[QueuedWrite]) -> Batch:
        """Decide writes in order against the draft; start storing their records."""
        decided, records = decide(draft, [write.plan for write in writes])
        store = None
        if records:
            erase = [offset for plan in decided if isinstance(plan, Plan) for offset in plan.erase]
            store = asyncio.ensure_future(self.storage.append(section.key, section.stream.epoch, records, erase))
        return Batch(writes, decided, records, store)

    async def _wait(self, writes: Writes, store: asyncio.Future[None], more_allowed: bool) -> None:
        """Wait for the batch in flight, or, if another may be decided meanwhile, for new writes.

        One future and one callback: asyncio.wait() costs several times that, once per batch.
        """
        wakeup: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def stored(_: asyncio.Future[None]) -> None:
            if not wakeup.done():
                wakeup.set_result(None)

        store.add_done_callback(stored)
        if more_allowed:
            writes.wakeup = wakeup
        try:
            await wakeup
        finally:
            writes.wakeup = None
            store.remove_done_callback(stored)

    def _finish(self, section: Section, batch: Batch) -> None:
        """The batch is durable: apply it, reply, announce, in the order it was decided."""
        for write, decided in zip(batch.writes, batch.decided, strict=True):
            if isinstance(decided, ChatError):
                _settle(write.outcome, decided)
                continue
            events = [section.stream.apply(record) for record in decided.records]
            reply(write.peer, decided.reply)
            write.peer.stored(len(decided.records))
            for record, event in zip(decided.records, events, strict=True):
                self._announce(section, record, event, write.peer)
            _settle(write.outcome)
        self._stored(section, batch.records)
        section.pins -= len(batch.writes)

    async def catch_up(self, section: Section) -> None:
        """Apply and announce what other nodes stored in the section since we last looked."""
        log = await self.storage.read_after(section.key, section.stream.offset)
        if log.epoch is not None:
            section.stream.epoch = log.epoch
        for record in log.records:
            self._announce(section, record, section.stream.apply(record), None)


def _settle(outcome: asyncio.Future[None], error: BaseException | None = None) -> None:
    # A waiter that was cancelled (its connection went away) has cancelled its
    # future; the write went ahead all the same, and there is nobody to tell.
    if outcome.done():
        return
    if error is None:
        outcome.set_result(None)
    else:
        outcome.set_exception(error)


def _fail(batch: Batch, error: StorageError) -> None:
    """Nothing of the batch was stored: every write in it fails (its own refusal, if it had one)."""
    for write, decided in zip(batch.writes, batch.decided, strict=True):
        _settle(write.outcome, decided if isinstance(decided, ChatError) else error)
