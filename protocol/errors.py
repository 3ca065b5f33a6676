# The error codes of the wire protocol and the one exception that carries them.
#
# A ChatError is always the peer's business: it becomes an `error` frame and
# the connection stays open. Our own bugs are not ChatErrors; the transport
# turns them into `internal` with a logged trace id.

from __future__ import annotations

BAD_REQUEST = "bad_request"
UNKNOWN_TYPE = "unknown_type"
NOT_FOUND = "not_found"
FORBIDDEN = "forbidden"
CONFLICT = "conflict"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

# Codes for which the same request may succeed if it is retried later.
TEMPORARY = frozenset({RATE_LIMITED, UNAVAILABLE})


class ChatError(Exception):
    """A request the server refuses, with the protocol's error code."""

    def __init__(self, code: str, message: str, reply_to: str | int | None = None):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reply_to = reply_to

    @property
    def temporary(self) -> bool:
        return self.code in TEMPORARY

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
