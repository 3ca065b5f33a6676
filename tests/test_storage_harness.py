"""The file storage under injected faults and power cuts, the way SQLite tests itself.

A workload of concurrent session creates and messages in three sections runs
through the chat logic (no sockets) on a SimulatedDisk (tests/faultdisk.py),
which every file call of the storage goes through:

(a) the Nth call fails, for every N the workload makes (opening the storage
    included), with EIO and with ENOSPC, once and persistently; the storage
    must recover by itself once the fault clears, then close and reopen;
(b) the power is cut after every prefix of the calls: the data dir keeps only
    what was synced, or that plus a random subset of the unsynced writes;
(c) the power is cut again during, and right after, the recovery from (b).

After every case the data dir is opened with a plain Disk and checked
(`check`): every acknowledged session and message is there exactly once,
nothing refused is, a write whose outcome was reported unknown is there at
most once, seqs and offsets are gapless, every event a subscriber saw live is
stored at its offset under the epoch it saw (no offset reused), and the
storage accepts writes.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from faultdisk import SimulatedDisk
from test_chat import CollectingPeer

from protocol.messages import (
    CreateSession,
    DeleteMessage,
    EditMessage,
    MarkRead,
    Message,
    MoveSessions,
    SendMessage,
    Session,
    Subscribe,
)
from server.chat import Chat
from server.core import Stream, event_of
from server.storage.base import (
    MessageDeletedRecord,
    MessageEditedRecord,
    MessageRecord,
    OutcomeUnknown,
    SectionKey,
    SectionLog,
    SessionCreatedRecord,
    StorageError,
    reads_key,
)
from server.storage.disk import Disk
from server.storage.file import FileStorage, _decode_line

SECTIONS = [SectionKey("doc", f"s{n}") for n in range(3)]
CLIENTS_PER_SECTION = 2
MESSAGES_PER_CLIENT = 4
SEGMENT_SIZES = (2048, 1 << 20)
SCRATCH = Path("/dev/shm") if os.path.isdir("/dev/shm") else None  # fsync is free there; the model decides durability


class Peer(CollectingPeer):
    """A peer whose replies are found by request id."""

    def reply_to(self, request_id: int) -> dict | None:
        return next((f for f in reversed(self.frames) if f.get("reply_to") == request_id), None)


@dataclass
class Outcomes:
    """What clients were told: by title (sessions) and client_msg_id (messages)."""

    sessions: dict[str, str] = field(default_factory=dict)  # title -> "acked" | "refused" | "unknown"
    session_ids: dict[str, str] = field(default_factory=dict)  # title -> id, when acked
    messages: dict[str, str] = field(default_factory=dict)
    acked_messages: dict[str, dict] = field(default_factory=dict)
    edits: dict[str, str] = field(default_factory=dict)  # title -> outcome of its edit of message 1
    acked_edits: dict[str, dict] = field(default_factory=dict)
    deletes: dict[str, str] = field(default_factory=dict)  # client_msg_id -> outcome of its message's delete
    events: dict[SectionKey, dict[int, dict]] = field(default_factory=dict)  # live events by offset
    epochs: dict[SectionKey, str] = field(default_factory=dict)


def _outcome(peer: Peer, request_id: int) -> tuple[str, dict | None]:
    frame = peer.reply_to(request_id)
    if frame is None:
        assert peer.closed == 1011, "a write got neither a reply nor a 1011"
        return "unknown", None
    if frame["type"] == "error":
        assert frame["code"] == "unavailable", frame
        return "refused", None
    return "acked", frame


async def workload(storage: FileStorage, outcomes: Outcomes, tag: str) -> None:
    chat = Chat(storage, sessions_per_minute=0)
    chat.sections.keep_state_after = 1  # every section's state is kept at the end (chat.close), under the same faults
    watchers: dict[SectionKey, Peer] = {}
    for key in SECTIONS:
        watcher = Peer(f"watch-{key.section_id}")
        await chat.handle(watcher, Subscribe(id=0, document_id=key.document_id, section_id=key.section_id))
        reply = watcher.reply_to(0)
        if reply is not None and reply["type"] == "subscribed":
            watchers[key] = watcher
            assert outcomes.epochs.setdefault(key, reply["epoch"]) == reply["epoch"] or not outcomes.events.get(key)
            outcomes.epochs[key] = reply["epoch"]

    async def client(key: SectionKey, n: int) -> None:
        peer = Peer(f"{tag}-u{n}")
        title = f"{tag}-{key.section_id}-{n}"
        await chat.handle(
            peer, CreateSession(id=1, document_id=key.document_id, section_id=key.section_id, title=title)
        )
        outcomes.sessions[title], reply = _outcome(peer, 1)
        if reply is None:
            return
        session_id = outcomes.session_ids[title] = reply["session"]["session_id"]

        async def send(m: int) -> None:
            cmid = f"{title}-{m}"
            await chat.handle(
                peer, SendMessage(id=2 + m, session_id=session_id, text=f"text {cmid}", client_msg_id=cmid)
            )
            outcomes.messages[cmid], reply = _outcome(peer, 2 + m)
            if reply is not None:
                outcomes.acked_messages[cmid] = reply["message"]

        # Two at a time: batches queue behind batches in flight, as under load.
        for m in range(0, MESSAGES_PER_CLIENT, 2):
            await asyncio.gather(send(m), send(m + 1))
        if outcomes.messages.get(f"{title}-0") == "acked":
            # An edit of the first message: its own record kind, read back by its latest offset.
            first_seq = outcomes.acked_messages[f"{title}-0"]["seq"]
            await chat.handle(peer, EditMessage(id=99, session_id=session_id, seq=first_seq, text=f"edited {title}"))
            outcomes.edits[title], edited = _outcome(peer, 99)
            if edited is not None:
                outcomes.acked_edits[title] = edited["message"]
        if outcomes.messages.get(f"{title}-1") == "acked":
            # A delete of the second: its text must leave every file.
            seq = outcomes.acked_messages[f"{title}-1"]["seq"]
            await chat.handle(peer, DeleteMessage(id=98, session_id=session_id, seq=seq))
            outcomes.deletes[f"{title}-1"] = _outcome(peer, 98)[0]

    await asyncio.gather(*(client(key, n) for key in SECTIONS for n in range(CLIENTS_PER_SECTION)))
    await chat.close()
    for key, watcher in watchers.items():
        seen = outcomes.events.setdefault(key, {})
        live = [frame for frame in watcher.frames if "offset" in frame and frame["type"] != "subscribed"]
        first = watcher.reply_to(0)["offset"] + 1
        assert [frame["offset"] for frame in live] == list(range(first, first + len(live))), "a gap in the live stream"
        for frame in live:
            assert seen.setdefault(frame["offset"], frame) == frame, "an offset was reused"


def _fast(storage: FileStorage, segment_bytes: int) -> FileStorage:
    storage.journal.outcome_deadline_s = 0.05
    storage.journal.retry_delays_s = (0.001,)
    # Small: segments fill up and are checkpointed during the workload. Large: the journal keeps everything.
    storage.journal.segment_bytes = segment_bytes
    storage.fold_after = 3  # the session index is folded into its table during the workload, twice
    return storage


async def crash(storage: FileStorage) -> None:
    """kill -9: nothing more is written; what the page cache has stays (the real files)."""
    if storage._folder is not None:
        storage._closing.set()
        await asyncio.wait([storage._folder])  # its worker thread cannot be stopped: the kill comes after it
    storage.journal.abandon()
    await asyncio.sleep(0)  # let the cancelled tasks end
    os.close(storage._lock_fd)
    storage._lock_fd = None


async def check(root: Path, outcomes: Outcomes) -> None:
    """Open `root` with a plain Disk and check every invariant; then it must accept writes."""
    storage = FileStorage(root)
    await storage.open()
    try:
        # The index first, before any section is loaded (then it answers from the files alone).
        sections = await storage.document_sections("doc")
        assert len(set(sections)) == len(sections) and set(sections) <= set(SECTIONS), sections
        for title, session_id in outcomes.session_ids.items():
            key = await storage.find_section(session_id)
            assert key is not None and key.section_id == title.split("-")[1] and key in sections, (title, key)
        titles: Counter[str] = Counter()
        messages: dict[str, dict] = {}
        duplicates: Counter[str] = Counter()
        edits: dict[str, list[dict]] = defaultdict(list)  # title -> its stored edits
        deleted: Counter[str] = Counter()  # client_msg_id -> its stored deletes
        for key in SECTIONS:
            log = await storage.read_after(key, 0)
            await _check_kept_state(storage, key, log)
            assert [r.offset for r in log.records] == list(range(1, len(log.records) + 1)), "offsets not gapless"
            _check_file_is_clean(storage, key, len(log.records))
            seqs: dict[str, int] = {}
            for record in log.records:
                if isinstance(record, MessageEditedRecord):
                    edits[record.message.text.removeprefix("edited ")].append(msgspec.to_builtins(record.message))
                if isinstance(record, MessageDeletedRecord):
                    deleted[record.message.client_msg_id] += 1
                if isinstance(record, SessionCreatedRecord):
                    titles[record.session.title] += 1
                    seqs[record.session.session_id] = 0
                    assert await storage.find_section(record.session.session_id) == key
                elif isinstance(record, MessageRecord):
                    message = record.message
                    seqs[message.session_id] += 1
                    assert message.seq == seqs[message.session_id], "seqs not gapless"
                    duplicates[message.client_msg_id] += 1
                    messages[message.client_msg_id] = msgspec.to_builtins(message)
            seen = outcomes.events.get(key, {})
            if seen:
                assert log.epoch == outcomes.epochs[key], "the epoch changed though events were stored"
            for offset, frame in seen.items():
                assert offset <= len(log.records), f"the event at offset {offset} seen live is not stored"
                stored = msgspec.to_builtins(event_of(log.records[offset - 1]))
                if stored != frame and frame["type"] == "message":  # erased since, by a delete
                    frame = {**frame, "message": {**frame["message"], "text": "", "mentions": [], "reactions": {}}}
                assert stored == frame, "a live event is not what is stored"
        for title, outcome in outcomes.sessions.items():
            expected = {"acked": (1,), "refused": (0,), "unknown": (0, 1)}[outcome]
            assert titles[title] in expected, f"session {title} ({outcome}) stored {titles[title]} times"
        for cmid, outcome in outcomes.messages.items():
            expected = {"acked": (1,), "refused": (0,), "unknown": (0, 1)}[outcome]
            assert duplicates[cmid] in expected, f"message {cmid} ({outcome}) stored {duplicates[cmid]} times"
            if outcome == "acked":
                acked = outcomes.acked_messages[cmid]
                if deleted[cmid]:
                    acked = {**acked, "text": "", "mentions": [], "reactions": {}}
                assert messages[cmid] == acked
        everything = b"".join(path.read_bytes() for path in root.rglob("*") if path.is_file())
        for cmid, outcome in outcomes.deletes.items():
            expected = {"acked": (1,), "refused": (0,), "unknown": (0, 1)}[outcome]
            assert deleted[cmid] in expected, f"the delete of {cmid} ({outcome}) stored {deleted[cmid]} times"
            # Once open, the journal is replayed and deleted: a stored delete left its text nowhere.
            assert (f"text {cmid}".encode() in everything) != bool(deleted[cmid]), f"{cmid}: text and delete disagree"
        for title, outcome in outcomes.edits.items():
            expected = {"acked": (1,), "refused": (0,), "unknown": (0, 1)}[outcome]
            assert len(edits[title]) in expected, f"the edit of {title} ({outcome}) stored {len(edits[title])} times"
            if outcome == "acked":
                assert edits[title] == [outcomes.acked_edits[title]]
        # And it takes writes.
        chat, peer = Chat(storage, sessions_per_minute=0), Peer("after")
        for key in SECTIONS:
            await chat.handle(peer, CreateSession(id=9, document_id=key.document_id, section_id=key.section_id))
            assert peer.reply_to(9)["type"] == "session_created"
    finally:
        await storage.close()


async def _check_kept_state(storage: FileStorage, key: SectionKey, log: SectionLog) -> None:
    """A load from the kept state builds exactly the section that replaying every record does."""
    loaded = await storage.load_section(key)
    if loaded.state is None:
        assert loaded.records == log.records
        return
    offset, data = loaded.state
    assert (
        loaded.epoch == log.epoch and loaded.records == log.records[offset:]
    ), "the kept state does not join up with the records"
    from_state, replayed = Stream(key, 10), Stream(key, 10)
    from_state.restore(offset, data)
    for record in loaded.records:
        from_state.apply(record)
    for record in log.records:
        replayed.apply(record)
    assert from_state.snapshot() == replayed.snapshot() and from_state.offset == replayed.offset


def _check_file_is_clean(storage: FileStorage, key: SectionKey, records: int) -> None:
    """Every line of the section file reads, in order: nothing was skipped to make the offsets look right."""
    path = storage._section_path(key)
    if not path.exists():
        assert records == 0
        return
    lines = path.read_bytes().splitlines()
    decoded = [_decode_line(line) for line in lines]  # raises on an unreadable line
    offsets = [getattr(item, "offset", 0) for item in decoded]
    # An empty file is a section whose first write failed after the file was made.
    assert offsets == list(range(records + 1)) or (not offsets and records == 0), "skipped or repeated lines"


class Case:
    """A scratch data dir for one case."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(dir=SCRATCH))
        self.data = self.base / "data"
        self.data.mkdir()

    def fresh(self, name: str) -> Path:
        path = self.base / name
        path.mkdir()
        return path

    def __enter__(self) -> Case:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


