# The session table: where each session is, found on disk instead of held in memory.
#
# `sessions.idx` gets one line per new session (derived from the journal, see
# file.py). Reading it whole at start would make start time and memory grow with
# every session ever created, so from time to time the lines written since the
# last time (the *tail*, the only part kept in memory) are folded into
# `sessions.tbl`: an immutable file of sorted lines, searched by binary search
# with pread, never read whole.
#
#   line 1                  "<crc32> " + TableHeader as JSON
#   "<session id>"\t["<document id>","<section id>"]         one per session
#   #"<document id>" <ordinal>\t"<section id>"               one per section
#
# Keys are the bytes before the first tab. Ids appear JSON-encoded, so a key
# never holds a raw tab or newline and no key is a prefix of another: sorting
# whole lines sorts by key, and a document's section lines are contiguous,
# ordered by their ordinal (where the section's first session is in the index),
# which is first-use order.
#
# The table is rewritten whole by each fold (a merge of the old one and the
# tail, streamed, never held in memory), atomically: a new file, fsynced,
# renamed over the old, the directory fsynced. It covers the index up to
# `covers`; a start reads only the index after that. It is derived data: a
# table that is missing, torn, or claims more of the index than there is, is
# dropped and the index is read whole (and folded again).

from __future__ import annotations

import heapq
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from .base import SectionKey
from .disk import Disk

TABLE_NAME = "sessions.tbl"
SEARCH_SPAN = 4096  # binary search narrows down to this much, then scans it
READ_BYTES = 64 * 1024  # reads while scanning and merging
HEADER_BYTES = 256


class TableHeader(msgspec.Struct):
    covers: int  # the table holds every session of sessions.idx before this byte
    sessions: int
    size: int  # the table file's size: a shorter file is torn


class TableRow(msgspec.Struct, array_like=True, gc=False):
    """Sessions one append added to the index, and where its lines are there."""

    start: int
    end: int
    session_ids: list[str]
    key: SectionKey


_encode = msgspec.json.Encoder().encode
_decode_header = msgspec.json.Decoder(TableHeader).decode
_decode_location = msgspec.json.Decoder(tuple[str, str]).decode
_decode_id = msgspec.json.Decoder(str).decode


class DamagedTable(Exception):
    """The table does not read back as it was written."""


def session_line(session_id: str, key: SectionKey) -> bytes:
    return _encode(session_id) + b"\t" + _encode(tuple(key)) + b"\n"


def _sections_prefix(document_id: str) -> bytes:
    return b"#" + _encode(document_id) + b" "


def section_line(key: SectionKey, ordinal: int) -> bytes:
    return _sections_prefix(key.document_id) + b"%016d\t" % ordinal + _encode(key.section_id) + b"\n"


