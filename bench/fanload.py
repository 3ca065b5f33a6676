# The fan-out load generator: subscriber processes and one publisher process.
#
# Three servers speak two dialects over the same WebSocket transport:
#   "json"     — sectionchat and the raw broadcast baseline (bench/broadcast_server.py):
#                sectionchat's own protocol, one JSON object per text frame;
#   "socketio" — python-socketio (bench/socketio_server.py): the raw Engine.IO v4
#                WebSocket protocol ("0{open}", "40" connect, "42[event,data]",
#                "43<id>[ack]", "2"/"3" ping/pong), spoken by the same light client.
#                python-socketio's AsyncClient (an aiohttp session, tasks and
#                queues per connection) costs far more per connection than the
#                servers we measure; with 1,000 of them on 2 cores it would be the
#                client that is measured.
#
# Subscribers use bench/wsclient.LightClient: each text payload is searched for
# the marker "@@"; a published message's text starts with
# "@@<time_ns, 19 digits>:<phase>:<seq>", so a delivery costs one find, one
# int() and one list append, and its latency is receive time − send time on the
# machine's shared clock (time.time_ns(), one host, so one clock).
#
# The publisher uses websockets' asyncio client (one connection) and publishes
# in phases: a few warm-up messages, then `paced` (a fixed rate, open loop: the
# latency figures), then `burst` (as fast as acknowledgements allow, at most
# `window` unacknowledged: the throughput figure). Both phases are bounded in
# count and time. When it is done it writes how many messages it published into
# a shared value; subscribers finish when every open connection has received
# that many, or at their deadline.

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import connect as ws_connect

from bench import wsclient
from bench.runs import abort_quietly, run_with_loop

MARKER = b"@@"
PHASES = {"w": "warmup", "p": "paced", "b": "burst"}
TEXT_LENGTH = 74  # the request benchmark's message text length
SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"


def dialect_of(target: str) -> str:
    return "socketio" if target == "socketio" else "json"


def ws_path(target: str, name: str) -> str:
    return SOCKETIO_PATH if target == "socketio" else f"/ws?name={name}"


def message_text(phase: str, seq: int) -> bytes:
    head = b"@@%019d:%s:%06d " % (time.time_ns(), phase.encode(), seq)
    return head + b"x" * max(0, TEXT_LENGTH - len(head))


class Head(msgspec.Struct):
    type: str = ""
    reply_to: Any = None
    code: Any = None
    message: Any = None


decode_head = msgspec.json.Decoder(Head).decode


# Subscribers -------------------------------------------------------------------


@dataclass
class SubscriberSpec:
    target: str
    host: str
    port: int
    indices: list[int]  # global subscriber numbers this process opens
    document_id: str
    section_id: str
    deadline_s: float  # after the start barrier, stop waiting for deliveries
    connect_concurrency: int = 25
    event_loop: str = "auto"  # the load generator's own loop (uvloop when installed: cheaper per frame)


@dataclass
class SubscriberResult:
    clients: int = 0
    latencies: dict[str, list[int]] = field(default_factory=dict)  # phase -> ns, one per delivery
    last_ns: dict[str, int] = field(default_factory=dict)  # phase -> time of the last delivery
    received: int = 0
    missing: int = 0  # deliveries that never came (published × clients − received)
    closed: dict[int, int] = field(default_factory=dict)  # close code -> connections closed by the server
    cpu_s: float = 0.0
    active_s: float = 0.0
    error: str | None = None


class Recorder:
    """Per-process delivery accounting, shared by all of the process's connections."""

    __slots__ = ("lists", "last")

    def __init__(self) -> None:
        self.lists: dict[int, list[int]] = {ord(p): [] for p in PHASES}
        self.last: dict[int, int] = dict.fromkeys(self.lists, 0)


class SubscriberState:
    __slots__ = ("ready", "count", "error")

    def __init__(self, ready: asyncio.Future[None]):
        self.ready = ready
        self.count = 0
        self.error: str | None = None


def _fail(state: SubscriberState, text: str) -> None:
    state.error = text
    if not state.ready.done():
        state.ready.set_exception(RuntimeError(text))


