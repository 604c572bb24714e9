"""Keeps the node's limits fresh and its usage counts in PostgreSQL (the I/O side of ``proxy/limits.py``).

:class:`UsageKeeper` runs one owned task. Every ``USAGE_FLUSH_S`` (default 1 s) it writes the bytes
the node relayed since the last flush as increments (``used_bytes = used_bytes + delta``) to every
usage row they belong to, reads back the quota row (so every node sees the others' bytes), re-reads
the credential record of each connection with open sessions (so a changed speed limit reaches open
sessions within a second even without a push), and reloads the ``ip_only`` index. A bus event for a
connection does the same at once for that connection. After a SIGKILL at most the bytes of the last
interval are lost; a clean stop flushes.

**Quota leases.** A node relays a quota'd connection's bytes only out of a lease: the SQL function
``quota_lease`` (migration 015) locks the connection's usage row and grants what the quota leaves after
the used bytes and every node's live lease, so all nodes together never pass the quota. The flush moves
relayed bytes from the node's lease row to the usage row in the same transaction, gives back leases that
sat unused, and renews the rows (``LEASE_TTL_S``); the rows of a node that died stop counting then.
A node that gets nothing while another node still holds a lease waits (``LEASE_RETRY_S``); nothing left
anywhere closes the connection's sessions. Without PostgreSQL no lease is renewed and quota'd sessions
stop relaying (fail closed) until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg

from proxyorch.limits_model import usage_rows

from .auth_cache.cache import AuthCache
from .auth_cache.store import PostgresCredentialStore
from .limits import LEASE_TTL_S, ConnState
from .server import ProxyServer

log = logging.getLogger(__name__)

_INCREMENT = """
INSERT INTO connection_usage(connection_id, period, period_start, used_bytes) VALUES ($1, $2, $3, $4)
ON CONFLICT (connection_id, period, period_start) DO UPDATE SET used_bytes = connection_usage.used_bytes + $4
RETURNING used_bytes
"""
_LEASE = "SELECT granted, used, others FROM quota_lease($1, $2, $3, $4, $5, $6, $7)"
_SETTLE = """
UPDATE connection_quota_leases SET bytes = greatest(0, bytes - $5), expires_at = now() + make_interval(secs => $6)
WHERE connection_id = $1 AND period = $2 AND period_start = $3 AND node = $4
"""
LEASE_RETRY_S = 0.1  # a node that got nothing while others hold leases asks again after this
_READ = "SELECT used_bytes FROM connection_usage WHERE connection_id = $1 AND period = $2 AND period_start = $3"


class UsageKeeper:
    """Owns the flush/refresh task of one node."""

    def __init__(self, pool: asyncpg.Pool, proxy: ProxyServer, store: PostgresCredentialStore,
                 interval: float = 1.0) -> None:
        self.pool = pool
        self.proxy = proxy
        self.store = store
        self.cache: AuthCache = proxy.auth_cache
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._changed: set[str] = set()
        self._reload_access = True
        self._flush_now = False
        self._lease_now = False
        self._retry_at: float | None = None
        self.node = proxy.node_name
        self.flushes = 0
        self.leases = 0
        self.errors = 0

    async def start(self) -> None:
        await self._load_access()
        # a previous process of this node is gone: its leases are void (it may have been SIGKILLed)
        await self.pool.execute("DELETE FROM connection_quota_leases WHERE node = $1", self.node)
        self.proxy.limits.leasing = True
        self.proxy.on_connection_changed = self._connection_changed
        self.proxy.on_quota_reached = self._flush_soon
        self.proxy.on_lease_needed = self._lease_soon
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the task and write what is left (a clean shutdown loses nothing)."""
        self.proxy.on_connection_changed = None
        self.proxy.on_quota_reached = None
        self.proxy.on_lease_needed = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.flush()
            for st in self.proxy.limits.states.values():
                st.lease, st.lease_until = 0, 0.0
            await self.pool.execute("DELETE FROM connection_quota_leases WHERE node = $1", self.node)
        except Exception as exc:
            log.warning("final usage flush failed: %s", exc)

    def _connection_changed(self, connection_id: str | None) -> None:
        """Bus event: refresh that connection (None = everything) and the ip_only index now."""
        if connection_id is None:
            self._changed.update(self.proxy.limits.states)
        else:
            self._changed.add(connection_id)
        self._reload_access = True
        self._wake.set()

    def _flush_soon(self) -> None:
        """A quota was used up here: write the counts now rather than at the next interval."""
        self._flush_now = True
        self._wake.set()

    def _lease_soon(self) -> None:
        """A session needs (more of) a quota lease."""
        self._lease_now = True
        self._wake.set()

    async def _run(self) -> None:
        next_flush = time.monotonic() + self.interval
        while True:
            wake_at = next_flush if self._retry_at is None else min(next_flush, self._retry_at)
            timeout = max(0.0, wake_at - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if self._reload_access:
                    self._reload_access = False
                    await self._load_access()
                changed, self._changed = self._changed, set()
                if changed:
                    await self._refresh(changed)
                if self._lease_now or (self._retry_at is not None and time.monotonic() >= self._retry_at):
                    self._lease_now, self._retry_at = False, None
                    await self.lease()
                if self._flush_now:
                    self._flush_now = False
                    await self.flush()
                if time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + self.interval
                    await self.flush()
                    await self._refresh({cid for cid, st in self.proxy.limits.states.items() if st.sessions})
                    await self._load_access()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # store down: keep counting, try again next interval
                self.errors += 1
                log.warning("usage keeper: %s", exc)

    async def _load_access(self) -> None:
        self.proxy.access.replace(await self.store.ip_only_ranges())

    async def _refresh(self, connection_ids: set[str]) -> None:
        """Re-read the records of these connections and apply their limits to the open sessions."""
        book = self.proxy.limits
        for cid in connection_ids:
            st = book.states.get(cid)
            if st is None:
                continue
            record = await self.cache.lookup(cid)
            if record is None:
                continue
            old_rates = (st.down.rate if st.down else None, st.up.rate if st.up else None)
            book.state(record, time.monotonic(), datetime.now(UTC))
            if (st.down.rate if st.down else None, st.up.rate if st.up else None) != old_rates:
                for member in list(st.members):
                    member.limits_changed()

    async def lease(self) -> None:
        """Ask the store for the quota leases the sessions need; wake the sessions of each answer."""
        book = self.proxy.limits
        mono = time.monotonic()
        wanted = [st for st in book.states.values() if st.wants_lease(mono)]
        for st in sorted(wanted, key=lambda s: s.connection_id):  # one lock order on every node
            if st.period is None or st.limits.quota_bytes is None:
                continue
            st.lease_asked = True
            asked = time.monotonic()
            try:
                row = await self.pool.fetchrow(_LEASE, st.connection_id, st.period[0], st.period[1], self.node,
                                               st.lease_request(asked), st.limits.quota_bytes, LEASE_TTL_S)
            except BaseException:
                st.lease_asked = False
                self._retry_at = time.monotonic() + self.interval  # the store is failing: not every 100 ms
                raise
            self.leases += 1
            st.leased(row["granted"], row["used"], row["others"], asked)
            if not row["granted"] and not st.spent:  # another node holds what is left: ask again soon
                self._retry_at = time.monotonic() + LEASE_RETRY_S
            for member in list(st.members):
                member.lease_changed()
            book.drop_if_idle(st)

    async def flush(self) -> None:
        """Write every connection's counted bytes as increments, all in one transaction (with the
        lease rows: relayed bytes move from the node's lease to the usage row; unused leases go back)."""
        book = self.proxy.limits
        now = datetime.now(UTC)
        started = time.monotonic()
        batch = book.take_increments(started)
        if not batch:
            return
        values: list[tuple[int | None, int]] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                for st, delta in batch:
                    values.append(await self._write(conn, st, delta, now))
        except BaseException:
            for st, delta in batch:
                book.flush_failed(st, delta)
            raise
        for (st, delta), (value, given_back) in zip(batch, values, strict=True):
            book.flushed(st, delta, value, given_back, started if st.leasing else None)
        self.flushes += 1

    async def _write(self, conn: asyncpg.Connection, st: ConnState, delta: int, now: datetime) -> tuple[int | None, int]:
        quota_row = st.period
        value = None
        if delta:
            for period, start in usage_rows(st.limits, now):
                v = await conn.fetchval(_INCREMENT, st.connection_id, period, start, delta)
                if (period, start) == quota_row:
                    value = v
        given_back = 0
        if quota_row is not None and st.leasing:
            given_back = st.give_back
            await conn.execute(_SETTLE, st.connection_id, quota_row[0], quota_row[1], self.node,
                               delta + given_back, LEASE_TTL_S)
        if quota_row is not None and value is None:
            value = await conn.fetchval(_READ, st.connection_id, quota_row[0], quota_row[1]) or 0
        return value, given_back
