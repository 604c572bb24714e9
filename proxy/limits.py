"""Enforcing a connection's limits on this node, sans-I/O: token buckets, session slots, the quota.

One :class:`LimitBook` per node holds a :class:`ConnState` per connection that has open sessions
or unflushed bytes. All sessions of a connection share its state: one download bucket, one upload
bucket (burst at most 0.5 s of the rate), one session count, one quota. Times are passed in
(``now``: monotonic seconds); nothing here does I/O. The adapter (``proxy/server.py``) asks
:meth:`ConnState.allow` how many bytes of a chunk the quota (lease) still lets through and
:meth:`TokenBucket.take` how many the bucket's tokens cover, relays only those, counts them with
:meth:`ConnState.count`, and holds the rest (``proxy/pacing.py``) until :meth:`TokenBucket.until` or
a new lease; ``proxy/usage_flush.py`` takes the leases and writes the counted bytes to PostgreSQL.
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
MIN_PAUSE_S = 0.005  # a waiting source sleeps at least this long
MIN_GRAIN = 4096     # ... and is woken for at least this many bytes (or GRAIN_S of the rate, or the burst)
GRAIN_S = 0.02
SLICE_S = 0.1  # cluster mode: the rate budget is leased per connection per 100 ms slice

QUOTA_EXHAUSTED = Refusal(ReplyCode.NOT_ALLOWED, "traffic quota exhausted", 403, blocked=True,
                          block_reason="quota")
SESSIONS_FULL = Refusal(ReplyCode.NOT_ALLOWED, "too many concurrent sessions", 429, blocked=True,
                        block_reason="sessions", retry_after=1)


class TokenBucket:
    """``rate`` bytes/s with a burst of ``BURST_S`` seconds. The relay takes at most the tokens there are
    (:meth:`take`), so no read is relayed past the bucket: what does not fit waits (:meth:`until`).

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

    def take(self, n: int, now: float) -> int:
        """Take up to ``n`` bytes' worth of tokens; how many were taken (never more than there are)."""
        self._refill(now)
        k = min(n, int(self.tokens))
        if k > 0:
            self.tokens -= k
            return k
        return 0

    def grain(self) -> int:
        """The least a waiting source is woken for (no timer storm of tiny writes)."""
        return int(max(1.0, min(self.burst, max(MIN_GRAIN, self.rate * GRAIN_S))))

    def until(self, n: int, now: float) -> float:
        """Seconds until ``n`` tokens (at most :meth:`grain`) are there; leased: the next lease tick."""
        self._refill(now)
        need = min(n, self.grain())
        if self.tokens >= need:
            return 0.0
        if self.leased:
            return SLICE_S / 2
        return max(MIN_PAUSE_S, (need - self.tokens) / self.rate)


LEASE_TTL_S = 10.0     # a quota lease row counts this long after its last renewal (each usage flush)
LEASE_MIN = 64 * 1024  # the first lease of a connection; it doubles while the node uses it up quickly
LEASE_MAX = 64 * 1024 * 1024
SPENT_KEEP_S = 5.0     # a used-up quota's state is kept this long after its sessions end (see drop_if_idle)


