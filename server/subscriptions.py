# Who listens to each section, who is present in it, and fan-out to them.
#
# Rules kept here:
# - Fan-out encodes a frame once per codec and never awaits: peers queue bytes.
#   One peer whose send raises is closed; the others still get the frame
#   (websockets' broadcast() guards each write the same way).
# - Presence is announced at most once per window, as the net change; a peer
#   that subscribed during the window was given a snapshot in its `subscribed`
#   reply, so it gets the change from that snapshot instead.

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from protocol import errors
from protocol.codec import Codec
from protocol.errors import ChatError
from protocol.messages import Presence, ServerFrame

from .metrics import Metrics
from .peer import Peer
from .storage.base import SectionKey

logger = logging.getLogger("sectionchat.chat")


class Audience:
    """One section's subscribers and presence."""

    def __init__(self, key: SectionKey):
        self.key = key
        self.subscribers: set[Peer] = set()
        self.presence: Counter[str] = Counter()  # this node's users: subscribed connections each
        self.remote_presence: set[str] = set()  # users present through other nodes
        # Presence as last announced, and the snapshot each peer that
        # subscribed since then was given (see Subscriptions._flush_presence).
        self.announced: set[str] = set()
        self.snapshots: dict[Peer, set[str]] = {}
        self.presence_flush: asyncio.TimerHandle | None = None

    def present(self) -> set[str]:
        return set(self.presence) | self.remote_presence

    def close(self) -> None:
        """The section leaves memory: nobody is left to tell of presence."""
        if self.presence_flush is not None:
            self.presence_flush.cancel()


class Subscriptions:
    """Every connection's subscriptions, bounded per connection."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_subscriptions: int = 100,
        presence_window_s: float = 0.1,
        local_presence_changed: Callable[[SectionKey, set[str]], None] = lambda key, users: None,
    ):
        self.metrics = metrics
        self.max_subscriptions = max_subscriptions
        self.presence_window_s = presence_window_s
        self._local_presence_changed = local_presence_changed  # tells other nodes
        self._of_peer: dict[Peer, dict[SectionKey, Audience]] = {}

    def check_room(self, peer: Peer, key: SectionKey) -> None:
        """Refuse a subscription past the per-connection limit."""
        subscribed = self._of_peer.get(peer, {})
        if key not in subscribed and len(subscribed) >= self.max_subscriptions:
            raise ChatError(
                errors.BAD_REQUEST,
                f"this connection is subscribed to {len(subscribed)} sections, the limit; unsubscribe first",
            )

    def subscribe(self, peer: Peer, audience: Audience) -> None:
        """Add the peer to the audience (again: nothing changes); the caller replies with a snapshot."""
        if peer in audience.subscribers:
            return
        audience.subscribers.add(peer)
        self._of_peer.setdefault(peer, {})[audience.key] = audience
        self.metrics.subscriptions.inc()
        audience.presence[peer.user] += 1
        if audience.presence[peer.user] == 1:
            self._present_here_changed(audience)
        if audience.presence_flush is not None:
            audience.snapshots[peer] = audience.present()

    def unsubscribe(self, peer: Peer, key: SectionKey) -> None:
        audience = self._of_peer.get(peer, {}).pop(key, None)
        if audience is None:
            return
        audience.subscribers.discard(peer)
        self.metrics.subscriptions.dec()
        audience.snapshots.pop(peer, None)
        audience.presence[peer.user] -= 1
        if audience.presence[peer.user] == 0:
            del audience.presence[peer.user]
            self._present_here_changed(audience)

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection that has gone: its subscriptions end and its presence with them."""
        for key in list(self._of_peer.get(peer, ())):
            self.unsubscribe(peer, key)
        self._of_peer.pop(peer, None)

    def broadcast(self, audience: Audience, frame: ServerFrame, cause: Peer | None) -> None:
        """Send a frame to every subscriber but the one that caused it."""
        encoded: dict[Codec, bytes] = {}
        for peer in audience.subscribers:
            if peer is cause:
                continue
            data = encoded.get(peer.codec)
            if data is None:
                data = encoded[peer.codec] = peer.codec.encode(frame)
            _send(peer, data)
        delivered = len(audience.subscribers) - (cause in audience.subscribers)
        if delivered:
            self.metrics.events_delivered.inc(delivered)

    def remote_presence_changed(self, audience: Audience, users: set[str]) -> None:
        if audience.subscribers and users != audience.remote_presence:
            audience.remote_presence = users
            self._presence_changed(audience)

    def _present_here_changed(self, audience: Audience) -> None:
        self._local_presence_changed(audience.key, set(audience.presence))
        self._presence_changed(audience)

    def _presence_changed(self, audience: Audience) -> None:
        if audience.presence_flush is None:
            loop = asyncio.get_running_loop()
            audience.presence_flush = loop.call_later(self.presence_window_s, self._flush_presence, audience)

    def _flush_presence(self, audience: Audience) -> None:
        """Announce the net presence change of the window to every subscriber."""
        audience.presence_flush = None
        present = audience.present()
        snapshots, audience.snapshots = audience.snapshots, {}
        common = _presence_frame(audience.key, audience.announced, present)
        audience.announced = present
        encoded: dict[Codec, bytes] = {}
        for peer in audience.subscribers:
            if peer in snapshots:
                frame = _presence_frame(audience.key, snapshots[peer], present)
                if frame is not None:
                    _send(peer, peer.codec.encode(frame))
            elif common is not None:
                data = encoded.get(peer.codec)
                if data is None:
                    data = encoded[peer.codec] = peer.codec.encode(common)
                _send(peer, data)


def _send(peer: Peer, data: bytes) -> None:
    try:
        peer.send(data)
    except Exception:
        logger.exception("sending to connection %s failed; closing it", peer.connection_id)
        try:
            peer.close(1011, "internal error")
        except Exception:
            logger.exception("closing connection %s failed", peer.connection_id)


def _presence_frame(key: SectionKey, before: set[str], after: set[str]) -> Presence | None:
    joined, left = sorted(after - before), sorted(before - after)
    if not joined and not left:
        return None
    return Presence(document_id=key.document_id, section_id=key.section_id, joined=joined, left=left)
