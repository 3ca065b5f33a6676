# Export a document's sections as JSON lines, and import them back.
#
# The format is the stored records themselves, each section introduced by a
# header line:
#   {"kind":"sectionchat-export","version":1,"document_id":"spec-7"}
#   {"kind":"section","document_id":"spec-7","section_id":"intro","epoch":"4813dbd9e70cd8a9"}
#   {"kind":"session_created","offset":1,"session":{...},"idempotency_key":"k1"}
#   {"kind":"message","offset":2,"message":{...}}
#   {"kind":"session_closed","offset":3,"session":{...}}
#
# A section's read markers follow it as a section of their own, whose id is the
# section's prefixed with "\u0000reads\u0000" (server/storage/base.py, reads_key).
#
# Import is idempotent: a session that already exists is skipped with its
# messages (and changes), a read marker that exists is skipped. Into an empty store, sections keep their offsets and epochs, so
# clients can go on recovering across a migration (files -> Redis, say).

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import IO, Union

import msgspec
from tqdm import tqdm

from .core import Stream
from .storage.base import (
    ReadRecord,
    SectionKey,
    SectionState,
    Storage,
    StoredRecord,
    erase_deleted,
    placed_sessions,
    reads_key,
    session_id_of,
)

FORMAT = "sectionchat-export"
VERSION = 1
BATCH = 500


class ExportHeader(msgspec.Struct, tag_field="kind", tag=FORMAT):
    version: int
    document_id: str


class SectionStart(msgspec.Struct, tag_field="kind", tag="section"):
    document_id: str
    section_id: str
    epoch: str | None


Line = Union[ExportHeader, SectionStart, StoredRecord]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Line).decode


class TransferError(Exception):
    """The export file cannot be imported; the message names the line."""


async def export_document(storage: Storage, document_id: str, out: IO[bytes], *, progress: bool = True) -> int:
    """Write the document's sections to `out`; return how many records were written."""
    out.write(_encode(ExportHeader(VERSION, document_id)) + b"\n")
    written = 0
    with tqdm(desc=f"exporting {document_id}", unit=" records", disable=None if progress else True) as bar:
        for section in await storage.document_sections(document_id):
            for key in (section, reads_key(section)):
                log = await storage.read_after(key, 0)
                if key != section and not log.records:
                    continue  # nobody marked anything read there
                out.write(_encode(SectionStart(key.document_id, key.section_id, log.epoch)) + b"\n")
                for record in erase_deleted(log.records):  # data stored before deletes erased text
                    out.write(_encode(record) + b"\n")
                written += len(log.records)
                bar.update(len(log.records))
    return written


def _identity(record: StoredRecord) -> object:
    """What makes a record one already imported: its session; a read marker, itself."""
    if isinstance(record, ReadRecord):
        return (record.session_id, record.user, record.seq)
    return session_id_of(record)


def _present(existing: list[StoredRecord], section_id: str) -> set[object]:
    return {_identity(r) for r in existing if isinstance(r, ReadRecord)} | set(placed_sessions(existing, section_id))


def _sections(lines: Iterable[bytes]) -> Iterator[tuple[SectionStart, list[StoredRecord]]]:
    header_seen = False
    current: tuple[SectionStart, list[StoredRecord]] | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = _decode(line)
        except msgspec.MsgspecError as error:
            raise TransferError(f"line {number}: {error}") from None
        if isinstance(item, ExportHeader):
            if item.version != VERSION:
                raise TransferError(f"line {number}: export format version {item.version} is not supported")
            header_seen = True
        elif not header_seen:
            raise TransferError(f"line {number}: not a sectionchat export (no header line)")
        elif isinstance(item, SectionStart):
            if current is not None:
                yield current
            current = (item, [])
        elif current is None:
            raise TransferError(f"line {number}: a record before any section line")
        else:
            current[1].append(item)
    if current is not None:
        yield current


async def import_lines(storage: Storage, lines: Iterable[bytes], *, progress: bool = True) -> tuple[int, int]:
    """Import an export; return (records imported, records skipped as already present)."""
    imported = skipped = 0
    with tqdm(desc="importing", unit=" records", disable=None if progress else True) as bar:
        for start, records in _sections(lines):
            key = SectionKey(start.document_id, start.section_id)
            loaded = await storage.load_section(key)
            existing = loaded.records if loaded.state is None else (await storage.read_after(key, 0)).records
            present = _present(existing, key.section_id)
            epoch = loaded.epoch or start.epoch or "imported"
            offset = len(existing)
            fresh: list[StoredRecord] = []
            for record in erase_deleted(records):
                if _identity(record) in present:
                    skipped += 1
                    continue
                offset += 1
                fresh.append(msgspec.structs.replace(record, offset=offset))
            for begin in range(0, len(fresh), BATCH):
                batch = fresh[begin : begin + BATCH]
                await storage.append(key, epoch, batch)
                imported += len(batch)
                bar.update(len(batch))
            if fresh:
                # So that the server's first load of the section does not replay every record.
                stream = Stream(key, recovery_window=0)
                for record in itertools.chain(existing, fresh):
                    stream.apply(record)
                await storage.keep_state(key, SectionState(stream.offset, stream.snapshot()))
            await storage.release(key)
    return imported, skipped
