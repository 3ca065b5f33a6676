# The storage interface: what the chat logic asks of a backend, and nothing more.
#
# A section's stored history is an ordered list of records, numbered by
# `offset` 1, 2, 3… with no gaps. Backends keep that list durably, plus the
# index that finds a session's section. `append` returns only once the records
# are durable; when it raises, none of them will ever be read back.

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import NamedTuple, Protocol, Union

from msgspec import Struct
from msgspec.structs import replace

from protocol.messages import Message, Session


class SectionKey(NamedTuple):
    document_id: str
    section_id: str


class Record(Struct, tag_field="kind", kw_only=True, omit_defaults=True, gc=False):  # never in a cycle
    offset: int


class SessionCreatedRecord(Record, tag="session_created"):
    session: Session
    idempotency_key: str | None = None


class MessageRecord(Record, tag="message"):
    message: Message


class SessionClosedRecord(Record, tag="session_closed"):
    session: Session


# Revision 1.1. A record that changes a message carries the whole message as it is
# after the change, so the latest record of a message is all a read needs.


class MessageEditedRecord(Record, tag="message_edited"):
    message: Message
    mentioned: list[str] = []  # users this version mentions and the one before did not (they are notified)


class MessageDeletedRecord(Record, tag="message_deleted"):
    message: Message  # the tombstone


class ReactionRecord(Record, tag="reaction"):
    message: Message
    reaction: str
    user: str
    on: bool
    at: str


class SessionUpdatedRecord(Record, tag="session_updated"):
    session: Session


class SessionReopenedRecord(Record, tag="session_reopened"):
    session: Session


class SessionMovedRecord(Record, tag="session_moved"):
    """A session moving between two sections of a document: stored in both streams, in one atomic write.

    In the target's stream it carries the session's state as the core holds it
    (`state`, see core.SessionState), so that the target never reads the
    source to take the session over; in the source's stream `state` is empty.
    The session's earlier records stay where they were stored.
    """

    session: Session  # as it is after the move
    from_section_id: str
    to_section_id: str
    state: bytes = b""


class ReadRecord(Record, tag="read"):
    """A user's read marker in a session: stored in the section's read stream (see `reads_key`), not its events."""

    session_id: str
    user: str
    seq: int


StoredRecord = Union[
    SessionCreatedRecord,
    MessageRecord,
    SessionClosedRecord,
    MessageEditedRecord,
    MessageDeletedRecord,
    ReactionRecord,
    SessionUpdatedRecord,
    SessionReopenedRecord,
    ReadRecord,
    SessionMovedRecord,
]


class Part(NamedTuple):
    """One section's records in a write that spans sections (a move): stored all together or not at all."""

    key: SectionKey
    epoch: str
    records: list[StoredRecord]


# An earlier record to store erased (see `erased`): the section of the document it is in, and its offset.
Erasure = tuple[str, int]


def session_id_of(record: StoredRecord) -> str:
    """The session a record belongs to."""
    if isinstance(
        record,
        (SessionCreatedRecord, SessionClosedRecord, SessionUpdatedRecord, SessionReopenedRecord, SessionMovedRecord),
    ):
        return record.session.session_id
    if isinstance(record, ReadRecord):
        return record.session_id
    return record.message.session_id


def erased(record: StoredRecord) -> StoredRecord:
    """The record as storage keeps it once its message is deleted: no text, mentions or reactions.

    Its encoding is never longer than the original's (the file backend erases in place).
    """
    if isinstance(record, MessageEditedRecord):
        return replace(record, message=replace(record.message, text="", mentions=[], reactions={}), mentioned=[])
    if isinstance(record, MessageRecord | ReactionRecord):
        return replace(record, message=replace(record.message, text="", mentions=[], reactions={}))
    return record


def erase_deleted(records: list[StoredRecord]) -> list[StoredRecord]:
    """These records with the text of each message that a later one of them deletes erased."""
    deleted = {(r.message.session_id, r.message.seq) for r in records if isinstance(r, MessageDeletedRecord)}
    if not deleted:
        return records
    return [
        erased(r)
        if isinstance(r, MessageRecord | MessageEditedRecord | ReactionRecord)
        and (r.message.session_id, r.message.seq) in deleted
        else r
        for r in records
    ]


def placed_sessions(records: list[StoredRecord], section_id: str) -> list[str]:
    """The sessions these records place in their section: what each backend's session index learns of them."""
    return [
        record.session.session_id
        for record in records
        if isinstance(record, SessionCreatedRecord)
        or (isinstance(record, SessionMovedRecord) and record.to_section_id == section_id)
    ]


# A section's read markers are a record stream of their own, stored like a section's
# under a key no client can name (ids may not hold control characters): durable
# before `read_marked` like every write, and never among the section's events.
_READS = "\x00reads\x00"