async def run_on(
    disk: SimulatedDisk, root: Path, outcomes: Outcomes, tag: str, segment_bytes: int = 2048
) -> FileStorage | None:
    """Open the storage on `disk` and run the workload; None if it could not open."""
    storage = _fast(FileStorage(root, disk=disk), segment_bytes)
    try:
        await storage.open()
    except StorageError:
        return None
    await workload(storage, outcomes, tag)
    return storage


async def run_into_power_cut(
    case: Case, root: Path, cut: int, outcomes: Outcomes, tag: str, lucky: random.Random | None
) -> Path:
    """Run the workload on `root` until the power goes at call `cut`; return what the disk kept, in a fresh dir."""
    disk = SimulatedDisk(root)
    disk.cut_at = cut
    storage = await run_on(disk, root, outcomes, tag, SEGMENT_SIZES[cut % 2])
    if storage is not None:
        await storage.close()
    after = case.fresh(f"after-{tag}-{cut}")
    disk.materialize(after, lucky)
    return after


async def count_calls() -> int:
    with Case() as case:
        disk = SimulatedDisk(case.data)
        storage = await run_on(disk, case.data, Outcomes(), "count")
        assert storage is not None
        calls = disk.calls
        await storage.close()
        return calls


async def wait_until_writable(storage: FileStorage) -> None:
    for _ in range(10_000):
        if storage.journal.broken is None:
            return
        await asyncio.sleep(0.001)  # a bounded poll of the storage's own state: it retries on a timer
    raise AssertionError(f"storage did not recover: {storage.journal.broken}")


