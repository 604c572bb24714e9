"""Redis goes down under two nodes that share limits through it (issue 16): a real redis-server of this
module is stopped mid-run. Each node falls back to its own counts (logged once): sessions are still
served within the per-node limits, and the quota, leased from PostgreSQL, is still never exceeded. When
Redis is back, the session cap is shared again."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import pytest_asyncio
from conftest import NodeProcess, create_database, free_port
from socks_client import socks5_code, socks5_open
from test_limits import DOWNLOAD_REQUEST, download_until_closed, read_for, stop_two_nodes, two_direct_nodes

pytestmark = pytest.mark.asyncio(loop_scope="session")


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, tmp_path_factory):
    redis = RedisServer()
    await redis.start()
    url = await create_database(pg_root[0])
    rig = await two_direct_nodes(url, tmp_path_factory.mktemp("redisdown"), {"REDIS_URL": redis.url}, "rd", "redis-down")
    yield {**rig, "redis": redis}
    await stop_two_nodes(rig)
    redis.stop()


async def connection(rig, limits: dict) -> tuple[str, str]:
    conn = await rig["dep"].connection(rig["token"], rig["device"]["remote_device_id"])
    status, body = await rig["dep"].call("PUT", f"/api/v2/proxy/connections/{conn['connectionId']}/limits",
                                         rig["token"], json=limits)
    assert status == 200, body
    return conn["connectionId"], conn["password"]


def warnings(node: NodeProcess, text: str) -> int:
    return node.log_path.read_text(errors="replace").count(text)


async def test_redis_down_falls_back_to_each_nodes_counts_and_the_quota_holds(rig, targets):
    a, b = rig["a"].proxy_port, rig["b"].proxy_port
    capped = await connection(rig, {"max_concurrent_sessions": 1})
    rate = 400_000
    paced = await connection(rig, {"download_bytes_per_s": rate})
    quota = 2_000_000
    quoted = await connection(rig, {"quota_bytes": quota})
    await asyncio.sleep(0.3)

    _r, held_a, _ = await socks5_open(a, *capped, "127.0.0.1", targets.echo_port)
    assert await socks5_code(b, *capped, "127.0.0.1", targets.echo_port) == 0x02  # shared through Redis

    rig["redis"].stop()
    # node B's own count is 0: it serves one session, then its own limit refuses the next
    deadline = time.monotonic() + 5
    while True:
        try:
            _r, held_b, _ = await socks5_open(b, *capped, "127.0.0.1", targets.echo_port)
            break
        except Exception:
            assert time.monotonic() < deadline, "node B served no session with Redis down"
            await asyncio.sleep(0.1)
    for _ in range(3):
        assert await socks5_code(b, *capped, "127.0.0.1", targets.echo_port) == 0x02
        assert await socks5_code(a, *capped, "127.0.0.1", targets.echo_port) == 0x02
    fallback = "Redis unreachable"
    assert warnings(rig["b"], fallback) == 1, "the fallback is logged once per outage"

    # the rate: each node paces to the whole rate on its own
    ra, wa, _ = await socks5_open(a, *paced, "127.0.0.1", targets.source_port)
    rb, wb, _ = await socks5_open(b, *paced, "127.0.0.1", targets.source_port)
    await asyncio.gather(read_for(ra, 0.5), read_for(rb, 0.5))
    got_a, got_b = await asyncio.gather(read_for(ra, 3.0), read_for(rb, 3.0))
    wa.close()
    wb.close()
    print(f"Redis down, {rate} B/s limit: node A {got_a / 3:.0f} B/s, node B {got_b / 3:.0f} B/s (per node)")
    for got in (got_a, got_b):
        assert 0.6 * rate * 3 <= got <= 1.1 * rate * 3 + 0.1 * rate

    # the quota does not go through Redis: concurrent downloads on both nodes stop exactly at it (a
    # node that got no lease before the other used the quota up relays not even the request)
    served = targets.bytes_requests
    (qa, closed_a), (qb, closed_b) = await asyncio.gather(download_until_closed(a, *quoted, targets.http_port),
                                                          download_until_closed(b, *quoted, targets.http_port))
    moved = qa + qb + (targets.bytes_requests - served) * len(DOWNLOAD_REQUEST)
    print(f"Redis down, one {quota} B quota: node A got {qa} + node B got {qb} + requests relayed "
          f"{targets.bytes_requests - served} = {moved} B, overshoot {moved - quota} B")
    assert closed_a and closed_b and moved == quota
    for port in (a, b):
        assert await socks5_code(port, *quoted, "127.0.0.1", targets.http_port) == 0x02

    # Redis back: once the fallback sessions ended, the cap is shared again
    held_a.close()
    held_b.close()
    await rig["redis"].start()
    await asyncio.sleep(6)  # the slots taken during the outage are not in the new Redis; probes resume
    _r, again, _ = await socks5_open(a, *capped, "127.0.0.1", targets.echo_port)
    deadline = time.monotonic() + 5
    while await socks5_code(b, *capped, "127.0.0.1", targets.echo_port) != 0x02:
        assert time.monotonic() < deadline, "the session cap was not shared again after Redis came back"
        await asyncio.sleep(0.2)
    again.close()
    assert warnings(rig["a"], "Redis reachable again") >= 1
