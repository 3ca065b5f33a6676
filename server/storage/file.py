# File storage: append-only JSON-lines logs under the data dir, made durable by
# one shared journal. Files are opened and read with aiofiles; the writes of a
# batch run as one job in the storage thread pool (aiofiles.os.wrap).
#
# Layout (ids are data, never paths: file names are hashes of them):
#   LOCK                            flock'ed while a server uses the dir
#   journal                         what was acknowledged since the last checkpoint
#   sessions.idx                    one line per session: [session_id, document_id, section_id]
#   sections/<h(doc)>/<h(sec)>.log  a header line, then one record per line
#
# Rules kept here:
# - An append is acknowledged once its entry is in the journal and the journal
#   is fsynced. Appends that arrive while a batch is being written go out as the
#   next batch: one write and one fsync of the journal for all of them, however
#   many sections they touch (group commit).
# - The same bytes are written to the section files and the index before the
#   journal, without fsync. A checkpoint (when the journal grows past a limit,
#   and at close) fsyncs those files and their directories, then empties the
#   journal. On open, the journal is replayed into any file that lacks its tail.
# - A failed write leaves every file as it was before the batch: files are cut
#   back to their previous size and the journal too, and a descriptor whose
#   fsync failed is never trusted again (the kernel may have dropped the pages).
# - A torn or garbage tail found when loading is cut off with a warning.

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Union

import aiofiles
import aiofiles.os
import msgspec

from ..metrics import Metrics
from .base import SectionKey, SectionLog, SessionCreatedRecord, StorageError, StoredRecord

logger = logging.getLogger("sectionchat.storage")

INDEX_NAME = "sessions.idx"
JOURNAL_NAME = "journal"
CHECKPOINT_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 256


class SectionHeader(msgspec.Struct, tag_field="kind", tag="section"):
    epoch: str
    document_id: str
    section_id: str


class JournalEntry(msgspec.Struct, array_like=True):
    document_id: str
    section_id: str
    epoch: str
    records: list[StoredRecord]  # written as msgspec.Raw (already encoded), read back as records


_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(Union[SectionHeader, StoredRecord]).decode
_decode_index_line = msgspec.json.Decoder(tuple[str, str, str]).decode
_decode_entry = msgspec.json.Decoder(JournalEntry).decode


