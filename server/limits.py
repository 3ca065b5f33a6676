# Rate limits as plain arithmetic on a clock: no I/O, no tasks, no timers.

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`."""

    __slots__ = ("rate", "burst", "tokens", "updated", "clock")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, cost: float = 1.0) -> bool:
        self._refill()
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def add(self, amount: float = 1.0) -> float:
        """Count something against the bucket from the other side (strikes)."""
        self._refill()
        self.tokens = max(0.0, self.tokens - amount)
        return self.burst - self.tokens


class RequestRate:
    """A connection's request rate, and whether it is abusing it.

    Every frame costs a token from a bucket of one second's worth, checked
    before it is decoded: a malformed frame (not JSON, the wrong frame kind,
    bad fields, an unknown type) costs the same as a request. Refused frames
    are strikes; strikes fade at the same rate, so only a client that keeps
    pushing past the limit (about three seconds' worth of refused frames)
    counts as abusive and gets closed.
    """

    __slots__ = ("_requests", "_strikes", "_strike_limit")

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic):
        burst = max(per_second, 1.0)
        self._requests = TokenBucket(per_second, burst, clock)
        self._strike_limit = max(3 * per_second, 30.0)
        self._strikes = TokenBucket(per_second, self._strike_limit, clock)

    def allow(self) -> bool:
        return self._requests.take()

    def strike(self) -> bool:
        """Record a refused request; True when the connection should be closed."""
        return self._strikes.add() >= self._strike_limit


class PerUserQuota:
    """At most `count` actions per user per `period_s`, e.g. sessions created per minute."""

    def __init__(self, count: int, period_s: float, clock: Callable[[], float] = time.monotonic):
        self.count = count
        self.period_s = period_s
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, user: str) -> bool:
        if self.count <= 0:
            return True
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._forget_full_buckets()
            bucket = self._buckets[user] = TokenBucket(self.count / self.period_s, self.count, self.clock)
        return bucket.take()

    def _forget_full_buckets(self) -> None:
        # A full bucket says nothing a new one would not.
        for user, bucket in list(self._buckets.items()):
            bucket.take(0)
            if bucket.tokens >= bucket.burst:
                del self._buckets[user]