def json_handler(recorder: Recorder, document_id: str, section_id: str):
    subscribe = msgspec.json.encode(
        {"type": "subscribe", "id": 1, "document_id": document_id, "section_id": section_id}
    )
    lists, last = recorder.lists, recorder.last

    def on_text(client: wsclient.LightClient, payload: bytes, now: int) -> None:
        at = payload.find(MARKER)
        if at >= 0:
            phase = payload[at + 22]
            lists[phase].append(now - int(payload[at + 2 : at + 21]))
            last[phase] = now
            client.state.count += 1  # type: ignore[attr-defined]
            return
        head = decode_head(payload)
        state: SubscriberState = client.state  # type: ignore[assignment]
        if head.type == "welcome":
            client.send_text(subscribe)
        elif head.type == "subscribed" and head.reply_to == 1:
            if not state.ready.done():
                state.ready.set_result(None)
        elif head.type == "error":
            _fail(state, f"error {head.code}: {head.message}")

    return on_text


def socketio_handler(recorder: Recorder, document_id: str, section_id: str):
    subscribe = (
        b"421"
        + json.dumps(
            ["subscribe", {"document_id": document_id, "section_id": section_id}], separators=(",", ":")
        ).encode()
    )
    lists, last = recorder.lists, recorder.last

    def on_text(client: wsclient.LightClient, payload: bytes, now: int) -> None:
        at = payload.find(MARKER)
        if at >= 0:
            phase = payload[at + 22]
            lists[phase].append(now - int(payload[at + 2 : at + 21]))
            last[phase] = now
            client.state.count += 1  # type: ignore[attr-defined]
            return
        state: SubscriberState = client.state  # type: ignore[assignment]
        if payload == b"2":  # Engine.IO ping
            client.send_text(b"3")
        elif payload[:1] == b"0":  # Engine.IO open -> Socket.IO CONNECT to "/"
            client.send_text(b"40")
        elif payload[:2] == b"40":  # connected -> subscribe, ack id 1
            client.send_text(subscribe)
        elif payload[:3] == b"431":
            if not state.ready.done():
                state.ready.set_result(None)
        elif payload[:2] == b"44":
            _fail(state, f"socket.io connect error {payload[:200]!r}")

    return on_text


async def run_subscribers(spec: SubscriberSpec, ready, published) -> SubscriberResult:
    wsclient.raise_fd_limit()
    result = SubscriberResult(clients=len(spec.indices))
    recorder = Recorder()
    make = socketio_handler if spec.target == "socketio" else json_handler
    on_text = make(recorder, spec.document_id, spec.section_id)
    loop = asyncio.get_running_loop()

    async def open_one(i: int) -> wsclient.LightClient:
        index = spec.indices[i]
        state = SubscriberState(loop.create_future())
        client = await wsclient.connect(spec.host, spec.port, ws_path(spec.target, f"sub-{index}"), on_text, state)
        async with asyncio.timeout(60):
            await state.ready
        return client

    clients: list[wsclient.LightClient] = []
    try:
        clients = await wsclient.connect_many(len(spec.indices), open_one, spec.connect_concurrency)
        await asyncio.to_thread(ready)  # every connection subscribed; wait for the others
        started = time.monotonic()
        cpu_started = time.process_time()
        deadline = started + spec.deadline_s
        while time.monotonic() < deadline:
            total = published.value
            if total >= 0 and all(c.state.count >= total or not c.is_open for c in clients):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        result.cpu_s = time.process_time() - cpu_started
        result.active_s = time.monotonic() - started
        total = max(0, published.value)
        for client in clients:
            state: SubscriberState = client.state  # type: ignore[assignment]
            result.received += state.count
            result.missing += max(0, total - state.count)
            if client.close_code is not None:
                result.closed[client.close_code] = result.closed.get(client.close_code, 0) + 1
            elif not client.is_open:
                result.closed[1006] = result.closed.get(1006, 0) + 1
        result.latencies = {PHASES[chr(k)]: v for k, v in recorder.lists.items()}
        result.last_ns = {PHASES[chr(k)]: v for k, v in recorder.last.items()}
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.05)
    return result