@dataclass(slots=True)
class ConnState:
    """One connection on this node: limits, open sessions, buckets, and the quota's byte counts.

    With ``leasing`` (the node's usage keeper runs) the quota is shared by every node through leases
    taken from the store (``proxy/usage_flush.py``): the node relays only the bytes of its ``lease``,
    which is valid until ``lease_until`` (monotonic). Without it the node caps by what it has seen."""

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
    leasing: bool = False
    lease: int = 0            # bytes of the quota this node may still relay
    lease_until: float = 0.0  # the lease is void after this (its row may have expired in the store)
    lease_chunk: int = LEASE_MIN
    lease_asked: bool = False  # a request is queued or under way
    lease_at: float = -1e9     # when the last grant arrived
    spent: bool = False        # the store said: nothing left for anyone (until the limits change)
    spent_at: float = 0.0
    recent: int = 0            # bytes counted since the last flush (idle leases go back)
    give_back: int = 0         # unused lease taken back here, to subtract from the store's row

    def used(self) -> int:
        return self.db_used + self.pending + self.inflight

    def exhausted(self) -> bool:
        q = self.limits.quota_bytes
        if q is None:
            return False
        if self.leasing:
            return self.spent or self.db_used >= q
        return self.used() >= q

    def allow(self, n: int, now: float = 0.0) -> int:
        """How many of ``n`` bytes the quota still lets through (leasing: out of a valid lease)."""
        q = self.limits.quota_bytes
        if q is None:
            return n
        if self.leasing:
            return min(n, self.lease) if now < self.lease_until else 0
        return max(0, min(n, q - self.used()))

    def count(self, n: int) -> None:
        self.pending += n
        if self.leasing and self.limits.quota_bytes is not None:
            self.lease -= n
            self.recent += n

    def wants_lease(self, now: float) -> bool:
        """Leasing: ask the store for more now (the lease runs low or is about to expire)."""
        if not self.leasing or self.limits.quota_bytes is None or self.lease_asked or self.spent:
            return False
        return self.lease < self.lease_chunk // 2 or now > self.lease_until - LEASE_TTL_S / 2

    def lease_request(self, now: float) -> int:
        """The bytes to ask for (the chunk doubles while leases go fast, halves when they last)."""
        if now - self.lease_at < 0.5:
            self.lease_chunk = min(LEASE_MAX, self.lease_chunk * 2)
        elif now - self.lease_at > 2.0:
            self.lease_chunk = max(LEASE_MIN, self.lease_chunk // 2)
        return self.lease_chunk

    def leased(self, granted: int, used: int, others: int, asked_at: float) -> None:
        """The store's answer: ``granted`` more, ``used`` flushed in total, ``others`` leased elsewhere."""
        self.lease_asked = False
        self.db_used = max(self.db_used, used)
        self.lease_until = max(self.lease_until, asked_at + LEASE_TTL_S)  # the row was renewed at least then
        if granted > 0:
            self.lease += granted
            self.lease_at = asked_at
        elif self.lease <= 0 and others == 0:
            self.spent = True  # nothing left here, nothing held by another node: the quota is used up
            self.spent_at = asked_at

    def apply(self, limits: Limits, used: int, now: float, wall: datetime, leased: bool = False) -> None:
        """New limits (from a fresh credential record whose store read saw ``used`` bytes)."""
        if (limits.quota_bytes, limits.quota_period, limits.quota_start) != (
                self.limits.quota_bytes, self.limits.quota_period, self.limits.quota_start):
            self.spent = False  # a new quota: ask the store again
        self.limits = limits
        key = period_start(limits.quota_period, limits.quota_start, wall) if limits.quota_bytes else None
        if key != self.period:
            self.period, self.db_used = key, used
            self.lease, self.lease_until, self.spent = 0, 0.0, False  # a lease is of one usage row
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
        self.leasing = False  # quotas through store leases (set by the usage keeper when it starts)

    def state(self, record: CredentialRecord, now: float, wall: datetime) -> ConnState:
        """The connection's state, created or refreshed from ``record``."""
        st = self.states.get(record.connection_id)
        if st is None:
            st = self.states[record.connection_id] = ConnState(record.connection_id, leasing=self.leasing)
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
            self.drop_if_idle(st)

    def drop_if_idle(self, st: ConnState, now: float | None = None) -> None:
        """Forget an idle state; one whose quota was found used up stays ``SPENT_KEEP_S`` (it refuses
        new sessions while the credential records the nodes read may not show the last bytes yet)."""
        if st.sessions == 0 and not st.pending and not st.inflight and not st.members and st.lease <= 0 \
                and not st.lease_asked and not st.give_back \
                and not (st.spent and (now is None or now - st.spent_at < SPENT_KEEP_S)):
            self.states.pop(st.connection_id, None)

    def live_usage(self, connection_id: str) -> tuple[int, int]:
        """(bytes counted here but not yet in the store, open sessions here)."""
        st = self.states.get(connection_id)
        return (st.pending + st.inflight, st.sessions) if st is not None else (0, 0)

    # -- flushing ----------------------------------------------------------------------------------
    def take_increments(self, now: float = 0.0) -> list[tuple[ConnState, int]]:
        """The bytes to write now, moved from pending to inflight (one entry per connection with a state).

        Leasing: a lease that expired here, or that sat unused since the last flush (and is older than
        a second), is taken back
        (``give_back``, written with the increments)."""
        out = []
        for st in list(self.states.values()):
            delta, st.pending = st.pending, 0
            st.inflight += delta
            if st.leasing and st.lease > 0 and (now >= st.lease_until or (not st.recent and now - st.lease_at > 1.0)):
                st.give_back += st.lease
                st.lease = 0
            st.recent = 0
            out.append((st, delta))
        return out

    def flushed(self, st: ConnState, delta: int, quota_row_value: int | None, given_back: int = 0,
                renewed_at: float | None = None) -> None:
        """The store confirmed ``delta`` (and ``given_back`` of the lease, the lease renewed at ``renewed_at``);
        ``quota_row_value`` is the quota row's value after it."""
        st.inflight -= delta
        st.give_back -= given_back
        if renewed_at is not None:
            st.lease_until = max(st.lease_until, renewed_at + LEASE_TTL_S)
        if quota_row_value is not None:
            st.db_used = max(st.db_used, quota_row_value)  # includes every node's flushed bytes
        self.drop_if_idle(st, renewed_at)

    def flush_failed(self, st: ConnState, delta: int) -> None:
        """Put ``delta`` back to be written next time."""
        st.inflight -= delta
        st.pending += delta
