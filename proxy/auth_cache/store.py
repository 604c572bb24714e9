"""Reading credential records from PostgreSQL (the data plane's side of the store)."""

from __future__ import annotations

import asyncpg

from .cache import StoredCredential

_QUERY = """
SELECT c.password_hash, c.device_id,
       ARRAY(SELECT entry FROM blacklist_entries WHERE scope = 'connection' AND scope_id = c.connection_id) AS conn_bl,
       ARRAY(SELECT entry FROM blacklist_entries WHERE scope = 'device' AND scope_id = c.device_id) AS dev_bl,
       ARRAY(SELECT entry FROM blacklist_entries WHERE scope = 'global') AS glob_bl
FROM proxy_credentials c WHERE c.connection_id = $1
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
        return StoredCredential(connection_id, bytes(row["password_hash"]), str(device) if device else None,
                                list(row["conn_bl"]), list(row["dev_bl"]), list(row["glob_bl"]))
