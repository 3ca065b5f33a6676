# Many nodes on one Redis behaving as one server: stored events and presence.
#
# Rules kept here:
# - Redis pub/sub is at-most-once, so a message is only a hint: the chat reads
#   what it missed from the stored log (Chat.section_changed -> catch up). After
#   any reconnect every loaded section catches up, so a lost hint costs latency,
#   never an event.
# - Presence: each node writes its own users per section under its node id and
#   heartbeats its liveness in a sorted set. A node that dies without a word
#   stops heartbeating; after `presence_ttl_s` the others drop its users.
# - Redis being away never stops the node: it retries with backoff and resyncs.
# - A `mentioned` notice is told by the node whose client stored the message:
#   to its own connections, and to the others' through MENTIONS_CHANNEL (at
#   most once, like presence: it is not a stored event; the counts that
#   summaries carry come from the stored messages).

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from protocol.messages import Mentioned

from .chat import Chat
from .storage.base import SectionKey, StorageError
from .storage.redis import EVENTS_CHANNEL, parse_hint, section_prefix

logger = logging.getLogger("sectionchat.cluster")

PRESENCE_CHANNEL = "sc:presence"
MENTIONS_CHANNEL = "sc:mentions"  # `mentioned` notices for users whose connections are on other nodes


class MentionNotice(msgspec.Struct, array_like=True):
    users: list[str]
    notice: Mentioned


NODES_KEY = "sc:nodes"

_encode = msgspec.json.Encoder().encode
_decode_key = msgspec.json.Decoder(tuple[str, str]).decode
_decode_users = msgspec.json.Decoder(list[str]).decode
_decode_mention = msgspec.json.Decoder(MentionNotice).decode


def presence_key(key: SectionKey) -> str:
    return f"{section_prefix(key)}:presence"


class RedisCluster:
    """This node's link to the others: event hints in, presence both ways."""

    def __init__(self, client: redis.Redis, chat: Chat, *, presence_ttl_s: float = 15.0):
        self.client = client
        self.chat = chat
        self.presence_ttl_s = presence_ttl_s
        self.node_id = secrets.token_hex(6)
        self._dirty: dict[SectionKey, set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        try:
            await self._heartbeat_once()
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        for job in (self._listen(), self._heartbeat()):
            self._tasks.add(asyncio.create_task(job))
        try:
            await asyncio.wait_for(self._subscribed.wait(), 10)
        except TimeoutError:
            await self.stop()
            raise StorageError("could not subscribe to Redis pub/sub") from None

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Leave politely, so others need not wait for the TTL.
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in self.chat.local_presence():
                    pipe.hdel(presence_key(key), self.node_id)
                    pipe.publish(PRESENCE_CHANNEL, _encode(key))
                pipe.zrem(NODES_KEY, self.node_id)
                await pipe.execute()
        except RedisError as error:
            logger.warning("could not withdraw presence from Redis: %s", error)

    # Presence out -------------------------------------------------------------

    def local_presence_changed(self, key: SectionKey, users: set[str]) -> None:
        self._dirty[key] = users
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_presence())

    async def _flush_presence(self) -> None:
        try:
            while self._dirty:
                dirty, self._dirty = self._dirty, {}
                try:
                    await self._write_presence(dirty, announce=True)
                except RedisError as error:
                    logger.warning("could not publish presence: %s (the heartbeat retries)", error)
                    return
        finally:
            self._flusher = None

    async def _write_presence(self, presence: dict[SectionKey, set[str]], *, announce: bool) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, users in presence.items():
                if users:
                    pipe.hset(presence_key(key), self.node_id, _encode(sorted(users)))
                else:
                    pipe.hdel(presence_key(key), self.node_id)
                if announce:
                    pipe.publish(PRESENCE_CHANNEL, _encode(key))
            await pipe.execute()

    # Mentions out -------------------------------------------------------------

    def mentioned(self, users: list[str], notice: Mentioned) -> None:
        """Tell the other nodes' connections of these users (at most once: a notice, not a stored event)."""
        task = asyncio.create_task(self._publish_mention(_encode(MentionNotice(users, notice))))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_mention(self, data: bytes) -> None:
        try:
            await self.client.publish(MENTIONS_CHANNEL, data)
        except RedisError as error:
            logger.warning("could not publish a mention to other nodes: %s", error)

    # Presence in --------------------------------------------------------------

    async def remote_presence(self, key: SectionKey) -> set[str]:
        """Users present in a section through other live nodes."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(presence_key(key))
                pipe.zrangebyscore(NODES_KEY, time.time() - self.presence_ttl_s, "+inf")
                by_node, live = await pipe.execute()
        except RedisError as error:
            raise StorageError(f"Redis: {error}") from None
        live_nodes = {node.decode() for node in live}
        users: set[str] = set()
        for node, data in by_node.items():
            if node.decode() != self.node_id and node.decode() in live_nodes:
                users.update(_decode_users(data))
        return users

    async def _refresh_remote(self, keys) -> None:
        for key in keys:
            self.chat.remote_presence_changed(key, await self.remote_presence(key))

    # Background jobs ------------------------------------------------------------

    async def _heartbeat_once(self) -> None:
        await self.client.zadd(NODES_KEY, {self.node_id: time.time()})
        local = self.chat.local_presence()
        if local:
            await self._write_presence(local, announce=False)
        await self._refresh_remote(list(local))
        await self.client.zremrangebyscore(NODES_KEY, "-inf", time.time() - 10 * self.presence_ttl_s)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.presence_ttl_s / 3)
            try:
                await self._heartbeat_once()
            except (RedisError, StorageError) as error:
                logger.warning("presence heartbeat failed: %s", error)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL, PRESENCE_CHANNEL, MENTIONS_CHANNEL)
                    if self._subscribed.is_set():
                        logger.info("reconnected to Redis; catching up")
                    self._subscribed.set()
                    # Whatever happened while we were not listening is in the logs.
                    self.chat.section_changed(None)
                    await self._refresh_remote(list(self.chat.local_presence()))
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._dispatch(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, StorageError, OSError) as error:
                logger.warning("lost Redis (%s); retrying in %.1f s", error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == EVENTS_CHANNEL.encode():
            hint = parse_hint(data)
            if hint is not None:
                self.chat.section_changed(*hint)
        elif channel == MENTIONS_CHANNEL.encode():
            try:
                mention = _decode_mention(data)
            except msgspec.MsgspecError:
                return
            self.chat.tell_mentioned(mention.users, mention.notice)
        elif channel == PRESENCE_CHANNEL.encode():
            try:
                key = SectionKey(*_decode_key(data))
            except msgspec.MsgspecError:
                return
            if self.chat.watches(key):
                task = asyncio.create_task(self._refresh_quietly(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _refresh_quietly(self, key: SectionKey) -> None:
        try:
            await self._refresh_remote([key])
        except StorageError as error:
            logger.warning("could not read presence: %s", error)
