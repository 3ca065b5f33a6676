# File storage: one journal is the durable truth; section files and the session
# index are derived from it.
#
# Layout (ids are data, never paths: file names are hashes of them):
#   LOCK                            flock'ed while a server uses the dir
#   FORMAT                          "2": this layout (a v1 dir is migrated on open)
#   journal/<n>.wal                 segments of entries "<crc32> <json>\n"
#   sessions.idx                    one line per session: [session_id, document_id, section_id]
#   sessions.tbl                    the index up to some line, sorted, searched on disk (sessiontable.py)
#   sections/<h(doc)>/<h(sec)>.log  a header line, then one record per line
#   sections/<h(doc)>/<h(sec)>.state  the chat logic's state of the section up to some record (a cache)
#   progress/<h(name)>.json         how far a consumer of the stored events (a webhook) got, per section
#
# Rules kept here (the fault tests in tests/test_storage_harness.py check them):
# - An append is acknowledged once its journal entry is written and the journal
#   fdatasynced. Appends that arrive while a batch is being written go out as the
#   next batch, whatever sections they touch: one write and one fdatasync for all
#   (group commit). Each entry says where its bytes go in the section file and
#   the index, so replaying it is idempotent and needs no reading of those files.
# - Section files and the index are written only after the journal entry is
#   durable, without fsync. A failed batch has therefore touched nothing but the
#   journal, and rolling it back only ever shrinks the journal.
# - After a failed journal write or fdatasync the outcome of that batch is
#   unknown (the kernel may have dropped the pages, or written them): the batch
#   is refused only once the journal is provably cut back to what was
#   acknowledged (truncate + fsync succeeded). Until then nothing new is
#   accepted; the storage retries by itself, and a batch whose outcome stays
#   unknown past OUTCOME_DEADLINE_S is reported as OutcomeUnknown, never as a
#   refusal. Every write queued behind a failed batch fails with it.
# - A derived file whose write or fsync failed is never trusted: it is rebuilt
#   from the journal (cut back to where the journal's first entry for it starts,
#   then rewritten) before anything else is accepted. Startup does the same for
#   every file the journal covers, so after a crash or power cut the derived
#   files are exactly what the journal says.
# - A checkpoint runs beside the writes, never inside a batch: once a journal
#   segment is full, the files it touched and the directories it created are
#   fsynced, and only then is the segment deleted. Startup fsyncs everything it
#   rebuilt before it deletes a segment.
# - A delete erases the text of its message where it is stored, in the same
#   journal entry as the delete: each earlier line that carried the message is
#   rewritten in place with its erased record, padded with spaces to the same
#   length (so every position stays valid; lines still in the batch are written
#   erased in the first place). Replay rewrites them again. The journal itself
#   still holds the text until its segment is deleted, so after an erasure the
#   current segment is sealed within ERASURE_SEAL_S and checkpointed: then no
#   file holds the text.
# - Open descriptors are bounded (an LRU of MAX_OPEN_FILES); running out of
#   descriptors closes the cached ones and retries instead of failing a write.
# - Nothing is read whole that grows with the data: a start reads the index
#   after the session table, a section loads from its kept state and the
#   records after it, pages are read by offset. Table and states are caches,
#   written atomically and checked on use; one that does not fit is passed over.

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import itertools
import logging
import os
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Union, cast

import aiofiles.os
import msgspec

from ..metrics import Metrics
from .base import (
    Erasure,
    OutcomeUnknown,
    Part,
    SectionKey,
    SectionLog,
    SectionState,
    StorageError,
    StoredRecord,
    erased,
    placed_sessions,
)
from .disk import Disk, out_of_descriptors
from .sessiontable import DamagedTable, SessionTable, TableRow

logger = logging.getLogger("sectionchat.storage")

FORMAT = b"2\n"
INDEX_NAME = "sessions.idx"
JOURNAL_DIR = "journal"
SEGMENT_BYTES = 16 * 1024 * 1024  # a full segment is checkpointed and deleted
MAX_OPEN_FILES = 128
INDEX_CHUNK_BYTES = 4 << 20  # the session index is decoded this much at a time
FOLD_AFTER_SESSIONS = 50_000  # index lines past the session table before they are folded into it
FOLD_RETRY_S = 30.0
DELETED_DIR = "deleted"  # deleted/<h(doc)>.json: a document deleted whose records old journal segments still hold
PROGRESS_DIR = "progress"  # progress/<h(name)>.json: a consumer's [document, section, epoch, offset] lines
MAX_RECORD_BYTES = 1 << 20  # no record's line is longer (frames are at most 64 KiB)
READ_GAP_BYTES = 64 * 1024  # a page's records this close together are read in one pread
OUTCOME_DEADLINE_S = 10.0  # how long a write whose outcome is unknown waits for the storage to find out
LOG_INTERVAL_S = 5.0  # failures are reported at most this often
RETRY_DELAYS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # between recovery attempts
ERASURE_SEAL_S = 1.0  # after an erasure, the segment is sealed (and checkpointed) this soon, at most this often


class SectionHeader(msgspec.Struct, tag_field="kind", tag="section"):
    epoch: str
    document_id: str
    section_id: str


class JournalEntry(msgspec.Struct, array_like=True, omit_defaults=True):
    """One section's part of a batch, and where its bytes go in the derived files."""

    document_id: str
    section_id: str
    epoch: str
    section_at: int  # where its lines start in the section file (0: the header comes first)
    index_at: int  # where its session lines start in the index (-1: none)
    records: list[msgspec.Raw]  # each record as encoded once, byte for byte its line in the section file
    # Earlier lines of the document's section files rewritten in place, erased (a delete): (the
    # section, where, the line's length, the erased record, padded with spaces to that length).
    erased: list[tuple[str, int, int, msgspec.Raw]] = []
    group: int = 0  # how many of the entries after this one are stored with it, all or none (a move)


class KeptState(msgspec.Struct, array_like=True):
    """The chat logic's state of a section up to `offset`, as `<section>.state` holds it.

    The file: where each record up to `offset` starts in the section file (8
    bytes each, offset N at byte 8 (N - 1): the same place in every later
    state, so pages are read from it by pread even while it is replaced), then
    this, encoded, then the encoding's length and crc32 (4 bytes each). A load
    reads only the end, never the positions.
    """

    epoch: str
    offset: int
    size: int  # the bytes of the section file it covers
    session_ids: list[str]
    data: bytes


class DeletedDocument(msgspec.Struct, array_like=True):
    """A deleted document: no journal segment up to `upto` may write its section files again."""

    document_id: str
    upto: int


class LegacyJournalEntry(msgspec.Struct, array_like=True):
    """An entry of the single `journal` file of format 1."""

    document_id: str
    section_id: str
    epoch: str
    records: list[StoredRecord]


_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(Union[SectionHeader, StoredRecord]).decode
_decode_record = msgspec.json.Decoder(StoredRecord).decode
_decode_index_line = msgspec.json.Decoder(tuple[str, str, str]).decode
_decode_index = msgspec.json.Decoder(list[tuple[str, str, str]]).decode
_decode_entry = msgspec.json.Decoder(JournalEntry).decode
_decode_legacy_entry = msgspec.json.Decoder(LegacyJournalEntry).decode
_encode_kept = msgspec.msgpack.Encoder().encode
_decode_kept = msgspec.msgpack.Decoder(KeptState).decode
_decode_progress = msgspec.json.Decoder(list[tuple[str, str, str, int]]).decode
_decode_deleted = msgspec.json.Decoder(DeletedDocument).decode


def _name(identifier: str) -> str:
    return hashlib.blake2b(identifier.encode(), digest_size=16).hexdigest()