@pytest.mark.timeout(300)
async def test_every_injected_fault_keeps_every_invariant():
    """EIO and ENOSPC at every call, once and persistent: nothing acknowledged lost, nothing refused stored, recovery by itself."""
    calls = await count_calls()
    cases = 0
    for fail_errno in (errno.EIO, errno.ENOSPC):
        for persistent in (False, True):
            for n in range(1, calls + 1):
                # Then: a clean stop, a kill -9, or a power cut (kept: only what was synced).
                ending = ("close", "kill", "power")[n % 3]
                with Case() as case:
                    disk = SimulatedDisk(case.data)
                    disk.fail_at, disk.fail_errno, disk.persistent = n, fail_errno, persistent
                    outcomes = Outcomes()
                    storage = await run_on(disk, case.data, outcomes, "a", SEGMENT_SIZES[n // 3 % 2])
                    disk.fail_at = None  # the fault clears
                    checked = case.data
                    if storage is not None:
                        await wait_until_writable(storage)
                        await workload(storage, outcomes, "b")  # writing resumes without a restart
                        assert all(o == "acked" for t, o in outcomes.sessions.items() if t.startswith("b-")), (
                            n,
                            outcomes.sessions,
                        )
                        b_edits = [o for t, o in outcomes.edits.items() if t.startswith("b-")]
                        assert len(b_edits) == len(SECTIONS) * CLIENTS_PER_SECTION and set(b_edits) == {"acked"}
                        if ending == "close":
                            await storage.close()
                        else:
                            await crash(storage)
                            if ending == "power":
                                checked = case.fresh("after")
                                disk.materialize(checked)
                    try:
                        await check(checked, outcomes)
                    except AssertionError as error:
                        raise AssertionError(
                            f"{os.strerror(fail_errno)} at call {n} ({persistent=}, then {ending}): {error}"
                        ) from error
                    cases += 1
    assert cases == 4 * calls
    print(f"{cases} injected-fault cases over {calls} calls")


@pytest.mark.timeout(300)
async def test_every_power_cut_keeps_every_invariant():
    """A power cut after every prefix of the calls, synced-only and with random unsynced writes kept."""
    calls = await count_calls()
    rng = random.Random(20261201)
    cases = 0
    for cut in range(1, calls + 2):
        for lucky in (False, True):
            with Case() as case:
                outcomes = Outcomes()
                after = await run_into_power_cut(
                    case, case.data, cut, outcomes, "a", random.Random(rng.random()) if lucky else None
                )
                await check(after, outcomes)
                cases += 1
    print(f"{cases} power-cut cases over {calls} calls")


@pytest.mark.timeout(300)
async def test_power_cuts_during_and_after_recovery():
    """A crash, then a power cut at every call of the recovery and the writes that follow it."""
    calls = await count_calls()
    rng = random.Random(7)
    cases = 0
    for first_cut in sorted(rng.sample(range(calls // 3, calls + 1), 6)):
        with Case() as case:
            outcomes = Outcomes()
            crashed = await run_into_power_cut(case, case.data, first_cut, outcomes, "a", random.Random(first_cut))
            # How many calls the recovery and a second workload take.
            probe = case.fresh("probe")
            shutil.copytree(crashed, probe, dirs_exist_ok=True)
            counting = SimulatedDisk(probe)
            second = await run_on(counting, probe, Outcomes(**_copy(outcomes)), "b")
            assert second is not None
            await second.close()
            for cut in range(1, counting.calls + 2):
                again = case.fresh(f"again-{cut}")
                shutil.copytree(crashed, again, dirs_exist_ok=True)
                these = Outcomes(**_copy(outcomes))
                after = await run_into_power_cut(case, again, cut, these, "b", None if cut % 2 else random.Random(cut))
                try:
                    await check(after, these)
                except AssertionError as error:
                    raise AssertionError(
                        f"power cut at call {first_cut}, then at call {cut} of the recovery: {error}"
                    ) from error
                cases += 1
    print(f"{cases} power cuts during or after a recovery")


async def move_workload(storage: FileStorage) -> tuple[list[str], str]:
    """Sessions with a message and a read marker each in s0, then one move of them all to s1: (their ids, its outcome)."""
    chat = Chat(storage, sessions_per_minute=0)
    peer, reader = Peer("mover"), Peer("reader")
    session_ids = []
    for n in range(3):
        await chat.handle(peer, CreateSession(id=10 + n, document_id="doc", section_id="s0"))
        outcome, reply = _outcome(peer, 10 + n)
        if reply is None:
            await chat.close()
            return session_ids, "not tried"
        session_ids.append(reply["session"]["session_id"])
        await chat.handle(peer, SendMessage(id=20 + n, session_id=session_ids[-1], text=f"m{n}"))
        await chat.handle(reader, MarkRead(id=30 + n, session_id=session_ids[-1], seq=1))
    await chat.handle(peer, MoveSessions(id=50, document_id="doc", from_section_id="s0", to_section_id="s1"))
    moved = _outcome(peer, 50)[0]
    await chat.close()
    return session_ids, moved


async def check_move(root: Path, session_ids: list[str], moved: str) -> None:
    """Every session is in exactly one section, all of them in the same one: the target if the move was acked."""
    storage = FileStorage(root)
    await storage.open()
    try:
        streams = {}
        for section_id in ("s0", "s1"):
            key = SectionKey("doc", section_id)
            stream = streams[section_id] = Stream(key, 0)
            for record in (await storage.read_after(key, 0)).records:
                stream.apply(record)
        places = {sid: [s for s, stream in streams.items() if sid in stream.sessions] for sid in session_ids}
        assert all(
            len(found) == 1 for found in places.values()
        ), f"a session in more or fewer than one section: {places}"
        assert len({found[0] for found in places.values()}) <= 1, f"a move half done: {places}"
        if moved == "acked":
            assert all(found == ["s1"] for found in places.values()), places
        elif moved == "refused":
            assert all(found == ["s0"] for found in places.values()), places
        for sid, [section_id] in places.items():
            state = streams[section_id].state_of(sid)
            assert state.session.section_id == section_id
            if moved == "acked":  # everything before it was acked too: it all came along
                reads = Stream(reads_key(SectionKey("doc", section_id)), 0)
                for record in (await storage.read_after(reads.key, 0)).records:
                    reads.apply(record)
                assert state.session.last_seq == 1 and reads.reads[sid]["reader"] == 1
            found = await storage.find_section(sid)  # the index names where it is, or a section it left
            assert found is not None and (found.section_id == section_id or sid in streams[found.section_id].moved)
    finally:
        await storage.close()


@pytest.mark.timeout(300)
async def test_a_move_is_all_or_nothing_at_every_power_cut():
    """Both sections' records (and the read markers) of a move are one journal group: a power cut keeps all or none."""

    async def check(root: Path, outcome: tuple[list[str], str]) -> None:
        await check_move(root, *outcome)

    await cut_power_at_every_call(move_workload, check, seed=13)


async def delete_workload(storage: FileStorage) -> dict:
    """Sessions and messages in two documents, one of them deleted, then a session in it again: what was acked."""
    chat = Chat(storage, sessions_per_minute=0)
    peer = Peer("deleter")
    acked: dict = {"doomed": [], "kept": [], "deleted": "not tried", "after": None}
    request = itertools.count(1)
    for document_id in ("doomed", "kept"):
        for n in range(2):
            rid = next(request)
            await chat.handle(peer, CreateSession(id=rid, document_id=document_id, section_id=f"s{n}"))
            reply = _outcome(peer, rid)[1]
            if reply is None:
                await chat.close()
                return acked
            sid = reply["session"]["session_id"]
            rid = next(request)
            await chat.handle(peer, SendMessage(id=rid, session_id=sid, text=f"text {document_id} {n}"))
            if _outcome(peer, rid)[0] == "acked":
                acked[document_id].append(sid)
    try:
        await chat.delete_document("doomed")
        acked["deleted"] = "acked"
    except OutcomeUnknown:
        acked["deleted"] = "unknown"
    except StorageError:
        acked["deleted"] = "refused"
    rid = next(request)
    await chat.handle(peer, CreateSession(id=rid, document_id="doomed", section_id="s0"))
    reply = _outcome(peer, rid)[1]
    if reply is not None:
        acked["after"] = reply["session"]["session_id"]
    await chat.close()
    return acked


async def check_delete(root: Path, acked: dict) -> None:
    storage = FileStorage(root)
    await storage.open()  # replays the journal, then deletes it: only the section files are left
    try:
        found: dict[str, set[str]] = {}
        for document_id in ("doomed", "kept"):
            found[document_id] = set()
            for n in range(2):
                stream = Stream(SectionKey(document_id, f"s{n}"), 0)
                for record in (await storage.read_after(stream.key, 0)).records:
                    stream.apply(record)
                found[document_id] |= set(stream.sessions)
        assert set(acked["kept"]) <= found["kept"], "a session of the other document was lost"
        everything = b"".join(path.read_bytes() for path in root.rglob("*") if path.is_file())
        assert b"text kept" in everything or not acked["kept"]
        if acked["deleted"] == "acked":
            assert not set(acked["doomed"]) & found["doomed"], "a deleted session came back"
            assert b"text doomed" not in everything, "the deleted text is still on disk"
        elif acked["deleted"] == "refused":
            assert set(acked["doomed"]) <= found["doomed"], "a refused deletion deleted"
        if acked["after"] is not None:
            assert acked["after"] in found["doomed"], "the session made after the deletion was lost"
    finally:
        await storage.close()


@pytest.mark.timeout(300)
async def test_a_document_deletion_is_all_or_nothing_at_every_power_cut():
    """The deletion's marker, its removals and the journal's replay: a power cut anywhere brings nothing back."""
    await cut_power_at_every_call(delete_workload, check_delete, seed=17)


async def cut_power_at_every_call(workload, check, *, seed: int) -> None:
    """Run `workload` once to count its calls, then again with the power cut at each, synced-only and lucky."""
    with Case() as case:
        disk = SimulatedDisk(case.data)
        storage = _fast(FileStorage(case.data, disk=disk), 1 << 20)
        await storage.open()
        await workload(storage)
        await storage.close()
        calls = disk.calls
    rng = random.Random(seed)
    for cut in range(1, calls + 2):
        for lucky in (None, random.Random(rng.random())):
            with Case() as case:
                disk = SimulatedDisk(case.data)
                disk.cut_at = cut
                storage = _fast(FileStorage(case.data, disk=disk), 1 << 20)
                try:
                    await storage.open()
                except StorageError:
                    continue
                outcome = await workload(storage)
                await storage.close()
                after = case.fresh("after")
                disk.materialize(after, lucky)
                try:
                    await check(after, outcome)
                except AssertionError as error:
                    raise AssertionError(f"power cut at call {cut} of {calls} ({outcome}): {error}") from error


def _copy(outcomes: Outcomes) -> dict:
    return {
        "sessions": dict(outcomes.sessions),
        "session_ids": dict(outcomes.session_ids),
        "messages": dict(outcomes.messages),
        "acked_messages": dict(outcomes.acked_messages),
        "events": {k: dict(v) for k, v in outcomes.events.items()},
        "epochs": dict(outcomes.epochs),
    }


def test_the_simulated_disk_forgets_what_was_not_synced(tmp_path):
    """The harness itself: a power cut keeps synced bytes and directory entries, and only those."""
    disk = SimulatedDisk(tmp_path)
    fd = disk.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    disk.write(fd, b"synced ")
    disk.fsync(fd)
    disk.sync_path(tmp_path)
    disk.write(fd, b"lost")
    disk.close(fd)
    fd = disk.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT)
    disk.fsync(fd)  # its data is durable, its name is not
    disk.close(fd)
    synced = tmp_path.parent / "synced"
    synced.mkdir()
    disk.materialize(synced)
    assert sorted(p.name for p in synced.iterdir()) == ["a"]
    assert (synced / "a").read_bytes() == b"synced "
    disk.fail_at = disk.calls + 1
    with pytest.raises(OSError):
        disk.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    assert isinstance(Disk(), Disk)


async def test_a_write_queued_behind_a_failed_section_file_update(tmp_path):
    """The journal took a batch but its section file did not: it is acknowledged, what queued behind it is refused, and the next offset follows it."""
    root = tmp_path / "data"
    root.mkdir()
    disk = SimulatedDisk(root)
    storage = _fast(FileStorage(root, disk=disk), 1 << 20)
    await storage.open()
    key = SECTIONS[0]
    session = Session("s", *key, None, "alice", "2026-12-01T00:00:00.000Z", False, 0)

    def message(seq: int) -> MessageRecord:
        return MessageRecord(
            offset=seq + 1, message=Message("s", seq, f"m{seq}", "alice", "hi", None, "2026-12-01T00:00:00.000Z")
        )

    await storage.load_section(key)
    await storage.append(key, "e", [SessionCreatedRecord(offset=1, session=session)])
    # Next: the journal's write and fdatasync succeed, then the section file's write fails.
    disk.fail_at = disk.pause_at = disk.calls + 3
    first = asyncio.ensure_future(storage.append(key, "e", [message(1)]))
    await asyncio.to_thread(disk.paused.wait, 10)
    queued = asyncio.ensure_future(storage.append(key, "e", [message(2)]))
    await asyncio.sleep(0)  # it is queued behind the batch in flight
    disk.resume.set()
    await first
    with pytest.raises(StorageError):
        await queued
    disk.fail_at = None
    await wait_until_writable(storage)
    await storage.append(key, "e", [message(2)])
    await storage.close()
    reopened = FileStorage(root)
    await reopened.open()
    assert [r.offset for r in (await reopened.load_section(key)).records] == [1, 2, 3]
    await reopened.close()
