# Redis storage: the same records as the file backend, shared by many nodes.
#
# Keys (the {hash tag} keeps one section's keys in one Redis Cluster slot):
#   sc:{<h(doc,sec)>}:meta   hash   document_id, section_id, epoch, offset
#   sc:{<h(doc,sec)>}:log    list   record N (JSON) at index N-1
#   sc:{<h(doc,sec)>}:fence  set    tokens of appends that must never run (see below)
#   sc:sessions              hash   session_id -> [document_id, section_id]
#   sc:doc:<h(doc)>          zset   the document's sections, scored by first use
#
# Rules kept here:
# - Appends are compare-and-set on the section's offset, in one Lua script: two
#   nodes writing one section never both win, so offsets and seqs stay gapless.
#   The loser gets StaleSection, catches up and decides again. An append
#   repeated after it landed (same offset, same first record) succeeds quietly.
# - The script publishes the new offset on EVENTS_CHANNEL in the same atomic
#   step, so every node hears of every stored event (and repairs any gap from
#   the log itself: the message is only a hint).
# - A session's index entry is written before its section record, as in the
#   file backend. What Redis acknowledged is as durable as its AOF settings.
# - A delete's erasures (base.erased) replace the earlier records in the log
#   in the same script as the append (LSET), so the text leaves the keys with
#   the delete. Redis's AOF still holds it until Redis rewrites the AOF.
#
# Unknown outcomes. StorageError ("unavailable") must mean "nothing of it is
# stored, now or later". Once the append script has been written to a socket,
# a timeout or a dropped connection does not say that: Redis may have run it
# and lost the reply, or, stalled (SIGSTOP, a paused VM, a disk that blocks its
# fsync), hold it in a socket buffer and run it at any later time, even after
# this node closed the connection, in any order relative to commands that
# other connections sent meanwhile. So a read that says "not there" proves
# nothing by itself. Instead:
# - The append never goes through redis-py's retries (the write client has
#   none, and the script is sent on a connection this module checked out and
#   connected itself): it is written to a socket exactly once. A failure before
#   that (no connection, a failed health-check PING) is "not sent": StorageError.
# - Every append carries a fresh random token. After a failure once it was
#   sent, the node runs _RESOLVE (on another connection, again and again until
#   RESOLVE_BUDGET_S is spent). Atomically, _RESOLVE answers LANDED if the
#   section's offset is at least the batch's last offset and the record at the
#   batch's first offset is byte for byte the batch's first record (a message or
#   a session carries a fresh uuid; an identical close record at that offset is
#   the same event); otherwise it adds the token to the section's fence set and
#   answers NOT_LANDED. The append script refuses to run when its token is
#   fenced, and every append that does run deletes the fence set.
# - LANDED is true: the records are there. NOT_LANDED is final: the section's
#   offset never decreases (Redis keeps what it acknowledged) and was at least
#   E, the offset the batch expects, when _RESOLVE ran. For the batch to land
#   later, the offset must be exactly E when it runs, so no append landed in
#   between, so nothing deleted the fence set, so its token is still fenced and
#   it refuses. A _RESOLVE that runs late (its own reply lost) never fences a
#   batch that had landed, and running it twice changes nothing. So whatever
#   order Redis runs queued commands in, the answer given is the truth.
# - If Redis does not answer _RESOLVE within the budget, append raises
#   OutcomeUnknown (the chat closes that connection with 1011 and its client
#   retries with its idempotency key or client_msg_id), and the attempt stays
#   pending: the section's next append first resolves it and sends nothing
#   until it has (StorageError meanwhile; StaleSection if it landed, so the
#   chat catches up before deciding again). Other nodes need not wait: the
#   compare-and-set and the fence keep them right.
# - Every wait on Redis is bounded (the *_S constants below). On a silent
#   Redis an append returns within about CONNECT_TIMEOUT_S + 2 x WRITE_TIMEOUT_S
#   + 2 x RESOLVE_BUDGET_S (an earlier write's resolution, a handshake or its
#   own reply, its resolution), a read within CONNECT_TIMEOUT_S + 2 x
#   READ_TIMEOUT_S, check() within CHECK_TIMEOUT_S.

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import NamedTuple, cast

