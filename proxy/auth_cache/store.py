"""Reading credential records from PostgreSQL (the data plane's side of the store)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from proxyorch.limits_model import Limits, parse_network, period_start

from .cache import StoredCredential

# Pool members: the listed devices, or the connection owner's devices of the pool's country, or
# (no pool) the one associated device. Device blacklists of every member apply to a pool.
_QUERY = """
WITH c AS (SELECT * FROM proxy_credentials WHERE connection_id = $1),
m AS (
    SELECT d.remote_device_id, d.country,
           COALESCE(array_position(c.pool_device_ids, d.remote_device_id), 0) AS pos, d.added
    FROM devices d, c
    WHERE (c.pool_device_ids IS NOT NULL AND d.remote_device_id = ANY(c.pool_device_ids))
       OR (c.pool_device_ids IS NULL AND c.pool_country IS NOT NULL AND upper(d.country) = c.pool_country
           AND d.user_id = (SELECT r.owner_user_id FROM rms_connections r WHERE r.connection_id = c.connection_id))
       OR (c.pool_device_ids IS NULL AND c.pool_country IS NULL AND d.remote_device_id = c.device_id)
)
SELECT c.password_hash, c.device_id,
       (c.pool_device_ids IS NOT NULL OR c.pool_country IS NOT NULL) AS is_pool,
       ARRAY(SELECT remote_device_id::text FROM m ORDER BY pos, added, remote_device_id) AS member_ids,
       ARRAY(SELECT COALESCE(country, '') FROM m ORDER BY pos, added, remote_device_id) AS member_countries,
       ARRAY(SELECT entry FROM blacklist_entries WHERE scope = 'connection' AND scope_id = c.connection_id) AS conn_bl,
       ARRAY(SELECT entry FROM blacklist_entries
             WHERE scope = 'device' AND scope_id IN (SELECT remote_device_id FROM m)) AS dev_bl,
       ARRAY(SELECT entry FROM blacklist_entries WHERE scope = 'global') AS glob_bl,
       l.download_bytes_per_s, l.upload_bytes_per_s, l.max_concurrent_sessions, l.quota_bytes, l.quota_period,
       l.quota_set_at, l.access_mode, l.allowed_ips
FROM c LEFT JOIN connection_limits l USING (connection_id)
"""
_USED = "SELECT used_bytes FROM connection_usage WHERE connection_id = $1 AND period = $2 AND period_start = $3"


def limits_of(row: asyncpg.Record) -> Limits:
    """The :class:`Limits` of a row with the ``connection_limits`` columns (NULLs when it has none)."""
    return Limits(row["download_bytes_per_s"], row["upload_bytes_per_s"], row["max_concurrent_sessions"],
                  row["quota_bytes"], row["quota_period"], row["quota_set_at"], row["access_mode"] or "password",
                  tuple(parse_network(e) for e in (row["allowed_ips"] or ())))


class PostgresCredentialStore:
    """``fetch`` for :class:`AuthCache`, one query per miss (two when the connection has a quota)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def fetch(self, connection_id: str) -> StoredCredential | None:
        row = await self.pool.fetchrow(_QUERY, connection_id)
        if row is None:
            return None
        device = row["device_id"]
        members = [(d, c or None) for d, c in zip(row["member_ids"], row["member_countries"], strict=True)]
        limits = limits_of(row)
        used = 0
        if limits.quota_bytes is not None:
            key = period_start(limits.quota_period, limits.quota_start, datetime.now(UTC))
            used = await self.pool.fetchval(_USED, connection_id, key[0], key[1]) or 0
        return StoredCredential(connection_id, bytes(row["password_hash"]), str(device) if device else None,
                                list(row["conn_bl"]), list(row["dev_bl"]), list(row["glob_bl"]),
                                members, bool(row["is_pool"]), limits, used)

    async def ip_only_ranges(self) -> list[tuple[str, list[str]]]:
        """Every ``ip_only`` connection and its ranges (for :class:`proxy.access.AccessIndex`)."""
        rows = await self.pool.fetch(
            "SELECT connection_id, allowed_ips FROM connection_limits WHERE access_mode = 'ip_only'")
        return [(str(r["connection_id"]), list(r["allowed_ips"])) for r in rows]