class SessionTable:
    """Lookups in `sessions.tbl` and folds into it; blocking, run in the storage's worker threads.

    Each lookup reads the header through the descriptor it searches with, so a
    fold renaming a new table into place meanwhile never mixes the two files.
    """

    def __init__(self, disk: Disk, directory: Path):
        self.disk = disk
        self.path = directory / TABLE_NAME
        self.header = TableHeader(0, 0, 0)

    @property
    def covers(self) -> int:
        return self.header.covers

    def open(self, index_size: int) -> bool:
        """Read the header; False (and nothing in the table) if there is none usable with an index of `index_size` bytes."""
        self.header = TableHeader(0, 0, 0)
        view = self._open_view()
        if view is None:
            return False
        fd, header, _ = view
        self.disk.close(fd)
        if header.covers > index_size:
            return False
        self.header = header
        return True

    def _open_view(self) -> tuple[int, TableHeader, int] | None:
        """A descriptor of the table, its header and where its body starts; None if there is no usable table."""
        try:
            fd = self.disk.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            first = self.disk.pread(fd, HEADER_BYTES, 0)
            size = self.disk.size(fd)
            end = first.find(b"\n")
            if end < 10 or int(first[:8], 16) != zlib.crc32(first[9:end]):
                raise ValueError
            header = _decode_header(first[9:end])
            if header.size != size:
                raise ValueError
        except (ValueError, msgspec.MsgspecError):
            self.disk.close(fd)
            return None
        except BaseException:
            self.disk.close(fd)
            raise
        return fd, header, end + 1

    # Lookups ---------------------------------------------------------------

    def find(self, session_id: str) -> SectionKey | None:
        target = _encode(session_id)
        for line in self._lines_from(target):
            key, _, location = line.partition(b"\t")
            if key != target:
                return None
            try:
                return SectionKey(*_decode_location(location))
            except msgspec.MsgspecError:
                raise DamagedTable(f"unreadable line for session {session_id!r} in {self.path}") from None
        return None

    def sections(self, document_id: str) -> list[SectionKey]:
        """The document's sections in the table, in first-use order."""
        prefix = _sections_prefix(document_id)
        found = []
        for line in self._lines_from(prefix):
            if not line.startswith(prefix):
                break
            try:
                found.append(SectionKey(document_id, _decode_id(line.partition(b"\t")[2])))
            except msgspec.MsgspecError:
                raise DamagedTable(f"unreadable section line for document {document_id!r} in {self.path}") from None
        return found

    def all_sections(self) -> list[SectionKey]:
        """Every section in the table (its section lines come last: '#' sorts after '"')."""
        found = []
        for line in self._lines_from(b"#"):
            head, _, section_id = line.partition(b"\t")
            try:
                found.append(SectionKey(_decode_id(head[1 : head.rindex(b" ")]), _decode_id(section_id)))
            except (ValueError, msgspec.MsgspecError):
                raise DamagedTable(f"unreadable section line in {self.path}") from None
        return found

    def _lines_from(self, target: bytes) -> Iterator[bytes]:
        """The table's lines from the first whose key is not below `target` (each without its newline)."""
        view = self._open_view() if self.header.sessions else None
        if view is None:
            return
        fd, header, body = view
        try:
            # Every line before `low` has a smaller key; the first line whose
            # key is not smaller starts before `high`.
            low, high = body, header.size
            while high - low > SEARCH_SPAN:
                middle = (low + high) // 2
                start, line = self._line_at_or_after(fd, middle, header.size)
                if start < high and line.partition(b"\t")[0] < target:
                    low = start
                else:
                    high = middle
            for line in self._scan(fd, low, header.size):
                if line.partition(b"\t")[0] >= target:
                    yield line
        finally:
            self.disk.close(fd)

    def _line_at_or_after(self, fd: int, position: int, size: int) -> tuple[int, bytes]:
        """The first whole line starting at or after `position` (past the body's start), and where it starts."""
        want = 4096
        while True:
            block = self.disk.pread(fd, want, position - 1)
            newline = block.find(b"\n")
            end = block.find(b"\n", newline + 1) if newline >= 0 else -1
            if end >= 0:
                return position + newline, block[newline + 1 : end]
            if position - 1 + len(block) >= size:
                return size, b""
            want *= 2

    def _scan(self, fd: int, position: int, end: int) -> Iterator[bytes]:
        """Every line from `position` (a line's start) to `end`, read a block at a time (the first one small)."""
        rest, want = b"", 2 * SEARCH_SPAN
        while position < end:
            block = self.disk.pread(fd, min(want, end - position), position)
            want = READ_BYTES
            if not block:
                raise DamagedTable(f"{self.path} ends before {end}")
            position += len(block)
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            raise DamagedTable(f"{self.path} does not end with a newline")

    # Folding -------------------------------------------------------------------

    def fold(self, rows: list[TableRow]) -> None:
        """Write a new table: the old one's lines and these rows' (which continue the index from `covers`)."""
        new_sessions = sorted(session_line(sid, row.key) for row in rows for sid in row.session_ids)
        known: set[SectionKey] = set()
        new_sections = []
        for row in rows:
            if row.session_ids and row.key not in known:
                known.add(row.key)
                if row.key not in self.sections(row.key.document_id):
                    new_sections.append(section_line(row.key, row.start))
        new_sections.sort()
        view = self._open_view() if self.header.sessions else None
        try:
            old: Iterable[bytes] = ()
            old_bytes = 0
            if view is not None:
                fd, old_header, body = view
                old = (line + b"\n" for line in self._scan(fd, body, old_header.size))
                old_bytes = old_header.size - body
            size = HEADER_BYTES + old_bytes + sum(map(len, new_sessions)) + sum(map(len, new_sections))
            header = TableHeader(rows[-1].end, self.header.sessions + len(new_sessions), size)
            self.disk.write_atomically(
                self.path, _chunks(_header_line(header), heapq.merge(old, new_sessions, new_sections))
            )
        finally:
            if view is not None:
                self.disk.close(view[0])
        if not self.open(header.covers):
            raise DamagedTable(f"{self.path} does not read back as written")


def _header_line(header: TableHeader) -> bytes:
    """The header, padded to HEADER_BYTES: its size is part of it, and must not change it."""
    payload = _encode(header).ljust(HEADER_BYTES - 10)
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _chunks(first: bytes, lines: Iterable[bytes]) -> Iterator[bytes]:
    chunk, size = [first], len(first)
    for line in lines:
        chunk.append(line)
        size += len(line)
        if size >= READ_BYTES:
            yield b"".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield b"".join(chunk)
