"""Reading credential records from PostgreSQL (the data plane's side of the store)."""

from __future__ import annotations

import asyncpg

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
       ARRAY(SELECT entry FROM blacklist_entries WHERE scope = 'global') AS glob_bl
FROM c
"""


class PostgresCredentialStore:
    """``fetch`` for :class:`AuthCache`, one query per miss."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def fetch(self, connection_id: str) -> StoredCredential | None:
        row = await self.pool.fetchrow(_QUERY, connection_id)
        if row is None:
            return None
        device = row["device_id"]
        members = [(d, c or None) for d, c in zip(row["member_ids"], row["member_countries"], strict=True)]
        return StoredCredential(connection_id, bytes(row["password_hash"]), str(device) if device else None,
                                list(row["conn_bl"]), list(row["dev_bl"]), list(row["glob_bl"]),
                                members, bool(row["is_pool"]))
