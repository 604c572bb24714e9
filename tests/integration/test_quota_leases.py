"""Quota leases in the real PostgreSQL (migration 015): concurrent grants never add up past the quota, a
dead node's lease stops counting when it expires, and a flush moves bytes from a lease to the usage row."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from conftest import create_database

from proxy.usage_flush import _LEASE, _SETTLE
from proxyorch import db

pytestmark = pytest.mark.asyncio(loop_scope="session")
START = datetime(1970, 1, 1, tzinfo=UTC)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(pg_root):
    url = await create_database(pg_root[0])
    pool = await db.create_pool(url, min_size=4, max_size=12)
    await db.migrate(pool)
    yield pool
    await pool.close()


async def lease(pool, cid: str, node: str, want: int, quota: int, ttl: float = 10.0) -> tuple[int, int, int]:
    row = await pool.fetchrow(_LEASE, cid, "total", START, node, want, quota, ttl)
    return row["granted"], row["used"], row["others"]


async def test_concurrent_grants_to_many_nodes_never_pass_the_quota(pool):
    cid, quota = str(uuid.uuid4()), 1_000_000
    grants = await asyncio.gather(*(lease(pool, cid, f"n{i % 4}", 70_000, quota) for i in range(40)))
    total = sum(g for g, _u, _o in grants)
    assert total == quota  # every byte granted once, none beyond
    assert (await lease(pool, cid, "n9", 1, quota))[0] == 0


async def test_a_dead_nodes_lease_stops_counting_when_it_expires(pool):
    cid, quota = str(uuid.uuid4()), 500_000
    assert (await lease(pool, cid, "dead", 400_000, quota))[0] == 250_000  # half of what is left at most
    assert (await lease(pool, cid, "dead", 400_000, quota))[0] == 125_000
    granted, used, others = await lease(pool, cid, "live", 400_000, quota)
    assert (granted, used, others) == (65_536, 0, 375_000)  # the live lease of "dead" is held back (64 KiB least)
    await pool.execute("UPDATE connection_quota_leases SET expires_at = now() - interval '1 second' "
                       "WHERE connection_id = $1 AND node = 'dead'", cid)
    granted, _used, others = await lease(pool, cid, "live", 400_000, quota)
    assert others == 0 and granted == (quota - 65_536) // 2  # the dead node's lease is free again


async def test_flush_moves_bytes_from_the_lease_to_the_usage_row(pool):
    cid, quota = str(uuid.uuid4()), 100_000
    assert (await lease(pool, cid, "a", 50_000, quota))[0] == 50_000
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE connection_usage SET used_bytes = used_bytes + 30000 WHERE connection_id = $1", cid)
        await conn.execute(_SETTLE, cid, "total", START, "a", 30_000 + 20_000, 10.0)  # 30 000 used, 20 000 back
    assert await pool.fetchval("SELECT bytes FROM connection_quota_leases WHERE connection_id = $1", cid) == 0
    granted, used, others = await lease(pool, cid, "b", 1_000_000, quota)
    assert (granted, used, others) == (65_536, 30_000, 0)
    assert (await lease(pool, cid, "b", 1_000_000, quota))[0] == 100_000 - 30_000 - 65_536
