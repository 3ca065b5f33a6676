# Redis storage: the same records as the file backend, shared by many nodes.
#
# Keys (the {hash tag} keeps one section's keys in one Redis Cluster slot):
#   sc:{<h(doc,sec)>}:meta   hash   document_id, section_id, epoch, offset
#   sc:{<h(doc,sec)>}:log    list   record N (JSON) at index N-1
#   sc:sessions              hash   session_id -> [document_id, section_id]
#   sc:doc:<h(doc)>          zset   the document's sections, scored by first use
#
# Rules kept here:
# - Appends are compare-and-set on the section's offset, in one Lua script: two
#   nodes writing one section never both win, so offsets and seqs stay gapless.
#   The loser gets StaleSection, catches up and decides again. A retried script
#   whose first run did land (the reply was lost) is recognised and succeeds.
# - The script publishes the new offset on EVENTS_CHANNEL in the same atomic
#   step, so every node hears of every stored event (and repairs any gap from
#   the log itself: the message is only a hint).
# - A session's index entry is written before its section record, as in the
#   file backend. What Redis acknowledged is as durable as its AOF settings.

from __future__ import annotations

import hashlib
import logging
import time

import msgspec
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from ..metrics import Metrics
from .base import SectionKey, SectionLog, SessionCreatedRecord, StaleSection, StorageError, StoredRecord

logger = logging.getLogger("sectionchat.storage")

EVENTS_CHANNEL = "sc:events"
SESSIONS_KEY = "sc:sessions"

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(StoredRecord).decode
_decode_key = msgspec.json.Decoder(tuple[str, str]).decode

# KEYS: meta, log. ARGV: expected offset, epoch, document_id, section_id, channel message, records...
_APPEND = """
local current = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local expected = tonumber(ARGV[1])
local count = #ARGV - 5
if current ~= expected then
    if current >= expected + count and redis.call('LINDEX', KEYS[2], expected) == ARGV[6] then
        return current
    end
    return -1 - current
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 6))
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[2])
redis.call('HSET', KEYS[1], 'offset', current + count, 'document_id', ARGV[3], 'section_id', ARGV[4])
redis.call('PUBLISH', '""" + EVENTS_CHANNEL + """', ARGV[5] .. (current + count))
return current + count
"""


def _hash(*parts: str) -> str:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=12).hexdigest()


def section_tag(key: SectionKey) -> str:
    return _hash(key.document_id, key.section_id)


def section_keys(key: SectionKey) -> tuple[str, str]:
    tag = section_tag(key)
    return f"sc:{{{tag}}}:meta", f"sc:{{{tag}}}:log"


def connect(url: str) -> redis.Redis:
    """A client that fails fast: a request waiting on a dead Redis is answered `unavailable` soon."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
        health_check_interval=10,
    )


class RedisStorage:
    """Sections and sessions in Redis, shared by every node that uses the same Redis."""

    shared = True  # other processes may append to the same sections
    pipelined = False  # one append per section at a time: each is a compare-and-set on the offset

    def __init__(self, url: str, metrics: Metrics | None = None):
        self.url = url
        self.metrics = metrics
        self.client = connect(url)
        self._append = self.client.register_script(_APPEND)
        # A session never moves, so a found section can be remembered.
        self._session_sections: dict[str, SectionKey] = {}

    async def open(self) -> None:
        await self.check()

    async def check(self) -> None:
        try:
            await self.client.ping()
        except RedisError as error:
            raise StorageError(f"cannot reach Redis at {self._safe_url()}: {error}") from None

    def _safe_url(self) -> str:
        # Never print a password that the URL may carry.
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def close(self) -> None:
        await self.client.aclose()

    async def load_section(self, key: SectionKey) -> SectionLog:
        return await self.read_after(key, 0)

    async def read_after(self, key: SectionKey, offset: int) -> SectionLog:
        meta, log = section_keys(key)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hget(meta, "epoch")
                pipe.lrange(log, offset, -1)
                epoch, lines = await pipe.execute()
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        records: list[StoredRecord] = []
        for line in lines:
            record = _decode_record(line)
            if record.offset != offset + len(records) + 1:
                raise StorageError(f"section log {log} is out of order at offset {record.offset}")
            records.append(record)
        return SectionLog(epoch.decode() if epoch else None, records)

    async def append(self, key: SectionKey, epoch: str, records: list[StoredRecord]) -> None:
        created = [r.session.session_id for r in records if isinstance(r, SessionCreatedRecord)]
        meta, log = section_keys(key)
        hint = _encode([key.document_id, key.section_id]).decode() + "\n"
        started = time.perf_counter()
        try:
            if created:
                async with self.client.pipeline(transaction=True) as pipe:
                    entry = _encode([key.document_id, key.section_id])
                    pipe.hset(SESSIONS_KEY, mapping={sid: entry for sid in created})
                    pipe.zadd(f"sc:doc:{_hash(key.document_id)}", {entry: time.time()}, nx=True)
                    await pipe.execute()
            result = await self._append(
                keys=[meta, log],
                args=[records[0].offset - 1, epoch, key.document_id, key.section_id, hint, *map(_encode, records)],
            )
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        if self.metrics is not None:
            self.metrics.storage_write_seconds.observe(time.perf_counter() - started)
        if result < 0:
            raise StaleSection(f"section is at offset {-1 - result}, not {records[0].offset - 1}")
        for session_id in created:
            self._session_sections[session_id] = key

    async def find_section(self, session_id: str) -> SectionKey | None:
        key = self._session_sections.get(session_id)
        if key is not None:
            return key
        try:
            entry = await self.client.hget(SESSIONS_KEY, session_id)
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        if entry is None:
            return None
        key = self._session_sections[session_id] = SectionKey(*_decode_key(entry))
        return key

    async def document_sections(self, document_id: str) -> list[SectionKey]:
        try:
            entries = await self.client.zrange(f"sc:doc:{_hash(document_id)}", 0, -1)
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        return [SectionKey(*_decode_key(entry)) for entry in entries]

    async def release(self, key: SectionKey) -> None:
        pass


def parse_hint(data: bytes) -> tuple[SectionKey, int] | None:
    """The section and offset an EVENTS_CHANNEL message announces."""
    try:
        head, _, offset = data.rpartition(b"\n")
        return SectionKey(*_decode_key(head)), int(offset)
    except (msgspec.MsgspecError, ValueError, TypeError):
        return None

