# File storage: append-only JSON-lines logs under the data dir, with aiofiles.
#
# Layout (ids are data, never paths: file names are hashes of them):
#   LOCK                          flock'ed while a server uses the dir
#   sessions.idx                  one line per session: [session_id, document_id, section_id]
#   sections/<h(doc)>/<h(sec)>.log  a header line, then one record per line
#
# Rules kept here:
# - `append` returns only after the bytes are written and fsynced (and, for a
#   new file, its directory too). Concurrent appends to one file share a write
#   and an fsync (group commit).
# - A failed write or fsync leaves the file as it was before the batch: the
#   descriptor is dropped (an fsync error is never retried on it) and the file
#   is truncated back to its last durable size before the next append.
# - A torn or garbage tail found when loading is cut off with a warning.
# - A session's index line is durable before its section record, so every
#   stored session can be found; an index line whose record never landed only
#   points at a section that does not have that session.

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
MAX_OPEN_FILES = 256


class SectionHeader(msgspec.Struct, tag_field="kind", tag="section"):
    epoch: str
    document_id: str
    section_id: str


_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(Union[SectionHeader, StoredRecord]).decode
_decode_index_line = msgspec.json.Decoder(tuple[str, str, str]).decode


def _name(identifier: str) -> str:
    return hashlib.blake2b(identifier.encode(), digest_size=16).hexdigest()


def _write_all_and_sync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    # fdatasync still flushes the new size (needed to read the data back), only
    # not the timestamps.
    os.fdatasync(fd)


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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


# One thread hop per durable write instead of three (write, flush, fsync).
write_all_and_sync = aiofiles.os.wrap(_write_all_and_sync)
sync_directory = aiofiles.os.wrap(_sync_directory)
truncate_and_sync = aiofiles.os.wrap(_truncate_and_sync)


class AppendFile:
    """An append-only file whose appends are durable when they return."""

    def __init__(self, path: Path, size: int, *, has_header: bool = True, metrics: Metrics | None = None):
        self.path = path
        self.metrics = metrics
        self.durable_size = size
        self.has_header = has_header
        self._file = None
        self._damaged = False
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def append(self, data: bytes) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((data, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        # Shielded: once queued, the bytes are written whether or not the
        # caller is still there, and the outcome is reported to the others.
        await asyncio.shield(future)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                started = time.perf_counter()
                try:
                    await self._write(b"".join(data for data, _ in batch))
                except OSError as error:
                    failure = StorageError(f"cannot write {self.path.name}: {error.strerror or error}")
                    for _, future in batch:
                        future.set_exception(failure)
                else:
                    for _, future in batch:
                        future.set_result(None)
                    if self.metrics is not None:
                        self.metrics.storage_write_seconds.observe(time.perf_counter() - started)
                        self.metrics.fsync_batch_size.observe(len(batch))
        finally:
            self._flusher = None

    async def _write(self, data: bytes) -> None:
        if self._damaged:
            await truncate_and_sync(self.path, self.durable_size)
            self._damaged = False
        created = self._file is None and not await aiofiles.os.path.exists(self.path)
        if self._file is None:
            self._file = await aiofiles.open(self.path, "ab", buffering=0)
        try:
            await write_all_and_sync(self._file.fileno(), data)
            if created:
                await sync_directory(self.path.parent)
        except OSError:
            # After a failed fsync the kernel may have dropped the dirty pages
            # and cleared the error: never trust this descriptor again.
            self._damaged = True
            await self._drop_descriptor()
            raise
        self.durable_size += len(data)

    @property
    def is_open(self) -> bool:
        return self._file is not None

    async def close(self) -> None:
        """Close the descriptor once queued appends are done; the next append reopens it."""
        while self._flusher is not None:
            await asyncio.wait([self._flusher])
        await self._drop_descriptor()

    async def _drop_descriptor(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                await file.close()
            except OSError:
                pass


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

    def __init__(self, data_dir: str | os.PathLike[str], metrics: Metrics | None = None, *, read_only: bool = False):
        self.root = Path(data_dir)
        self.metrics = metrics
        # Read-only (export): no lock, no repairs, so it can read beside a running server.
        self.read_only = read_only
        self._sections_dir = self.root / "sections"
        self._lock_fd: int | None = None
        self._index: AppendFile | None = None
        self._session_sections: dict[str, SectionKey] = {}
        self._document_sections: dict[str, dict[SectionKey, None]] = {}
        self._files: OrderedDict[SectionKey, AppendFile] = OrderedDict()

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
        await self._probe_writable()
        await self._load_index()

    async def check(self) -> None:
        """Raise StorageError unless a file can be written and synced in the data dir now."""
        await self._probe_writable()

    async def _probe_writable(self) -> None:
        probe = self.root / f".probe-{os.getpid()}"
        try:
            async with aiofiles.open(probe, "wb") as file:
                await write_all_and_sync(file.fileno(), b"ok")
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
        self._index = AppendFile(path, size, metrics=self.metrics)

    async def close(self) -> None:
        for file in self._files.values():
            await file.close()
        self._files.clear()
        if self._index is not None:
            await self._index.close()
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
        self._files[key] = AppendFile(path, size, has_header=epoch is not None, metrics=self.metrics)
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
        file = self._files.get(key)
        if file is None:
            # Appending to a section that was not loaded would skip the checks
            # that load_section makes; the chat logic always loads first.
            raise StorageError("section is not loaded")
        self._files.move_to_end(key)
        created = [r.session for r in records if isinstance(r, SessionCreatedRecord)]
        if created:
            await self._index_sessions(key, [s.session_id for s in created])
        lines = [_encode(record) + b"\n" for record in records]
        if not file.has_header:
            await self._make_directory(file.path.parent)
            lines.insert(0, _encode(SectionHeader(epoch, *key)) + b"\n")
        await file.append(b"".join(lines))
        file.has_header = True

    async def _make_directory(self, path: Path) -> None:
        if await aiofiles.os.path.isdir(path):
            return
        try:
            await aiofiles.os.makedirs(path, exist_ok=True)
            await sync_directory(path.parent)
        except OSError as error:
            raise StorageError(f"cannot create {path.name}: {error.strerror or error}") from None

    async def _index_sessions(self, key: SectionKey, session_ids: list[str]) -> None:
        assert self._index is not None, "storage is not open"
        await self._index.append(b"".join(_encode((sid, *key)) + b"\n" for sid in session_ids))
        for session_id in session_ids:
            self._remember_session(session_id, key)

    def _remember_session(self, session_id: str, key: SectionKey) -> None:
        self._session_sections[session_id] = key
        self._document_sections.setdefault(key.document_id, {})[key] = None

    async def find_section(self, session_id: str) -> SectionKey | None:
        return self._session_sections.get(session_id)

    async def document_sections(self, document_id: str) -> list[SectionKey]:
        return list(self._document_sections.get(document_id, ()))

    async def release(self, key: SectionKey) -> None:
        file = self._files.pop(key, None)
        if file is not None:
            await file.close()

    async def _close_least_used_files(self) -> None:
        # Keeps descriptors bounded; a closed AppendFile reopens on its next append.
        for file in list(self._files.values())[: max(0, len(self._files) - MAX_OPEN_FILES)]:
            if file.is_open:
                await file.close()
