# A client connection as the chat logic sees it: a user, the documents it may
# use, a codec, and a send that never blocks.

from __future__ import annotations

from typing import Protocol

from protocol import errors
from protocol.codec import Codec
from protocol.errors import ChatError
from protocol.messages import ServerFrame


class Peer(Protocol):
    """One client connection."""

    connection_id: str
    user: str
    documents: frozenset[str] | None  # the documents this peer may use; None: all
    moderator: bool  # may edit and delete anyone's messages, update anyone's session
    codec: Codec

    def send(self, data: bytes) -> None:
        """Queue one encoded frame; never blocks."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection (it reconnects); never blocks."""

    def stored(self, records: int) -> None:
        """A write of this peer's was decided and its reply sent: it stored `records` (0: it changed nothing)."""


def reply(peer: Peer, frame: ServerFrame) -> None:
    peer.send(peer.codec.encode(frame))


def check_access(peer: Peer, document_id: str) -> None:
    if peer.documents is not None and document_id not in peer.documents:
        raise ChatError(errors.FORBIDDEN, f"your token does not grant document {document_id!r}")
