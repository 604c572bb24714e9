"""Enforcing a connection's limits on this node, sans-I/O: token buckets, session slots, the quota.

One :class:`LimitBook` per node holds a :class:`ConnState` per connection that has open sessions
or unflushed bytes. All sessions of a connection share its state: one download bucket, one upload
bucket (burst at most 0.5 s of the rate), one session count, one quota. Times are passed in
(``now``: monotonic seconds); nothing here does I/O. The adapter (``proxy/server.py``) asks
:meth:`ConnState.allow` how many bytes of a chunk the quota still lets through, counts what it
relayed with :meth:`ConnState.count`, and pauses the source side for the delay a bucket returns;
``proxy/usage_flush.py`` writes the counted bytes to PostgreSQL as increments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from device_tunnel.replies import ReplyCode
from proxyorch.limits_model import NO_LIMITS, Limits, period_start

from .session_policy import Refusal

if TYPE_CHECKING:
    from .auth_cache.cache import CredentialRecord

BURST_S = 0.5  # a bucket holds at most this many seconds of its rate
MIN_PAUSE_S = 0.005  # a debt pauses the source at least this long (no timer storms for tiny debts)
SLICE_S = 0.1  # cluster mode: the rate budget is leased per connection per 100 ms slice

QUOTA_EXHAUSTED = Refusal(ReplyCode.NOT_ALLOWED, "traffic quota exhausted", 403, blocked=True,
                          block_reason="quota")
SESSIONS_FULL = Refusal(ReplyCode.NOT_ALLOWED, "too many concurrent sessions", 429, blocked=True,
                        block_reason="sessions", retry_after=1)


class TokenBucket:
    """``rate`` bytes/s with a burst of ``BURST_S`` seconds; the level may go below zero (a debt).

    ``leased`` (several nodes share the rate): the bucket does not refill with time; it holds at
    most one slice of the rate and only :meth:`grant` (a lease from the cluster budget) fills it."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "leased")

    def __init__(self, rate: int, now: float, leased: bool = False) -> None:
        self.leased = leased
        self.rate = float(rate)
        self.burst = self.rate * (SLICE_S if leased else BURST_S)
        self.tokens = 0.0 if leased else self.burst
        self.stamp = now

    def grant(self, n: int) -> None:
        """Add ``n`` leased bytes (capped at the burst)."""
        self.tokens = min(self.burst, self.tokens + n)

    def want(self) -> int:
        """Leased mode: the bytes to ask the cluster for now (what would fill the bucket, at most a slice)."""
        return int(max(0.0, min(self.rate * SLICE_S, self.burst - self.tokens)))

    def _refill(self, now: float) -> None:
        if self.leased:
            self.stamp = now
            return
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def set_rate(self, rate: int, now: float) -> None:
        self._refill(now)
        self.rate = float(rate)
        self.burst = self.rate * (SLICE_S if self.leased else BURST_S)
        self.tokens = min(self.tokens, self.burst)

    def consume(self, n: int, now: float) -> float:
        """Take ``n`` bytes; the seconds the source must pause until the level is back at zero."""
        self._refill(now)
        self.tokens -= n
        return max(MIN_PAUSE_S, -self.tokens / self.rate) if self.tokens < 0 else 0.0

    def wait(self, now: float) -> float:
        """Seconds until the level is back at zero (0 when it is)."""
        self._refill(now)
        return max(MIN_PAUSE_S, -self.tokens / self.rate) if self.tokens < 0 else 0.0