def _name(identifier: str) -> str:
    return hashlib.blake2b(identifier.encode(), digest_size=16).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _truncate_and_sync(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


truncate_and_sync = aiofiles.os.wrap(_truncate_and_sync)


class LogFile:
    """An append-only file, written without fsync: the journal makes its writes durable.

    Its methods block; they run in the storage thread pool, one batch at a time.
    """

    def __init__(self, path: Path, size: int, *, has_header: bool = True):
        self.path = path
        self.size = size  # what was written and not rolled back
        self.has_header = has_header
        self.header_at: int | None = None  # where a header not yet known to be written starts
        self._fd: int | None = None
        self._damaged = False  # a failed write may have left bytes past `size`

    def write(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._damaged:
            os.ftruncate(self._fd, self.size)
            self._damaged = False
        try:
            _write_all(self._fd, data)
        except OSError:
            self._damaged = True
            self.rollback(self.size)
            raise
        self.size += len(data)

    def rollback(self, size: int) -> None:
        """Cut the file back to `size` (best effort: a failure leaves it damaged, cut next time)."""
        self.size = size
        if self.header_at is not None and size <= self.header_at:
            self.has_header = False
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, size)
                self._damaged = False
        except OSError:
            self._damaged = True

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class Journal:
    """The one file fsynced per batch; everything acknowledged since the last checkpoint."""

    def __init__(self, path: Path, metrics: Metrics | None):
        self.path = path
        self.metrics = metrics
        self._fd: int | None = None
        self._size = 0
        self._dirty: set[Path] = set()  # files written since the last checkpoint
        self._new_dirs: set[Path] = set()  # directories whose new entries are not yet synced
        self._pending: list[tuple[bytes, list[tuple[LogFile, bytes]], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._run = aiofiles.os.wrap(self._write_batch)

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    def restore(self, writes: list[tuple[LogFile, bytes]]) -> None:
        """Write what recovery found missing (in the storage thread); the next checkpoint syncs it."""
        for file, data in writes:
            file.write(data)
            self._dirty.add(file.path)

    def created(self, path: Path) -> None:
        """`path` is a new file or directory: its parent's entry is synced at the next checkpoint."""
        self._new_dirs.add(path.parent)

    async def commit(self, entry: bytes, writes: list[tuple[LogFile, bytes]]) -> None:
        """Write `writes` to their files and `entry` to the journal; return once it is durable."""
        outcome = asyncio.get_running_loop().create_future()
        self._pending.append((entry, writes, outcome))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        # Shielded: once queued, the write happens whether or not the caller waits.
        await asyncio.shield(outcome)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                started = time.perf_counter()
                failures = await self._run(batch)
                for (_, _, outcome), failure in zip(batch, failures, strict=True):
                    if failure is None:
                        outcome.set_result(None)
                    else:
                        outcome.set_exception(StorageError(f"cannot write: {failure.strerror or failure}"))
                if any(failures):
                    # What was queued meanwhile may build on what just failed: fail it too.
                    queued, self._pending = self._pending, []
                    for _, _, outcome in queued:
                        outcome.set_exception(StorageError("an earlier write failed; nothing was stored"))
                if self.metrics is not None:
                    self.metrics.storage_write_seconds.observe(time.perf_counter() - started)
                    self.metrics.fsync_batch_size.observe(len(batch))
        finally:
            self._flusher = None

    def _write_batch(self, batch) -> list[OSError | None]:
        """In the storage thread: the files first, then the journal and its fsync."""
        failures: list[OSError | None] = []
        written: list[list[tuple[LogFile, int]]] = []
        first_failure: OSError | None = None
        for _, writes, _ in batch:
            done: list[tuple[LogFile, int]] = []
            if first_failure is not None:
                # Items may build on earlier ones (the next batch of a section): after a failure, none is written.
                failures.append(first_failure)
                written.append(done)
                continue
            try:
                for file, data in writes:
                    size = file.size
                    file.write(data)
                    done.append((file, size))
                failures.append(None)
            except OSError as error:
                _roll_back(done)
                done = []
                failures.append(error)
                first_failure = error
            written.append(done)
        entries = b"".join(entry for (entry, _, _), failure in zip(batch, failures, strict=True) if failure is None)
        if not entries:
            return failures
        try:
            if self._fd is None:
                # Reopened after a failure: cut off whatever the failed batch left.
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                os.ftruncate(self._fd, self._size)
            _write_all(self._fd, entries)
            os.fdatasync(self._fd)
        except OSError as error:
            # Nothing of this batch is acknowledged: undo it everywhere, and
            # never fsync this descriptor again.
            for done in written:
                _roll_back(done)
            self._reset_after_failure()
            return [failure or error for failure in failures]
        self._size += len(entries)
        for done in written:
            for file, _ in done:
                self._dirty.add(file.path)
                file.header_at = None
        if self._size > CHECKPOINT_BYTES:
            self.checkpoint()
        return failures

    def _reset_after_failure(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            _truncate_and_sync(self.path, self._size)
        except OSError as error:
            logger.warning("cannot cut back the journal yet (%s); it is cut before the next write", error)

    def checkpoint(self) -> None:
        """Make the files durable on their own, then empty the journal (in the storage thread)."""
        try:
            for path in sorted(self._dirty):
                _sync_path(path)
            for directory in sorted(self._new_dirs, key=lambda p: len(p.parts), reverse=True):
                _sync_path(directory)
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
        except OSError as error:
            logger.warning("checkpoint failed (%s); the journal keeps everything until the next one", error)
            return
        self._size = 0
        self._dirty.clear()
        self._new_dirs.clear()

    async def close(self) -> None:
        while self._flusher is not None:
            await asyncio.wait([self._flusher])
        await aiofiles.os.wrap(self.checkpoint)()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _roll_back(done: list[tuple[LogFile, int]]) -> None:
    for file, size in reversed(done):
        file.rollback(size)


async def _read_lines(path: Path) -> tuple[list[bytes], int, bytes]:
    """The complete lines of a file, the size they span, and any torn tail."""
    try:
        async with aiofiles.open(path, "rb") as file:
            content = await file.read()
    except FileNotFoundError:
        return [], 0, b""
    end = content.rfind(b"\n") + 1
    return content[:end].splitlines(), end, content[end:]


class FileStorage:
    """Sections and sessions in append-only files under one data directory."""

    shared = False  # the data dir is locked to one process
    pipelined = True  # appends are written in order, and a failure fails every later one

    def __init__(self, data_dir: str | os.PathLike[str], metrics: Metrics | None = None, *, read_only: bool = False):
        self.root = Path(data_dir)
        self.metrics = metrics
        # Read-only (export): no lock, no repairs, so it can read beside a running server.
        self.read_only = read_only
        self._sections_dir = self.root / "sections"
        self._lock_fd: int | None = None
        self._journal = Journal(self.root / JOURNAL_NAME, metrics)
        self._index: LogFile | None = None
        self._session_sections: dict[str, SectionKey] = {}
        self._document_sections: dict[str, dict[SectionKey, None]] = {}
        self._files: OrderedDict[SectionKey, LogFile] = OrderedDict()
        self._next_offset: dict[SectionKey, int] = {}  # of each loaded section, counting appends in flight

    # Lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        if self.read_only:
            if not await aiofiles.os.path.isdir(self.root):
                raise StorageError(f"data dir {self.root} does not exist")
            await self._load_index()
            return
        try:
            await aiofiles.os.makedirs(self._sections_dir, exist_ok=True)
            self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StorageError(f"data dir {self.root} is not writable: {error.strerror or error}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StorageError(f"data dir {self.root} is in use by another sectionchat server") from None
        await self.check()
        await self._load_index()
        try:
            self._journal.open()
            await self._replay_journal()
        except OSError as error:
            raise StorageError(f"cannot recover the journal: {error.strerror or error}") from None

    async def check(self) -> None:
        """Raise StorageError unless a file can be written and synced in the data dir now."""
        probe = self.root / f".probe-{os.getpid()}"
        try:
            async with aiofiles.open(probe, "wb") as file:
                await file.write(b"ok")
                await file.flush()
                await aiofiles.os.wrap(os.fsync)(file.fileno())
            await aiofiles.os.remove(probe)
        except OSError as error:
            raise StorageError(f"data dir {self.root} is not writable: {error.strerror or error}") from None

    async def _load_index(self) -> None:
        path = self.root / INDEX_NAME
        lines, size, tail = await _read_lines(path)
        for number, line in enumerate(lines, 1):
            try:
                session_id, document_id, section_id = _decode_index_line(line)
            except msgspec.MsgspecError:
                logger.warning("skipping unreadable line %d of %s", number, path)
                continue
            self._remember_session(session_id, SectionKey(document_id, section_id))
        if self.read_only:
            return
        if tail:
            logger.warning("cutting a torn tail of %d bytes from %s", len(tail), path)
            await truncate_and_sync(path, size)
        self._index = LogFile(path, size)

    async def _replay_journal(self) -> None:
        """Put back into the files whatever the journal holds that they lost in a crash."""
        lines, _, _ = await _read_lines(self._journal.path)
        journaled: dict[SectionKey, tuple[str, list[StoredRecord]]] = {}
        for line in lines:
            try:
                entry = _decode_entry(line)
            except msgspec.MsgspecError:
                continue  # a torn last entry was never acknowledged
            key = SectionKey(entry.document_id, entry.section_id)
            journaled.setdefault(key, (entry.epoch, []))[1].extend(entry.records)
        restored = 0
        for key, (epoch, records) in journaled.items():
            log = await self.load_section(key)
            missing = [r for r in records if r.offset > len(log.records)]
            if missing and missing[0].offset != len(log.records) + 1:
                # Records older than the last checkpoint are gone too: nothing to append them after.
                logger.error("section %s lost records from before the last checkpoint; keeping what is left", key)
                missing = []
            writes = self._writes(key, epoch, missing, [_encode(r) for r in missing]) if missing else []
            unindexed = [
                r.session.session_id
                for r in records
                if isinstance(r, SessionCreatedRecord) and r not in missing and r.session.session_id not in self._session_sections
            ]
            if unindexed:
                assert self._index is not None
                writes.append((self._index, b"".join(_encode((sid, *key)) + b"\n" for sid in unindexed)))
            if writes:
                await aiofiles.os.wrap(self._journal.restore)(writes)
                restored += len(missing) + len(unindexed)
                for record in records:
                    if isinstance(record, SessionCreatedRecord):
                        self._remember_session(record.session.session_id, key)
            await self.release(key)
        if restored:
            logger.warning("restored %d records and index lines from the journal", restored)
        await aiofiles.os.wrap(self._journal.checkpoint)()

    async def close(self) -> None:
        await self._journal.close()
        for file in self._files.values():
            file.close()
        self._files.clear()
        if self._index is not None:
            self._index.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # Sections ---------------------------------------------------------------

    def _section_path(self, key: SectionKey) -> Path:
        return self._sections_dir / _name(key.document_id) / f"{_name(key.section_id)}.log"

    async def load_section(self, key: SectionKey) -> SectionLog:
        path = self._section_path(key)
        epoch, records, size, tail = await self._read_section(key)
        if tail:
            logger.warning("cutting a torn tail of %d bytes from %s", len(tail), path)
            try:
                await truncate_and_sync(path, size)
            except OSError as error:
                raise StorageError(f"cannot repair section: {error.strerror or error}") from None
        await self.release(key)
        self._files[key] = LogFile(path, size, has_header=epoch is not None)
        self._next_offset[key] = len(records) + 1
        await self._close_least_used_files()
        return SectionLog(epoch, records)

    async def read_after(self, key: SectionKey, offset: int) -> SectionLog:
        epoch, records, _, _ = await self._read_section(key)
        return SectionLog(epoch, records[offset:])

    async def _read_section(self, key: SectionKey) -> tuple[str | None, list[StoredRecord], int, bytes]:
        """The section's epoch and valid records, the size they span, and any torn tail."""
        path = self._section_path(key)
        try:
            lines, size, tail = await _read_lines(path)
        except OSError as error:
            raise StorageError(f"cannot read section: {error.strerror or error}") from None
        epoch: str | None = None
        records: list[StoredRecord] = []
        for number, line in enumerate(lines, 1):
            try:
                item = _decode_line(line)
            except msgspec.MsgspecError:
                logger.warning("skipping unreadable line %d of %s", number, path)
                continue
            if isinstance(item, SectionHeader):
                if (item.document_id, item.section_id) != key:
                    raise StorageError(f"{path} belongs to another section")
                epoch = epoch or item.epoch
            elif item.offset != len(records) + 1:
                logger.warning("skipping line %d of %s: offset %d out of order", number, path, item.offset)
            else:
                records.append(item)
        return epoch, records, size, tail

    async def append(self, key: SectionKey, epoch: str, records: list[StoredRecord]) -> None:
        if key not in self._files:
            # Appending to a section that was not loaded would skip the checks
            # that load_section makes; the chat logic always loads first.
            raise StorageError("section is not loaded")
        if records[0].offset != self._next_offset[key]:
            # Built on an append that failed after this one was decided.
            raise StorageError("an earlier write to this section failed; nothing was stored")
        self._next_offset[key] = records[-1].offset + 1
        self._files.move_to_end(key)
        encoded = [_encode(record) for record in records]
        writes = self._writes(key, epoch, records, encoded)
        # The journal entry embeds the records as already encoded: each is encoded once.
        entry = _encode(JournalEntry(key.document_id, key.section_id, epoch, list(map(msgspec.Raw, encoded)))) + b"\n"
        try:
            await self._journal.commit(entry, writes)
        except StorageError:
            self._next_offset[key] = min(self._next_offset[key], records[0].offset)
            raise
        for record in records:
            if isinstance(record, SessionCreatedRecord):
                self._remember_session(record.session.session_id, key)

    def _writes(
        self, key: SectionKey, epoch: str, records: list[StoredRecord], encoded: list[bytes]
    ) -> list[tuple[LogFile, bytes]]:
        """What appending `records` (and `encoded`, the same encoded) writes to the section file and the index."""
        file = self._files[key]
        lines = [line + b"\n" for line in encoded]
        if not file.has_header:
            if not file.path.parent.is_dir():
                file.path.parent.mkdir(parents=True, exist_ok=True)
                self._journal.created(file.path.parent)
            self._journal.created(file.path)
            lines.insert(0, _encode(SectionHeader(epoch, *key)) + b"\n")
            file.has_header, file.header_at = True, file.size  # undone if this write is rolled back
        writes = [(file, b"".join(lines))]
        created = [r.session.session_id for r in records if isinstance(r, SessionCreatedRecord)]
        if created:
            assert self._index is not None, "storage is not open"
            if self._index.size == 0:
                self._journal.created(self._index.path)
            writes.append((self._index, b"".join(_encode((sid, *key)) + b"\n" for sid in created)))
        return writes

    def _remember_session(self, session_id: str, key: SectionKey) -> None:
        self._session_sections[session_id] = key
        self._document_sections.setdefault(key.document_id, {})[key] = None

    async def find_section(self, session_id: str) -> SectionKey | None:
        return self._session_sections.get(session_id)

    async def document_sections(self, document_id: str) -> list[SectionKey]:
        return list(self._document_sections.get(document_id, ()))

    async def release(self, key: SectionKey) -> None:
        self._next_offset.pop(key, None)
        file = self._files.pop(key, None)
        if file is not None:
            file.close()

    async def _close_least_used_files(self) -> None:
        # Keeps descriptors bounded; a closed LogFile reopens on its next write.
        for file in list(self._files.values())[: max(0, len(self._files) - MAX_OPEN_FILES)]:
            file.close()
