"""Issue 18 on a cluster: ``GET /api/v2/proxy/sessions`` on any node lists the open sessions of every
live node, each once, with its node; a stopped or killed node does not fail the call (it is named
in ``missingNodes``). Three real nodes on one PostgreSQL and one redis-server (the issue 13 fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest
import pytest_asyncio
from cluster_fixtures import PRESENCE_TTL_S, SECRET, start_cluster
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")
SIZES = {1: 1_000, 2: 2_000, 3: 3_000}  # tenant A's session through node i moves SIZES[i] bytes each way


async def open_echo(cluster, i: int, conn: dict, port: int, size: int):  # noqa: ANN201
    """A session through node ``i`` that moved ``size`` bytes each way and stays open."""
    reader, writer, _ = await socks5_open(cluster.nodes[i].proxy_port, conn["connectionId"], conn["password"],
                                          "127.0.0.1", port)
    writer.write(b"e" * size)
    assert await asyncio.wait_for(reader.readexactly(size), 15) == b"e" * size
    return writer


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, redis_url, tmp_path_factory, targets):
    """Tenant A: device on node 2, sessions through nodes 1 and 3 (relayed) and 2 (local).
    Tenant B: device on node 3, one session through node 1 (relayed)."""
    c = await start_cluster(pg_root, redis_url, tmp_path_factory.mktemp("sessions-cluster"))
    writers = []
    try:
        _ua, token_a = await c.dep(1).user("sessions-a")
        _ub, token_b = await c.dep(1).user("sessions-b")
        dev_a = await c.dep(2).device(token_a)
        dev_b = await c.dep(3).device(token_b)
        await c.dep(2).agent(dev_a, "--allow-private", "--server", c.servers(2))
        await c.dep(3).agent(dev_b, "--allow-private", "--server", c.servers(3))
        await c.wait_device_on(dev_a["remote_device_id"], 2)
        await c.wait_device_on(dev_b["remote_device_id"], 3)
        conn_a = await c.dep(1).connection(token_a, dev_a["remote_device_id"])
        conn_b = await c.dep(1).connection(token_b, dev_b["remote_device_id"])
        for i, size in SIZES.items():
            writers.append(await open_echo(c, i, conn_a, targets.echo_port, size))
        writers.append(await open_echo(c, 1, conn_b, targets.echo_port, 500))
        c.a = {"token": token_a, "device": dev_a, "conn": conn_a}
        c.b = {"token": token_b, "device": dev_b, "conn": conn_b}
        yield c
    finally:
        for w in writers:
            w.close()
        for node in c.nodes.values():  # a test may leave a node stopped
            with contextlib.suppress(ProcessLookupError, AttributeError):
                os.kill(node.proc.pid, signal.SIGCONT)
        await c.close()


async def sessions(c, i: int, token: str | None = None, admin: bool = False, **params: str) -> dict:
    status, body = await c.dep(i).call("GET", "/api/v2/proxy/sessions", token, admin=admin, params=params)
    assert status == 200, body
    return body


async def test_every_node_lists_local_and_relayed_sessions_exactly_once_with_their_node(rig):
    c, a = rig, rig.a
    views = {}
    for i in (1, 2, 3):
        body = await sessions(c, i, a["token"])
        assert body["missingNodes"] == [], body
        rows = sorted(body["sessions"], key=lambda r: r["bytesIn"])
        assert body["total"] == 3 == len(rows), rows
        # the session is listed by the node its client reached; the device's node (2) does not list the relayed ones again
        assert [(r["node"], r["bytesIn"], r["bytesOut"]) for r in rows] == \
            [(c.name(j), SIZES[j], SIZES[j]) for j in (1, 2, 3)]
        assert {r["deviceId"] for r in rows} == {a["device"]["remote_device_id"]}
        assert {r["connectionId"] for r in rows} == {a["conn"]["connectionId"]}
        assert len({r["sessionId"] for r in rows}) == 3
        views[i] = {r["sessionId"]: r["node"] for r in rows}
    assert views[1] == views[2] == views[3]


async def test_filters_and_tenants_hold_across_nodes(rig):
    c, a, b = rig, rig.a, rig.b
    # B sees only its own session (on node 1), asking node 2 or 3.
    for i in (2, 3):
        body = await sessions(c, i, b["token"])
        assert [(r["node"], r["connectionId"], r["bytesIn"]) for r in body["sessions"]] == \
            [(c.name(1), b["conn"]["connectionId"], 500)]
        # A's connection and device are not B's to see, wherever their sessions are.
        assert (await sessions(c, i, b["token"], connectionId=a["conn"]["connectionId"]))["total"] == 0
        assert (await sessions(c, i, b["token"], deviceId=a["device"]["remote_device_id"]))["total"] == 0
    body = await sessions(c, 3, a["token"], deviceId=a["device"]["remote_device_id"])
    assert sorted(r["bytesIn"] for r in body["sessions"]) == [1_000, 2_000, 3_000]
    body = await sessions(c, 2, a["token"], connectionId=b["conn"]["connectionId"])
    assert body["total"] == 0
    # The admin sees all four, from any node.
    body = await sessions(c, 2, admin=True)
    mine = [r for r in body["sessions"] if r["connectionId"] in (a["conn"]["connectionId"], b["conn"]["connectionId"])]
    assert sorted(r["bytesIn"] for r in mine) == [500, 1_000, 2_000, 3_000]
    assert body["missingNodes"] == []


async def test_internal_sessions_endpoint_needs_the_cluster_secret_and_checks_its_body(rig):
    c = rig
    url = c.nodes[2].api + "/internal/sessions"
    http = c.dep(2).http
    for headers in ({}, {"X-Cluster-Secret": "wrong-" + SECRET}):
        async with http.post(url, json={"connectionIds": None, "deviceIds": None}, headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["success"] is False
    ok = {"X-Cluster-Secret": SECRET}
    for bad in ({"connectionIds": "x"}, {"deviceIds": [1, 2]}, {"connectionIds": ["a" * 65]}):
        async with http.post(url, json=bad, headers=ok) as r:
            assert r.status == 400, await r.text()
            assert "must be null or a list of ids" in (await r.json())["error"]
    async with http.post(url, data=b"{not json", headers={**ok, "Content-Type": "application/json"}) as r:
        assert r.status == 400
    async with http.post(url, json={"connectionIds": [c.a["conn"]["connectionId"]]}, headers=ok) as r:
        body = await r.json()
    # node 2's own sessions only: the local one (the relayed ones are listed by the clients' nodes)
    assert r.status == 200 and body["node"] == c.name(2)
    assert [(s["node"], s["bytesIn"]) for s in body["sessions"]] == [(c.name(2), 2_000)]


async def test_openapi_documents_missing_nodes_and_the_internal_route(rig):
    status, doc = await rig.dep(1).call("GET", "/api/v2/openapi.json")
    assert status == 200
    op = doc["paths"]["/api/v2/proxy/sessions"]["get"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ProxySessions"}
    listing = doc["components"]["schemas"]["ProxySessions"]
    assert "missingNodes" in listing["required"] and listing["properties"]["missingNodes"]["type"] == "array"
    assert set(doc["components"]["schemas"]["ProxySession"]["required"]) == {
        "sessionId", "connectionId", "deviceId", "node", "clientAddress", "target", "protocol", "startedAt",
        "bytesIn", "bytesOut", "rateIn", "rateOut"}
    internal = doc["paths"]["/internal/sessions"]["post"]
    assert internal["tags"] == ["internal"]
    assert any(p["name"] == "X-Cluster-Secret" and p["required"] for p in internal["parameters"])


async def test_a_stopped_node_is_named_missing_and_the_others_still_answer(rig):
    c, a = rig, rig.a
    os.kill(c.nodes[3].proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        body = await sessions(c, 1, a["token"])
        took = time.monotonic() - t0
    finally:
        os.kill(c.nodes[3].proc.pid, signal.SIGCONT)
    assert body["missingNodes"] == [c.name(3)]
    assert sorted((r["node"], r["bytesIn"]) for r in body["sessions"]) == [(c.name(1), 1_000), (c.name(2), 2_000)]
    assert took < 10, took  # one short per-node timeout, not a hang
    deadline = time.time() + 20  # node 3 answers again once it runs
    while (body := await sessions(c, 1, a["token"]))["missingNodes"] and time.time() < deadline:
        await asyncio.sleep(0.2)
    assert body["missingNodes"] == [] and body["total"] == 3


async def test_a_killed_node_does_not_break_the_call_and_leaves_it_after_its_presence_expires(rig):
    c, a = rig, rig.a
    c.nodes[3].proc.kill()
    c.nodes[3].proc.wait()
    body = await sessions(c, 1, a["token"])  # its presence is still live for a few seconds
    assert body["missingNodes"] == [c.name(3)]
    assert sorted((r["node"], r["bytesIn"]) for r in body["sessions"]) == [(c.name(1), 1_000), (c.name(2), 2_000)]
    deadline = time.time() + 3 * PRESENCE_TTL_S
    while (body := await sessions(c, 2, a["token"]))["missingNodes"] and time.time() < deadline:
        await asyncio.sleep(0.2)
    assert body["missingNodes"] == []  # a dead node leaves the list of nodes to ask
    assert sorted((r["node"], r["bytesIn"]) for r in body["sessions"]) == [(c.name(1), 1_000), (c.name(2), 2_000)]


def _two_free_ports() -> int:
    """A port p such that p and p + 1 are both free now."""
    import socket

    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            try:
                b.bind(("127.0.0.1", a.getsockname()[1] + 1))
            except OSError:
                continue
            return a.getsockname()[1]
    raise AssertionError("no two consecutive free ports")


@pytest.mark.parametrize("reach", ["this machine", "other machines"])
async def test_workers_list_the_sessions_of_both_workers_from_either(pg_root, tmp_path, targets, reach):
    """``serve --workers 2``: each worker advertises its own private API port; asked there, each
    lists the sessions held by both workers (which worker holds a session: from the kernel, psutil).
    "other machines": API_ADVERTISE names the host the other nodes reach this machine at (127.0.0.3
    here), INTERNAL_API_PORT the first of the workers' fixed private ports; the private listeners bind
    BIND_HOST (a listener on 127.0.0.1 alone would not answer at 127.0.0.3)."""
    import collections

    from conftest import AgentProcess, Deployment, create_database
    from test_workers import Workers, tunnel_holders

    url = await create_database(pg_root[0])
    w = Workers(url, tmp_path / "sup", 2)
    base = 0
    if reach == "other machines":
        base = _two_free_ports()
        w.extra_env.update({"BIND_HOST": "0.0.0.0", "API_ADVERTISE": f"http://127.0.0.3:{w.api_port}",
                            "INTERNAL_API_PORT": str(base)})
    await w.start()
    dep = Deployment(w)
    await dep.open()
    writers = []
    try:
        _uid, token = await dep.user("workers-sessions")
        device = await dep.device(token)
        dep.agents.append(AgentProcess(w, device["remote_device_id"], device["device_token"], "--allow-private",
                                       "--tunnels", "12").start())
        await dep.wait_online(device["remote_device_id"])
        deadline = time.time() + 20
        while len(tunnel_holders(w)) < 2 and time.time() < deadline:
            await asyncio.sleep(0.2)
        conn = await dep.connection(token, device["remote_device_id"])
        workers = {c.pid: c for c in w.children()}
        names = {pid: p.environ()["NODE_NAME"] for pid, p in workers.items()}
        apis = {names[pid]: p.environ()["API_ADVERTISE"] for pid, p in workers.items()}
        assert len(set(apis.values())) == 2, apis
        if base:
            assert apis == {"wk-0": f"http://127.0.0.3:{base}", "wk-1": f"http://127.0.0.3:{base + 1}"}
        held: collections.Counter[str] = collections.Counter()
        while min(held.get(n, 0) for n in apis) < 2 and len(writers) < 40:  # the kernel spreads them
            reader, writer, _ = await socks5_open(w.proxy_port, conn["connectionId"], conn["password"],
                                                  "127.0.0.1", targets.echo_port)
            writer.write(b"w" * 100)
            assert await asyncio.wait_for(reader.readexactly(100), 15) == b"w" * 100
            writers.append(writer)
            port = writer.get_extra_info("sockname")[1]
            owner = [pid for pid, p in workers.items() if any(
                k.raddr and k.raddr.port == port and k.laddr.port == w.proxy_port for k in p.net_connections("tcp"))]
            assert len(owner) == 1, owner
            held[names[owner[0]]] += 1
        assert min(held.values()) >= 2 and len(held) == 2, held
        for name, api in apis.items():
            async with dep.http.get(api + "/api/v2/proxy/sessions", headers={"Authorization": f"Bearer {token}"}) as r:
                body = await r.json()
            assert r.status == 200 and body["missingNodes"] == [], (name, body)
            assert collections.Counter(s["node"] for s in body["sessions"]) == held, (name, body)
            assert len({s["sessionId"] for s in body["sessions"]}) == len(writers)
    finally:
        for writer in writers:
            writer.close()
        await dep.close()
        await w.stop(timeout=60)


async def test_without_redis_the_nodes_find_each_other_in_postgresql(pg_root, tmp_path, targets):
    """Presence in PostgreSQL (``RELAY_PORT``, no ``REDIS_URL``): ``cluster_nodes.api`` (migration 016)."""
    from cluster_fixtures import Cluster
    from conftest import create_database

    c = Cluster(await create_database(pg_root[0]), "", tmp_path, "pg" + os.urandom(3).hex())
    nodes = [c.make_node(i, REDIS_URL="") for i in (1, 2)]
    await asyncio.gather(*(n.start() for n in nodes))
    for i, node in enumerate(nodes, 1):
        await c.attach(i, node)
    writer = None
    try:
        _uid, token = await c.dep(1).user("pg-presence")
        device = await c.dep(2).device(token)
        await c.dep(2).agent(device, "--allow-private", "--server", c.servers(2))
        await c.wait_device_on(device["remote_device_id"], 2)
        conn = await c.dep(1).connection(token, device["remote_device_id"])
        writer = await open_echo(c, 1, conn, targets.echo_port, 700)  # relayed: client at node 1, device on 2
        apis = {r["name"]: r["api"] for r in await c.dep(1).pool.fetch("SELECT name, api FROM cluster_nodes")}
        assert apis == {c.name(i): c.nodes[i].api for i in (1, 2)}
        body = await sessions(c, 2, token)
        assert body["missingNodes"] == []
        assert [(r["node"], r["bytesIn"]) for r in body["sessions"]] == [(c.name(1), 700)]
    finally:
        if writer is not None:
            writer.close()
        await c.close()
