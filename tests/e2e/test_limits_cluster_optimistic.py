"""OPTIMISTIC_OPEN=1 on two tunnel nodes (real agent on node 1, node 2 relays to it) sharing one session cap
through a real redis-server (issue 16): the optimistic-open path takes a cluster-wide slot before it answers."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import pytest_asyncio
from cluster_fixtures import Cluster
from conftest import create_database
from socks_client import SocksReplyError, socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, redis_url, tmp_path_factory):
    c = Cluster(await create_database(pg_root[0]), redis_url, tmp_path_factory.mktemp("optcluster"),
                "o" + uuid.uuid4().hex[:6])
    nodes = [c.make_node(i, OPTIMISTIC_OPEN="1") for i in (1, 2)]
    await asyncio.gather(*(n.start() for n in nodes))
    for i, node in enumerate(nodes, 1):
        await c.attach(i, node)
    _uid, token = await c.dep(1).user("optimist")
    dev = await c.dep(1).device(token)
    await c.dep(1).agent(dev, "--allow-private", "--server", c.servers(1))
    await c.wait_device_on(dev["remote_device_id"], 1)
    conn = await c.dep(1).connection(token, dev["remote_device_id"])
    status, body = await c.dep(1).call("PUT", f"/api/v2/proxy/connections/{conn['connectionId']}/limits", token,
                                       json={"max_concurrent_sessions": 1})
    assert status == 200, body
    await asyncio.sleep(0.3)
    yield c, conn
    await c.close()


async def echo_once(reader, writer) -> bytes:  # noqa: ANN001
    writer.write(b"ping\n")
    return await asyncio.wait_for(reader.readline(), 10)


async def test_optimistic_opens_share_one_cluster_session_slot(rig, targets):
    c, conn = rig
    cid, pw = conn["connectionId"], conn["password"]
    one, two = c.nodes[1].proxy_port, c.nodes[2].proxy_port
    r, w, bound = await socks5_open(one, cid, pw, "127.0.0.1", targets.echo_port)
    assert bound == ("0.0.0.0", 0)  # node 1 answered optimistically (before the device connected)
    assert await echo_once(r, w) == b"ping\n"
    assert await socks5_code(two, cid, pw, "127.0.0.1", targets.echo_port) == 0x02
    w.close()
    deadline = time.monotonic() + 5
    while True:  # node 2 (relaying to node 1's device) gets the slot once node 1's session ended
        try:
            r2, w2, _ = await socks5_open(two, cid, pw, "127.0.0.1", targets.echo_port)
            break
        except SocksReplyError as exc:
            assert exc.code == 0x02 and time.monotonic() < deadline, "node 1's session never gave its slot back"
        await asyncio.sleep(0.05)
    assert await echo_once(r2, w2) == b"ping\n"
    # node 1 holds no session now: only the cluster-wide count can refuse its optimistic open
    assert await socks5_code(one, cid, pw, "127.0.0.1", targets.echo_port) == 0x02
    w2.close()
