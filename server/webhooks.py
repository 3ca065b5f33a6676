# Webhooks: every stored event of every section POSTed to each --webhook URL,
# signed per Standard Webhooks, at least once, in offset order per section.
#
# Rules kept here:
# - Events are read from storage (Chat.stored_events), never from the
#   recovery window alone: whatever was stored while a receiver was down, or
#   this server was, is delivered when it is back.
# - Per URL, per section: one event at a time, in offset order; a failure is
#   retried with backoff (BACKOFF_S doubling to BACKOFF_MAX_S) while later events
#   of that section wait and other sections go on. URLs never wait for each
#   other, and the chat never waits for a receiver: a stored event only marks
#   its section due.
# - Progress (each section's epoch and last offset delivered) is saved through
#   the storage after every SAVE_EVERY events and when a section is caught up,
#   so a restart resumes at most a few events early (at least once, never a
#   gap). A section whose epoch changed starts again from its first event.
# - At start every section is looked at (what was stored while nobody
#   delivered it). With several nodes on one Redis, a section is delivered by
#   the node that holds its lease (LEASE_S, renewed while it delivers, its
#   saved progress read when it is taken); a node that dies loses its leases
#   within LEASE_S, and the others look at every section every RESCAN_S.

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from datetime import UTC, datetime
from typing import cast

import aiohttp
import msgspec
from standardwebhooks.webhooks import Webhook

from protocol.messages import StoredEvent

from .chat import Chat
from .metrics import Metrics
from .storage.base import SectionKey, StorageError, section_of_reads

logger = logging.getLogger("sectionchat.webhooks")

TIMEOUT_S = 10.0  # a receiver answers 2xx within this, or the attempt failed
BACKOFF_S = 1.0
BACKOFF_MAX_S = 300.0
MAX_SECTIONS_IN_FLIGHT = 8  # per URL: sections being delivered at once
PAGE = 100  # events read from storage at a time
SAVE_EVERY = 50  # events delivered between progress saves (and at the end of each catch-up)
LEASE_S = 10.0
RESCAN_S = 5.0

_encode = msgspec.json.Encoder().encode


def webhook_id(key: SectionKey, epoch: str, offset: int) -> str:
    """The same on every attempt, node and restart for one event."""
    digest = hashlib.blake2b("\x00".join((*key, epoch, str(offset))).encode(), digest_size=16).hexdigest()
    return f"msg_{digest}"