def _frame(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _unframe(line: bytes) -> bytes | None:
    """The payload of a journal line, or None if it is torn or damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        checksum = int(line[:8], 16)
    except ValueError:
        return None
    return payload if zlib.crc32(payload) == checksum else None


def _header_line(epoch: str, key: SectionKey) -> bytes:
    return _encode(SectionHeader(epoch, *key)) + b"\n"


def _index_lines(session_ids: list[str], key: SectionKey) -> bytes:
    return b"".join(_encode((sid, *key)) + b"\n" for sid in session_ids)


def _error_text(error: OSError) -> str:
    return error.strerror or str(error)


class DerivedFile:
    """A section file or the index: what was written to it (the journal says where the rest goes)."""

    __slots__ = ("path", "size")

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size


class LoadedSection:
    """A section the chat logic holds in memory, as the storage tracks it."""

    __slots__ = ("file", "epoch", "next_offset", "durable_offset", "kept", "starts", "lengths", "session_ids")

    def __init__(
        self,
        file: DerivedFile,
        epoch: str | None,
        kept: KeptPlace | None,
        starts: array[int],
        lengths: array[int],
        session_ids: list[str],
    ):
        self.file = file
        self.epoch = epoch
        self.session_ids = session_ids
        # Where each record's line is in the file, for the records after the
        # kept state (offset N at index N - 1 - kept offset); the kept state's
        # file has the others. Pages are read from there.
        self.kept = kept
        self.starts = starts
        self.lengths = lengths
        offset = len(starts) + (kept.offset if kept else 0)
        self.next_offset = offset + 1  # counting appends in flight
        self.durable_offset = offset  # the last offset acknowledged


class KeptPlace(NamedTuple):
    """Where a kept state is, and what of the section file it covers."""

    path: Path
    offset: int
    size: int


@dataclass(eq=False)
class PendingAppend:
    key: SectionKey
    epoch: str
    section: LoadedSection
    encoded: list[bytes]
    created: list[str]
    last_offset: int
    outcome: asyncio.Future[None]
    erase: list[Erasure]  # the document's records to store erased (see Storage.append)
    group: int = 0  # as JournalEntry.group
    # Filled in by the batch job: the derived writes, once the entry is durable, and where its lines start.
    derived: list[tuple[DerivedFile, int, bytes]] = field(default_factory=list)
    erasures: list[tuple[str, int, int, bytes]] = field(default_factory=list)  # as JournalEntry.erased
    starts: list[int] = field(default_factory=list)
    index_span: tuple[int, int] = (-1, -1)  # where its session lines are in the index


@dataclass(eq=False)
class Segment:
    number: int
    path: Path
    touched: set[Path] = field(default_factory=set)  # derived files written for its entries
    new_dirs: set[Path] = field(default_factory=set)  # directories that got new entries meanwhile


class DeletionInDoubt(OSError):
    """A deletion failed after its marker may have become durable."""

    def __init__(self, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.error = error


class WrongPositions(Exception):
    """A kept state's positions do not lead to the records they name (the file was damaged)."""


class BatchFailed(Exception):
    """The batch job failed; `written` says whether the journal may hold part of it."""

    def __init__(self, error: OSError, *, written: bool):
        super().__init__(error)
        self.error = error
        self.written = written


class Descriptors:
    """Write descriptors of derived files, at most MAX_OPEN_FILES, least recently used closed first.

    Used only by the one batch job or recovery running at a time.
    """

    def __init__(self, disk: Disk, limit: int = MAX_OPEN_FILES):
        self.disk = disk
        self.limit = limit
        self._fds: OrderedDict[Path, int] = OrderedDict()

    def get(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        try:
            fd = self.disk.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as error:
            if not out_of_descriptors(error) or not self._fds:
                raise
            self.close_all()  # the sockets need them more than our cache does
            fd = self.disk.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._fds[path] = fd
        while len(self._fds) > self.limit:
            _, old = self._fds.popitem(last=False)
            self._close(old)
        return fd

    def forget(self, path: Path) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            self._close(fd)

    def close_all(self) -> None:
        while self._fds:
            self._close(self._fds.popitem()[1])

    def _close(self, fd: int) -> None:
        try:
            self.disk.close(fd)
        except OSError:
            pass


class Journal:
    """The segments, the batch writer, the checkpoint and the recovery from failures."""

    def __init__(self, storage: FileStorage):
        self.storage = storage
        self.disk = storage.disk
        self.dir = storage.root / JOURNAL_DIR
        self.metrics = storage.metrics
        self.descriptors = Descriptors(self.disk)
        self.sealed: list[Segment] = []  # full segments not yet checkpointed, oldest first
        self.current: Segment | None = None
        self._fd: int | None = None
        self._size = 0  # bytes of the current segment known to be durable
        self._pending: list[PendingAppend] = []
        self._flusher: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # Why writes cannot be acknowledged now (None: they can).
        self.broken: str | None = None
        self._untrusted: set[Path] = set()  # derived files to rebuild from the journal before going on
        self._unresolved: list[PendingAppend] = []  # written when the journal failed: outcome unknown
        self._unresolved_since = 0.0
        self._last_logged = -LOG_INTERVAL_S
        self._failures_unlogged = 0
        # Tests shorten these.
        self.outcome_deadline_s = OUTCOME_DEADLINE_S
        self.retry_delays_s = RETRY_DELAYS_S
        self.segment_bytes = SEGMENT_BYTES
        self._retry_waiter: asyncio.Future[None] | None = None
        # After an erasure the segments still hold the text it erased: the current one is
        # sealed (at most every ERASURE_SEAL_S) so that the checkpoint deletes them all.
        self._seal_wanted = False
        self._seal_timer: asyncio.TimerHandle | None = None
        self._jobs: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []  # run between batches (see `exclusive`)

    # The write path ---------------------------------------------------------------

    def submit(self, items: list[PendingAppend]) -> None:
        """Queue these entries for the next batch (a group is never split); each item's outcome says when durable."""
        self._pending += items
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending or self.broken is not None or self._seal_wanted or self._jobs:
                if self.broken is not None:
                    await self._recover()
                    continue
                if self._jobs:
                    job, done = self._jobs.pop(0)
                    try:
                        done.set_result(await aiofiles.os.wrap(job)())
                    except OSError as error:
                        done.set_exception(error)
                    self._start_checkpoint()
                    continue
                batch, self._pending = self._pending, []
                seal, self._seal_wanted = self._seal_wanted, False
                started = time.perf_counter()
                try:
                    derived_error = await aiofiles.os.wrap(self._write_batch)(batch, seal)
                except BatchFailed as failure:
                    self._seal_wanted |= seal
                    self._batch_failed(batch, failure)
                    continue
                except Exception as error:  # a bug: nobody may be left waiting, and nothing is known
                    logger.exception("storage write failed unexpectedly")
                    _rewind(batch)
                    _refuse(batch, OutcomeUnknown(f"storage failed unexpectedly: {error!r}"))
                    self._break(repr(error), {item.section.file.path for item in batch} | {self.storage.index.path})
                    continue
                for item in batch:
                    loaded = item.section
                    loaded.durable_offset = item.last_offset
                    loaded.starts.extend(item.starts)
                    loaded.lengths.extend(map(len, item.encoded))
                    if item.created:
                        self.storage.remember(TableRow(*item.index_span, item.created, item.key))
                    if not item.outcome.done():
                        item.outcome.set_result(None)
                if derived_error is not None:  # after the above: what it refuses is rewound to this batch
                    self._break(*derived_error)
                if any(item.erasures for item in batch):
                    self._seal_soon()
                self._start_checkpoint()
                if self.metrics is not None and batch:
                    self.metrics.storage_write_seconds.observe(time.perf_counter() - started)
                    self.metrics.fsync_batch_size.observe(len(batch))
        finally:
            self._flusher = None

    async def exclusive(self, job: Callable[[], Any]) -> Any:
        """Run `job` in a worker thread between two batches, with the segments and descriptors to itself."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.append((job, done))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await asyncio.shield(done)

    def _seal_soon(self) -> None:
        if self._seal_timer is None:
            self._seal_timer = asyncio.get_running_loop().call_later(ERASURE_SEAL_S, self._seal)

    def _seal(self) -> None:
        self._seal_timer, self._seal_wanted = None, True
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    def _write_batch(self, batch: list[PendingAppend], seal: bool = False) -> tuple[str, set[Path]] | None:
        """In a worker thread: the journal entry, its fdatasync, then the derived files.

        `seal`: start a new segment first, even if the current one is not full.
        Returns why derived files are no longer trusted, and which, if a write to one failed.
        """
        try:
            entries, new_dirs = self._entries(batch)
        except OSError as error:
            raise BatchFailed(error, written=False) from None
        try:
            if self._size >= self.segment_bytes or seal:
                self._start_segment()
        except OSError as error:
            raise BatchFailed(error, written=True) from None  # the journal directory is in doubt
        assert self.current is not None and self._fd is not None
        self.current.new_dirs.update(new_dirs)
        if not entries:
            return None
        try:
            data = b"".join(entries)
            self.disk.write(self._fd, data)
            self.disk.fdatasync(self._fd)
        except OSError as error:
            raise BatchFailed(error, written=True) from None
        self._size += len(data)
        return self._write_derived(batch)

    def _entries(self, batch: list[PendingAppend]) -> tuple[list[bytes], list[Path]]:
        """The batch's journal entries (and the directories they make): where each item's bytes go."""
        disk, storage = self.disk, self.storage
        planned: dict[DerivedFile, int] = {}  # where the next bytes of each file go
        entries: list[bytes] = []
        new_dirs: list[Path] = []
        _erase_in_batch(batch)
        for item in batch:
            file = item.section.file
            at = planned.get(file, file.size)
            lines = b"".join(line + b"\n" for line in item.encoded)
            header = b""
            if at == 0:
                # The file and its directory may be new (or left by a failed batch): their
                # entries are synced by the checkpoint that retires this segment.
                new_dirs += [file.path.parent, file.path.parent.parent]
                disk.makedirs(file.path.parent)
                self.descriptors.get(file.path)  # create it now: a failure here stores nothing
                header = _header_line(item.epoch, item.key)
                lines = header + lines
            planned[file] = at + len(lines)
            item.starts = list(
                itertools.accumulate((len(line) + 1 for line in item.encoded[:-1]), initial=at + len(header))
            )
            item.derived = [(file, at, lines)]
            index_at = -1
            if item.created:
                index = storage.index
                index_at = planned.get(index, index.size)
                index_bytes = _index_lines(item.created, item.key)
                planned[index] = index_at + len(index_bytes)
                item.derived.append((index, index_at, index_bytes))
                item.index_span = (index_at, index_at + len(index_bytes))
                if index_at == 0:
                    new_dirs.append(index.path.parent)
            raw = list(map(msgspec.Raw, item.encoded))
            if item.erase:
                item.erasures = storage.erasures(item.key.document_id, item.erase)
            erased = [(section_id, at, n, msgspec.Raw(data)) for section_id, at, n, data in item.erasures]
            entry = JournalEntry(*item.key, item.epoch, at, index_at, raw, erased, item.group)
            entries.append(_frame(_encode(entry)))
        return entries, new_dirs

    def _write_derived(self, batch: list[PendingAppend]) -> tuple[str, set[Path]] | None:
        """The journal has the batch: now the derived files.

        A failure here loses nothing (the journal has it) but leaves the file,
        and those not yet written, untrusted until they are rebuilt from it.
        """
        disk = self.disk
        assert self.current is not None
        failure: OSError | None = None
        untrusted: set[Path] = set()
        for item in batch:
            for file, at, data in item.derived:
                if file.size != at and failure is None:  # never expected; the journal decides
                    failure = OSError(f"{file.path.name} is at {file.size}, the journal puts the next bytes at {at}")
                file.size = at + len(data)  # what the file holds, now or once rebuilt
                self.current.touched.add(file.path)
                if failure is None:
                    try:
                        disk.write(self.descriptors.get(file.path), data)
                        continue
                    except OSError as error:
                        failure = error
                        logger.error(
                            "cannot update %s after a durable write (%s); rebuilding from the journal",
                            file.path,
                            _error_text(error),
                        )
                        self.descriptors.forget(file.path)
                untrusted.add(file.path)
            for path, erasures in self.storage.erasures_by_path(item.key.document_id, item.erasures).items():
                self.current.touched.add(path)
                if failure is None:
                    try:
                        _erase_lines(disk, path, erasures)
                    except OSError as error:
                        failure = error
                        logger.error("cannot erase in %s (%s); rebuilding from the journal", path, _error_text(error))
                if failure is not None:
                    untrusted.add(path)
        if failure is not None:
            return f"cannot update {len(untrusted)} files: {_error_text(failure)}", untrusted
        return None

    def _start_segment(self, number: int | None = None) -> None:
        """Open the next segment (its name made durable before anything in it is acknowledged).

        The full one joins `sealed` at once, whatever happens to the batch that
        started the new one: a segment left out would be replayed out of order.
        """
        if number is None:
            assert self.current is not None
            number = self.current.number + 1
        path = self.dir / f"{number:016d}.wal"
        # O_TRUNC: a file by that name can only be left by a rotation that failed before using it.
        fd = self.disk.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC)
        try:
            self.disk.sync_path(self.dir)
        except OSError:
            self.disk.close(fd)
            try:
                self.disk.unlink(path)
            except OSError:
                pass
            raise
        old, old_fd = self.current, self._fd
        self.current, self._fd, self._size = Segment(number, path), fd, 0
        if old is not None:
            self.sealed.append(old)
        if old_fd is not None:
            self.disk.close(old_fd)

    def _batch_failed(self, batch: list[PendingAppend], failure: BatchFailed) -> None:
        """Nothing of `batch` may be acknowledged, nor anything queued behind it."""
        self._log_failure(f"storage write failed: {_error_text(failure.error)}")
        _rewind(batch)
        if failure.written:
            # Until the journal is cut back we cannot say it was not stored.
            self._unresolved = [item for item in batch if not item.outcome.done()]
            self._unresolved_since = time.monotonic()
            self._break(_error_text(failure.error))
        else:
            _refuse(batch, StorageError(f"cannot write: {_error_text(failure.error)}"))
            self._refuse_queued()

    def _break(self, reason: str, rebuild: AbstractSet[Path] = frozenset()) -> None:
        """Accept nothing until `_recover` has verified the storage again."""
        if self.broken is None:
            self.broken = reason
            if self.metrics is not None:
                self.metrics.storage_failures.inc()
        self._untrusted |= rebuild
        self._refuse_queued()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    def _log_failure(self, text: str) -> None:
        # One line per LOG_INTERVAL_S at most: a disk failing every few writes
        # must not flood the log (or block on a full pipe to it).
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._last_logged >= LOG_INTERVAL_S:
            more = (
                f" ({self._failures_unlogged - 1} similar since the last report)" if self._failures_unlogged > 1 else ""
            )
            logger.warning("%s%s", text, more)
            self._last_logged, self._failures_unlogged = now, 0

    def _refuse_queued(self) -> None:
        # They may build on what failed (the next batch of a section).
        queued, self._pending = self._pending, []
        _rewind(queued)
        _refuse(queued, StorageError("an earlier write failed; nothing was stored"))

    # Recovery -----------------------------------------------------------------------

    async def _recover(self) -> None:
        """Return the storage to a state verified on disk, then accept writes again."""
        if self._checkpointer is not None:
            await asyncio.wait([self._checkpointer])
        attempt = 0
        while True:
            self._report_unknown_outcomes()
            if self._untrusted:
                await self.storage.stop_reads()
            try:
                await aiofiles.os.wrap(self._restore)()
            except OSError as error:
                if attempt == 0:
                    logger.warning("storage still failing (%s); retrying", _error_text(error))
                await self._pause(self.retry_delays_s[min(attempt, len(self.retry_delays_s) - 1)])
                attempt += 1
                continue
            self._log_failure(f"storage recovered after {attempt} retries; accepting writes again")
            unresolved, self._unresolved = self._unresolved, []
            _refuse(unresolved, StorageError(f"cannot write: {self.broken}; nothing was stored"))
            self.broken = None
            self._untrusted.clear()
            self.storage.readable.set()
            return

    async def _pause(self, delay: float) -> None:
        """Until the next recovery attempt is due, or a write wants one now."""
        loop = asyncio.get_running_loop()
        waiter = self._retry_waiter = loop.create_future()
        timer = loop.call_later(delay, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._retry_waiter = None

    def retry_now(self) -> None:
        if self._retry_waiter is not None:
            _settle(self._retry_waiter)

    def _report_unknown_outcomes(self) -> None:
        if self._unresolved and time.monotonic() - self._unresolved_since >= self.outcome_deadline_s:
            unresolved, self._unresolved = self._unresolved, []
            for item in unresolved:
                if not item.outcome.done():
                    item.outcome.set_exception(
                        OutcomeUnknown("storage failed while writing; the write may or may not be stored")
                    )

    def _restore(self) -> None:
        """In a worker thread: cut the journal back to what was acknowledged, rebuild what is untrusted."""
        self._drop_descriptor()
        assert self.current is not None
        self.disk.truncate_path(self.current.path, self._size)
        if self._untrusted:
            self.descriptors.close_all()
            self.storage.rebuild_derived([*self.sealed, self.current], only=self._untrusted)
        self._fd = self.disk.open(self.current.path, os.O_WRONLY | os.O_APPEND)

    def _drop_descriptor(self) -> None:
        # A descriptor whose write or fsync failed is never used again.
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                self.disk.close(fd)
            except OSError:
                pass

    # Checkpoints ----------------------------------------------------------------------

    def _start_checkpoint(self) -> None:
        if self._checkpointer is None and self.sealed and self.broken is None:
            self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            while self.sealed and self.broken is None:
                segment = self.sealed[0]
                try:
                    await aiofiles.os.wrap(self._retire)(segment)
                except OSError as error:
                    logger.error("checkpoint failed (%s); rebuilding from the journal", _error_text(error))
                    self._break(f"checkpoint failed: {_error_text(error)}", set(segment.touched))
                    return
        finally:
            self._checkpointer = None

    def _retire(self, segment: Segment) -> None:
        """In a worker thread: make a segment's effects durable on their own, then delete it."""
        sync_all(self.disk, segment.touched, segment.new_dirs)
        self.disk.unlink(segment.path)
        self.sealed.remove(segment)  # gone: a rebuild must not look for it
        self.disk.sync_path(self.dir)
        self.storage.forget_deletions(upto=segment.number)  # before any later segment goes

    # Lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """In a worker thread, after recovery on open: an empty journal with a fresh segment."""
        old = _segments(self.dir)
        self._start_segment(max((int(p.stem) for p in old), default=0) + 1)
        _delete_oldest_first(self.disk, self.dir, old)

    def abandon(self) -> None:
        """Stop at once without writing anything more, as a kill -9 would (for tests)."""
        self._cancel_seal()
        for task in (self._flusher, self._checkpointer):
            if task is not None:
                task.cancel()
        self._drop_descriptor()
        self.descriptors.close_all()

    def _cancel_seal(self) -> None:
        if self._seal_timer is not None:
            self._seal_timer.cancel()
            self._seal_timer = None

    async def close(self) -> None:
        self._cancel_seal()  # the final checkpoint deletes every segment
        while self._flusher is not None and self.broken is None:
            await asyncio.wait([self._flusher])
        if self._checkpointer is not None:
            await asyncio.wait([self._checkpointer])
        if self._flusher is not None:  # still broken: give up on it
            self._flusher.cancel()
            await asyncio.wait([self._flusher])
        _refuse(self._pending + self._unresolved, OutcomeUnknown("storage closed while it was failing"))
        if self.broken is None and self.current is not None:
            try:
                await aiofiles.os.wrap(self._retire_all)()
            except OSError as error:
                logger.warning(
                    "final checkpoint failed (%s); the journal is replayed on the next start", _error_text(error)
                )
        self._drop_descriptor()
        self.descriptors.close_all()

    def _retire_all(self) -> None:
        segments = [*self.sealed, *([self.current] if self.current is not None else [])]
        for segment in segments:
            sync_all(self.disk, segment.touched, segment.new_dirs)
        self._drop_descriptor()
        _delete_oldest_first(self.disk, self.dir, [segment.path for segment in segments])
        self.sealed, self.current = [], None
        self.storage.forget_deletions(upto=None)


def _delete_oldest_first(disk: Disk, directory: Path, segments: list[Path]) -> None:
    # Each deletion is durable before the next: whatever a crash leaves is the
    # newest segments, which replay correctly on their own (the older ones never would).
    for path in segments:
        disk.unlink(path)
        disk.sync_path(directory)


def sync_all(disk: Disk, files: set[Path], directories: set[Path]) -> None:
    for path in sorted(files):
        disk.sync_path(path)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        disk.sync_path(directory)


def _segments(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix == ".wal")
    except FileNotFoundError:
        return []


def _intact_entries(content: bytes) -> tuple[list[JournalEntry], int]:
    """A segment's entries up to the first torn or damaged one, and the bytes they span.

    The entries of a group (a move) count only all together: a group cut short ends them there.
    """
    lines = content.splitlines(keepends=True)
    entries: list[JournalEntry] = []
    good = index = 0
    while index < len(lines):
        entry = _journal_entry(lines[index])
        if entry is None:
            break
        group = [entry, *(_journal_entry(line) for line in lines[index + 1 : index + 1 + entry.group])]
        if len(group) != entry.group + 1 or None in group:
            break
        entries += cast(list[JournalEntry], group)
        good += sum(map(len, lines[index : index + len(group)]))
        index += len(group)
    return entries, good


def _journal_entry(line: bytes) -> JournalEntry | None:
    """The entry a journal line holds; None if it is torn or damaged."""
    payload = _unframe(line[:-1]) if line.endswith(b"\n") else None
    if payload is None:
        return None
    try:
        return _decode_entry(payload)
    except msgspec.MsgspecError:
        return None


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _rewind(items: list[PendingAppend]) -> None:
    for item in items:
        item.section.next_offset = item.section.durable_offset + 1


def _erase_in_batch(batch: list[PendingAppend]) -> None:
    """Records to erase that are still in this batch are written erased in the first place."""
    for index, item in enumerate(batch):
        if not item.erase:
            continue
        left = []
        for section_id, offset in item.erase:
            for earlier in batch[: index + 1]:
                first = earlier.last_offset - len(earlier.encoded) + 1
                if earlier.key == (item.key.document_id, section_id) and first <= offset <= earlier.last_offset:
                    line = earlier.encoded[offset - first]
                    earlier.encoded[offset - first] = _encode(erased(_decode_record(line)))
                    break
            else:
                left.append((section_id, offset))
        item.erase = left


def _erasure(at: int, line: bytes, offset: int) -> tuple[int, int, bytes] | None:
    """How to rewrite the line of the record at `offset` erased, in place; None if it is not that record."""
    try:
        record = _decode_record(line)
    except msgspec.MsgspecError:
        return None
    data = _encode(erased(record))
    return (at, len(line), data) if record.offset == offset and len(data) <= len(line) else None


def _erase_lines(disk: Disk, path: Path, erasures: list[tuple[int, int, bytes]], *, sync: bool = False) -> None:
    """Rewrite lines of a section file in place, each padded with spaces to its length (a valid JSON line)."""
    fd = disk.open(path, os.O_WRONLY)  # not O_APPEND: pwrite would append
    try:
        size = disk.size(fd)
        for at, length, data in erasures:
            if at + length > size:
                raise OSError(f"{path} ends at {size} but the journal erases a line at {at}: data was lost")
            disk.pwrite(fd, data.ljust(length), at)
        if sync:
            disk.fsync(fd)
    finally:
        disk.close(fd)


def _refuse(items: list[PendingAppend], error: Exception) -> None:
    for item in items:
        if not item.outcome.done():
            item.outcome.set_exception(error)


class FileStorage:
    """Sections and sessions in files under one data directory."""

    shared = False  # the data dir is locked to one process
    pipelined = True  # appends are written in order, and a failure fails every later one

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        metrics: Metrics | None = None,
        *,
        read_only: bool = False,
        disk: Disk | None = None,
    ):
        self.root = Path(data_dir)
        self.metrics = metrics
        self.disk = disk or Disk()
        # Read-only (export): no lock, no repairs, so it can read beside a running server.
        self.read_only = read_only
        self._sections_dir = self.root / "sections"
        self._lock_fd: int | None = None
        self.journal = Journal(self)
        self.index = DerivedFile(self.root / INDEX_NAME, 0)
        self.table = SessionTable(self.disk, self.root)
        # The index after the table (its tail), in memory: sessions, its rows in index order, new sections per document.
        self._tail: dict[str, SectionKey] = {}
        self._tail_rows: list[TableRow] = []
        self._tail_sections: dict[str, dict[SectionKey, SectionKey]] = {}
        self.fold_after = FOLD_AFTER_SESSIONS
        self._folder: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._loaded: dict[SectionKey, LoadedSection] = {}
        self._deleted: dict[str, int] = {}  # documents deleted -> the last journal segment holding their records
        self._loaded_sessions: dict[str, SectionKey] = {}  # the sessions of loaded sections
        self._keeping: set[SectionKey] = set()  # sections whose state is being written
        self.readable = asyncio.Event()  # cleared while derived files are being rebuilt
        self.readable.set()
        self._readers = 0
        self._no_readers = asyncio.Event()
        self._no_readers.set()

    def _run(self, function, *args):
        return aiofiles.os.wrap(function)(*args)

    # Lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        if self.read_only:
            if not await aiofiles.os.path.isdir(self.root):
                raise StorageError(f"data dir {self.root} does not exist")
            await self._load_index()
            return
        try:
            await self._run(self.disk.makedirs, self._sections_dir)
            lock_fd: int = await self._run(self.disk.open, self.root / "LOCK", os.O_RDWR | os.O_CREAT)
        except OSError as error:
            raise StorageError(f"data dir {self.root} is not writable: {_error_text(error)}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StorageError(f"data dir {self.root} is in use by another sectionchat server") from None
        self._lock_fd = lock_fd
        try:
            await self._run(self._recover_on_open)
            await self._load_index()
        except OSError as error:
            await self.close()
            raise StorageError(f"cannot recover the data dir {self.root}: {_error_text(error)}") from None

    def _recover_on_open(self) -> None:
        """In a worker thread: bring the derived files up to the journal, make them durable, empty the journal."""
        disk = self.disk
        journal_dir, legacy = self.root / JOURNAL_DIR, self.root / "journal.v1"
        if journal_dir.is_file():  # format 1: one journal file where the segments' directory goes now
            disk.rename(journal_dir, legacy)
            disk.sync_path(self.root)
        if legacy.exists():
            self._migrate_v1(legacy)
        if not journal_dir.is_dir():
            sync_all(disk, set(), set(disk.makedirs(journal_dir)))
        for marker in sorted((self.root / DELETED_DIR).glob("*.json")):  # deletions the journal may undo
            deleted = _decode_deleted(disk.read_file(marker))
            self._deleted[deleted.document_id] = deleted.upto
            self._remove_document_files(deleted.document_id)
        self.rebuild_derived([Segment(int(p.stem), p) for p in _segments(journal_dir)])
        self.journal.start()
        self.forget_deletions(upto=None)
        format_path = self.root / "FORMAT"
        if not format_path.exists() or format_path.read_bytes() != FORMAT:
            disk.write_atomically(format_path, FORMAT)

    def rebuild_derived(self, segments: list[Segment], only: set[Path] | None = None) -> None:
        """In a worker thread: rewrite every derived file the journal covers (or those in `only`) from where its first entry starts.

        The journal is cut at its first torn or damaged entry (nothing after it
        was acknowledged). The rebuilt files and their directories are fsynced,
        so the journal may then be deleted.
        """
        disk = self.disk
        writes, erasures = self._read_journal(segments)
        if only is not None:
            writes = {path: planned for path, planned in writes.items() if path in only}
            erasures = {path: erasing for path, erasing in erasures.items() if path in only}
        new_dirs: set[Path] = set()
        for path, planned in writes.items():
            disk.makedirs(path.parent)
            new_dirs.update((path.parent, path.parent.parent))
            data = bytearray(b"".join(planned.chunks))
            for at, length, erased_line in erasures.get(path, ()):
                if at >= planned.start:  # a line the journal writes: erased before it is
                    data[at - planned.start : at - planned.start + length] = erased_line.ljust(length)
            _write_from(disk, path, planned.start, bytes(data), sync=True)
        for path, erased_lines in erasures.items():
            start = writes[path].start if path in writes else None
            earlier = [erasure for erasure in erased_lines if start is None or erasure[0] < start]
            if earlier:  # lines the journal no longer writes (checkpointed): erased in place
                _erase_lines(disk, path, earlier, sync=True)
        sync_all(disk, set(), new_dirs)
        if writes:
            logger.info("rebuilt %d files from the journal", len(writes))
        # What is in memory follows the files.
        for loaded in self._loaded.values():
            if loaded.file.path in writes:
                loaded.file.size = writes[loaded.file.path].end
        if self.index.path in writes:
            self.index.size = writes[self.index.path].end

    def _read_journal(
        self, segments: list[Segment]
    ) -> tuple[dict[Path, PlannedWrite], dict[Path, list[tuple[int, int, bytes]]]]:
        """What the journal writes to each derived file, and erases in it; the journal is cut at its first bad entry."""
        disk = self.disk
        writes: dict[Path, PlannedWrite] = {}
        erasures: dict[Path, list[tuple[int, int, bytes]]] = {}
        for number, segment in enumerate(segments):
            try:
                content = disk.read_file(segment.path)
            except FileNotFoundError:
                continue  # retired, its deletion not yet synced: everything in it was
            entries, good = _intact_entries(content)
            for entry in entries:
                key = SectionKey(entry.document_id, entry.section_id)
                if self._deleted.get(entry.document_id, -1) >= segment.number:
                    # Of a document deleted since: only its session index lines stay (positions).
                    if entry.index_at >= 0:
                        created = placed_sessions([_decode_record(bytes(raw)) for raw in entry.records], key.section_id)
                        _plan_write(writes, self.index.path, entry.index_at, _index_lines(created, key))
                    continue
                path = self._section_path(key)
                lines = b"".join(bytes(raw) + b"\n" for raw in entry.records)
                if entry.section_at == 0:
                    lines = _header_line(entry.epoch, key) + lines
                _plan_write(writes, path, entry.section_at, lines)
                for section_id, at, n, raw in entry.erased:
                    erased_path = self._section_path(SectionKey(entry.document_id, section_id))
                    erasures.setdefault(erased_path, []).append((at, n, bytes(raw)))
                if entry.index_at >= 0:
                    created = placed_sessions([_decode_record(bytes(raw)) for raw in entry.records], key.section_id)
                    _plan_write(writes, self.index.path, entry.index_at, _index_lines(created, key))
            if good < len(content):
                logger.warning("cutting %d bytes of unacknowledged writes from the journal", len(content) - good)
                disk.truncate_path(segment.path, good)
                for later in segments[number + 1 :]:
                    disk.truncate_path(later.path, 0)
                break
        return writes, erasures

    def _migrate_v1(self, legacy: Path) -> None:
        """Format 1 kept one `journal` file of records not yet checkpointed: put them into the files."""
        disk = self.disk
        touched: set[Path] = set()
        index = {sid for row in self._read_index_rows(0)[0] for sid in row.session_ids}
        for line in disk.read_file(legacy).splitlines():
            try:
                entry = _decode_legacy_entry(line)
            except msgspec.MsgspecError:
                continue  # a torn last entry was never acknowledged
            key = SectionKey(entry.document_id, entry.section_id)
            path = self._section_path(key)
            epoch, records, size, _ = self._parse_section(key, disk.read_at(path, -1, 0))
            missing = [r for r in entry.records if r.offset > len(records)]
            if missing and missing[0].offset == len(records) + 1:
                lines = b"".join(_encode(r) + b"\n" for r in missing)
                if epoch is None:
                    lines = _header_line(entry.epoch, key) + lines
                disk.makedirs(path.parent)
                _write_from(disk, path, size, lines)
                touched.add(path)
            unindexed = [sid for sid in placed_sessions(entry.records, key.section_id) if sid not in index]
            if unindexed:
                _write_from(disk, self.index.path, None, _index_lines(unindexed, key))
                index.update(unindexed)
                touched.add(self.index.path)
        sync_all(disk, touched, {p.parent for p in touched} | {self._sections_dir})
        disk.unlink(legacy)
        disk.sync_path(self.root)
        logger.warning("migrated the data dir to format 2 (%d files completed from the old journal)", len(touched))

    async def check(self) -> None:
        """Raise StorageError unless writes can be acknowledged now (a probe write and fdatasync)."""
        if self.journal.broken is not None:
            raise StorageError(f"storage cannot acknowledge writes: {self.journal.broken}")
        try:
            await self._run(self._probe)
        except OSError as error:
            raise StorageError(f"data dir {self.root} is not writable: {_error_text(error)}") from None

    def _probe(self) -> None:
        path = self.root / ".probe"
        fd = self.disk.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self.disk.write(fd, b"ok")
            self.disk.fdatasync(fd)
        finally:
            self.disk.close(fd)
        self.disk.unlink(path)

    async def _load_index(self) -> None:
        for row in await self._run(self._read_index_tail):
            self.remember(row)

    def _read_index_tail(self) -> list[TableRow]:
        """In a worker thread: the index lines the session table does not cover (all of them if there is no table)."""
        path = self.index.path
        size = self.disk.size_of(path)
        if not self.table.open(size) and self.table.path.exists():
            logger.warning("%s is unusable; reading the whole session index", self.table.path.name)
        start = self.table.covers
        if start and self.disk.read_at(path, 1, start - 1) != b"\n":
            logger.warning(
                "%s does not end where a line of %s does; reading the whole index", self.table.path.name, path.name
            )
            self.table.open(-1)
            start = 0
        rows, end = self._read_index_rows(start)
        if end < size and not self.read_only:
            logger.warning("cutting a torn tail of %d bytes from %s", size - end, path)
            self.disk.truncate_path(path, end)
        self.index.size = end
        return rows

    def _read_index_rows(self, start: int) -> tuple[list[TableRow], int]:
        """The index's lines from `start`, and where the last whole one ends."""
        path = self.index.path
        content = self.disk.read_at(path, -1, start)
        end = content.rfind(b"\n") + 1
        keys: dict[tuple[str, str], SectionKey] = {}
        rows: list[TableRow] = []
        position = 0
        while position < end:
            # A few MiB of lines at a time, each chunk one decode (line by line only if one is damaged).
            stop = content.rfind(b"\n", position, position + INDEX_CHUNK_BYTES) + 1 or content.find(b"\n", position) + 1
            chunk = content[position:stop]
            raw_lines = chunk.split(b"\n")[:-1]
            ends = itertools.accumulate((len(line) + 1 for line in raw_lines), initial=start + position)
            spans = list(itertools.pairwise(ends))
            try:
                lines = _decode_index(b"[" + chunk[:-1].replace(b"\n", b",") + b"]")
            except msgspec.MsgspecError:
                lines = []
                for line in raw_lines:
                    try:
                        lines.append(_decode_index_line(line))
                    except msgspec.MsgspecError:
                        logger.warning("skipping an unreadable line of %s: %r", path, line[:80])
                        lines.append(("", "", ""))  # a row of no session, so that the rows still join up
            for (session_id, document_id, section_id), (line_start, line_end) in zip(lines, spans, strict=True):
                key = keys.get((document_id, section_id))
                if key is None:
                    key = keys[(document_id, section_id)] = SectionKey(document_id, section_id)
                rows.append(TableRow(line_start, line_end, [session_id] if session_id else [], key))
            position = stop
        return rows, start + end

    async def close(self) -> None:
        self._closing.set()
        if self._folder is not None:
            await asyncio.wait([self._folder])  # a fold under way finishes: its thread cannot be stopped
        if not self.read_only and self._lock_fd is not None:
            await self.journal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # Sections ---------------------------------------------------------------

    def _section_path(self, key: SectionKey) -> Path:
        return self._sections_dir / _name(key.document_id) / f"{_name(key.section_id)}.log"

    async def stop_reads(self) -> None:
        """Hold new reads of derived files and wait for those under way (they are about to be rebuilt)."""
        self.readable.clear()
        await self._no_readers.wait()

    async def _read(self, function, *args):
        """Run a read of derived files in a worker thread, never while they are being rebuilt."""
        if not self.readable.is_set():
            try:
                async with asyncio.timeout(
                    self.journal.outcome_deadline_s
                ):  # not wait_for: it can swallow a cancel on 3.11
                    await self.readable.wait()
            except TimeoutError:
                raise StorageError(f"storage is recovering ({self.journal.broken})") from None
        self._readers += 1
        self._no_readers.clear()
        try:
            return await self._run(function, *args)
        except OSError as error:
            raise StorageError(f"cannot read the data dir: {_error_text(error)}") from None
        finally:
            self._readers -= 1
            if not self._readers:
                self._no_readers.set()

    async def load_section(self, key: SectionKey) -> SectionLog:
        epoch, records, size, starts, lengths, kept = await self._read(self._load_section_sync, key)
        path = self._section_path(key)
        place, session_ids = None, placed_sessions(records, key.section_id)
        if kept is not None:
            place = KeptPlace(path.with_suffix(".state"), kept.offset, kept.size)
            session_ids = [*kept.session_ids, *session_ids]
        self._loaded[key] = LoadedSection(DerivedFile(path, size), epoch, place, starts, lengths, session_ids)
        self._loaded_sessions.update(dict.fromkeys(session_ids, key))
        return SectionLog(epoch, records, None if kept is None else SectionState(kept.offset, kept.data))

    def _load_section_sync(self, key: SectionKey):
        """In a worker thread: the section from its kept state and the records after it, or from all its records."""
        path = self._section_path(key)
        starts, lengths = array("Q"), array("I")
        kept = self._read_kept(key)
        if kept is not None:
            content = self.disk.read_at(path, -1, kept.size)
            epoch, records, size, torn = self._parse_section(
                key, content, starts, lengths, after=kept.offset, at=kept.size, epoch=kept.epoch
            )
        else:
            content = self.disk.read_at(path, -1, 0)
            epoch, records, size, torn = self._parse_section(key, content, starts, lengths)
        if torn and not self.read_only:
            logger.warning("cutting a torn tail of %d bytes from %s", torn, path)
            self.disk.truncate_path(path, size)
        return epoch, records, size, starts, lengths, kept

    def _read_kept(self, key: SectionKey) -> KeptState | None:
        """The section's kept state if it still describes the start of its file (it is only a cache: anything else, None)."""
        path = self._section_path(key)
        state_path = path.with_suffix(".state")
        size = self.disk.size_of(state_path)
        if not size:
            return None
        try:
            if size < 8:
                raise ValueError("torn")
            length, checksum = array("I", self.disk.read_at(state_path, 8, size - 8))
            if length > size - 8:
                raise ValueError("torn")
            payload = self.disk.read_at(state_path, length, size - 8 - length)
            if len(payload) != length or zlib.crc32(payload) != checksum:
                raise ValueError("checksum")
            kept = _decode_kept(payload)
            if not kept.offset or size != 8 * kept.offset + length + 8:
                raise ValueError("size")
            first = self.disk.read_at(path, 4096, 0)
            header = _decode_line(first[: first.find(b"\n")])
            if not isinstance(header, SectionHeader) or header.epoch != kept.epoch:
                raise ValueError("another epoch")
            [start] = array("Q", self.disk.read_at(state_path, 8, 8 * (kept.offset - 1)))
            line = self.disk.read_at(path, kept.size - start, start)
            if line[-1:] != b"\n" or b"\n" in line[:-1] or _decode_record(line[:-1]).offset != kept.offset:
                raise ValueError("not where the file has it")
        except (ValueError, msgspec.MsgspecError) as error:
            logger.info("not using the kept state of %s (%s)", path.name, error)
            return None
        return kept

    async def keep_state(self, key: SectionKey, state: SectionState) -> None:
        loaded = self._loaded.get(key)
        if (
            self.read_only
            or loaded is None
            or loaded.epoch is None
            # At the same offset too: a state the chat logic could not use (kept by an earlier version) is replaced.
            or not (loaded.kept.offset if loaded.kept else 0) <= state.offset <= loaded.durable_offset
            or state.offset == 0
            or key in self._keeping
        ):
            return
        tail = state.offset - (loaded.kept.offset if loaded.kept else 0)
        size = (
            loaded.starts[tail - 1] + loaded.lengths[tail - 1] + 1 if tail or loaded.kept is None else loaded.kept.size
        )
        kept = KeptState(loaded.epoch, state.offset, size, list(loaded.session_ids), state.data)
        path = loaded.file.path.with_suffix(".state")
        self._keeping.add(key)
        try:
            await self._read(self._write_kept, path, loaded.kept, loaded.starts[:tail].tobytes(), _encode_kept(kept))
        except StorageError as error:
            logger.warning("cannot keep the state of %s (%s)", loaded.file.path.name, error)
            return
        finally:
            self._keeping.discard(key)
        if self._loaded.get(key) is loaded:  # its positions are in the new file now, at the same place
            loaded.kept = KeptPlace(path, state.offset, size)
            del loaded.starts[:tail], loaded.lengths[:tail]

    def _write_kept(self, path: Path, old: KeptPlace | None, starts: bytes, payload: bytes) -> None:
        """In a worker thread: the state file, with the old one's positions (if any), then `starts`."""
        earlier = self.disk.read_at(old.path, 8 * old.offset, 0) if old is not None else b""
        if old is not None and len(earlier) != 8 * old.offset:
            raise OSError(f"{old.path.name} is shorter than it was")
        footer = array("I", [len(payload), zlib.crc32(payload)]).tobytes()
        self.disk.write_atomically(path, [earlier, starts, payload, footer])

    async def read_records(self, key: SectionKey, offsets: list[int]) -> list[StoredRecord]:
        section = self._loaded.get(key)
        if section is None:
            raise StorageError("section is not loaded")
        try:
            return await self._read_records(section, offsets)
        except WrongPositions as error:  # a damaged kept state: find where its records are in the section file
            logger.warning("%s; reading them from %s", error, section.file.path.name)
            assert section.kept is not None
            kept = section.kept
            starts, lengths = await self._read(self._positions, key, kept)
            if len(starts) < kept.offset:
                raise StorageError(f"{section.file.path.name} has fewer records than its kept state") from None
            # The records after the kept state are where the arrays say (they may have grown meanwhile).
            section.starts, section.lengths = (
                starts[: kept.offset] + section.starts,
                lengths[: kept.offset] + section.lengths,
            )
            section.kept = None
            return await self._read_records(section, offsets)

    def _positions(self, key: SectionKey, kept: KeptPlace) -> tuple[array[int], array[int]]:
        """In a worker thread: where the records a kept state covers are, from the section file; that state is deleted."""
        starts, lengths = array("Q"), array("I")
        self._parse_section(key, self.disk.read_at(self._section_path(key), kept.size, 0), starts, lengths)
        self.disk.unlink(kept.path)
        return starts, lengths

    async def _read_records(self, section: LoadedSection, offsets: list[int]) -> list[StoredRecord]:
        kept = section.kept.offset if section.kept else 0
        earlier = [offset for offset in offsets if offset <= kept]
        spans = {o: (section.starts[o - kept - 1], section.lengths[o - kept - 1]) for o in offsets if o > kept}
        lines = await self._read(self._read_spans, section.file.path, section.kept, earlier, spans)
        try:
            records = [_decode_record(line) for line in lines]
        except msgspec.MsgspecError as error:
            if section.kept is not None and any(offset <= section.kept.offset for offset in offsets):
                raise WrongPositions(
                    f"the kept state of {section.file.path.name} does not say where its records are"
                ) from None
            raise StorageError(f"unreadable record in {section.file.path.name}: {error}") from None
        by_offset = {record.offset: record for record in records}
        if len(by_offset) != len(records) or by_offset.keys() != set(offsets):
            raise WrongPositions(f"the kept state of {section.file.path.name} does not say where its records are")
        return [by_offset[offset] for offset in offsets]

    def _read_spans(
        self, path: Path, kept: KeptPlace | None, earlier: list[int], spans: dict[int, tuple[int, int]]
    ) -> list[bytes]:
        """In a worker thread: the lines at these offsets (in order), those up to the kept state's found through its file."""
        if earlier:
            assert kept is not None
            low, high = min(earlier), max(earlier)
            # The starts from `low` to the one after `high`: a line ends where the next one starts.
            wanted = 8 * (min(high + 1, kept.offset) - low + 1)
            data = self.disk.read_at(kept.path, wanted, 8 * (low - 1))
            if len(data) != wanted:
                raise WrongPositions(f"the kept state of {path.name} is shorter than it was")
            starts = array("Q", data)
            if high == kept.offset:
                starts.append(kept.size)
            for offset in earlier:
                start = starts[offset - low]
                spans[offset] = (start, starts[offset - low + 1] - start - 1)
                if not 0 <= spans[offset][1] <= MAX_RECORD_BYTES:
                    raise WrongPositions(f"the kept state of {path.name} puts record {offset} at {start}")
        ordered = [spans[offset] for offset in sorted(spans)]
        if not ordered:
            return []
        fd = self.disk.open(path, os.O_RDONLY)
        try:
            low, high = ordered[0][0], max(start + length for start, length in ordered)
            if high - low <= 2 * sum(length for _, length in ordered) + READ_GAP_BYTES:
                block = self.disk.pread(fd, high - low, low)  # the lines are close together: one read
                return [block[start - low : start - low + length] for start, length in ordered]
            return [self.disk.pread(fd, length, start) for start, length in ordered]
        finally:
            self.disk.close(fd)

    def erasures(self, document_id: str, erase: list[Erasure]) -> list[tuple[str, int, int, bytes]]:
        """In the batch job's thread: how to erase the lines of these durable records (see JournalEntry.erased)."""
        by_section: dict[str, list[int]] = {}
        for section_id, offset in erase:
            by_section.setdefault(section_id, []).append(offset)
        found = []
        for section_id, offsets in by_section.items():
            key = SectionKey(document_id, section_id)
            found += [(section_id, *erasure) for erasure in self._erasures_in(key, sorted(offsets))]
        return found

    def _erasures_in(self, key: SectionKey, offsets: list[int]) -> list[tuple[int, int, bytes]]:
        """Erasures of one section's records. Where they are comes from the positions in memory and the
        kept state; each line found is checked to be the record at its offset, and if one is not (or
        the section is not loaded) the section file itself is parsed to find them."""
        path = self._section_path(key)
        section = self._loaded.get(key)
        found: list[tuple[int, int, bytes] | None] = [None]
        if section is not None:
            kept = section.kept
            base = kept.offset if kept else 0
            try:
                spans = {o: (section.starts[o - base - 1], section.lengths[o - base - 1]) for o in offsets if o > base}
                lines = self._read_spans(path, kept, [o for o in offsets if o <= base], spans)
                found = [_erasure(spans[o][0], line, o) for o, line in zip(sorted(spans), lines, strict=True)]
            except (WrongPositions, IndexError):
                found = [None]
        if None in found:
            starts, lengths = array("Q"), array("I")
            content = self.disk.read_at(path, -1, 0)
            _, records, _, _ = self._parse_section(key, content, starts, lengths)
            found = [
                _erasure(starts[o - 1], content[starts[o - 1] : starts[o - 1] + lengths[o - 1]], o)
                for o in offsets
                if o <= len(records)
            ]
            if None in found or len(found) < len(offsets):
                logger.error("cannot find every record to erase in %s; the deleted text stays there", path)
        return [erasure for erasure in found if erasure is not None]

    def erasures_by_path(
        self, document_id: str, erasures: list[tuple[str, int, int, bytes]]
    ) -> dict[Path, list[tuple[int, int, bytes]]]:
        by_path: dict[Path, list[tuple[int, int, bytes]]] = {}
        for section_id, at, length, data in erasures:
            path = self._section_path(SectionKey(document_id, section_id))
            by_path.setdefault(path, []).append((at, length, data))
        return by_path

    async def read_after(self, key: SectionKey, offset: int) -> SectionLog:
        content = await self._read(self.disk.read_at, self._section_path(key), -1, 0)
        epoch, records, _, _ = self._parse_section(key, content)
        return SectionLog(epoch, records[offset:])

    def _parse_section(
        self,
        key: SectionKey,
        content: bytes,
        starts: array[int] | None = None,
        lengths: array[int] | None = None,
        *,
        after: int = 0,
        at: int = 0,
        epoch: str | None = None,
    ) -> tuple[str | None, list[StoredRecord], int, int]:
        """The section's epoch and valid records, the size their lines span, and the size of a torn tail.

        `content` is the file from byte `at`, which follows the record at offset
        `after`. `starts` and `lengths` get where each record's line is.
        """
        path = self._section_path(key)
        end = content.rfind(b"\n") + 1
        records: list[StoredRecord] = []
        # Line by line with find, not one split of the whole file: every call is
        # short, so a big section never holds the GIL (and the event loop) for long.
        view, start, number = memoryview(content), 0, 0
        while start < end:
            stop = content.find(b"\n", start)
            line, number = view[start:stop], number + 1
            start, position = stop + 1, start
            try:
                item = _decode_line(line)
            except msgspec.MsgspecError:
                logger.warning("skipping unreadable line %d of %s", number, path)
                continue
            if isinstance(item, SectionHeader):
                if (item.document_id, item.section_id) != key:
                    raise StorageError(f"{path} belongs to another section")
                epoch = epoch or item.epoch
            elif item.offset != after + len(records) + 1:
                logger.warning("skipping line %d of %s: offset %d out of order", number, path, item.offset)
            else:
                records.append(item)
                if starts is not None and lengths is not None:
                    starts.append(at + position)
                    lengths.append(len(line))
        return epoch, records, at + end, len(content) - end

    def append(
        self, key: SectionKey, epoch: str, records: list[StoredRecord], erase: Sequence[Erasure] = ()
    ) -> asyncio.Future[None]:
        # Begun here and now, without a task of its own: the writer's hot path (see Storage.append).
        try:
            [item] = self._pending_appends([Part(key, epoch, records)], erase)
        except StorageError as error:
            refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            refused.set_exception(error)
            return refused
        self.journal.submit([item])
        return item.outcome

    async def append_parts(self, parts: list[Part], erase: Sequence[Erasure] = ()) -> None:
        items = self._pending_appends(parts, erase)
        # A group's outcomes are one outcome (gather retrieves every one); shielded: once
        # queued, the write happens whether or not the caller waits.
        self.journal.submit(items)
        await asyncio.shield(asyncio.gather(*(item.outcome for item in items)))

    def _pending_appends(self, parts: list[Part], erase: Sequence[Erasure]) -> list[PendingAppend]:
        """The journal's items for these parts, one group (or StorageError: nothing may be appended now)."""
        sections = [self._loaded.get(part.key) for part in parts]
        for part, section in zip(parts, sections, strict=True):
            if section is None:
                # Appending to a section that was not loaded would skip the checks
                # that load_section makes; the chat logic always loads first.
                raise StorageError("section is not loaded")
            if part.records[0].offset != section.next_offset:
                # Built on an append that failed after this one was decided.
                raise StorageError("an earlier write to this section failed; nothing was stored")
        if self.journal.broken is not None:
            self.journal.retry_now()  # the fault may have cleared: writes resume at the speed of traffic
            raise StorageError(f"storage is recovering ({self.journal.broken}); nothing was stored")
        loop = asyncio.get_running_loop()
        items = []
        for part, section in zip(parts, cast(list[LoadedSection], sections), strict=True):
            section.next_offset = part.records[-1].offset + 1
            section.epoch = part.epoch
            items.append(
                PendingAppend(
                    part.key,
                    part.epoch,
                    section,
                    [_encode(r) for r in part.records],
                    placed_sessions(part.records, part.key.section_id),
                    part.records[-1].offset,
                    loop.create_future(),
                    [],
                )
            )
        # One entry a part, in one group: the journal replays all of them or none.
        items[0].erase, items[0].group = list(erase), len(items) - 1
        return items

    # The session index ------------------------------------------------------

    def remember(self, row: TableRow) -> None:
        """Sessions just stored (in the order their lines are in the index)."""
        self._tail_rows.append(row)
        if not row.session_ids:
            return
        row.key = self._tail_sections.setdefault(row.key.document_id, {}).setdefault(
            row.key, row.key
        )  # one object per section
        for session_id in row.session_ids:
            self._tail[session_id] = row.key
        loaded = self._loaded.get(row.key)
        if loaded is not None:
            loaded.session_ids.extend(row.session_ids)
            self._loaded_sessions.update(dict.fromkeys(row.session_ids, row.key))
        if len(self._tail) >= self.fold_after and self._folder is None and not self.read_only:
            self._folder = asyncio.get_running_loop().create_task(self._fold())

    async def find_section(self, session_id: str) -> SectionKey | None:
        key = self._loaded_sessions.get(session_id) or self._tail.get(session_id)
        if key is not None:
            return key
        try:
            return await self._read(self.table.find, session_id)
        except DamagedTable as error:
            raise StorageError(str(error)) from None

    async def document_sections(self, document_id: str) -> list[SectionKey]:
        try:
            found = await self._read(self.table.sections, document_id)
        except DamagedTable as error:
            raise StorageError(str(error)) from None
        return found + [key for key in self._tail_sections.get(document_id, ()) if key not in found]

    async def _fold(self) -> None:
        """Move the tail of the index into the table (in a worker thread), so that a start reads only what follows."""
        try:
            while len(self._tail) >= self.fold_after and self.journal.broken is None and not self._closing.is_set():
                rows, end = [], self.table.covers
                for row in self._tail_rows:  # the part of the tail that continues the table without a gap
                    if row.start != end:
                        break
                    rows.append(row)
                    end = row.end
                if not rows:
                    return
                try:
                    await self._read(self.table.fold, rows)
                except (StorageError, DamagedTable) as error:
                    logger.warning(
                        "cannot fold the session index into %s (%s); trying again later", self.table.path.name, error
                    )
                    try:
                        async with asyncio.timeout(FOLD_RETRY_S):
                            await self._closing.wait()
                    except TimeoutError:
                        pass
                    continue
                del self._tail_rows[: len(rows)]
                for row in rows:
                    for session_id in row.session_ids:
                        self._tail.pop(session_id, None)
                self._tail_sections = {}
                for row in self._tail_rows:
                    if row.session_ids:
                        self._tail_sections.setdefault(row.key.document_id, {}).setdefault(row.key, row.key)
                logger.info(
                    "folded %d sessions into %s (%d in it)",
                    sum(len(r.session_ids) for r in rows),
                    self.table.path.name,
                    self.table.header.sessions,
                )
        finally:
            self._folder = None

    async def all_sections(self) -> list[SectionKey]:
        try:
            found = await self._read(self.table.all_sections)
        except DamagedTable as error:
            raise StorageError(str(error)) from None
        seen = set(found)
        return found + [key for keys in self._tail_sections.values() for key in keys if key not in seen]

    def _progress_path(self, name: str) -> Path:
        return self.root / PROGRESS_DIR / f"{_name(name)}.json"

    async def load_progress(self, name: str) -> dict[SectionKey, tuple[str, int]]:
        try:
            data = await self._read(self.disk.read_at, self._progress_path(name), -1, 0)
            entries = _decode_progress(data) if data else []
        except msgspec.MsgspecError:
            logger.warning("%s is unreadable: starting it afresh", self._progress_path(name))
            entries = []
        return {
            SectionKey(document_id, section_id): (epoch, offset) for document_id, section_id, epoch, offset in entries
        }

    async def save_progress(self, name: str, progress: dict[SectionKey, tuple[str, int]]) -> None:
        entries = [(*key, epoch, offset) for key, (epoch, offset) in progress.items()]
        path = self._progress_path(name)
        try:
            await aiofiles.os.wrap(self._write_progress)(path, _encode(entries))
        except OSError as error:
            raise StorageError(f"cannot save progress: {_error_text(error)}") from None

    def _write_progress(self, path: Path, data: bytes) -> None:
        sync_all(self.disk, set(), set(self.disk.makedirs(path.parent)))
        self.disk.write_atomically(path, data)

    async def lease(self, name: str, key: SectionKey, holder: str, ttl_s: float) -> bool:
        return True  # one process per data dir (its LOCK): nobody else delivers

    async def delete_document(self, document_id: str, keys: list[SectionKey], session_ids: list[str]) -> None:
        try:
            await self.journal.exclusive(partial(self._delete_document, document_id))
        except DeletionInDoubt as doubt:
            raise OutcomeUnknown(
                f"the deletion may be recorded ({_error_text(doubt.error)}); it completes when retried or at the next start"
            ) from None
        except OSError as error:
            raise StorageError(f"cannot delete the document: {_error_text(error)}; nothing was deleted") from None
        finally:
            for key in keys:
                await self.release(key)

    def _delete_document(self, document_id: str) -> None:
        """In the journal's worker thread, between batches: mark the document deleted durably, then remove it.

        A new segment first, so that every record of the document is in a
        segment up to `upto`; the marker makes replay skip them (and finish the
        removal) until those segments are checkpointed and deleted.
        """
        journal = self.journal
        journal._start_segment()  # a failure here changes nothing
        assert journal.current is not None
        upto = journal.current.number - 1
        marker = self.root / DELETED_DIR / f"{_name(document_id)}.json"
        try:
            sync_all(self.disk, set(), set(self.disk.makedirs(marker.parent)))
            self.disk.write_atomically(marker, _encode(DeletedDocument(document_id, upto)))
            self._deleted[document_id] = upto
            self._remove_document_files(document_id)
        except OSError as error:
            raise DeletionInDoubt(error) from None  # the marker may be durable: then the deletion is

    def _remove_document_files(self, document_id: str) -> None:
        directory = self._sections_dir / _name(document_id)
        if not directory.is_dir():
            return
        segments = [*self.journal.sealed, *([self.journal.current] if self.journal.current else [])]
        for path in sorted(directory.iterdir()):
            self.journal.descriptors.forget(path)
            self.disk.unlink(path)
            for segment in segments:  # nothing left there for a checkpoint to sync
                segment.touched.discard(path)
        self.disk.sync_path(directory)

    def forget_deletions(self, upto: int | None) -> None:
        """In a worker thread: the markers of deletions whose segments are all gone (None: every one)."""
        forgotten = False
        for document_id, last in list(self._deleted.items()):
            if upto is None or last <= upto:
                try:
                    self.disk.unlink(self.root / DELETED_DIR / f"{_name(document_id)}.json")
                except FileNotFoundError:
                    pass
                del self._deleted[document_id]
                forgotten = True
        if forgotten:
            self.disk.sync_path(self.root / DELETED_DIR)

    async def release(self, key: SectionKey) -> None:
        loaded = self._loaded.pop(key, None)
        if loaded is not None:
            for session_id in loaded.session_ids:
                self._loaded_sessions.pop(session_id, None)


@dataclass(eq=False)
class PlannedWrite:
    """What a rebuild writes to one file: `chunks`, from `start` to `end`."""

    start: int
    end: int
    chunks: list[bytes]


def _plan_write(writes: dict[Path, PlannedWrite], path: Path, at: int, data: bytes) -> None:
    planned = writes.get(path)
    if planned is None:
        writes[path] = PlannedWrite(at, at + len(data), [data])
        return
    if at != planned.end:
        raise OSError(f"the journal puts bytes at {at} of {path}, expected {planned.end}")
    planned.chunks.append(data)
    planned.end += len(data)


def _write_from(disk: Disk, path: Path, at: int | None, data: bytes, *, sync: bool = False) -> None:
    """Write `data` into `path` from position `at` (None: its end), cutting off what lies beyond.

    A file shorter than `at` lost what it was known to hold: that is an error, never padded over.
    """
    fd = disk.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        if at is not None:
            size = disk.size(fd)
            if size < at:
                raise OSError(f"{path} ends at {size} but the journal continues it at {at}: data was lost")
            if size > at:
                disk.ftruncate(fd, at)  # O_APPEND: the write goes to the new end
        disk.write(fd, data)
        if sync:
            disk.fsync(fd)
    finally:
        disk.close(fd)