def subscriber_main(spec: SubscriberSpec, barrier, results, published) -> None:
    try:
        result = run_with_loop(run_subscribers(spec, lambda: barrier.wait(timeout=180), published), spec.event_loop)
    except BaseException as error:  # noqa: BLE001 - reported to the driver
        abort_quietly(barrier)
        result = SubscriberResult(error=f"{type(error).__name__}: {error}")
    results.put(("subscribers", result))


# Publisher ----------------------------------------------------------------------


@dataclass
class PublisherSpec:
    target: str
    host: str
    port: int
    document_id: str
    section_id: str
    settle_s: float  # after the start barrier, before the first message (presence frames settle)
    warmup_messages: int
    rate: float  # paced phase: messages per second
    paced_messages: int
    gap_s: float  # between the phases
    burst_messages: int
    burst_seconds: float
    window: int  # burst: most unacknowledged messages at once
    ack_timeout_s: float = 30.0
    event_loop: str = "auto"


@dataclass
class PublisherResult:
    sent: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    burst_first_ns: int = 0
    burst_last_send_ns: int = 0
    paced_late_s: float = 0.0  # how far behind schedule the paced phase's last send was
    cpu_s: float = 0.0
    error: str | None = None


class Publisher:
    """One connection that publishes into one session and counts acknowledgements."""

    def __init__(self, spec: PublisherSpec):
        self.spec = spec
        self.socketio = spec.target == "socketio"
        self.websocket: Any = None
        self.session_id = ""
        self.next_id = 1
        self.outstanding = 0
        self.acked = 0
        self.changed = asyncio.Event()
        self.error: str | None = None
        self.replies: dict[int, asyncio.Future[Any]] = {}

    async def open(self) -> None:
        spec = self.spec
        self.websocket = await ws_connect(
            f"ws://{spec.host}:{spec.port}{ws_path(spec.target, 'publisher')}",
            compression=None,
            max_size=2**24,
            ping_interval=None,
            open_timeout=30,
            close_timeout=2,
        )
        if self.socketio:
            opening = await self.websocket.recv(decode=False)
            if opening[:1] != b"0":
                raise RuntimeError(f"expected an Engine.IO open packet, got {opening[:100]!r}")
            await self.websocket.send(b"40", text=True)
            connected = await self.websocket.recv(decode=False)
            if connected[:2] != b"40":
                raise RuntimeError(f"expected a Socket.IO CONNECT, got {connected[:100]!r}")
        else:
            welcome = decode_head(await self.websocket.recv(decode=False))
            if welcome.type != "welcome":
                raise RuntimeError(f"expected welcome, got {welcome.type}")
        self.reader = asyncio.create_task(self._read())
        created = await self.request(
            "create_session",
            {"document_id": spec.document_id, "section_id": spec.section_id, "title": "fan-out benchmark"},
        )
        if created.get("type") != "session_created":
            raise RuntimeError(f"create_session failed: {created}")
        self.session_id = created["session"]["session_id"]

    def _frame(self, kind: str, request_id: int, body: dict) -> bytes:
        if self.socketio:
            return b"42%d" % request_id + json.dumps([kind, body], separators=(",", ":")).encode()
        return msgspec.json.encode({"type": kind, "id": request_id, **body})

    async def request(self, kind: str, body: dict) -> dict:
        """A request whose whole reply we want (set-up only)."""
        request_id = self.next_id
        self.next_id += 1
        future = self.replies[request_id] = asyncio.get_running_loop().create_future()
        await self.websocket.send(self._frame(kind, request_id, body), text=True)
        async with asyncio.timeout(self.spec.ack_timeout_s):
            return await future

    async def _read(self) -> None:
        websocket = self.websocket
        try:
            async for data in websocket:
                if isinstance(data, str):
                    data = data.encode()
                if self.socketio:
                    if data == b"2":
                        await websocket.send(b"3", text=True)
                        continue
                    if data[:2] != b"43":
                        continue
                    bracket = data.index(b"[")
                    request_id = int(data[2:bracket])
                    future = self.replies.pop(request_id, None)
                    if future is not None:
                        future.set_result(json.loads(data[bracket:])[0])
                        continue
                    head = Head(type=json.loads(data[bracket:])[0].get("type", ""))
                else:
                    head = decode_head(data)
                    if head.reply_to is None:
                        continue  # an event (presence …): not for the publisher
                    future = self.replies.pop(head.reply_to, None)
                    if future is not None:
                        future.set_result(msgspec.json.decode(data))
                        continue
                if head.type == "message_ack":
                    self.acked += 1
                    self.outstanding -= 1
                    self.changed.set()
                else:
                    self.error = f"publish got {head.type} {head.code or ''} {head.message or ''}".strip()
                    self.changed.set()
                    return
        except Exception as error:  # noqa: BLE001
            self.error = f"publisher connection: {type(error).__name__}: {error}"
            self.changed.set()

    async def publish(self, phase: str, seq: int) -> None:
        request_id = self.next_id
        self.next_id += 1
        self.outstanding += 1
        if self.socketio:
            frame = (
                b'42%d["send_message",{"session_id":"%s","text":"' % (request_id, self.session_id.encode())
                + message_text(phase, seq)
                + b'"}]'
            )
        else:
            frame = (
                b'{"type":"send_message","id":%d,"session_id":"%s","text":"' % (request_id, self.session_id.encode())
                + message_text(phase, seq)
                + b'"}'
            )
        await self.websocket.send(frame, text=True)

    async def wait_outstanding(self, at_most: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.outstanding > at_most:
                if self.error:
                    raise RuntimeError(self.error)
                self.changed.clear()
                await self.changed.wait()
        if self.error:
            raise RuntimeError(self.error)


async def run_publisher(spec: PublisherSpec, ready, published) -> PublisherResult:
    result = PublisherResult()
    publisher = Publisher(spec)
    sent = {"warmup": 0, "paced": 0, "burst": 0}
    try:
        await publisher.open()
        await asyncio.to_thread(ready)
        cpu_started = time.process_time()
        await asyncio.sleep(spec.settle_s)
        interval = 1.0 / spec.rate
        # Warm-up and paced: open loop at `rate`, never waiting for acks.
        for phase, count in (("w", spec.warmup_messages), ("p", spec.paced_messages)):
            start = time.monotonic()
            for seq in range(count):
                delay = start + seq * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if publisher.error:
                    raise RuntimeError(publisher.error)
                await publisher.publish(phase, seq)
                sent[PHASES[phase]] += 1
            if phase == "p" and count:
                result.paced_late_s = max(0.0, time.monotonic() - (start + (count - 1) * interval))
            await publisher.wait_outstanding(0, spec.ack_timeout_s)
            await asyncio.sleep(spec.gap_s)
        # Burst: as fast as acknowledgements allow, `window` at a time.
        if spec.burst_messages:
            result.burst_first_ns = time.time_ns()
            stop = time.monotonic() + spec.burst_seconds
            for seq in range(spec.burst_messages):
                if time.monotonic() >= stop:
                    break
                await publisher.wait_outstanding(spec.window - 1, spec.ack_timeout_s)
                await publisher.publish("b", seq)
                sent["burst"] += 1
            result.burst_last_send_ns = time.time_ns()
            await publisher.wait_outstanding(0, spec.ack_timeout_s)
        result.cpu_s = time.process_time() - cpu_started
    except BaseException as error:  # noqa: BLE001
        result.error = f"{type(error).__name__}: {error}"
    finally:
        result.sent = sent
        result.acked = publisher.acked
        published.value = sum(sent.values())  # subscribers stop once they have all of these
        if publisher.websocket is not None:
            await publisher.websocket.close()
    return result


def publisher_main(spec: PublisherSpec, barrier, results, published) -> None:
    try:
        result = run_with_loop(run_publisher(spec, lambda: barrier.wait(timeout=180), published), spec.event_loop)
    except BaseException as error:  # noqa: BLE001
        result = PublisherResult(error=f"{type(error).__name__}: {error}")
    if result.error:
        abort_quietly(barrier)
    results.put(("publisher", result))