import msgspec
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from ..metrics import Metrics
from .base import (
    Erasure,
    OutcomeUnknown,
    Part,
    SectionKey,
    SectionLog,
    SectionState,
    SessionCreatedRecord,
    SessionMovedRecord,
    StaleSection,
    StorageError,
    StoredRecord,
    erased,
    placed_sessions,
)

logger = logging.getLogger("sectionchat.storage")

EVENTS_CHANNEL = "sc:events"
SESSIONS_KEY = "sc:sessions"

# Time bounds (seconds). Reads may be retried once by redis-py (they change
# nothing); writes never are.
CONNECT_TIMEOUT_S = 1.0  # TCP connect; the handshake that follows has the command timeout
READ_TIMEOUT_S = 5.0  # one read (whole sections are read at once)
WRITE_TIMEOUT_S = 2.0  # one write's reply
RESOLVE_BUDGET_S = 3.0  # finding out whether a write whose reply was lost landed
CHECK_TIMEOUT_S = 2.0  # the health check

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(StoredRecord).decode
_decode_key = msgspec.json.Decoder(tuple[str, str]).decode

# One append to one or more sections of a document (a move: all or nothing).
# KEYS: meta, log, fence of each part, then the logs that erasures name.
# ARGV: the number of parts, token, then each part: expected offset, epoch,
# document_id, section_id, channel message, record count, records...; then the
# number of erasures and each one's (KEYS index, list index, erased record).
# The first part's fence and first record decide, as for a one-part append.
_APPEND = (
    """
local parts = tonumber(ARGV[1])
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then
    return 'fenced'
end
local starts = {}
local at = 3
for p = 1, parts do
    starts[p] = at
    at = at + 6 + tonumber(ARGV[at + 5])
end
for p = 1, parts do
    local a, base = starts[p], 3 * (p - 1)
    local expected, count = tonumber(ARGV[a]), tonumber(ARGV[a + 5])
    local current = tonumber(redis.call('HGET', KEYS[base + 1], 'offset') or '0')
    if current ~= expected then
        if p == 1 and current >= expected + count and redis.call('LINDEX', KEYS[2], expected) == ARGV[a + 6] then
            return current
        end
        return -1 - current
    end
end
for e = 1, tonumber(ARGV[at]) do
    local i = at + 3 * e - 2
    redis.call('LSET', KEYS[tonumber(ARGV[i])], tonumber(ARGV[i + 1]), ARGV[i + 2])
end
local result
for p = 1, parts do
    local a, base = starts[p], 3 * (p - 1)
    local expected, count = tonumber(ARGV[a]), tonumber(ARGV[a + 5])
    redis.call('RPUSH', KEYS[base + 2], unpack(ARGV, a + 6, a + 5 + count))
    redis.call('HSETNX', KEYS[base + 1], 'epoch', ARGV[a + 1])
    redis.call('HSET', KEYS[base + 1], 'offset', expected + count, 'document_id', ARGV[a + 2], 'section_id', ARGV[a + 3])
    redis.call('DEL', KEYS[base + 3])
    redis.call('PUBLISH', '"""
    + EVENTS_CHANNEL
    + """', ARGV[a + 4] .. (expected + count))
    result = result or expected + count
end
return result
"""
)

# KEYS: meta, log, fence. ARGV: expected offset, record count, token, first record.
# 1: the batch is stored. 0: it is not, and now never will be.
_RESOLVE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local expected = tonumber(ARGV[1])
if current >= expected + tonumber(ARGV[2]) and redis.call('LINDEX', KEYS[2], expected) == ARGV[4] then
    return 1
