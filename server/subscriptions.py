# Who listens to each section, who is present in it, and fan-out to them.
#
# Rules kept here:
# - Fan-out encodes a frame once per codec and never awaits: peers queue bytes.
#   One peer whose send raises is closed; the others still get the frame
#   (websockets' broadcast() guards each write the same way).
# - Presence is announced at most once per window, as the net change; a peer
#   that subscribed during the window was given a snapshot in its `subscribed`
#   reply, so it gets the change from that snapshot instead.
# - A document's watchers get a section's summary at most once per
#   SUMMARY_WINDOW_S, and only when it differs from the one they were last sent:
#   computed once per user, encoded once per user and codec.
# - Every frame to many peers goes through `_deliver`: encoded once per codec,
#   and one peer's failure (its send, its codec) is its own, never the others'.
# - Subscriptions and watched documents count together against max_subscriptions.

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from protocol import errors
from protocol.codec import Codec
from protocol.errors import ChatError
from protocol.messages import DocumentDeleted, Presence, SectionSummary, SectionSummaryEvent, ServerFrame

from .metrics import Metrics
from .peer import Peer
from .storage.base import SectionKey

logger = logging.getLogger("sectionchat.chat")

SUMMARY_WINDOW_S = 1.0  # a section's summary is sent to watchers at most this often

