"""Failed-authentication limiter: per client address and per connectionId, sliding window.

Per address: an address with ``limit`` failures in ``window`` is refused outright.
Per connectionId: once an id collects ``limit`` failures (from anywhere), only addresses that
authenticated successfully for it recently may keep trying, so a distributed guesser is stopped
while the id's real users (on their known addresses) are unaffected.
"""

from __future__ import annotations

import time
from collections import deque


class FailureLimiter:
    """``blocked(key)`` is True once ``limit`` failures were recorded for ``key`` within ``window``."""

    def __init__(self, limit: int = 20, window: float = 60.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}
        self._good: dict[str, dict[str, float]] = {}   # connection id -> {address: last success}
        self.total_failures = 0
        self.total_blocked = 0

    def _trim(self, key: str, now: float) -> deque[float] | None:
        q = self._failures.get(key)
        if q is None:
            return None
        edge = now - self.window
        while q and q[0] < edge:
            q.popleft()
        if not q:
            del self._failures[key]
            return None
        return q

    def blocked(self, key: str) -> bool:
        q = self._trim(key, time.monotonic())
        if q is not None and len(q) >= self.limit:
            self.total_blocked += 1
            return True
        return False

    def allowed(self, address: str, connection_id: str | None) -> bool:
        """May this address attempt to authenticate (as this connection id) now?"""
        if self.blocked(address):
            return False
        if connection_id is not None and self.blocked(connection_id):
            seen = self._good.get(connection_id, {}).get(address)
            return seen is not None and seen > time.monotonic() - self.window * 10
        return True

    def record_success(self, address: str, connection_id: str) -> None:
        good = self._good.setdefault(connection_id, {})
        if len(good) >= 64:
            good.pop(next(iter(good)))
        good[address] = time.monotonic()
        if len(self._good) > self.max_keys:
            self._good.pop(next(iter(self._good)))

    def record_failure(self, key: str) -> None:
        now = time.monotonic()
        self.total_failures += 1
        q = self._trim(key, now)
        if q is None:
            if len(self._failures) >= self.max_keys:
                # Drop the oldest keys rather than grow without bound under a spray of addresses.
                for old in list(self._failures)[: self.max_keys // 10]:
                    del self._failures[old]
            q = self._failures[key] = deque(maxlen=self.limit * 2)
        q.append(now)
