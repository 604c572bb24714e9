"""Two real nodes, one owning the log store (LOG_STORE_URL): every session counted exactly once.

Node ``owner`` keeps its embedded chDB; node ``sender`` has ``LOG_STORE_URL`` pointing at the
owner's API, so its batches go there (spooled while the owner is down) and its log reads too.
Each node holds the tunnel of one device, so sessions through both nodes are local to them.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import pytest
import pytest_asyncio
from conftest import AgentProcess, Deployment, NodeProcess, create_database
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")
SECRET = "cluster-" + uuid.uuid4().hex
KEY = base64.b64encode(b"r" * 32).decode()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, tmp_path_factory, targets):
    base = tmp_path_factory.mktemp("logstore")
    url = await create_database(pg_root[0])
    common = {"CLUSTER_SECRET": SECRET, "RMS_KEY": KEY, "LOG_BATCH_S": "0.2"}
    owner = await NodeProcess(url, base / "owner", {**common, "NODE_NAME": "owner"}).start()
    sender = NodeProcess(url, base / "sender", {**common, "NODE_NAME": "sender", "LOG_STORE_URL": owner.api})
    sender.admin_token = owner.admin_token
    await sender.start()
    dep_o, dep_s = Deployment(owner), Deployment(sender)
    await dep_o.open()
    await dep_s.open()
    _uid, token = await dep_o.user("logs-owner")
    dev_o, dev_s = await dep_o.device(token), await dep_o.device(token)
    await dep_o.agent(dev_o, "--allow-private")
    agent_s = AgentProcess(sender, dev_s["remote_device_id"], dev_s["device_token"], "--allow-private").start()
    dep_s.agents.append(agent_s)
    await dep_s.wait_online(dev_s["remote_device_id"])
    conn_o = await dep_o.connection(token, dev_o["remote_device_id"])
    conn_s = await dep_o.connection(token, dev_s["remote_device_id"])
    rig = {"owner": dep_o, "sender": dep_s, "token": token, "conn_o": conn_o, "conn_s": conn_s,
           "echo": targets.echo_port, "dev_s": dev_s["remote_device_id"], "sent": {"owner": 0, "sender": 0}}
    yield rig
    for dep in (dep_s, dep_o):
        await dep.close()
    await sender.stop()
    await owner.stop()


def window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()}


async def session(rig, via: str, payload: bytes = b"ping") -> None:
    dep = rig[via]
    conn = rig["conn_o" if via == "owner" else "conn_s"]
    reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                          "127.0.0.1", rig["echo"])
    writer.write(payload)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == payload
    writer.close()
    rig["sent"][via] += 1


async def logs(dep, token) -> tuple[int, dict]:
    return await dep.call("GET", "/api/v2/proxy/logs", token, params={**window(), "limit": "10000"})


async def wait_counts(rig, expected: dict[str, int], timeout: float = 40) -> dict[str, int]:
    """Rows per serverNode on both nodes, once they reach ``expected`` (or at the deadline)."""
    deadline = time.time() + timeout
    while True:
        seen, consistent = [], True
        for via in ("owner", "sender"):
            status, body = await logs(rig[via], rig["token"])
            assert status == 200, body
            counts: dict[str, int] = {}
            for e in body["entries"]:
                counts[e["serverNode"]] = counts.get(e["serverNode"], 0) + 1
            # total and the page are two reads: a batch landing between them may split them once
            consistent = consistent and body["total"] == len(body["entries"])
            seen.append(counts)
        if (consistent and seen[0] == seen[1] == expected) or time.time() > deadline:
            assert consistent, "total and entries still disagree at the deadline"
            assert seen[0] == seen[1], seen
            return seen[0]
        await asyncio.sleep(0.3)


async def test_sessions_through_both_nodes_appear_exactly_once_on_either_node(rig) -> None:
    for _ in range(5):
        await session(rig, "owner")
        await session(rig, "sender")
    assert await wait_counts(rig, dict(rig["sent"])) == rig["sent"]
    await asyncio.sleep(1.5)  # no late duplicates
    assert await wait_counts(rig, dict(rig["sent"]), timeout=0) == rig["sent"]
    _status, body = await logs(rig["sender"], rig["token"])
    assert {(e["serverNode"], e["deviceNode"]) for e in body["entries"]} == {("owner", "owner"), ("sender", "sender")}
    # bandwidth and the dashboard's domains read through the owner too
    for via in ("owner", "sender"):
        status, bw = await rig[via].call("GET", "/api/v2/proxy/bandwidth", rig["token"])
        assert status == 200 and {r["connectionId"] for r in bw["rows"]} == {
            rig["conn_o"]["connectionId"], rig["conn_s"]["connectionId"]}, bw
        status, dom = await rig[via].call("GET", "/api/v2/proxy/domains", rig["token"], params=window())
        assert status == 200 and sum(d["sessions"] for d in dom["domains"]) == sum(rig["sent"].values()), dom


async def test_another_tenant_sees_none_of_the_rows_through_the_sending_node(rig) -> None:
    _uid, other = await rig["owner"].user("logs-stranger")
    for via in ("owner", "sender"):
        status, body = await logs(rig[via], other)
        assert status == 200 and body["total"] == 0 and body["entries"] == [], body
        status, body = await rig[via].call("GET", "/api/v2/proxy/logs", other,
                                           params={**window(), "deviceId": rig["dev_s"]})
        assert status == 403, body
        status, body = await rig[via].call("GET", "/api/v2/proxy/domains", other, params=window())
        assert status == 200 and body["domains"] == [], body


async def test_batches_wait_while_the_owner_is_down_and_arrive_exactly_once(rig) -> None:
    owner, sender = rig["owner"], rig["sender"]
    before = dict(rig["sent"])
    await wait_counts(rig, before)
    await owner.node.stop()
    for _ in range(6):
        await session(rig, "sender")
    async with aiohttp.ClientSession() as http:
        deadline = time.time() + 20
        while True:
            async with http.get(sender.node.api + "/healthz") as r:
                stores = (await r.json())["stores"]
            if int(stores["request_log_spool_bytes"]) > 0 or time.time() > deadline:
                break
            await asyncio.sleep(0.2)
    assert stores["clickhouse"].startswith("failing") and int(stores["request_log_spool_bytes"]) > 0, stores
    status, body = await logs(sender, rig["token"])   # reads need the owner: a clear 502
    assert status == 502 and body["success"] is False and "log store unavailable" in body["error"], body
    await owner.node.start()
    assert await wait_counts(rig, dict(rig["sent"])) == rig["sent"]
    await asyncio.sleep(2)
    assert await wait_counts(rig, dict(rig["sent"]), timeout=0) == rig["sent"]


async def test_internal_endpoints_need_the_cluster_secret(rig, deployment) -> None:
    owner = rig["owner"].node
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"X-Cluster-Secret": "wrong" * 8}, {"X-Cluster-Secret": ""}):
            for method, path in (("GET", "/internal/ping"), ("POST", "/internal/log/insert"),
                                 ("POST", "/internal/log/query"), ("GET", "/internal/anything/else")):
                async with http.request(method, owner.api + path, headers=headers, data=b"{}") as r:
                    assert r.status == 401, (method, path, headers)
                    assert (await r.json())["error"] == "Missing or invalid X-Cluster-Secret"
        good = {"X-Cluster-Secret": SECRET}
        async with http.get(owner.api + "/internal/ping", headers=good) as r:
            assert r.status == 200 and (await r.json())["node"] == "owner"
        async with http.get(owner.api + "/internal/anything/else", headers=good) as r:
            assert r.status == 404
        async with http.post(owner.api + "/internal/log/query", headers=good, json={"kind": "drop table"}) as r:
            assert r.status == 400 and "`kind` must be one of" in (await r.json())["error"]
        async with http.post(owner.api + "/internal/log/insert", headers=good, data=b"not json") as r:
            assert r.status == 400
        # the sender does not own a store: it refuses inserts meant for an owner
        async with http.post(rig["sender"].node.api + "/internal/log/insert", headers=good, json={}) as r:
            assert r.status == 409
        # a node without CLUSTER_SECRET answers 401 whatever header it gets
        async with http.get(deployment.node.api + "/internal/ping", headers=good) as r:
            assert r.status == 401
        async with http.get(owner.api + "/api/v2/openapi.json") as r:
            doc = await r.json()
        internal = {p: ops for p, ops in doc["paths"].items() if p.startswith("/internal")}
        assert internal and all(op["tags"] == ["internal"] for ops in internal.values() for op in ops.values())


async def test_the_owner_counts_a_batch_sent_twice_with_one_token_once(rig) -> None:
    owner = rig["owner"].node
    dev = str(uuid.uuid4())
    now = datetime.now(UTC).isoformat()
    row = [now, rig["conn_o"]["connectionId"], dev, "replayer", "dup.example.com:443", "domain", 443, "", "allowed",
           "", 10, 20, 1, "127.0.0.1:1", "socks5", 0, "", "example.com", "replayer"]
    from proxy.request_log.writer import REQUEST_LOG_COLUMNS

    body = orjson.dumps({"table": "request_log", "token": "dup-" + uuid.uuid4().hex, "columns": REQUEST_LOG_COLUMNS,
                         "rows": [row, row]})
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(owner.api + "/internal/log/insert", data=body,
                                 headers={"X-Cluster-Secret": SECRET, "Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
        args = {"device_ids": [dev], **{k: v for k, v in zip(("start", "end"), window().values(), strict=True)},
                "connection_id": None, "target": None, "action": None, "limit": 100, "offset": 0}
        async with http.post(owner.api + "/internal/log/query", headers={"X-Cluster-Secret": SECRET},
                             json={"kind": "logs", "args": args}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["result"]["total"] == 2