class Receiver:
    """One webhook URL: its sections' progress, the sections due, their deliveries."""

    def __init__(self, url: str, chat: Chat, signer: Webhook, http: aiohttp.ClientSession, metrics: Metrics):
        self.url, self.chat, self.signer, self.http, self.metrics = url, chat, signer, http, metrics
        self.name = "webhook " + url
        self.progress: dict[SectionKey, tuple[str, int]] = {}
        self.unsaved: dict[SectionKey, tuple[str, int]] = {}
        self.due: set[SectionKey] = set()
        self.running: dict[SectionKey, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(MAX_SECTIONS_IN_FLIGHT)
        self.holder = secrets.token_hex(8)
        self.held: set[SectionKey] = set()  # sections whose lease this node holds
        self.waiting: dict[SectionKey, int] = {}  # events known to wait, by section being delivered

    def mark_due(self, key: SectionKey) -> None:
        if section_of_reads(key) is not None:
            return  # read markers are not events
        task = self.running.get(key)
        if task is None:
            self.running[key] = asyncio.get_running_loop().create_task(self._deliver_section(key))
        else:
            self.due.add(key)  # picked up when the running delivery finishes its page

    async def _deliver_section(self, key: SectionKey) -> None:
        again = False
        try:
            async with self.slots:
                while True:
                    self.due.discard(key)
                    if not await self._lease(key):
                        return  # another node delivers it
                    if not await self._deliver_page(key) and key not in self.due:
                        break
                await self._save()
            again = key in self.due  # stored while the progress was being saved
        except StorageError as error:
            logger.warning("webhook %s: cannot read section %s: %s; retrying at the next rescan", self.url, key, error)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("webhook %s: delivery of section %s failed", self.url, key)
        finally:
            self.running.pop(key, None)
            if again:
                self.mark_due(key)

    async def document_deleted(self, document_id: str, keys: list[SectionKey]) -> None:
        for key in keys:
            task = self.running.pop(key, None)
            if task is not None:
                task.cancel()
            self.due.discard(key)
            self.progress.pop(key, None)
            self.unsaved.pop(key, None)
            self._waiting(key, 0)
        await self._save(always=True)
        body = {"type": "document_deleted", "document_id": document_id}
        await self._send(body, webhook_id(SectionKey(document_id, ""), "deleted", int(time.time())), document_id)

    async def _lease(self, key: SectionKey) -> bool:
        if not await self.chat.storage.lease(self.name, key, self.holder, LEASE_S):
            self.held.discard(key)
            return False
        if key not in self.held:
            self.held.add(key)
            if not self.chat.storage.shared:
                return True  # nobody else delivers: the progress in memory is the latest
            # Taken over (or a first look): another node may have got further.
            saved = (await self.chat.storage.load_progress(self.name)).get(key)
            if saved is not None and (key not in self.progress or saved[1] > self.progress[key][1]):
                self.progress[key] = saved
        return True

    async def _deliver_page(self, key: SectionKey) -> bool:
        """Deliver the next page of the section's events; whether there may be more."""
        epoch, done = self.progress.get(key, ("", 0))
        current_epoch, offset = await self.chat.position(key)
        if current_epoch != epoch:
            done = 0  # a new stream (or a first look): from its first event
        if done >= offset:
            self._waiting(key, 0)
            return False
        epoch, offset, events, has_more = await self.chat.stored_events(key, done, current_epoch, PAGE)
        for count, event in enumerate(events, 1):
            delivered = cast(int, event.offset)
            await self._post(key, epoch, event, delivered)
            self.progress[key] = self.unsaved[key] = (epoch, delivered)
            if count % SAVE_EVERY == 0:
                await self._save()
            self._waiting(key, offset - delivered)
        return has_more

    def _waiting(self, key: SectionKey, events: int) -> None:
        if events:
            self.waiting[key] = events
        else:
            self.waiting.pop(key, None)
        self.metrics.webhook_backlog.labels(self.url).set(sum(self.waiting.values()))

    async def _post(self, key: SectionKey, epoch: str, event: StoredEvent, offset: int) -> None:
        """POST one event until the receiver takes it (2xx within TIMEOUT_S)."""
        # The frame as a subscriber gets it, plus where it is from.
        body = {**msgspec.to_builtins(event), "document_id": key.document_id, "section_id": key.section_id}
        await self._send({**body, "epoch": epoch}, webhook_id(key, epoch, offset), f"{key} at offset {offset}", key)

    async def _send(self, body: dict, message_id: str, what: str, key: SectionKey | None = None) -> None:
        """POST a body, signed anew for each attempt, until the receiver answers 2xx (backing off meanwhile)."""
        data = _encode(body).decode()
        delay = BACKOFF_S
        while True:
            now = datetime.now(tz=UTC)
            headers = {
                "content-type": "application/json",
                "webhook-id": message_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": self.signer.sign(message_id, now, data),
            }
            try:
                async with self.http.post(self.url, data=data, headers=headers) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        return
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                reason = str(error) or type(error).__name__
            self.metrics.webhook_failures.labels(self.url).inc()
            logger.info("webhook %s: %s for %s; retrying in %.0f s", self.url, reason, what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
            if key is not None:
                await self.chat.storage.lease(self.name, key, self.holder, LEASE_S + delay)

    async def _save(self, *, always: bool = False) -> None:
        if not self.unsaved and not always:
            return
        unsaved, self.unsaved = self.unsaved, {}
        try:
            await self.chat.storage.save_progress(self.name, self.progress)
        except StorageError as error:
            self.unsaved.update(unsaved)
            logger.warning("webhook %s: cannot save progress (%s); events may be delivered again", self.url, error)


class Webhooks:
    """Every URL's receiver, fed by the chat's stored events and a periodic rescan of every section."""

    def __init__(self, chat: Chat, urls: tuple[str, ...], secret: str, metrics: Metrics):
        self.chat, self.urls, self.metrics = chat, urls, metrics
        self.signer = Webhook(secret)
        self.receivers: list[Receiver] = []
        self._http: aiohttp.ClientSession | None = None
        self._scanner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        for url in self.urls:
            receiver = Receiver(url, self.chat, self.signer, self._http, self.metrics)
            receiver.progress = await self.chat.storage.load_progress(receiver.name)
            self.receivers.append(receiver)
        self.chat.stored_hooks.append(self.section_stored)
        self.chat.deleted_hooks.append(self.document_deleted)
        self._scanner = asyncio.get_running_loop().create_task(self._rescan())

    @property
    def rescan_s(self) -> float | None:
        """How often every section is looked at again: with other nodes (their leases end), else only at start."""
        return RESCAN_S if self.chat.storage.shared else None

    def document_deleted(self, document_id: str, keys: list[SectionKey]) -> None:
        """Its undelivered events are dropped; each URL gets one `document_deleted` instead."""
        for receiver in self.receivers:
            asyncio.get_running_loop().create_task(receiver.document_deleted(document_id, keys))

    def section_stored(self, key: SectionKey) -> None:
        for receiver in self.receivers:
            receiver.mark_due(key)

    async def _rescan(self) -> None:
        """Every section: what was stored while nobody delivered it (down, or another node that died)."""
        while True:
            started = time.monotonic()
            try:
                for key in await self.chat.storage.all_sections():
                    self.section_stored(key)
            except StorageError as error:
                logger.warning("webhooks: cannot list the sections: %s", error)
                await asyncio.sleep(1.0)
                continue
            if self.rescan_s is None:
                return
            await asyncio.sleep(max(self.rescan_s - (time.monotonic() - started), 0.1))

    async def stop(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()
        tasks = [task for receiver in self.receivers for task in receiver.running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for receiver in self.receivers:
            await receiver._save()
        if self._http is not None:
            await self._http.close()
