"""``python -m benchmarks.cluster [--seconds S] [--conns C] [--scale N]``: cluster figures of issue 13.

1. **Sessions/s, ``serve --workers 2`` vs 1** on this machine: one embedded PostgreSQL, one C load
   generator target (echo), one device agent (12 tunnels so that, with ``SO_REUSEPORT``, every
   worker holds some), the loadgen ``rate`` mode (SOCKS5 connect + auth + 64-byte echo + close, C
   concurrent connections) for S seconds against the shared proxy port. Same request log setting
   as the product default (on).
2. **Footprint per 100 000 devices and 1 000 000 credentials**, measured at ``--scale`` rows and
   extrapolated linearly: PostgreSQL bytes (``pg_total_relation_size`` of ``devices``,
   ``proxy_credentials``, ``rms_connections``, indexes included) after inserting N devices and
   N credentials the way the RMS stores them (32-byte keyed hash, AES-GCM ciphertext), and the
   data plane's auth-cache bytes per cached credential (``tracemalloc`` around N records in an
   :class:`AuthCache`). Redis keys: the presence map is the relay branch's design and had not
   landed when this was written, so it is not measured here (the invalidation bus keeps no keys).

Prints one JSON object; the numbers go into ``benchmarks/RESULTS.md`` by hand (section "Cluster").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

from . import loadgen as lg_mod
from .procs import (
    HOST,
    PY,
    Node,
    Stack,
    admin,
    make_credential,
    node_env,
    start_postgres,
    start_target,
    wait_port,
    wait_socks,
)

ROOT = Path(__file__).resolve().parent.parent


def start_serve(stack: Stack, database_url: str, name: str, workers: int) -> Node:
    data_dir = stack.tmp / name
    data_dir.mkdir(parents=True, exist_ok=True)
    env = node_env(data_dir, database_url, name, {"LOG_LEVEL": "WARNING"})
    node = Node(name, int(env["PROXY_PORT"]), int(env["TUNNEL_PORT"]), int(env["API_PORT"]), data_dir, env)
    argv = [PY, "-m", "proxyorch", "serve"] + (["--workers", str(workers)] if workers > 1 else [])
    node.proc = stack.spawn(name, argv, env, cwd=data_dir)
    wait_port(node.api_port, 120, node.proc.popen)
    wait_port(node.proxy_port, 30, node.proc.popen)
    time.sleep(3 if workers > 1 else 0.5)  # the other workers finish starting
    return node


def sessions_per_second(stack: Stack, exe: Path, target, database_url: str, workers: int, seconds: float,
                        conns: int) -> dict:
    node = start_serve(stack, database_url, f"w{workers}", workers)
    user = admin(node, "create-user", "--name", f"bench-{workers}")["user_id"]
    cred = make_credential(node, user, f"bench-dev-{workers}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    agent = stack.spawn(f"agent-w{workers}", [PY, "-m", "proxyorch", "device-agent", "--server",
                                              f"{HOST}:{node.tunnel_port}", "--device-id", cred.device_id,
                                              "--token", cred.device_token, "--allow-private", "--tunnels", "12",
                                              "--log-level", "WARNING"], env)
    wait_socks(node.proxy_port, target.echo_port, cred.connection_id, cred.password, timeout=60)
    time.sleep(2)  # all 12 tunnels up
    gen = lg_mod.LoadGen(exe)
    via = lg_mod.Via(node.proxy_port, cred.connection_id, cred.password)
    res = gen.rate(via, target.echo_port, conns, seconds, warmup=1.0)
    stack.stop(agent)
    stack.stop(node.proc)
    return {"workers": workers, "rate": res.get("rate"), "errors": res.get("errors"),
            "p50_us": res.get("p50_us"), "p99_us": res.get("p99_us")}


async def footprint(database_url: str, n: int) -> dict:
    """PostgreSQL and auth-cache bytes per device / credential, from ``n`` of each."""
    import asyncpg

    from proxy.auth_cache.cache import AuthCache, StoredCredential
    from proxy.auth_cache.hashing import hash_password
    from proxyorch import db

    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        await db.migrate(pool)
        tables = ("devices", "proxy_credentials", "rms_connections")

        async def sizes() -> dict[str, int]:
            await pool.execute("VACUUM ANALYZE devices, proxy_credentials, rms_connections")
            return {t: await pool.fetchval("SELECT pg_total_relation_size($1::regclass)", t) for t in tables}

        before = await sizes()
        user = await pool.fetchval("INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id", uuid.uuid4(),
                                   "footprint-" + uuid.uuid4().hex)
        devs = [uuid.uuid4() for _ in range(n)]
        await pool.copy_records_to_table(
            "devices", columns=["remote_device_id", "user_id", "name", "token_hash", "brand", "model", "country"],
            records=[(d, user, f"dev-{d}", secrets.token_bytes(32), "Samsung", "SM-A525F", "DE") for d in devs])
        conns = [uuid.uuid4() for _ in range(n)]
        await pool.copy_records_to_table(
            "proxy_credentials", columns=["connection_id", "password_hash", "device_id"],
            records=[(c, hash_password(str(c), secrets.token_urlsafe(12)), devs[i]) for i, c in enumerate(conns)])
        await pool.copy_records_to_table(
            "rms_connections", columns=["connection_id", "owner_user_id", "name", "password_encrypted"],
            records=[(c, user, f"conn-{i}", secrets.token_bytes(12 + 16 + 16)) for i, c in enumerate(conns)])
        after = await sizes()
    except asyncpg.PostgresError as exc:
        raise RuntimeError(f"footprint: {exc}") from exc
    finally:
        await pool.close()
    dev_bytes = (after["devices"] - before["devices"]) / n
    cred_bytes = ((after["proxy_credentials"] - before["proxy_credentials"])
                  + (after["rms_connections"] - before["rms_connections"])) / n

    dev_ids = [str(d) for d in devs]

    async def fill() -> AuthCache:
        """N lookups on a cold cache; ids and rows made inside the measured window, as in a node."""
        async def fetch(cid: str) -> StoredCredential:
            return StoredCredential(cid, hash_password(cid, "x" * 16), str(uuid.UUID(dev_ids[len(cache._entries)])), [], [], [])

        cache = AuthCache(fetch, ttl=3600)
        for c in conns:
            await cache.lookup(str(c))
        return cache

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cache = await fill()
    cache_bytes = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    del cache
    return {"scale": n, "pg_bytes_per_device": round(dev_bytes), "pg_bytes_per_credential": round(cred_bytes),
            "auth_cache_bytes_per_credential": round(cache_bytes),
            "pg_mib_per_100k_devices": round(dev_bytes * 100_000 / 2**20, 1),
            "pg_mib_per_1m_credentials": round(cred_bytes * 1_000_000 / 2**20, 1),
            "auth_cache_mib_per_1m_credentials_per_node": round(cache_bytes * 1_000_000 / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--scale", type=int, default=20_000)
    p.add_argument("--no-sessions", action="store_true")
    args = p.parse_args(argv)
    stack = Stack()
    out: dict = {"cpus": os.cpu_count()}
    try:
        pg = start_postgres(stack)
        if not args.no_sessions:
            exe = lg_mod.build()
            target = start_target(stack, exe)
            out["sessions"] = [sessions_per_second(stack, exe, target, pg, w, args.seconds, args.conns)
                               for w in (1, 2)]
        out["footprint"] = asyncio.run(footprint(pg, args.scale))
    finally:
        stack.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
