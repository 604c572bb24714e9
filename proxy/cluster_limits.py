"""Sharing a connection's limits between the nodes of a cluster through Redis (with ``REDIS_URL``).

- **Session slots**: a sorted set per connection (``proxyorch:slots:<id>``) of ``node:session``
  members scored by their expiry on the Redis clock. A Lua script drops expired members and adds
  one only while fewer than ``max_concurrent_sessions`` remain, so two nodes cannot both take the
  last slot. Each node renews its members every second (``HEARTBEAT_S``; they expire after
  ``SLOT_TTL_S``, so the slots of a killed node come free) and removes a member when its session ends.
- **Rate budget**: per connection and direction, the rate is leased in 100 ms slices of the Redis
  clock: a script grants at most ``rate × 0.1`` bytes per slice over all nodes, in the first half of
  a slice at most an equal share per node that asked recently, then whatever is left. A node's
  buckets (``TokenBucket(leased=True)``) are filled only by those grants.

Without Redis nothing here runs and the node's own :class:`proxy.limits.LimitBook` is the truth.
The quota does not go through Redis at all: nodes lease it from PostgreSQL (``proxy/usage_flush.py``).

**Redis down.** The first failed call logs one warning and the node falls back to its own counts:
a new session takes a slot of the node's own count only (so the cluster may hold up to N per node),
and each node grants itself the full rate (up to the rate per node). Redis is probed again every
``PROBE_S``; the first success logs that the shared counts are back (slots taken meanwhile are not
in Redis: they count on their node only until they end). The quota stays exact throughout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .limits import SLICE_S, LimitBook

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
SLOT_TTL_S = 5.0
LEASE_TICK_S = SLICE_S / 2
PROBE_S = 1.0  # Redis down: the shared counts are tried again this often (the node's own counts meanwhile)
REDIS_TIMEOUT_S = 1.0

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 2, #ARGV do redis.call('ZADD', KEYS[i - 1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
return 1
"""
_LEASE = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slice = math.floor(ms / 100)
local key = KEYS[1] .. ':' .. slice
local nodes = KEYS[1] .. ':nodes'
redis.call('ZADD', nodes, ms + 300, ARGV[3])
redis.call('ZREMRANGEBYSCORE', nodes, '-inf', ms)
redis.call('PEXPIRE', nodes, 1000)
local n = redis.call('ZCARD', nodes)
local cap = tonumber(ARGV[2])
local used = tonumber(redis.call('HGET', key, '_') or '0')
local mine = tonumber(redis.call('HGET', key, ARGV[3]) or '0')
local limit = cap - used
if ms % 100 < 50 then limit = math.min(limit, math.floor(cap / n) - mine) end
local grant = math.min(tonumber(ARGV[1]), limit)
if grant <= 0 then return 0 end
redis.call('HINCRBY', key, '_', grant)
redis.call('HINCRBY', key, ARGV[3], grant)
redis.call('PEXPIRE', key, 1000)
return grant
"""


class ClusterLimits:
    """One per node when ``REDIS_URL`` is set: session slots and rate leases shared through Redis."""

    def __init__(self, redis_url: str, node_name: str, book: LimitBook) -> None:
        import redis.asyncio as aioredis

        self.redis: Any = aioredis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                            socket_connect_timeout=REDIS_TIMEOUT_S)
        self.node = node_name
        self.book = book
        self.slots: dict[str, tuple[str, str]] = {}  # member -> (key, connection id): this node's slots
        self._seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._releases: set[asyncio.Task[None]] = set()
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._lease = self.redis.register_script(_LEASE)
        self.errors = 0
        self.down_until = 0.0  # Redis failed: the node's own counts until this (monotonic) time
        self.degraded = False

    def unreachable(self, exc: BaseException) -> None:
        """A Redis call failed: use the node's own counts for ``PROBE_S`` (logged once per outage)."""
        self.errors += 1
        self.down_until = asyncio.get_running_loop().time() + PROBE_S
        if not self.degraded:
            self.degraded = True
            log.warning("Redis unreachable (%s): session slots and rate limits fall back to this node's own "
                        "counts (up to the limit per node); quotas stay exact through PostgreSQL", exc)

    def _reachable(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("Redis reachable again: session slots and rate limits are shared by the cluster again")

    def _skip(self) -> bool:
        """Redis failed less than ``PROBE_S`` ago: do not wait for it."""
        return self.degraded and asyncio.get_running_loop().time() < self.down_until

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._leases())]

    async def close(self) -> None:
        for t in [*self._tasks, *self._releases]:
            t.cancel()
        for t in [*self._tasks, *self._releases]:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.slots:
            try:
                pipe = self.redis.pipeline()
                for member, (key, _cid) in self.slots.items():
                    pipe.zrem(key, member)
                await pipe.execute()
            except Exception as exc:
                log.warning("could not free session slots: %s", exc)
        await self.redis.aclose()

    # -- session slots ---------------------------------------------------------------------------
    async def acquire(self, connection_id: str, cap: int) -> str | None:
        """A slot of the connection's ``cap`` over the whole cluster: its member name, or None (all taken)."""
        if self._skip():
            raise ConnectionError("Redis down (probing again shortly)")
        self._seq += 1
        member = f"{self.node}:{self._seq}"
        key = f"proxyorch:slots:{connection_id}"
        ok = await self._acquire(keys=[key], args=[cap, member, SLOT_TTL_S])
        self._reachable()
        if not ok:
            return None
        self.slots[member] = (key, connection_id)
        return member

    def own(self, task: asyncio.Task[None]) -> None:
        """Keep a session's slot request until it ends (cancelled on close)."""
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def release(self, member: str) -> None:
        """Give the slot back (in the background; it also expires by itself)."""
        entry = self.slots.pop(member, None)
        if entry is None:
            return
        task = asyncio.get_running_loop().create_task(self._zrem(entry[0], member))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _zrem(self, key: str, member: str) -> None:
        if self._skip():
            return  # it expires by itself
        try:
            await self.redis.zrem(key, member)
        except Exception as exc:
            self.unreachable(exc)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if not self.slots:
                continue
            members = list(self.slots.items())
            if self._skip():
                continue
            try:
                await self._renew(keys=[k for _m, (k, _c) in members], args=[SLOT_TTL_S, *[m for m, _ in members]])
            except Exception as exc:
                self.unreachable(exc)

    # -- rate leases -----------------------------------------------------------------------------
    async def _leases(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(LEASE_TICK_S)
            now = loop.time()
            elapsed, last = now - last, now
            if self._skip():
                self._grant_locally(elapsed)
                continue
            try:
                if await self._lease_once():
                    self._reachable()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: each node goes on at the full rate rather than stall
                self.unreachable(exc)
                self._grant_locally(elapsed)

    def _grant_locally(self, elapsed: float) -> None:
        """Redis down: each bucket gets the rate for the time that passed (the node's own budget)."""
        for st in list(self.book.states.values()):
            for bucket in (st.down, st.up):
                if bucket is not None:
                    bucket.grant(int(bucket.rate * min(elapsed, SLICE_S)))

    async def _lease_once(self) -> bool:
        """One round of rate leases; True when Redis was asked."""
        asked = False
        for st in list(self.book.states.values()):
            if not st.members:
                continue
            for direction, bucket in (("down", st.down), ("up", st.up)):
                if bucket is None:
                    continue
                want = bucket.want()
                if want <= 0:
                    continue
                asked = True
                granted = await self._lease(keys=[f"proxyorch:rate:{st.connection_id}:{direction}"],
                                            args=[want, int(bucket.rate * SLICE_S), self.node])
                if granted:
                    bucket.grant(int(granted))
        return asked
