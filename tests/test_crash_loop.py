"""Crash loop: concurrent writers, kill -9 at a random moment, restart, verify; and clients that vanish mid-request.

Real server processes (`python -m server serve`) on one data dir, real sockets,
real files. Rounds: SECTIONCHAT_CRASH_ROUNDS (default 3); the kill delays come
from SECTIONCHAT_CRASH_SEED (random unless set; printed, so a failure can be
replayed with the same seed).

After every restart everything acknowledged in all rounds so far must be stored
exactly once (by session_id, message_id, idempotency_key and client_msg_id), seqs
gapless per session, offsets gapless per section, and the data fully readable.
Requests in flight at the kill are retried, as a client would: a retry returns
what was stored, or stores it now; either way nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from client import ScriptClient

ROUNDS = int(os.environ.get("SECTIONCHAT_CRASH_ROUNDS", "3"))
SEED = int(os.environ.get("SECTIONCHAT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
WRITERS = 6
DOC = "crash"
COMMON = "common"  # one section every round writes to, so its offsets run on across many kills
RECOVERY_WINDOW = 1000
ROUND_SECTION_BUDGET = 900  # events per section per round, to stay inside the recovery window
COMMON_BUDGET = max(5, (RECOVERY_WINDOW - 100) // ROUNDS - WRITERS)
KILL_DELAY_S = (0.05, 1.0)
SERVER_ARGS = ("--rate-limit", "0")

# Server log lines that mean stored data was damaged (a torn tail after kill -9 is expected and repaired).
DAMAGE = ("skipping unreadable line", "out of order", "belongs to another section", "Traceback")

GONE = (ConnectionClosed, OSError, asyncio.TimeoutError)


def page_all(client: ScriptClient, session_id: str):
    """Every message of a session, paging forward with after_seq."""

    async def pages() -> list[dict]:
        messages: list[dict] = []
        while True:
            page = await client.call("history", session_id=session_id, after_seq=len(messages), limit=200)
            messages.extend(page["messages"])
            if not page["has_more"]:
                return messages

    return pages()


@dataclass
class Ledger:
    """What the server acknowledged, and what was in flight when it died."""

    sessions: dict[str, dict] = field(default_factory=dict)  # session_id -> session as acknowledged
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # session_id -> (user, idempotency_key)
    messages: dict[str, dict[int, dict]] = field(
        default_factory=lambda: defaultdict(dict)
    )  # session_id -> seq -> message
    pending: dict[str, tuple] = field(default_factory=dict)  # user -> the request it had in flight
    owners: dict[str, str] = field(default_factory=dict)  # session_id -> the writer that created it

    def ack_session(self, session: dict, user: str, key: str) -> None:
        assert session["session_id"] not in self.sessions, f"session {session['session_id']} acknowledged twice"
        self.sessions[session["session_id"]] = session
        self.keys[session["session_id"]] = (user, key)
        self.owners[session["session_id"]] = user

    def ack_message(self, message: dict) -> None:
        known = self.messages[message["session_id"]].get(message["seq"])
        assert (
            known is None or known == message
        ), f"seq {message['seq']} acknowledged as two messages: {known} {message}"
        self.messages[message["session_id"]][message["seq"]] = message

    @property
    def message_count(self) -> int:
        return sum(len(by_seq) for by_seq in self.messages.values())

    def sections(self) -> set[str]:
        return {session["section_id"] for session in self.sessions.values()}


async def writer(
    url: str,
    name: str,
    sections: list[str],
    budgets: Counter,
    limits: dict[str, int],
    rng: random.Random,
    ledger: Ledger,
    ready: asyncio.Event,
    opened: list,
    acknowledged: asyncio.Event,
) -> None:
    """Create sessions (with idempotency keys) and send messages (with client_msg_ids) until the server dies."""
    try:
        client = await ScriptClient.open(url, name=name, timeout=10)
    except GONE:
        opened.append(None)
        return
    opened.append(client)
    if len(opened) == WRITERS:
        ready.set()
    await ready.wait()
    try:
        for i in range(10_000):
            choices = [s for s in sections if budgets[s] < limits[s]]
            if not choices:
                await client.websocket.wait_closed()  # out of budget: idle until the kill
                return
            section = rng.choice(choices)
            key = f"{name}-{i}"
            budgets[section] += 1
            ledger.pending[name] = ("create", section, key)
            reply = await client.call(
                "create_session", document_id=DOC, section_id=section, idempotency_key=key, title=f"t {key}"
            )
            ledger.ack_session(reply["session"], name, key)
            del ledger.pending[name]
            acknowledged.set()
            session_id = reply["session"]["session_id"]
            for m in range(rng.randint(1, 6)):
                if budgets[section] >= limits[section]:
                    break
                budgets[section] += 1
                text = f"{name} says {m} in {i}"
                ledger.pending[name] = ("send", session_id, text, f"{key}-{m}")
                ack = await client.call("send_message", session_id=session_id, text=text, client_msg_id=f"{key}-{m}")
                ledger.ack_message(ack["message"])
                del ledger.pending[name]
    except GONE:
        return  # the server was killed under us; what was acknowledged is in the ledger
    finally:
        await asyncio.gather(client.close(), return_exceptions=True)


@dataclass
class Check:
    sessions: int = 0
    messages: int = 0
    in_flight_stored: int = 0
    in_flight_lost: int = 0
    sections: int = 0
    events: int = 0


async def verify(url: str, ledger: Ledger, rng: random.Random, retry_pending: bool) -> Check:
    """Everything acknowledged is stored exactly once; in-flight requests resolve exactly once on retry."""
    check = Check()
    async with ScriptClient.connect(url, name="checker") as checker:
        listed, cursor = [], None
        while True:  # pages of at most 1,000
            page = await checker.call("list_sessions", document_id=DOC, **({"cursor": cursor} if cursor else {}))
            listed += page["sessions"]
            if (cursor := page["next_cursor"]) is None:
                break
        stored = {s["session_id"]: s for s in listed}
        assert len(stored) == len(listed), "a session is listed twice"
        missing = set(ledger.sessions) - set(stored)
        assert not missing, f"acknowledged sessions lost: {sorted(missing)[:5]}"
        for session_id, session in ledger.sessions.items():
            changing = ("last_seq", "closed", "last_activity_at")  # what later writes change
            mine = {k: v for k, v in stored[session_id].items() if k not in changing}
            assert mine == {k: v for k, v in session.items() if k not in changing}, session_id

        # Sessions nobody saw acknowledged can only be creates that were in flight: one per writer at most.
        pending_creates = {(op[1], user): op for user, op in ledger.pending.items() if op[0] == "create"}
        orphans: dict[tuple[str, str], str] = {}
        for session_id in set(stored) - set(ledger.sessions):
            session = stored[session_id]
            owner = (session["section_id"], session["created_by"])
            assert owner in pending_creates, f"session {session_id} of {owner} was never requested in flight"
            assert owner not in orphans, f"two unacknowledged sessions for one in-flight create: {owner}"
            orphans[owner] = session_id

        # Every session's history: gapless seqs, acknowledged messages exactly as acknowledged.
        histories: dict[str, list[dict]] = {}
        message_ids: set[str] = set()
        for session_id in stored:
            messages = await page_all(checker, session_id)
            histories[session_id] = messages
            assert [m["seq"] for m in messages] == list(
                range(1, len(messages) + 1)
            ), f"seqs of {session_id} not gapless"
            client_ids = [m["client_msg_id"] for m in messages]
            assert None not in client_ids and len(set(client_ids)) == len(
                client_ids
            ), f"a client_msg_id stored twice in {session_id}"
            for message in messages:
                assert message["message_id"] not in message_ids, f"message_id {message['message_id']} stored twice"
                message_ids.add(message["message_id"])
            acked = ledger.messages.get(session_id, {})
            for seq, message in acked.items():
                assert (
                    seq <= len(messages) and messages[seq - 1] == message
                ), f"acknowledged message {session_id}#{seq} lost or changed"
            extra = [m for m in messages if m["seq"] not in acked]
            if extra:
                # Only the writer's last request, in flight at the kill, may be stored without an ack.
                owner = ledger.owners.get(session_id) or stored[session_id]["created_by"]
                op = ledger.pending.get(owner)
                assert (
                    len(extra) == 1 and op is not None and op[0] == "send" and op[1] == session_id
                ), f"unexpected messages in {session_id}: {extra}"
                assert extra[0]["seq"] == len(messages) and (extra[0]["text"], extra[0]["client_msg_id"]) == (
                    op[2],
                    op[3],
                )

        if retry_pending:
            # A client retries what it never heard back about: it gets what was stored, or it is stored now.
            for user, op in sorted(ledger.pending.items()):
                async with ScriptClient.connect(url, name=user) as retry:
                    if op[0] == "create":
                        _, section, key = op
                        reply = await retry.call(
                            "create_session", document_id=DOC, section_id=section, idempotency_key=key, title=f"t {key}"
                        )
                        session = reply["session"]
                        earlier = orphans.get((section, user))
                        if earlier is not None:
                            assert (
                                session["session_id"] == earlier
                            ), "retry created a second session for one idempotency_key"
                            check.in_flight_stored += 1
                        else:
                            check.in_flight_lost += 1
                        ledger.ack_session(session, user, key)
                        histories.setdefault(session["session_id"], [])
                    else:
                        _, session_id, text, client_msg_id = op
                        ack = await retry.call(
                            "send_message", session_id=session_id, text=text, client_msg_id=client_msg_id
                        )
                        message = ack["message"]
                        earlier = [m for m in histories[session_id] if m["client_msg_id"] == client_msg_id]
                        if earlier:
                            assert message == earlier[0], "retry stored a second message for one client_msg_id"
                            check.in_flight_stored += 1
                        else:
                            assert message["seq"] == len(histories[session_id]) + 1
                            histories[session_id].append(message)
                            check.in_flight_lost += 1
                        ledger.ack_message(message)
            ledger.pending.clear()
            assert set(histories) == set(ledger.sessions), "a stored session is accounted for by no request"
        else:
            assert set(stored) == set(ledger.sessions)

        # Idempotency outlives crashes: retrying a sample of old acknowledged requests changes nothing.
        for session_id in rng.sample(sorted(ledger.sessions), min(8, len(ledger.sessions))):
            user, key = ledger.keys[session_id]
            session = ledger.sessions[session_id]
            async with ScriptClient.connect(url, name=user) as retry:
                reply = await retry.call(
                    "create_session", document_id=DOC, section_id=session["section_id"], idempotency_key=key
                )
                assert reply["session"]["session_id"] == session_id, f"idempotency_key {key} forgotten after restart"
                acked = ledger.messages.get(session_id)
                if acked:
                    message = acked[rng.choice(sorted(acked))]
                    again = await retry.call(
                        "send_message", session_id=session_id, text="retry", client_msg_id=message["client_msg_id"]
                    )
                    assert (
                        again["message"] == message
                    ), f"client_msg_id {message['client_msg_id']} forgotten after restart"

        # Offsets: every section's stored stream is 1..offset, and holds exactly its sessions and messages in order.
        by_section: dict[str, list[str]] = defaultdict(list)
        for session_id, session in ledger.sessions.items():
            by_section[session["section_id"]].append(session_id)
        for section, session_ids in sorted(by_section.items()):
            expected_events = len(session_ids) + sum(len(histories[s]) for s in session_ids)
            reply = await checker.call("subscribe", document_id=DOC, section_id=section, since_offset=0)
            assert (
                reply["offset"] == expected_events
            ), f"section {section}: offset {reply['offset']}, stored items {expected_events}"
            assert sorted(s["session_id"] for s in reply["sessions"]) == sorted(session_ids)
            if reply["offset"] <= RECOVERY_WINDOW:
                events = reply["events"]
                assert reply["recovered"] is True
                assert [e["offset"] for e in events] == list(
                    range(1, reply["offset"] + 1)
                ), f"offsets of {section} not gapless"
                created = [e["session"]["session_id"] for e in events if e["type"] == "session_created"]
                assert sorted(created) == sorted(session_ids) and len(created) == len(set(created))
                per_session: dict[str, list[dict]] = defaultdict(list)
                for event in events:
                    if event["type"] == "message":
                        per_session[event["message"]["session_id"]].append(event["message"])
                        assert (
                            event["message"]["session_id"]
                            in created[: created.index(event["message"]["session_id"]) + 1]
                        )
                for session_id in session_ids:
                    assert (
                        per_session[session_id] == histories[session_id]
                    ), f"events of {session_id} differ from its history"
            await checker.call("unsubscribe", document_id=DOC, section_id=section)
            check.sections += 1
            check.events += expected_events

    check.sessions = len(ledger.sessions)
    check.messages = ledger.message_count
    return check


def assert_undamaged(log: str, when: str) -> int:
    """No stored data was found damaged; returns how many torn tails were cut (expected after kill -9)."""
    damaged = [line for line in log.splitlines() if any(word in line for word in DAMAGE)]
    assert not damaged, f"{when}: {damaged[:5]}"
    return sum("torn tail" in line for line in log.splitlines())


@pytest.mark.timeout(30 + 12 * ROUNDS)
async def test_crash_loop(server_process):
    """ROUNDS x (concurrent writers, kill -9 at a random moment, restart, verify everything acknowledged so far)."""
    print(f"\ncrash loop: {ROUNDS} rounds, seed {SEED} (SECTIONCHAT_CRASH_SEED={SEED} replays the kill delays)")
    rng = random.Random(SEED)
    ledger = Ledger()
    server = server_process(*SERVER_ARGS)
    torn_tails = 0
    for round_number in range(1, ROUNDS + 1):
        started = time.monotonic()
        sections = [f"r{round_number}-s{j}" for j in range(3)] + [COMMON]
        limits = {s: ROUND_SECTION_BUDGET for s in sections} | {COMMON: COMMON_BUDGET}
        budgets: Counter = Counter()
        delay = rng.uniform(*KILL_DELAY_S)
        writer_rngs = [random.Random(rng.random()) for _ in range(WRITERS)]
        acked_before = (len(ledger.sessions), ledger.message_count)

        ready, opened, acknowledged = asyncio.Event(), [], asyncio.Event()
        writers = [
            asyncio.create_task(
                writer(
                    server.url,
                    f"r{round_number}w{n}",
                    sections,
                    budgets,
                    limits,
                    writer_rngs[n],
                    ledger,
                    ready,
                    opened,
                    acknowledged,
                )
            )
            for n in range(WRITERS)
        ]
        # The delay runs from the first acknowledgement, so every round has something to lose.
        await asyncio.wait_for(acknowledged.wait(), 15)
        await asyncio.sleep(delay)  # the random moment: this is the point of the test
        server.kill()
        await asyncio.wait_for(asyncio.gather(*writers), 15)
        in_flight = len(ledger.pending)
        # (Torn tails are cut when a server loads a section, so this log tells of the previous kill.)
        torn_tails += assert_undamaged(server.output.decode(errors="replace"), f"round {round_number} before the kill")

        acked_sessions = len(ledger.sessions) - acked_before[0]
        acked_messages = ledger.message_count - acked_before[1]

        server = server_process(*SERVER_ARGS)
        check = await verify(server.url, ledger, rng, retry_pending=True)
        print(
            f"round {round_number}/{ROUNDS}: kill -9 {delay:.3f} s after the first ack; acknowledged this round {acked_sessions} sessions, "
            f"{acked_messages} messages; in flight {in_flight} (stored {check.in_flight_stored}, not stored {check.in_flight_lost}); "
            f"verified cumulative {check.sessions} sessions, {check.messages} messages, {check.events} events in {check.sections} sections; "
            f"round took {time.monotonic() - started:.2f} s"
        )
        assert acked_sessions > 0, "nothing was acknowledged before the kill: the round tested nothing"

    # The last incarnation stops cleanly and left nothing damaged either.
    assert server.terminate() == 0
    torn_tails += assert_undamaged(server.output.decode(errors="replace"), "after the last round")
    print(
        f"crash loop done: {len(ledger.sessions)} sessions, {ledger.message_count} messages over {ROUNDS} kills; torn tails cut on restart: {torn_tails}"
    )


async def burst(url: str, name: str, session_id: str, count: int, then: str) -> list[str]:
    """Send `count` send_message frames back to back, then drop the connection at once ("abort": a TCP
    reset, "close": a close frame right behind the requests) or keep it ("stay"); return their client_msg_ids."""
    # max_queue=None: this client never reads its replies, and with the default bounded queue it
    # would stop reading its socket and never see the server's answer to its close frame.
    websocket = await ws_connect(f"{url}?name={quote(name)}", compression=None, open_timeout=10, max_queue=None)
    welcome = json.loads(await websocket.recv())
    assert welcome["type"] == "welcome"
    client_ids = [f"{name}-{i}" for i in range(count)]
    for i, client_id in enumerate(client_ids):
        await websocket.send(
            json.dumps(
                {
                    "type": "send_message",
                    "id": i,
                    "session_id": session_id,
                    "text": f"{name} {i}",
                    "client_msg_id": client_id,
                }
            )
        )
    if then == "abort":
        websocket.transport.abort()  # no close frame, unread replies dropped
    elif then == "close":
        await websocket.close()
    else:
        STAYING.append(websocket)
    return client_ids


STAYING: list = []  # connections left open on purpose, cleaned up by the test that made them


def check_history(messages: list[dict], acked: list[dict], bursts: dict[str, list[str]]) -> Counter:
    """Gapless seqs, acknowledged messages exactly once, and each burst stored as an in-order prefix of itself."""
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1)), "seqs not gapless"
    assert len({m["message_id"] for m in messages}) == len(messages), "a message_id stored twice"
    client_ids = [m["client_msg_id"] for m in messages if m["client_msg_id"] is not None]
    assert len(set(client_ids)) == len(client_ids), "a client_msg_id stored twice"
    for message in acked:
        assert messages[message["seq"] - 1] == message, f"acknowledged message lost or changed: {message}"
    stored = Counter()
    for name, sent in bursts.items():
        got = [m["client_msg_id"] for m in messages if m["author"] == name]
        assert got == sent[: len(got)], f"{name}'s burst stored out of order or with holes: {got}"
        texts = [m["text"] for m in messages if m["author"] == name]
        assert texts == [f"{name} {i}" for i in range(len(got))], f"{name}'s messages garbled"
        stored[name] = len(got)
    return stored


@pytest.mark.timeout(60)
async def test_client_vanishing_mid_request_leaves_no_lock_and_no_torn_record(server_process):
    """Bursts of writes from clients that drop the connection at once: the next writer gets through promptly; after a kill -9 the history is clean."""
    server = server_process(*SERVER_ARGS)
    acked: list[dict] = []
    bursts: dict[str, list[str]] = {}
    async with ScriptClient.connect(server.url, name="owner") as owner:
        session_id = (await owner.call("create_session", document_id="vanish", section_id="s"))["session"]["session_id"]
        for i in range(3):
            acked.append((await owner.call("send_message", session_id=session_id, text=f"before {i}"))["message"])

        latencies = []
        for name, how in (("b1", "abort"), ("b2", "close"), ("b3", "abort")):
            bursts[name] = await burst(server.url, name, session_id, 60, how)
            # The next writer to the same session and section is served promptly: no lock was left behind.
            async with ScriptClient.connect(server.url, name=f"next-{name}") as following:
                started = time.monotonic()
                async with asyncio.timeout(3):
                    ack = await following.call(
                        "send_message", session_id=session_id, text=f"after {name}", client_msg_id=f"after-{name}"
                    )
                    created = await following.call("create_session", document_id="vanish", section_id="s")
                latencies.append(time.monotonic() - started)
                acked.append(ack["message"])
                await following.call("close_session", session_id=created["session"]["session_id"])
            history = await page_all(owner, session_id)
            check_history(history, acked, bursts)

        # kill -9 in the middle of a burst: once its first message is stored, 199 more are queued behind it.
        await owner.call("subscribe", document_id="vanish", section_id="s")
        bursts["b4"] = await burst(server.url, "b4", session_id, 200, "stay")
        while (await owner.next_event("message", timeout=10))["message"]["author"] != "b4":
            pass
    server.kill()
    for websocket in STAYING:
        websocket.transport.abort()
    STAYING.clear()
    assert_undamaged(server.read_rest(), "before the kill")

    restarted = server_process(*SERVER_ARGS)
    async with ScriptClient.connect(restarted.url, name="checker") as checker:
        history = await page_all(checker, session_id)
        stored = check_history(history, acked, bursts)
        reply = await checker.call("subscribe", document_id="vanish", section_id="s", since_offset=0)
        # 2 sessions + 3 closes per burst round: 1 + 3*2 session events, plus every message.
        assert [e["offset"] for e in reply["events"]] == list(range(1, reply["offset"] + 1))
        assert reply["offset"] == 1 + 3 * 2 + len(history)
        # Retrying every burst request returns what was stored or stores it now, once.
        async with ScriptClient.connect(restarted.url, name="b4") as retry:
            for i, client_id in enumerate(bursts["b4"]):
                ack = await retry.call("send_message", session_id=session_id, text=f"b4 {i}", client_msg_id=client_id)
                if i < stored["b4"]:
                    assert ack["message"] == history[[m["client_msg_id"] for m in history].index(client_id)]
                else:
                    assert ack["message"]["seq"] == len(history) + 1 + i - stored["b4"]
        final = await page_all(checker, session_id)
        assert [m["client_msg_id"] for m in final if m["author"] == "b4"] == bursts["b4"]
        assert [m["seq"] for m in final] == list(range(1, len(final) + 1))
    assert restarted.terminate() == 0
    assert_undamaged(restarted.output.decode(errors="replace"), "after the restart")
    print(
        f"\nvanishing clients: stored of each burst {dict(stored)} (sent 60 then reset, 60 then close, 60 then reset, 200 then kill -9); "
        f"next writer served in {', '.join(f'{t * 1000:.0f}' for t in latencies)} ms"
    )