end
redis.call('SADD', KEYS[3], ARGV[3])
return 0
"""


# KEYS: a lease. ARGV: holder, ttl ms. 1 if the holder has it now (taken or renewed), 0 if another does.
_LEASE = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
FORMAT_KEY = "sc:format"
KEY_FORMAT = b"2"  # 2: a section's keys carry its document's hash tag (1: its own)
_FORMAT_1_META = re.compile(rb"sc:\{[0-9a-f]{24}\}:meta")
# KEYS: a section's old meta, log, fence, then their new names. Run again, it does nothing.
_RENAME = """
for i = 1, 3 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
        redis.call('RENAME', KEYS[i], KEYS[i + 3])
    end
end
"""


def _hash(*parts: str) -> str:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=12).hexdigest()


def section_prefix(key: SectionKey) -> str:
    """What a section's keys start with: the document's hash tag, so that one script may touch all its sections."""
    return f"sc:{{{_hash(key.document_id)}}}:{_hash(key.document_id, key.section_id)}"


def section_keys(key: SectionKey) -> tuple[str, str]:
    prefix = section_prefix(key)
    return f"{prefix}:meta", f"{prefix}:log"


def fence_key(key: SectionKey) -> str:
    return f"{section_prefix(key)}:fence"


def connect(url: str, *, socket_timeout: float = READ_TIMEOUT_S, retries: int = 1) -> redis.Redis:
    """A client that fails fast: a request waiting on a dead or stalled Redis is answered soon."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02) if retries else NoBackoff(), retries=retries),
        health_check_interval=10,
        # Off (they need RESP3, which we do not speak): while they are "auto", the
        # pool hands out connections the server has closed (a Redis restart)
        # without noticing, and the next command on one fails.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


class _Attempt(NamedTuple):
    """An append as sent, with what it takes to find out whether it landed."""

    expected: int
    records: int  # how many
    token: str
    first: bytes  # the encoded first record


