"""Per-agent budgets: token buckets for each kind of call (create, poll, retrieve, call), and counts of
calls held open (`?wait=`, brokered calls)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    per_minute: int
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, now: float | None = None) -> tuple[bool, int]:
        """Take one token for `key`: (allowed, seconds until one is available again)."""
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True, 0
        retry = math.ceil((1.0 - bucket.tokens) / rate) if rate > 0 else 60
        return False, max(1, retry)


@dataclass
class InFlight:
    """How many calls of one kind are open at once: for one agent, and in all.

    A budget of rates says nothing of calls that stay open (a `?wait=`, a brokered call to
    a slow destination); this one does. Over it, a call is refused at once, never queued.
    """

    per_key: int
    total: int = 0  # 0: no bound on the sum
    _held: Counter[str] = field(default_factory=Counter)

    def full(self, key: str) -> str | None:
        """Why another call for `key` may not start now ("agent" or "total"), or None if it may."""
        if self._held[key] >= self.per_key:
            return "agent"
        if self.total and sum(self._held.values()) >= self.total:
            return "total"
        return None

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        self._held[key] += 1
        try:
            yield
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
