"""Request rate limits of the API: token buckets keyed by token or address (sans-I/O: time is passed in)."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """``rate`` requests per second per key with bursts of ``burst``; at most ``max_keys`` keys kept.

    Keys untouched for longest are forgotten first (a forgotten key starts again with a full
    bucket), so memory stays bounded whatever keys clients invent.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def acquire(self, key: str, now: float) -> float:
        """Take one request for ``key``: 0.0 when allowed, else the seconds until one is."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
