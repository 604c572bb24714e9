"""A node SIGKILLed while it holds a quota lease does not block the quota (issue 16): its lease row stops
counting after LEASE_TTL_S and the other node relays what is left, up to the quota (two real nodes, one
PostgreSQL; no Redis: the PostgreSQL-only mode)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import pytest_asyncio
from conftest import Deployment, NodeProcess, create_database
from socks_client import socks5_open

from proxy.limits import LEASE_TTL_S

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


@pytest_asyncio.fixture(loop_scope="session")
async def pair(pg_root, tmp_path):
    url = await create_database(pg_root[0])
    env = {"DIRECT_EXIT": "1", "DIRECT_EXIT_ALLOW_PRIVATE": "1", "REQUEST_LOG": "0",
           "CLUSTER_SECRET": "lease-expiry-" + "s" * 16, "RMS_KEY": "cm90YXRpb24ta2V5LXJvdGF0aW9uLWtleS0zMmJ5dGU="}
    a = await NodeProcess(url, tmp_path / "a", {**env, "NODE_NAME": "le-a"}).start()
    b = await NodeProcess(url, tmp_path / "b", {**env, "NODE_NAME": "le-b"}).start()
    dep = Deployment(a)
    await dep.open()
    yield dep, a, b
    await dep.close()
    await a.stop()
    if b.proc is not None and b.proc.poll() is None:
        await b.stop()


async def test_a_killed_nodes_lease_expires_and_the_other_node_gets_the_rest(pair, targets):
    dep, a, b = pair
    _uid, token = await dep.user("lease-expiry")
    device = await dep.device(token)
    conn = await dep.connection(token, device["remote_device_id"])
    cid, pw = conn["connectionId"], conn["password"]
    quota = 20_000_000
    status, _ = await dep.call("PUT", f"/api/v2/proxy/connections/{cid}/limits", token, json={"quota_bytes": quota})
    assert status == 200
    await asyncio.sleep(0.3)
    r, w, _ = await socks5_open(b.proxy_port, cid, pw, "127.0.0.1", targets.source_port)
    got = 0
    while got < 2_000_000:  # node B relays fast: its lease has grown by now
        got += len(await asyncio.wait_for(r.read(65536), 10))
    held = await dep.pool.fetchval("SELECT sum(bytes) FROM connection_quota_leases WHERE connection_id = $1 "
                                   "AND node = 'le-b'", cid)
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    w.close()
    assert held and held > 0, "node B held no lease"
    killed_at = time.monotonic()
    ra, wa, _ = await socks5_open(a.proxy_port, cid, pw, "127.0.0.1", targets.source_port)
    got_a = 0
    try:
        while chunk := await asyncio.wait_for(ra.read(65536), LEASE_TTL_S + 10):
            got_a += len(chunk)
    except ConnectionError:
        pass
    wa.close()
    took = time.monotonic() - killed_at
    await asyncio.sleep(1.5)
    used = await dep.pool.fetchval("SELECT used_bytes FROM connection_usage WHERE connection_id = $1 "
                                   "AND period = 'total'", cid)
    print(f"node B killed holding {held} B of lease rows; node A relayed {got_a} B more and closed after "
          f"{took:.1f} s; used {used} of {quota} B")
    assert used == quota  # node A got everything the dead node's lease no longer held
    assert took < LEASE_TTL_S + 8