# The summary of a section for a user, or None when the section is not in memory.
Summarize = Callable[[SectionKey, str], SectionSummary | None]


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
        summarize: Summarize = lambda key, user: None,
    ):
        self.metrics = metrics
        self.max_subscriptions = max_subscriptions
        self.presence_window_s = presence_window_s
        self._local_presence_changed = local_presence_changed  # tells other nodes
        self._of_peer: dict[Peer, dict[SectionKey, Audience]] = {}
        self._by_user: dict[str, set[Peer]] = {}  # every open connection, subscribed or not
        self._summarize = summarize
        self._watching: dict[Peer, set[str]] = {}  # documents each connection watches
        self._watchers: dict[str, set[Peer]] = {}
        self._sent: dict[Peer, dict[SectionKey, SectionSummary]] = {}  # what each watcher was last sent
        self._changed: dict[str, set[SectionKey]] = {}  # sections whose summaries are due, per document
        self._summary_flush: dict[str, asyncio.TimerHandle] = {}

    def connect(self, peer: Peer) -> None:
        self._by_user.setdefault(peer.user, set()).add(peer)

    def check_room(self, peer: Peer, key: SectionKey | str) -> None:
        """Refuse a subscription (a section key) or a watch (a document id) past the per-connection limit."""
        subscribed, watched = self._of_peer.get(peer, {}), self._watching.get(peer, set())
        if key in subscribed or key in watched:
            return
        if len(subscribed) + len(watched) >= self.max_subscriptions:
            raise ChatError(
                errors.BAD_REQUEST,
                f"this connection subscribes to {len(subscribed)} sections and watches {len(watched)} documents, "
                "the limit; unsubscribe or unwatch first",
            )

    # Watching documents ----------------------------------------------------------

    def watch(self, peer: Peer, document_id: str, summaries: list[SectionSummary]) -> None:
        """The peer watches the document, having been sent these summaries in its reply."""
        self._watching.setdefault(peer, set()).add(document_id)
        self._watchers.setdefault(document_id, set()).add(peer)
        for summary in summaries:
            self._sent.setdefault(peer, {})[SectionKey(document_id, summary.section_id)] = summary

    def unwatch(self, peer: Peer, document_id: str) -> None:
        watched = self._watching.get(peer)
        if watched is None or document_id not in watched:
            return
        watched.discard(document_id)
        if not watched:
            del self._watching[peer]
        watchers = self._watchers[document_id]
        watchers.discard(peer)
        if not watchers:
            del self._watchers[document_id]
            flush = self._summary_flush.pop(document_id, None)
            if flush is not None:
                flush.cancel()
            self._changed.pop(document_id, None)
        sent = self._sent.get(peer, {})
        for key in [key for key in sent if key.document_id == document_id]:
            del sent[key]
        if not sent:
            self._sent.pop(peer, None)

    def watched(self, document_id: str) -> bool:
        return document_id in self._watchers

    def section_changed(self, key: SectionKey) -> None:
        """Something stored in the section may change its summary: watchers hear of it within the window."""
        if key.document_id not in self._watchers:
            return
        self._changed.setdefault(key.document_id, set()).add(key)
        if key.document_id not in self._summary_flush:
            loop = asyncio.get_running_loop()
            self._summary_flush[key.document_id] = loop.call_later(
                SUMMARY_WINDOW_S, self._flush_summaries, key.document_id
            )

    def _flush_summaries(self, document_id: str) -> None:
        del self._summary_flush[document_id]
        by_user: dict[str, list[Peer]] = {}
        for peer in self._watchers.get(document_id, ()):
            by_user.setdefault(peer.user, []).append(peer)
        for key in self._changed.pop(document_id, ()):
            for user, peers in by_user.items():
                summary = self._summarize(key, user)
                if summary is None:
                    continue
                due = [peer for peer in peers if self._sent.get(peer, {}).get(key) != summary]  # others: no change
                for peer in due:
                    self._sent.setdefault(peer, {})[key] = summary
                _deliver(due, SectionSummaryEvent(document_id=document_id, summary=summary))

    def document_deleted(self, document_id: str, audiences: list[Audience]) -> None:
        """Tell each subscriber and watcher of the document once; their subscriptions and watches of it end."""
        told: set[Peer] = set()
        for audience in audiences:
            for peer in list(audience.subscribers):
                self.unsubscribe(peer, audience.key)
                told.add(peer)
        for peer in list(self._watchers.get(document_id, ())):
            self.unwatch(peer, document_id)
            told.add(peer)
        _deliver(list(told), DocumentDeleted(document_id=document_id))

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
        for document_id in list(self._watching.get(peer, ())):
            self.unwatch(peer, document_id)
        peers = self._by_user.get(peer.user)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self._by_user[peer.user]

    def tell_user(self, audience: Audience, user: str, frame: ServerFrame, cause: Peer | None) -> None:
        """Send a frame to the user's connections in the audience, but the one that caused it."""
        _deliver([peer for peer in audience.subscribers if peer.user == user and peer is not cause], frame)

    def tell_users(self, users: list[str], document_id: str, frame: ServerFrame) -> None:
        """Send a frame to every connection of these users that may use the document."""
        peers = [peer for user in users for peer in self._by_user.get(user, ())]
        _deliver([peer for peer in peers if peer.documents is None or document_id in peer.documents], frame)

    def broadcast(self, audience: Audience, frame: ServerFrame, cause: Peer | None) -> None:
        """Send a frame to every subscriber but the one that caused it."""
        _deliver([peer for peer in audience.subscribers if peer is not cause], frame)
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
        for peer in snapshots.keys() & audience.subscribers:
            frame = _presence_frame(audience.key, snapshots[peer], present)
            if frame is not None:
                _deliver([peer], frame)
        if common is not None:
            _deliver([peer for peer in audience.subscribers if peer not in snapshots], common)


def _deliver(peers: list[Peer], frame: ServerFrame) -> None:
    """Send one frame to these peers, encoded once per codec.

    A peer whose send fails, or whose codec cannot carry the frame, is closed
    with 1011 (it reconnects and recovers); the others get the frame all the same.
    """
    encoded: dict[Codec, bytes | None] = {}
    for peer in peers:
        if peer.codec not in encoded:
            try:
                encoded[peer.codec] = peer.codec.encode(frame)
            except Exception:
                logger.exception("cannot encode a %s frame for %s clients", type(frame).__name__, peer.codec)
                encoded[peer.codec] = None
        data = encoded[peer.codec]
        try:
            if data is None:
                raise RuntimeError("the frame could not be encoded for this connection")
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