@dataclass(slots=True)
class ConnState:
    """One connection on this node: limits, open sessions, buckets, and the quota's byte counts."""

    connection_id: str
    limits: Limits = NO_LIMITS
    sessions: int = 0
    down: TokenBucket | None = None
    up: TokenBucket | None = None
    period: tuple[str, datetime] | None = None  # the usage row of the quota
    db_used: int = 0      # the quota row's value in the store, as last seen (includes our flushed bytes)
    pending: int = 0      # relayed, not yet handed to the flusher
    inflight: int = 0     # handed to the flusher, not yet confirmed
    members: set = field(default_factory=set)  # open sessions (adapters), to wake on a limit change

    def used(self) -> int:
        return self.db_used + self.pending + self.inflight

    def exhausted(self) -> bool:
        q = self.limits.quota_bytes
        return q is not None and self.used() >= q

    def allow(self, n: int) -> int:
        """How many of ``n`` bytes the quota still lets through."""
        q = self.limits.quota_bytes
        if q is None:
            return n
        return max(0, min(n, q - self.used()))

    def count(self, n: int) -> None:
        self.pending += n

    def apply(self, limits: Limits, used: int, now: float, wall: datetime, leased: bool = False) -> None:
        """New limits (from a fresh credential record whose store read saw ``used`` bytes)."""
        self.limits = limits
        key = period_start(limits.quota_period, limits.quota_start, wall) if limits.quota_bytes else None
        if key != self.period:
            self.period, self.db_used = key, used
        else:
            self.db_used = max(self.db_used, used)  # the store's counter only grows within a period
        self.down = _bucket(self.down, limits.download_bytes_per_s, now, leased)
        self.up = _bucket(self.up, limits.upload_bytes_per_s, now, leased)


def _bucket(old: TokenBucket | None, rate: int | None, now: float, leased: bool) -> TokenBucket | None:
    if rate is None:
        return None
    if old is None:
        return TokenBucket(rate, now, leased)
    if old.rate != rate:
        old.set_rate(rate, now)
    return old


class LimitBook:
    """Every :class:`ConnState` of this node, by connection id (``leased``: rates shared by a cluster)."""

    def __init__(self, leased: bool = False) -> None:
        self.states: dict[str, ConnState] = {}
        self.leased = leased

    def state(self, record: CredentialRecord, now: float, wall: datetime) -> ConnState:
        """The connection's state, created or refreshed from ``record``."""
        st = self.states.get(record.connection_id)
        if st is None:
            st = self.states[record.connection_id] = ConnState(record.connection_id)
        st.apply(record.limits, record.used_bytes, now, wall, self.leased)
        return st

    def admit(self, record: CredentialRecord, now: float, wall: datetime) -> Refusal | None:
        """Take a session slot, or the refusal (quota exhausted, all sessions in use)."""
        st = self.state(record, now, wall)
        if st.exhausted():
            return QUOTA_EXHAUSTED
        cap = st.limits.max_concurrent_sessions
        if cap is not None and st.sessions >= cap:
            return SESSIONS_FULL
        st.sessions += 1
        return None

    def release(self, connection_id: str) -> None:
        st = self.states.get(connection_id)
        if st is not None and st.sessions > 0:
            st.sessions -= 1
            self._drop_if_idle(st)

    def _drop_if_idle(self, st: ConnState) -> None:
        if st.sessions == 0 and not st.pending and not st.inflight and not st.members:
            self.states.pop(st.connection_id, None)

    def live_usage(self, connection_id: str) -> tuple[int, int]:
        """(bytes counted here but not yet in the store, open sessions here)."""
        st = self.states.get(connection_id)
        return (st.pending + st.inflight, st.sessions) if st is not None else (0, 0)

    # -- flushing ----------------------------------------------------------------------------------
    def take_increments(self) -> list[tuple[ConnState, int]]:
        """The bytes to write now, moved from pending to inflight (one entry per connection with a state)."""
        out = []
        for st in list(self.states.values()):
            delta, st.pending = st.pending, 0
            st.inflight += delta
            out.append((st, delta))
        return out

    def flushed(self, st: ConnState, delta: int, quota_row_value: int | None) -> None:
        """The store confirmed ``delta``; ``quota_row_value`` is the quota row's value after it."""
        st.inflight -= delta
        if quota_row_value is not None:
            st.db_used = quota_row_value  # includes every node's flushed bytes
        self._drop_if_idle(st)

    def flush_failed(self, st: ConnState, delta: int) -> None:
        """Put ``delta`` back to be written next time."""
        st.inflight -= delta
        st.pending += delta
