# The sections in memory: each one's stream, lock, waiting writes and audience,
# loaded on demand and dropped when nobody uses them.
#
# Rules kept here:
# - A section loads under its lock, from the state the storage keeps for it
#   (`Stream.snapshot`) and only the records after that state.
# - A pinned section (a write queued, a lock wanted) and one with subscribers
#   are never evicted, so the object a caller locks is the one the cache holds.
# - The storage is asked to keep a section's state when it leaves memory, at
#   shutdown, after a load that replayed many records, and every
#   KEEP_STATE_EVERY records of a section that never leaves: a load after a
#   crash stays short.

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

from .background import Background
from .core import OutdatedState, Stream
from .storage.base import SectionKey, SectionState, Storage, section_of_reads
from .subscriptions import Audience
from .writer import Writes

logger = logging.getLogger("sectionchat.chat")

LOAD_CHUNK = 2000  # records applied between yields to the event loop when a section loads
KEEP_STATE_AFTER = 1000  # records replayed or added since the kept state before the storage keeps a new one
KEEP_STATE_EVERY = 50_000  # records added before a section in use has its state kept


class Section:
    """One section in memory."""

    def __init__(self, key: SectionKey, recovery_window: int):
        self.key = key
        self.stream = Stream(key, recovery_window)
        self.audience = Audience(key)
        self.writes = Writes()
        self.lock = asyncio.Lock()  # held by its writer, and while it loads
        self.loaded = False
        self.pins = 0
        self.last_used = time.monotonic()
        self.kept_offset = 0  # the offset of the state the storage keeps for it
        self.sync_scheduled = False  # a catch-up with other nodes' writes is on its way
        self.movers = 0  # moves waiting for its lock: its writer lets them go first

    def reset(self) -> None:
        """Its stored stream is gone (the document was deleted): the next use loads it afresh, with a new epoch."""
        self.stream = Stream(self.key, self.stream.recent.maxlen or 0)
        self.loaded = False
        self.kept_offset = 0

    def evictable(self, now: float, idle_s: float) -> bool:
        return (
            self.pins == 0
            and not self.audience.subscribers
            and not self.lock.locked()
            and now - self.last_used >= idle_s
        )


class SectionCache:
    def __init__(
        self,
        storage: Storage,
        background: Background,
        *,
        recovery_window: int = 1000,
        idle_s: float = 60.0,
        max_cached: int = 10_000,
    ):
        self.storage = storage
        self.background = background
        self.recovery_window = recovery_window
        self.idle_s = idle_s
        self.max_cached = max_cached
        self.keep_state_after = KEEP_STATE_AFTER
        self.keep_state_every = KEEP_STATE_EVERY
        self.watched: Callable[[str], bool] = lambda document_id: False  # a watched document's sections stay
        self._sections: dict[SectionKey, Section] = {}

    def __len__(self) -> int:
        return len(self._sections)

    def __iter__(self) -> Iterator[Section]:
        return iter(list(self._sections.values()))

    def get(self, key: SectionKey) -> Section | None:
        return self._sections.get(key)

    def section(self, key: SectionKey) -> Section:
        """The section, in memory (perhaps not loaded yet)."""
        section = self._sections.get(key)
        if section is None:
            section = self._sections[key] = Section(key, self.recovery_window)
        return section

    async def loaded(self, key: SectionKey) -> Section:
        """The section, loaded, for reading: reads never wait behind a write's fsync."""
        section = self._sections.get(key)
        if section is not None and section.loaded:
            section.last_used = time.monotonic()
            return section
        async with self.locked(key) as section:
            return section

    @asynccontextmanager
    async def locked(self, key: SectionKey) -> AsyncIterator[Section]:
        """The section, loaded, with its lock held."""
        section = self.section(key)
        section.pins += 1
        try:
            async with section.lock:
                if not section.loaded:
                    await self._load(section)
                yield section
        finally:
            section.pins -= 1
            section.last_used = time.monotonic()

    async def _load(self, section: Section) -> None:
        log = await self.storage.load_section(section.key)
        stream = section.stream
        if log.state is not None:
            try:
                stream.restore(*log.state)
            except OutdatedState as error:
                logger.info("section %s: %s; replaying its records", section.key, error)
                stream = section.stream = Stream(section.key, self.recovery_window)
                log = await self.storage.read_after(section.key, 0)
        if log.state is not None:
            section.kept_offset = log.state.offset
            # The recovery window: the last records the state covers, read back (a page, not the section).
            first = max(1, log.state.offset - self.recovery_window + len(log.records) + 1)
            window = list(range(first, log.state.offset + 1))
            if window:
                stream.recent.extend(await self.storage.read_records(section.key, window))
        for n, record in enumerate(log.records, 1):
            stream.apply(record)
            if n % LOAD_CHUNK == 0:
                # A big section must not stall every other client; nobody sees it until it is loaded.
                await asyncio.sleep(0)
        stream.epoch = log.epoch or secrets.token_hex(8)
        section.loaded = True
        if len(log.records) >= self.keep_state_after:
            await self.keep_state(section)  # replayed many records: the next load need not

    async def keep_state(self, section: Section) -> None:
        """Have the storage keep the section's state as it is now (everything applied is durable)."""
        if section.loaded and section.stream.offset > section.kept_offset:
            section.kept_offset = section.stream.offset
            await self.storage.keep_state(section.key, SectionState(section.stream.offset, section.stream.snapshot()))

    def stored(self, section: Section) -> None:
        """A batch was applied to the section."""
        if section.stream.offset - section.kept_offset >= self.keep_state_every:
            # A busy section may never leave memory: keep its state now and then.
            section.kept_offset = section.stream.offset - 1  # not again before this task has run
            self.background.spawn(self.keep_state(section))

    async def evict_idle(self) -> int:
        """Drop sections nobody has used for a while; returns how many."""
        now = time.monotonic()
        candidates = [s for s in self._sections.values() if self._evictable(s, now, self.idle_s)]
        excess = len(self._sections) - self.max_cached
        if excess > 0:
            # Over the cap: also drop the least recently used of the rest.
            others = sorted(
                (s for s in self._sections.values() if self._evictable(s, now, 0.0) and s not in candidates),
                key=lambda s: s.last_used,
            )
            candidates.extend(others[: max(0, excess - len(candidates))])
        for section in candidates:
            del self._sections[section.key]
            section.audience.close()
        for section in candidates:
            await self._keep_changed_state(section)
            await self.storage.release(section.key)
        return len(candidates)

    def _evictable(self, section: Section, now: float, idle_s: float) -> bool:
        if not section.evictable(now, idle_s) or self.watched(section.key.document_id):
            return False
        owner = section_of_reads(section.key)
        return owner is None or owner not in self._sections  # read markers leave with their section, not before

    async def close(self) -> None:
        """At shutdown, after the last write: have the storage keep the state of sections that changed much."""
        for section in list(self._sections.values()):
            await self._keep_changed_state(section)

    async def _keep_changed_state(self, section: Section) -> None:
        if section.stream.offset - section.kept_offset >= self.keep_state_after:
            await self.keep_state(section)