def reads_key(key: SectionKey) -> SectionKey:
    """Where the read markers of a section's sessions are stored."""
    return SectionKey(key.document_id, _READS + key.section_id)


def section_of_reads(key: SectionKey) -> SectionKey | None:
    """The section whose read markers `key` stores, if it is a `reads_key`."""
    if not key.section_id.startswith(_READS):
        return None
    return SectionKey(key.document_id, key.section_id.removeprefix(_READS))


class SectionState(NamedTuple):
    """What the chat logic made of a section's records up to `offset`, encoded by it; opaque to storage."""

    offset: int
    data: bytes


class SectionLog(NamedTuple):
    """A section as loaded from storage: its epoch (None if nothing was ever stored) and records.

    With a `state` (one saved by `release`), `records` are those after its offset.
    """

    epoch: str | None
    records: list[StoredRecord]
    state: SectionState | None = None


class StorageError(Exception):
    """Storage could not do what was asked; nothing of the request was stored."""


class OutcomeUnknown(StorageError):
    """Storage failed mid-write and could not find out in time whether the write landed.

    Never reported to a client as a refusal: the write may be stored. The
    client learns the outcome by retrying with its idempotency key or client_msg_id.
    """


class StaleSection(Exception):
    """Another process stored records in the section first; catch up and decide again."""


class Storage(Protocol):
    # True when other processes may append to the same sections (then `append`
    # may raise StaleSection and other nodes' events arrive through a Cluster).
    shared: bool
    # True when a section's next append may start before the previous one is
    # durable: appends are stored in the order they were made, and once one
    # fails every later one to that section fails too.
    pipelined: bool

    async def open(self) -> None:
        """Check the backend is usable and load what must be in memory; raise StorageError if not."""

    async def close(self) -> None: ...

    async def check(self) -> None:
        """Raise StorageError unless storage can take a write right now (for health checks)."""

    async def load_section(self, key: SectionKey) -> SectionLog: ...

    async def read_after(self, key: SectionKey, offset: int) -> SectionLog:
        """The section's epoch and its records after `offset`, in order."""

    async def read_records(self, key: SectionKey, offsets: list[int]) -> list[StoredRecord]:
        """The records at these offsets of a loaded section (a page: reads what it returns, not the section)."""

    def append(
        self, key: SectionKey, epoch: str, records: list[StoredRecord], erase: Sequence[Erasure] = ()
    ) -> Awaitable[None]:
        """Store records durably right after offset `records[0].offset - 1`.

        A coroutine, or a future when the backend can begin the append at once
        (file storage: the writer's hot path then needs no task per append);
        either way, once begun the append is carried out whether or not anybody
        still waits for it.

        `epoch` names a new section's stream. `erase`: earlier records (or
        these) of the document that are stored `erased` from now on, in the
        same atomic step (a delete: the deleted text leaves storage with it).
        Raises StaleSection if the section has moved past that offset,
        StorageError if nothing could be stored.
        """

    async def append_parts(self, parts: list[Part], erase: Sequence[Erasure] = ()) -> None:
        """Append to sections of one document atomically: after a crash, every part is stored or none is.

        Each part as `append` (the first part's document is the one `erase` names).
        """

    async def find_section(self, session_id: str) -> SectionKey | None: ...

    async def document_sections(self, document_id: str) -> list[SectionKey]:
        """The sections of a document that hold at least one session, oldest first."""

    async def all_sections(self) -> list[SectionKey]:
        """Every section that has ever held a session (each once)."""

    async def load_progress(self, name: str) -> dict[SectionKey, tuple[str, int]]:
        """What a consumer of the stored events (a webhook) last saved: each section's epoch and offset done."""

    async def save_progress(self, name: str, progress: dict[SectionKey, tuple[str, int]]) -> None:
        """Replace the consumer's progress durably (StorageError if it could not be saved)."""

    async def lease(self, name: str, key: SectionKey, holder: str, ttl_s: float) -> bool:
        """Take or renew the consumer's lease on the section for `holder`; False while another holds it."""

    async def delete_document(self, document_id: str, keys: list[SectionKey], session_ids: list[str]) -> None:
        """Remove every record of these sections (all of the document's, read streams included) durably.

        Their next load finds nothing (a new stream, a new epoch). Text leaves the
        storage at once or, on files, when the journal segments that held it are
        checkpointed (within about a second). Running it again changes nothing.
        """

    async def keep_state(self, key: SectionKey, state: SectionState) -> None:
        """Keep the chat logic's state of a loaded section (of durable records only), for its next load.

        That load then returns the state and only the records after it. An
        optimisation: a backend may ignore it, and it never fails.
        """

    async def release(self, key: SectionKey) -> None:
        """The chat logic no longer holds this section in memory: drop what is cached for it."""
