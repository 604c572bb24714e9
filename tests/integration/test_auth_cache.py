"""The auth cache against a real PostgreSQL store and the real LISTEN/NOTIFY bus."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest
import pytest_asyncio
from conftest import create_database

from proxy.auth_cache.cache import MISSING, AuthCache, normalize_connection_id
from proxy.auth_cache.store import PostgresCredentialStore
from proxy.authenticate import Authenticator, AuthOutcome
from proxy.ratelimit import FailureLimiter
from proxy.session_core import ProxyMetrics
from proxyorch import accounts, db
from proxyorch.bus import PostgresBus, RedisBus
from proxyorch.tokens import hash_password

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(pg_root):
    url = await create_database(pg_root[0])
    pool = await db.create_pool(url, min_size=1, max_size=5)
    await db.migrate(pool)
    user_id, _ = await accounts.create_user(pool, "cache")
    device = await accounts.create_device(pool, user_id)
    yield {"pool": pool, "url": url, "device": device["remote_device_id"]}
    await pool.close()


async def new_credential(pool: asyncpg.Pool, device: str | None, password: str = "p" * 16) -> str:
    cid = str(uuid.uuid4())
    await pool.execute("INSERT INTO proxy_credentials(connection_id, password_hash, device_id) VALUES ($1,$2,$3)",
                       cid, hash_password(cid, password), device)
    return cid


async def test_record_holds_hash_device_and_compiled_blacklists(store):
    pool = store["pool"]
    cid = await new_credential(pool, store["device"], "secret-password!")
    await pool.execute("INSERT INTO blacklist_entries(scope, scope_id, entry) VALUES ('connection', $1, 'x.test')", cid)
    await pool.execute("INSERT INTO blacklist_entries(scope, scope_id, entry) VALUES ('device', $1, 'y.test')",
                       store["device"])
    cache = AuthCache(PostgresCredentialStore(pool).fetch, ttl=0.1)
    rec = await cache.lookup(cid)
    assert rec is not None and rec.device_id == store["device"]
    assert rec.check_password("secret-password!") and not rec.check_password("secret-password?")
    scopes = {scope: bl.match("a.x.test") or bl.match("b.y.test") for scope, bl in rec.blacklists}
    assert scopes["connection"] == "x.test" and scopes["device"] == "y.test"
    assert b"secret-password!" not in rec.password_hash


async def test_change_is_served_at_most_ttl_after_it_happened(store):
    pool = store["pool"]
    cid = await new_credential(pool, store["device"])
    cache = AuthCache(PostgresCredentialStore(pool).fetch, ttl=0.1)
    assert (await cache.lookup(cid)).device_id == store["device"]
    await pool.execute("UPDATE proxy_credentials SET device_id = NULL WHERE connection_id = $1", cid)
    changed = time.monotonic()
    while (await cache.lookup(cid)).device_id is not None:
        await asyncio.sleep(0.005)
    assert time.monotonic() - changed <= 0.1 + 0.05  # TTL, plus one query's slack


async def test_unknown_ids_are_cached_negatively_and_queries_are_shared(store):
    pool = store["pool"]
    cache = AuthCache(PostgresCredentialStore(pool).fetch, ttl=10)
    ghost = str(uuid.uuid4())
    results = await asyncio.gather(*(cache.lookup(ghost) for _ in range(20)))
    assert results == [None] * 20
    assert cache.misses == 1  # one store query for twenty concurrent lookups
    assert cache.get_cached(ghost) is None and cache.get_cached(str(uuid.uuid4())) is MISSING


async def test_notify_invalidates_far_sooner_than_the_ttl(store):
    pool = store["pool"]
    cid = await new_credential(pool, store["device"])
    cache = AuthCache(PostgresCredentialStore(pool).fetch, ttl=60)  # only the push can refresh it
    bus = PostgresBus(store["url"])
    await bus.start(cache.handle_event)
    try:
        assert (await cache.lookup(cid)).device_id == store["device"]
        await pool.execute("UPDATE proxy_credentials SET device_id = NULL WHERE connection_id = $1", cid)
        t0 = time.monotonic()
        while cache.get_cached(cid) is not MISSING:
            assert time.monotonic() - t0 < 2
            await asyncio.sleep(0.001)
        assert (await cache.lookup(cid)).device_id is None
    finally:
        await bus.close()


async def test_redis_bus_delivers_published_events(redis_url):
    seen: list[str] = []
    bus = RedisBus(redis_url)
    await bus.start(seen.append)
    try:
        await bus.publish("conn:abc")
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == ["conn:abc"]
    finally:
        await bus.close()


async def test_connection_ids_are_normalised_or_rejected():
    u = uuid.uuid4()
    assert normalize_connection_id(str(u).upper()) == str(u)
    assert normalize_connection_id("not-a-uuid") is None
    assert normalize_connection_id("x" * 300) is None


async def _authenticate(auth, addr: str, user: str, password: str):
    got: list[AuthOutcome] = []
    pending = auth.authenticate(addr, user, password, got.append)
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        await asyncio.sleep(0.01)
    return pending, got[0]


async def test_authenticator_checks_the_store_then_the_cache_and_rate_limits_failures(store):
    pool = store["pool"]
    cid = await new_credential(pool, store["device"], "right-password!!")
    metrics = ProxyMetrics()
    auth = Authenticator(AuthCache(PostgresCredentialStore(pool).fetch, ttl=5), FailureLimiter(limit=3), metrics)
    pending, out = await _authenticate(auth, "198.51.100.1", cid, "right-password!!")
    assert pending and out.record is not None and out.record.connection_id == cid  # first: from the store
    pending, out = await _authenticate(auth, "198.51.100.1", cid.upper(), "right-password!!")
    assert not pending and out.record is not None  # then: from the cache, id normalised
    _p, out = await _authenticate(auth, "198.51.100.1", "not-a-uuid", "x")
    assert out.record is None and out.reason == "unknown connection"
    for _ in range(3):
        _p, out = await _authenticate(auth, "198.51.100.2", cid, "wrong-password!!")
        assert out.record is None and out.reason == "invalid credentials"
    _p, out = await _authenticate(auth, "198.51.100.2", cid, "right-password!!")
    assert out.record is None and out.reason == "too many failed attempts" and metrics.auth_rate_limited == 1
    assert auth.tasks == set()


async def test_authenticator_reports_an_unreachable_store(store):
    pool = await db.create_pool(store["url"], min_size=1, max_size=1)
    await pool.close()  # a closed pool: every lookup fails
    auth = Authenticator(AuthCache(PostgresCredentialStore(pool).fetch, ttl=5, stale_if_error=0),
                         FailureLimiter(), ProxyMetrics())
    pending, out = await _authenticate(auth, "198.51.100.3", str(uuid.uuid4()), "x")
    assert pending and out.record is None and out.unavailable


async def test_a_credential_in_use_is_reread_before_it_expires_and_changes_still_land_within_the_ttl(store):
    pool = store["pool"]
    cid = await new_credential(pool, store["device"], "right-password!!")
    cache = AuthCache(PostgresCredentialStore(pool).fetch, ttl=0.5)
    auth = Authenticator(cache, FailureLimiter(limit=10000), ProxyMetrics())  # the wrong-password polls below
    pending, out = await _authenticate(auth, "198.51.100.4", cid, "right-password!!")
    assert pending and out.record is not None  # the first one reads the store
    waited = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.6:  # three TTLs of a credential in steady use
        pending, out = await _authenticate(auth, "198.51.100.4", cid, "right-password!!")
        assert out.record is not None
        waited += pending
        await asyncio.sleep(0.01)
    # without the re-read, every expiry made a session wait for the store (three here)
    assert waited <= 1 and cache.misses >= 3
    await pool.execute("UPDATE proxy_credentials SET password_hash = $2 WHERE connection_id = $1",
                       cid, hash_password(cid, "new-password!!!!"))
    changed = time.monotonic()
    while True:
        _p, out = await _authenticate(auth, "198.51.100.5", cid, "new-password!!!!")
        if out.record is not None:
            break
        await asyncio.sleep(0.01)
    assert time.monotonic() - changed <= 0.5 + 0.1  # still at most the TTL (plus one query's slack)
    auth.close()


async def test_a_lookup_after_an_invalidation_never_joins_a_read_that_began_before_it(store):
    pool = store["pool"]
    cid = await new_credential(pool, store["device"])
    real = PostgresCredentialStore(pool).fetch
    gate, reads = asyncio.Event(), []

    async def fetch(connection_id: str):  # the real store; the first read is held after it ran
        reads.append(connection_id)
        row = await real(connection_id)
        if len(reads) == 1:
            await gate.wait()
        return row

    cache = AuthCache(fetch, ttl=60)
    early = asyncio.ensure_future(cache.refresh(cid))  # e.g. the re-read of a credential in use
    while not reads:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # that read has seen the old row
    await pool.execute("UPDATE proxy_credentials SET device_id = NULL WHERE connection_id = $1", cid)
    cache.invalidate(cid)  # the push of the change
    fresh = await asyncio.wait_for(cache.lookup(cid), 5)
    assert fresh is not None and fresh.device_id is None  # a new read, not the old one's answer
    gate.set()
    assert (await early).device_id == store["device"]
    assert cache.get_cached(cid).device_id is None  # the late old read did not overwrite the fresh entry
