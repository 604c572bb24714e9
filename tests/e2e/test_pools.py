"""Pools and sticky sessions end to end: real agents (each with its own source address, so the
peer-echo target tells which device a session left through) and a real SOCKS5 client."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADDRS = {"us1": "127.0.0.4", "us2": "127.0.0.5", "de": "127.0.0.6"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(pg_root, tmp_path_factory, targets):
    dep = await fresh_deployment(pg_root, tmp_path_factory.mktemp("pools"))
    _uid, token = await dep.user("pooler")
    _uid2, other = await dep.user("stranger")
    devices, agents = {}, {}
    for name, country in (("us1", "US"), ("us2", "us"), ("de", "DE")):
        devices[name] = await dep.device(token)
        agents[name] = await dep.agent(devices[name], "--allow-private", "--source-address", ADDRS[name],
                                       "--country", country)
    stranger_device = await dep.device(other)
    yield {"dep": dep, "token": token, "other": other, "devices": devices, "agents": agents,
           "ids": {k: v["remote_device_id"] for k, v in devices.items()}, "stranger_device": stranger_device}
    await dep.close()
    await dep.node.stop()


async def pool_connection(world, pool: dict) -> dict:
    s, data = await world["dep"].call("POST", "/api/v2/proxy/connections", world["token"], json={"pool": pool})
    assert s == 200, data
    return data["connection"]


async def via(world, conn: dict, targets, suffix: str = "") -> tuple[str, asyncio.StreamWriter]:
    """Open a session (username + suffix); the source address the target saw, and the open writer."""
    r, w, _ = await socks5_open(world["dep"].node.proxy_port, conn["connectionId"] + suffix, conn["password"],
                                "127.0.0.1", targets.peer_port, timeout=20)
    return (await asyncio.wait_for(r.readline(), 20)).decode().strip(), w


async def once(world, conn: dict, targets, suffix: str = "") -> str:
    seen, w = await via(world, conn, targets, suffix)
    w.close()
    await w.wait_closed()
    await asyncio.sleep(0.05)  # let the node see the session end
    return seen


async def test_sessions_spread_over_the_pool(world, targets):
    ids = world["ids"]
    conn = await pool_connection(world, {"device_ids": [ids["us1"], ids["us2"]]})
    assert conn["pool"] == {"device_ids": [ids["us1"], ids["us2"]]} and conn["deviceId"] is None
    first, w1 = await via(world, conn, targets)
    second, w2 = await via(world, conn, targets)  # the first is still open: fewest active sessions wins
    assert {first, second} == {ADDRS["us1"], ADDRS["us2"]}
    w1.close()
    w2.close()
    # the request log records the device each session actually used
    dep = world["dep"]
    now = datetime.now(UTC)
    window = ((now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
              (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    deadline = time.monotonic() + 20
    while True:
        s, logs = await dep.call("GET", "/api/v2/proxy/logs", world["token"], params={
            "connectionId": conn["connectionId"], "from": window[0], "to": window[1]})
        rows = logs["entries"] if s == 200 else []
        if s == 200 and len(rows) >= 2:
            break
        assert time.monotonic() < deadline, (s, logs)
        await asyncio.sleep(0.3)
    used = {r.get("deviceId") for r in rows}
    assert used == {ids["us1"], ids["us2"]}


async def test_sticky_session_stays_on_one_device_until_it_goes_offline(world, targets):
    ids = world["ids"]
    conn = await pool_connection(world, {"device_ids": [ids["us1"], ids["us2"], ids["de"]]})
    bound = await once(world, conn, targets, "-session-abc123-ttl-60")
    # a plain session held open on the sticky device would push a free choice elsewhere; the token sticks
    hold, wh = await via(world, conn, targets)
    for _ in range(4):
        assert await once(world, conn, targets, "-session-abc123-ttl-60") == bound
    wh.close()
    name = next(k for k, v in ADDRS.items() if v == bound)
    world["agents"][name].kill()
    await world["dep"].wait_online(ids[name], False)
    moved = await once(world, conn, targets, "-session-abc123-ttl-60")
    assert moved != bound and moved in ADDRS.values()
    assert await once(world, conn, targets, "-session-abc123-ttl-60") == moved  # sticks to the new one
    # bring the device back for the other tests
    world["agents"][name] = await world["dep"].agent(world["devices"][name], "--allow-private", "--source-address",
                                                     ADDRS[name], "--country", "DE" if name == "de" else "US")


async def test_country_parameter_and_country_pools_narrow(world, targets):
    ids = world["ids"]
    mixed = await pool_connection(world, {"device_ids": [ids["us1"], ids["us2"], ids["de"]]})
    for _ in range(3):
        assert await once(world, mixed, targets, "-country-de") == ADDRS["de"]
    assert await once(world, mixed, targets, "-session-x-country-DE") == ADDRS["de"]
    us = await pool_connection(world, {"country": "us"})
    assert us["pool"] == {"country": "US"}
    held = [await via(world, us, targets) for _ in range(3)]
    assert {seen for seen, _w in held} == {ADDRS["us1"], ADDRS["us2"]}  # never the DE device
    for _seen, w in held:
        w.close()
    # no online device of the pool (or of the narrowed pool): 0x03
    nowhere = await pool_connection(world, {"country": "FR"})
    assert await socks5_code(world["dep"].node.proxy_port, nowhere["connectionId"], nowhere["password"],
                             "127.0.0.1", targets.peer_port) == 0x03
    assert await socks5_code(world["dep"].node.proxy_port, us["connectionId"] + "-country-DE", us["password"],
                             "127.0.0.1", targets.peer_port) == 0x03


async def test_malformed_username_parameters_are_an_auth_failure(world, targets):
    dep = world["dep"]
    conn = await pool_connection(world, {"device_ids": [world["ids"]["us1"]]})
    for suffix in ("-session-", "-session-a-b", "-ttl-60", "-session-x-ttl-0", "-country-USA", "-foo-bar",
                   "-session-a-session-b", "-session-\u00e9"):
        code = await socks5_code(dep.node.proxy_port, conn["connectionId"] + suffix, conn["password"],
                                 "127.0.0.1", targets.peer_port)
        assert code == 0x101, suffix  # RFC 1929 status 1
    assert "malformed username parameters" in dep.node.log_path.read_text()
    assert await once(world, conn, targets) == ADDRS["us1"]  # the node is fine


async def test_put_device_accepts_a_pool_and_back(world, targets):
    dep, token, ids = world["dep"], world["token"], world["ids"]
    conn = await dep.connection(token, ids["us1"])
    assert await once(world, conn, targets) == ADDRS["us1"]
    path = f"/api/v2/proxy/connections/{conn['connectionId']}/device"
    s, data = await dep.call("PUT", path, token, json={"pool": {"device_ids": [ids["de"]]}})
    assert s == 200 and data["pool"] == {"device_ids": [ids["de"]]} and data["deviceId"] is None
    await asyncio.sleep(0.3)  # the auth cache TTL
    assert await once(world, conn, targets) == ADDRS["de"]
    _s, listed = await dep.call("GET", "/api/v2/proxy/connections", token)
    assert next(c for c in listed["connections"] if c["connectionId"] == conn["connectionId"])["pool"] == {
        "device_ids": [ids["de"]]}
    s, data = await dep.call("PUT", path, token, json={"device_id": ids["us2"]})
    assert s == 200 and data["pool"] is None
    await asyncio.sleep(0.3)
    assert await once(world, conn, targets) == ADDRS["us2"]


async def test_pool_bodies_are_validated_and_tenant_checked(world):
    dep, token, other, ids = world["dep"], world["token"], world["other"], world["ids"]
    create = "/api/v2/proxy/connections"
    for bad in ({"pool": []}, {"pool": {}}, {"pool": {"device_ids": []}}, {"pool": {"device_ids": "x"}},
                {"pool": {"device_ids": ["not-a-uuid"]}}, {"pool": {"device_ids": [ids["us1"], ids["us1"]]}},
                {"pool": {"country": "USA"}}, {"pool": {"country": 1}}, {"pool": {"country": "US", "device_ids": []}},
                {"pool": {"country": "US"}, "device_id": ids["us1"]}):
        s, data = await dep.call("POST", create, token, json=bad)
        assert s == 400 and data["success"] is False, (bad, data)
    # someone else's device in a pool: not found (create) / forbidden (hot-swap), like device_id
    s, _ = await dep.call("POST", create, token, json={"pool": {"device_ids": [world["stranger_device"]["remote_device_id"]]}})
    assert s == 404
    s, _ = await dep.call("POST", create, other, json={"pool": {"device_ids": [ids["us1"]]}})
    assert s == 404
    conn = await pool_connection(world, {"country": "US"})
    path = f"/api/v2/proxy/connections/{conn['connectionId']}/device"
    assert (await dep.call("PUT", path, other, json={"pool": {"country": "DE"}}))[0] == 403
    assert (await dep.call("PUT", path, token, json={"pool": {"device_ids": [world["stranger_device"]["remote_device_id"]]}}))[0] == 403
    assert (await dep.call("PUT", path, token, json={"pool": {"country": "D"}}))[0] == 400
    # a country pool holds only the owner's devices: the stranger's US pool sees none of ours
    theirs = (await dep.call("POST", create, other, json={"pool": {"country": "US"}}))[1]["connection"]
    assert await socks5_code(dep.node.proxy_port, theirs["connectionId"], theirs["password"], "127.0.0.1", 9) == 0x03


async def http_via(world, conn: dict, head: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", world["dep"].node.proxy_port)
    auth = base64.b64encode(f"{conn['connectionId']}-session-web1:{conn['password']}".encode()).decode()
    w.write(head.replace(b"AUTH", auth.encode()))
    try:
        return await asyncio.wait_for(r.read(), 20)  # the proxy closes after the answer (Connection: close / 407)
    finally:
        w.close()


async def test_http_connect_and_forwarding_use_the_username_parameters_too(world, targets):
    ids = world["ids"]
    conn = await pool_connection(world, {"device_ids": [ids["de"], ids["us1"]]})
    url = f"http://127.0.0.1:{targets.http_port}/peer"
    seen = set()
    for _ in range(3):  # absolute-form forwarding: every request through the token's device
        answer = await http_via(world, conn, f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Authorization: Basic AUTH"
                                             f"\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        seen.add(answer.rsplit(b"\r\n\r\n", 1)[1].decode())
    assert seen == {ADDRS["de"]}  # pool order: the first member, then sticky
    r, w = await asyncio.open_connection("127.0.0.1", world["dep"].node.proxy_port)
    auth = base64.b64encode(f"{conn['connectionId']}-session-web1:{conn['password']}".encode()).decode()
    w.write(f"CONNECT 127.0.0.1:{targets.peer_port} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    assert b" 200 " in await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
    assert (await asyncio.wait_for(r.readline(), 20)).decode().strip() == ADDRS["de"]
    w.close()
    bad = await http_via(world, conn, f"GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic "
                         f"{base64.b64encode((conn['connectionId'] + '-ttl-5:' + conn['password']).encode()).decode()}"
                         f"\r\n\r\n".encode())
    assert bad.startswith(b"HTTP/1.1 407"), bad[:100]
