"""Per-agent token buckets for request creation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    updated: float
    refused_since_refill: bool = False


@dataclass
class RateLimiter:
    per_minute: int
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, now: float | None = None) -> tuple[bool, int, bool]:
        """Take one token for `key`.

        Returns (allowed, retry_after_seconds, first_refusal). `first_refusal` is
        true for the first refusal after a success, so a flood is audited once,
        not once per refused call.
        """
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.refused_since_refill = False
            return True, 0, False
        first = not bucket.refused_since_refill
        bucket.refused_since_refill = True
        retry = math.ceil((1.0 - bucket.tokens) / rate) if rate > 0 else 60
        return False, max(1, retry), first
