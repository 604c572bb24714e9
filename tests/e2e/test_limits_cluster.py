"""Two nodes share one connection's limits (issue 16): two ``serve`` processes, each its own direct exit,
sharing PostgreSQL and a real redis-server. Session cap, speed limit and quota hold for the connection
as a whole, not per node."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from conftest import create_database
from socks_client import socks5_code, socks5_open
from test_limits import DOWNLOAD_REQUEST, download_until_closed, read_for, stop_two_nodes, two_direct_nodes

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(pg_root, redis_url, tmp_path_factory):
    url = await create_database(pg_root[0])
    rig = await two_direct_nodes(url, tmp_path_factory.mktemp("cluster"), {"REDIS_URL": redis_url},
                                 "limits-cluster", "reseller")
    yield rig
    await stop_two_nodes(rig)


async def new_connection(c, limits: dict) -> dict:
    conn = await c["dep"].connection(c["token"], c["device"]["remote_device_id"])
    status, body = await c["dep"].call("PUT", f"/api/v2/proxy/connections/{conn['connectionId']}/limits", c["token"],
                                       json=limits)
    assert status == 200, body
    await asyncio.sleep(0.2)
    return conn


async def test_one_session_cap_over_two_nodes(cluster, targets):
    conn = await new_connection(cluster, {"max_concurrent_sessions": 1})
    cid, pw = conn["connectionId"], conn["password"]
    a, b = cluster["a"].proxy_port, cluster["b"].proxy_port
    _r, w, _ = await socks5_open(a, cid, pw, "127.0.0.1", targets.echo_port)
    assert await socks5_code(b, cid, pw, "127.0.0.1", targets.echo_port) == 0x02
    assert await socks5_code(a, cid, pw, "127.0.0.1", targets.echo_port) == 0x02
    w.close()
    deadline = time.monotonic() + 5
    while await socks5_code(b, cid, pw, "127.0.0.1", targets.echo_port) != 0:
        assert time.monotonic() < deadline, "closing the session on node A never freed the slot for node B"
        await asyncio.sleep(0.05)


async def test_two_sessions_on_two_nodes_share_one_speed_limit(cluster, targets):
    rate = 1_000_000
    conn = await new_connection(cluster, {"download_bytes_per_s": rate})
    cid, pw = conn["connectionId"], conn["password"]
    ra, wa, _ = await socks5_open(cluster["a"].proxy_port, cid, pw, "127.0.0.1", targets.source_port)
    rb, wb, _ = await socks5_open(cluster["b"].proxy_port, cid, pw, "127.0.0.1", targets.source_port)
    await asyncio.gather(read_for(ra, 1.0), read_for(rb, 1.0))
    got_a, got_b = await asyncio.gather(read_for(ra, 5.0), read_for(rb, 5.0))
    wa.close()
    wb.close()
    total = got_a + got_b
    print(f"two nodes at one {rate} B/s limit: {got_a / 5:.0f} + {got_b / 5:.0f} = {total / 5:.0f} B/s")
    assert 0.8 * rate * 5 <= total <= 1.1 * rate * 5
    assert got_a > 0.2 * rate * 5 and got_b > 0.2 * rate * 5  # both nodes get a share


async def test_one_quota_over_two_nodes(cluster, targets):
    quota = 400_000
    conn = await new_connection(cluster, {"quota_bytes": quota})
    cid, pw = conn["connectionId"], conn["password"]

    async def fetch(port: int, size: int) -> int:
        r, w, _ = await socks5_open(port, cid, pw, "127.0.0.1", targets.http_port)
        req = f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        w.write(req)
        got = 0
        while chunk := await asyncio.wait_for(r.read(65536), 20):
            got += len(chunk)
        w.close()
        return got + len(req)

    first = await fetch(cluster["a"].proxy_port, 150_000)
    assert first < quota
    await asyncio.sleep(2.5)  # node A flushed; node B reads the shared counter
    second = await fetch(cluster["b"].proxy_port, 1_000_000)
    assert first + second == quota  # node B stopped exactly at what node A left
    await asyncio.sleep(0.3)  # node B writes its count when the quota runs out (not only each USAGE_FLUSH_S)
    assert await socks5_code(cluster["a"].proxy_port, cid, pw, "127.0.0.1", targets.http_port) == 0x02
    await asyncio.sleep(2.5)
    status, usage = await cluster["dep"].call("GET", f"/api/v2/proxy/connections/{cid}/usage", cluster["token"])
    assert usage["used_bytes"] == quota and usage["remaining_bytes"] == 0


async def test_concurrent_downloads_on_two_nodes_never_pass_one_quota(cluster, targets):
    """Both nodes relay at once through one quota: together they stop exactly at it (quota leases)."""
    quota = 3_000_000
    # a shared 1 MB/s keeps both downloads running for about 3 s, so both nodes hold leases at once
    conn = await new_connection(cluster, {"quota_bytes": quota, "download_bytes_per_s": 1_000_000})
    cid, pw = conn["connectionId"], conn["password"]

    async def fetch(port: int) -> tuple[int, bool]:
        got, closed = await download_until_closed(port, cid, pw, targets.http_port)
        return got + len(DOWNLOAD_REQUEST), closed  # both nodes relayed their request (asserted below)

    (got_a, closed_a), (got_b, closed_b) = await asyncio.gather(fetch(cluster["a"].proxy_port),
                                                                fetch(cluster["b"].proxy_port))
    total = got_a + got_b
    print(f"one {quota} B quota over two nodes at once: node A {got_a} + node B {got_b} = {total} B, "
          f"overshoot {total - quota} B")
    assert closed_a and closed_b, "a session that reached the quota was not closed"
    assert got_a > 0.05 * quota and got_b > 0.05 * quota  # both nodes really relayed concurrently
    assert total == quota
    for node in ("a", "b"):
        assert await socks5_code(cluster[node].proxy_port, cid, pw, "127.0.0.1", targets.http_port) == 0x02
    await asyncio.sleep(2.5)
    status, usage = await cluster["dep"].call("GET", f"/api/v2/proxy/connections/{cid}/usage", cluster["token"])
    assert status == 200 and usage["used_bytes"] == total and usage["remaining_bytes"] == 0


async def forward_get(port: int, cid: str, pw: str, http_port: int) -> tuple[int, dict, asyncio.StreamWriter]:
    """One absolute-form GET through the node, keep-alive (the upstream stays open): (status, headers, writer)."""
    import base64

    r, w = await asyncio.open_connection("127.0.0.1", port)
    auth = base64.b64encode(f"{cid}:{pw}".encode()).decode()
    w.write(f"GET http://127.0.0.1:{http_port}/hello HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n"
            f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    await asyncio.wait_for(r.readexactly(int(headers.get("content-length", "0"))), 10)
    return int(lines[0].split()[1]), headers, w


async def test_absolute_form_forwarding_takes_a_cluster_session_slot(cluster, targets):
    conn = await new_connection(cluster, {"max_concurrent_sessions": 1})
    cid, pw = conn["connectionId"], conn["password"]
    a, b = cluster["a"].proxy_port, cluster["b"].proxy_port
    status, _h, wa = await forward_get(a, cid, pw, targets.http_port)
    assert status == 200  # node A forwards; its upstream (keep-alive) holds the connection's one slot
    status, headers, wb = await forward_get(b, cid, pw, targets.http_port)
    wb.close()
    assert status == 429 and headers.get("retry-after")  # node B's own count is 0: the cluster refused
    assert await socks5_code(b, cid, pw, "127.0.0.1", targets.echo_port) == 0x02
    wa.close()
    deadline = time.monotonic() + 5
    while True:
        status, _h, wb = await forward_get(b, cid, pw, targets.http_port)
        wb.close()
        if status == 200:
            break
        assert time.monotonic() < deadline, "closing node A's forwarding connection never freed the slot"
        await asyncio.sleep(0.05)
