"""Keeps the node's limits fresh and its usage counts in PostgreSQL (the I/O side of ``proxy/limits.py``).

:class:`UsageKeeper` runs one owned task. Every ``USAGE_FLUSH_S`` (default 1 s) it writes the bytes
the node relayed since the last flush as increments (``used_bytes = used_bytes + delta``) to every
usage row they belong to, reads back the quota row (so every node sees the others' bytes), re-reads
the credential record of each connection with open sessions (so a changed speed limit reaches open
sessions within a second even without a push), and reloads the ``ip_only`` index. A bus event for a
connection does the same at once for that connection. After a SIGKILL at most the bytes of the last
interval are lost; a clean stop flushes.
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
from .limits import ConnState
from .server import ProxyServer

log = logging.getLogger(__name__)

_INCREMENT = """
INSERT INTO connection_usage(connection_id, period, period_start, used_bytes) VALUES ($1, $2, $3, $4)
ON CONFLICT (connection_id, period, period_start) DO UPDATE SET used_bytes = connection_usage.used_bytes + $4
RETURNING used_bytes
"""
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
        self.flushes = 0
        self.errors = 0

    async def start(self) -> None:
        await self._load_access()
        self.proxy.on_connection_changed = self._connection_changed
        self.proxy.on_quota_reached = self._flush_soon
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the task and write what is left (a clean shutdown loses nothing)."""
        self.proxy.on_connection_changed = None
        self.proxy.on_quota_reached = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.flush()
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

    async def _run(self) -> None:
        next_flush = time.monotonic() + self.interval
        while True:
            timeout = max(0.0, next_flush - time.monotonic())
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

    async def flush(self) -> None:
        """Write every connection's counted bytes as increments, all in one transaction."""
        book = self.proxy.limits
        now = datetime.now(UTC)
        batch = book.take_increments()
        if not batch:
            return
        values: list[int | None] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                for st, delta in batch:
                    values.append(await self._write(conn, st, delta, now))
        except BaseException:
            for st, delta in batch:
                book.flush_failed(st, delta)
            raise
        for (st, delta), value in zip(batch, values, strict=True):
            book.flushed(st, delta, value)
        self.flushes += 1

    @staticmethod
    async def _write(conn: asyncpg.Connection, st: ConnState, delta: int, now: datetime) -> int | None:
        quota_row = st.period
        value = None
        if delta:
            for period, start in usage_rows(st.limits, now):
                v = await conn.fetchval(_INCREMENT, st.connection_id, period, start, delta)
                if (period, start) == quota_row:
                    value = v
        if quota_row is not None and value is None:
            value = await conn.fetchval(_READ, st.connection_id, quota_row[0], quota_row[1]) or 0
        return value