class RedisStorage:
    """Sections and sessions in Redis, shared by every node that uses the same Redis."""

    shared = True  # other processes may append to the same sections
    pipelined = False  # one append per section at a time: each is a compare-and-set on the offset

    def __init__(
        self,
        url: str,
        metrics: Metrics | None = None,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        resolve_budget_s: float = RESOLVE_BUDGET_S,
        check_timeout_s: float = CHECK_TIMEOUT_S,
    ):
        self.url = url
        self.metrics = metrics
        # Reads, presence and pub/sub (RedisCluster uses this client too).
        self.client = connect(url, socket_timeout=read_timeout_s, retries=1)
        # Writes: no retries, so nothing is ever sent twice behind our back.
        self.writes = connect(url, socket_timeout=write_timeout_s, retries=0)
        self._append_script = self.writes.register_script(_APPEND)
        self._resolve_script = self.writes.register_script(_RESOLVE)
        self._lease_script = self.writes.register_script(_LEASE)
        self.resolve_budget_s = resolve_budget_s
        self.check_timeout_s = check_timeout_s
        # Appends sent whose outcome is not known yet, by section.
        self._pending: dict[SectionKey, _Attempt] = {}
        # Where sessions were found: a session that moved since is found through the section it left.
        self._session_sections: dict[str, SectionKey] = {}

    async def open(self) -> None:
        await self.check()
        try:
            await self._migrate()
        except RedisError as error:
            raise StorageError(f"Redis: cannot bring the data to this version's key layout: {error}") from None

    async def _migrate(self) -> None:
        """Keys of format 1 (a hash tag per section) take the names of format 2 (the document's hash tag)."""
        if await self.client.get(FORMAT_KEY) == KEY_FORMAT:
            return
        renamed = 0
        async for name in self.client.scan_iter(match="sc:{*}:meta", count=1000):
            if not _FORMAT_1_META.fullmatch(name):
                continue
            ids = cast(list[bytes | None], await self.client.hmget(name, ["document_id", "section_id"]))
            if None in ids:
                continue
            key = SectionKey(*(cast(bytes, part).decode() for part in ids))
            old = name.decode().removesuffix(":meta")
            await self.writes.eval(
                _RENAME, 6, f"{old}:meta", f"{old}:log", f"{old}:fence", *section_keys(key), fence_key(key)
            )
            renamed += 1
        await self.writes.set(FORMAT_KEY, KEY_FORMAT)
        if renamed:
            logger.info("renamed the keys of %d sections to the key layout of format 2", renamed)

    async def check(self) -> None:
        try:
            async with asyncio.timeout(self.check_timeout_s):
                await self.client.ping()
        except (RedisError, OSError) as error:  # OSError: TimeoutError from asyncio.timeout
            reason = str(error) or f"no answer within {self.check_timeout_s:g} s"
            raise StorageError(f"cannot reach Redis at {self._safe_url()}: {reason}") from None

    def _safe_url(self) -> str:
        # Never print a password that the URL may carry.
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def close(self) -> None:
        await self.client.aclose()
        await self.writes.aclose()

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

    async def read_records(self, key: SectionKey, offsets: list[int]) -> list[StoredRecord]:
        # LINDEX walks the list from its nearer end: a page deep in a long section costs more here than on files.
        _, log = section_keys(key)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for offset in offsets:
                    pipe.lindex(log, offset - 1)
                lines = await pipe.execute()
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        if any(line is None for line in lines):
            raise StorageError(f"section log {log} is shorter than expected")
        return [_decode_record(line) for line in lines]

    async def append(
        self, key: SectionKey, epoch: str, records: list[StoredRecord], erase: Sequence[Erasure] = ()
    ) -> None:
        await self.append_parts([Part(key, epoch, records)], erase)

    async def append_parts(self, parts: list[Part], erase: Sequence[Erasure] = ()) -> None:
        anchor = parts[0].key
        for part in parts:
            pending = self._pending.get(part.key)
            if pending is not None:
                # An earlier append to this section may still land: nothing new goes out until we know.
                landed = await self._resolve(part.key, pending, self.resolve_budget_s)
                if landed is None:
                    raise StorageError("Redis: the outcome of an earlier write to this section is still unknown")
                if landed and part.records[0].offset - 1 < pending.expected + pending.records:
                    raise StaleSection(f"an earlier write to the section landed at offset {pending.expected + 1}")
        started = time.perf_counter()
        await self._index_new_sessions(parts)
        parts, erasures = await self._erasures(parts, erase)
        keys: list[str] = []
        args: list[bytes | str | int] = [len(parts), os.urandom(12).hex()]
        for part in parts:
            keys += [*section_keys(part.key), fence_key(part.key)]
            hint = _encode([part.key.document_id, part.key.section_id]).decode() + "\n"
            encoded = [_encode(r) for r in part.records]
            args += [part.records[0].offset - 1, part.epoch, *part.key, hint, len(encoded), *encoded]
        args.append(len(erasures))
        for log, index, line in erasures:
            if log not in keys:
                keys.append(log)
            args += [keys.index(log) + 1, index, line]
        first = parts[0].records
        attempt = _Attempt(first[0].offset - 1, len(first), cast(str, args[1]), _encode(first[0]))
        result = await self._send_append(anchor, attempt, tuple(keys), tuple(args))
        if self.metrics is not None:
            self.metrics.storage_write_seconds.observe(time.perf_counter() - started)
        if result < 0:
            raise StaleSection(f"a section is at offset {-1 - result}, not where the write expected")
        await self._index_moved_sessions(parts)

    async def _index_new_sessions(self, parts: list[Part]) -> None:
        """The index entries of the sessions an append creates, written before it."""
        created = {
            part.key: [r.session.session_id for r in part.records if isinstance(r, SessionCreatedRecord)]
            for part in parts
        }
        placed = [part.key for part in parts if placed_sessions(part.records, part.key.section_id)]
        if not placed:
            return
        try:
            # Its outcome does not matter: an index entry without its record names a
            # section that lacks the session (`not_found`), as in the file backend.
            async with self.writes.pipeline(transaction=True) as pipe:
                for key in placed:
                    entry = _encode([key.document_id, key.section_id])
                    if created[key]:
                        pipe.hset(SESSIONS_KEY, mapping={sid: entry for sid in created[key]})
                    pipe.zadd(f"sc:doc:{_hash(key.document_id)}", {entry: time.time()}, nx=True)
                await pipe.execute()
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        for key, session_ids in created.items():
            self._session_sections.update(dict.fromkeys(session_ids, key))

    async def _index_moved_sessions(self, parts: list[Part]) -> None:
        """The index entries of sessions a move placed, written after it: until then, and if this fails,
        the section they left says where they went (the chat follows it)."""
        moved = {
            r.session.session_id: part.key
            for part in parts
            for r in part.records
            if isinstance(r, SessionMovedRecord) and r.to_section_id == part.key.section_id
        }
        if not moved:
            return
        self._session_sections.update(moved)
        try:
            await self.writes.hset(SESSIONS_KEY, mapping={sid: _encode(list(key)) for sid, key in moved.items()})
        except RedisError as error:
            logger.warning(
                "cannot update the session index after a move (%s); the moved sessions are still found", error
            )

    async def _erasures(
        self, parts: list[Part], erase: Sequence[Erasure]
    ) -> tuple[list[Part], list[tuple[str, int, bytes]]]:
        """The parts with the records to erase that they hold erased, and (log, index, record) for the others."""
        if not erase:
            return parts, []
        document_id = parts[0].key.document_id
        wanted = set(erase)
        parts = [
            part._replace(records=[erased(r) if (part.key.section_id, r.offset) in wanted else r for r in part.records])
            for part in parts
        ]
        in_parts = {(part.key.section_id, r.offset) for part in parts for r in part.records}
        # Earlier ones are read now (this node appends to a section one write at a time) and replaced by the script.
        by_section: dict[str, list[int]] = {}
        for section_id, offset in sorted(wanted - in_parts):
            by_section.setdefault(section_id, []).append(offset)
        erasures = []
        for section_id, offsets in by_section.items():
            key = SectionKey(document_id, section_id)
            log = section_keys(key)[1]
            for offset, record in zip(offsets, await self.read_records(key, offsets), strict=True):
                erasures.append((log, offset - 1, _encode(erased(record))))
        return parts, erasures

    async def _send_append(self, key: SectionKey, attempt: _Attempt, keys: tuple, args: tuple) -> int:
        """Run the append script, sent exactly once; its result, resolved if the reply is lost."""
        pool = self.writes.connection_pool
        try:
            connection = await pool.get_connection()
        except (RedisError, OSError) as error:
            raise StorageError(f"Redis: {error}") from None
        try:
            try:
                await connection.check_health()  # a PING if idle; nothing of ours is sent yet
            except (RedisError, OSError) as error:
                raise StorageError(f"Redis: {error}") from None
            self._pending[key] = attempt  # from here on, the script may run at any time
            try:
                sha = self._append_script.sha
                await connection.send_command("EVALSHA", sha, len(keys), *keys, *args, check_health=False)
                try:
                    result = await connection.read_response()
                except NoScriptError:
                    # Redis ran nothing (it had lost its script cache): send the script itself.
                    await connection.send_command("EVAL", _APPEND, len(keys), *keys, *args, check_health=False)
                    result = await connection.read_response()
            except ResponseError as error:
                # Redis answered with an error: the script did not run.
                self._settled(key, attempt)
                raise StorageError(f"Redis: {error}") from None
            except (RedisError, OSError) as error:
                logger.warning("Redis did not confirm a write (%s); finding out whether it landed", error)
                landed = await self._resolve(key, attempt, self.resolve_budget_s)
                if landed is None:
                    raise OutcomeUnknown(
                        f"Redis did not answer within {self.resolve_budget_s:g} s; the write may or may not be stored"
                    ) from None
                if not landed:
                    raise StorageError(f"Redis: {error} (the write was not stored and never will be)") from None
                return attempt.expected + attempt.records
        finally:
            await pool.release(connection)
        self._settled(key, attempt)
        if result == b"fenced":
            # Only an attempt already resolved as not stored is fenced; nobody waits for its reply.
            raise StorageError("Redis: the write was fenced off")
        return int(result)

    async def _resolve(self, key: SectionKey, attempt: _Attempt, budget: float) -> bool | None:
        """Whether the attempt landed (True) or never will (False); None if Redis does not say in time."""
        meta, log = section_keys(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        pause = 0.05
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    landed = await self._resolve_script(
                        keys=[meta, log, fence_key(key)],
                        args=[attempt.expected, attempt.records, attempt.token, attempt.first],
                    )
            except (RedisError, OSError):
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
                pause = min(pause * 2, 0.5)
                continue
            self._settled(key, attempt)
            logger.info("a write whose reply was lost %s", "is stored" if landed else "was not stored (fenced)")
            return bool(landed)
        return None

    def _settled(self, key: SectionKey, attempt: _Attempt) -> None:
        if self._pending.get(key) is attempt:
            del self._pending[key]

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
        return [SectionKey(*_decode_key(entry)) for entry in cast(list[bytes], entries)]

    async def all_sections(self) -> list[SectionKey]:
        try:
            found: dict[SectionKey, None] = {}
            async for name in self.client.scan_iter(match="sc:doc:*", count=1000):
                for entry in cast(list[bytes], await self.client.zrange(name, 0, -1)):
                    found[SectionKey(*_decode_key(entry))] = None
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        return list(found)

    async def load_progress(self, name: str) -> dict[SectionKey, tuple[str, int]]:
        try:
            entries = cast(dict[bytes, bytes], await self.client.hgetall(f"sc:progress:{_hash(name)}"))
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        progress = {}
        for field, value in entries.items():
            epoch, _, offset = value.decode().rpartition(" ")
            progress[SectionKey(*_decode_key(field))] = (epoch, int(offset))
        return progress

    async def save_progress(self, name: str, progress: dict[SectionKey, tuple[str, int]]) -> None:
        if not progress:
            return
        mapping = {_encode(list(key)): f"{epoch} {offset}" for key, (epoch, offset) in progress.items()}
        try:
            await self.writes.hset(f"sc:progress:{_hash(name)}", mapping=mapping)  # type: ignore[arg-type]
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None

    async def lease(self, name: str, key: SectionKey, holder: str, ttl_s: float) -> bool:
        lease = f"{section_prefix(key)}:lease:{_hash(name)}"
        try:
            return bool(await self._lease_script(keys=[lease], args=[holder, int(ttl_s * 1000)]))
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None

    async def delete_document(self, document_id: str, keys: list[SectionKey], session_ids: list[str]) -> None:
        doomed = [name for key in keys for name in (*section_keys(key), fence_key(key))]
        try:
            async with self.writes.pipeline(transaction=True) as pipe:  # one MULTI: all of it or none
                pipe.delete(*doomed, f"sc:doc:{_hash(document_id)}")
                if session_ids:
                    pipe.hdel(SESSIONS_KEY, *session_ids)
                await pipe.execute()
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        for session_id in session_ids:
            self._session_sections.pop(session_id, None)

    async def keep_state(self, key: SectionKey, state: SectionState) -> None:
        pass  # a section's records are read from Redis in one round trip: nothing to gain

    async def release(self, key: SectionKey) -> None:
        pass


def parse_hint(data: bytes) -> tuple[SectionKey, int] | None:
    """The section and offset an EVENTS_CHANNEL message announces."""
    try:
        head, _, offset = data.rpartition(b"\n")
        return SectionKey(*_decode_key(head)), int(offset)
    except (msgspec.MsgspecError, ValueError, TypeError):
        return None
