"""Every proxy attempt becomes one ClickHouse row (real chDB inside a real node), nothing is lost."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, tmp_path_factory, targets):
    base = tmp_path_factory.mktemp("logs")
    fault = base / "clickhouse-down"
    dep = await fresh_deployment(pg_root, base, BANDWIDTH_FLUSH_S="0.5", LOG_BATCH_S="0.2",
                                 TEST_ONLY_CLICKHOUSE_FAULT_FILE=str(fault))
    _uid, token = await dep.user("logger")
    device = await dep.device(token)
    await dep.agent(device, "--allow-private")
    conn = await dep.connection(token, device["remote_device_id"])
    await dep.call("POST", f"/api/v2/proxy/connections/{conn['connectionId']}/blacklist", token,
                   json={"domains": ["blocked.test"]})
    rig = {"dep": dep, "token": token, "device": device, "conn": conn, "fault": fault, "expected": []}
    yield rig
    await dep.close()
    await dep.node.stop()


def window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"from": (now - timedelta(hours=2)).isoformat(), "to": (now + timedelta(hours=2)).isoformat()}


async def all_logs(dep, token, **params) -> dict:
    status, body = await dep.call("GET", "/api/v2/proxy/logs", token, params={**window(), "limit": "10000", **params})
    assert status == 200, body
    return body


async def wait_total(dep, token, n: int, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while True:
        body = await all_logs(dep, token)
        if body["total"] >= n or time.time() > deadline:
            return body
        await asyncio.sleep(0.2)


async def socks_echo(rig, port: int, payload: bytes) -> None:
    dep, c = rig["dep"], rig["conn"]
    reader, writer, _ = await socks5_open(dep.node.proxy_port, c["connectionId"], c["password"], "127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert got == payload
    rig["expected"].append(("allowed", "socks5", len(payload), len(payload)))


async def http_connect_echo(rig, port: int, payload: bytes) -> None:
    dep, c = rig["dep"], rig["conn"]
    reader, writer = await asyncio.open_connection("127.0.0.1", dep.node.proxy_port)
    auth = base64.b64encode(f"{c['connectionId']}:{c['password']}".encode()).decode()
    writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 200 " in head
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert got == payload
    rig["expected"].append(("allowed", "http", len(payload), len(payload)))


async def http_connect_blocked(rig) -> None:
    dep, c = rig["dep"], rig["conn"]
    reader, writer = await asyncio.open_connection("127.0.0.1", dep.node.proxy_port)
    auth = base64.b64encode(f"{c['connectionId']}:{c['password']}".encode()).decode()
    writer.write(f"CONNECT www.blocked.test:443 HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 403 " in head
    writer.close()
    rig["expected"].append(("blocked", "http", 0, 0))


async def socks_blocked(rig) -> None:
    dep, c = rig["dep"], rig["conn"]
    assert await socks5_code(dep.node.proxy_port, c["connectionId"], c["password"], "blocked.test", 443) == 0x02
    rig["expected"].append(("blocked", "socks5", 0, 0))


async def test_each_attempt_is_exactly_one_row_with_exact_bytes(rig, targets):
    dep, token = rig["dep"], rig["token"]
    for i in range(4):
        await socks_echo(rig, targets.echo_port, bytes([i]) * (1000 + i))
        await http_connect_echo(rig, targets.echo_port, bytes([i]) * (500 + i))
    await socks_blocked(rig)
    await http_connect_blocked(rig)
    body = await wait_total(dep, token, len(rig["expected"]))
    assert body["total"] == len(rig["expected"])
    entries = body["entries"]
    got = sorted((e["action"], e["protocol"], e["bytesIn"], e["bytesOut"]) for e in entries)
    assert got == sorted(rig["expected"])
    e = entries[0]
    assert set(e) >= {"timestamp", "connectionId", "deviceId", "serverNode", "target", "targetType", "port",
                      "resolvedIp", "action", "blockReason", "bytesIn", "bytesOut"}
    blocked = [x for x in entries if x["action"] == "blocked"]
    assert all("blocked.test" in x["blockReason"] for x in blocked)
    allowed = [x for x in entries if x["action"] == "allowed"]
    assert all(x["resolvedIp"] == "127.0.0.1" and x["targetType"] == "ipv4" and x["blockReason"] is None
               for x in allowed)
    assert all(x["serverNode"] == "test-node" and x["deviceId"] == rig["device"]["remote_device_id"] for x in entries)


async def test_filters_pagination_and_validation(rig):
    dep, token = rig["dep"], rig["token"]
    body = await all_logs(dep, token, action="blocked")
    assert body["total"] == 2 and all(e["action"] == "blocked" for e in body["entries"])
    body = await all_logs(dep, token, target="blocked.test")
    assert body["total"] == 2
    body = await all_logs(dep, token, connectionId=rig["conn"]["connectionId"], deviceId=rig["device"]["remote_device_id"])
    assert body["total"] >= 10
    page1 = await all_logs(dep, token, limit="3", offset="0")
    page2 = await all_logs(dep, token, limit="3", offset="3")
    assert len(page1["entries"]) == 3 and page1["total"] == page2["total"]
    assert not {(e["timestamp"], e["bytesIn"], e["target"]) for e in page1["entries"]} & \
        {(e["timestamp"], e["bytesIn"], e["target"]) for e in page2["entries"]}
    w = window()
    bad = [{"to": w["to"]}, {"from": w["from"]}, {"from": "yesterday", "to": w["to"]},
           {"from": w["to"], "to": w["from"]}, {**w, "limit": "0"}, {**w, "limit": "10001"},
           {**w, "limit": "x"}, {**w, "offset": "-1"}, {**w, "action": "maybe"}, {**w, "deviceId": "nope"}]
    for params in bad:
        status, body = await dep.call("GET", "/api/v2/proxy/logs", token, params=params)
        assert status == 400 and body["success"] is False, params


async def test_bandwidth_hour_and_day_equal_the_raw_rows(rig):
    dep, token = rig["dep"], rig["token"]
    raw = (await all_logs(dep, token))["entries"]
    want_in, want_out = sum(e["bytesIn"] for e in raw), sum(e["bytesOut"] for e in raw)
    for group in ("hour", "day"):
        deadline = time.time() + 10
        while True:
            status, body = await dep.call("GET", "/api/v2/proxy/bandwidth", token, params={"groupBy": group})
            assert status == 200
            got = (sum(r["bytesIn"] for r in body["rows"]), sum(r["bytesOut"] for r in body["rows"]))
            if got == (want_in, want_out) or time.time() > deadline:
                break
            await asyncio.sleep(0.2)
        assert got == (want_in, want_out), group
        assert all(r["bucket"].endswith("Z") for r in body["rows"])
    assert (await dep.call("GET", "/api/v2/proxy/bandwidth", token, params={"groupBy": "week"}))[0] == 400


async def test_open_session_shows_in_bandwidth_before_it_closes(rig, targets):
    dep, token, c = rig["dep"], rig["token"], rig["conn"]
    status, body = await dep.call("GET", "/api/v2/proxy/bandwidth", token, params={"connectionId": c["connectionId"]})
    before = sum(r["bytesOut"] for r in body["rows"])
    reader, writer, _ = await socks5_open(dep.node.proxy_port, c["connectionId"], c["password"], "127.0.0.1",
                                          targets.echo_port)
    writer.write(b"z" * 7000)
    await reader.readexactly(7000)
    deadline = time.time() + 15
    while time.time() < deadline:
        _s, body = await dep.call("GET", "/api/v2/proxy/bandwidth", token, params={"connectionId": c["connectionId"]})
        if sum(r["bytesOut"] for r in body["rows"]) >= before + 7000:
            break
        await asyncio.sleep(0.2)
    assert sum(r["bytesOut"] for r in body["rows"]) == before + 7000  # counted while still open
    writer.write_eof()
    await reader.read()
    writer.close()
    rig["expected"].append(("allowed", "socks5", 7000, 7000))
    await wait_total(dep, token, len(rig["expected"]))


async def test_admin_proxies_report_real_byte_counts(rig):
    dep = rig["dep"]
    _s, body = await dep.call("GET", "/api/v2/admin/proxies", admin=True)
    entry = {p["connection_id"]: p for p in body["proxies"]}[rig["conn"]["connectionId"]]
    raw = (await all_logs(dep, rig["token"]))["entries"]
    total = sum(e["bytesIn"] + e["bytesOut"] for e in raw)
    assert entry["bytes_lifetime"] == total and entry["bytes_last_24h"] == total


async def test_another_user_never_sees_these_rows(rig):
    dep = rig["dep"]
    _uid, other = await dep.user("outsider")
    body = await all_logs(dep, other)
    assert body["total"] == 0 and body["entries"] == []
    status, _ = await dep.call("GET", "/api/v2/proxy/logs", other,
                               params={**window(), "deviceId": rig["device"]["remote_device_id"]})
    assert status == 403
    status, body = await dep.call("GET", "/api/v2/proxy/bandwidth", other)
    assert status == 200 and body["rows"] == []
    status, _ = await dep.call("GET", "/api/v2/proxy/bandwidth", other,
                               params={"deviceId": rig["device"]["remote_device_id"]})
    assert status == 403


async def test_device_policy_refusal_is_logged_blocked_with_its_reply_code(rig, targets):
    """The agent refuses private targets by default: an operator filtering action=blocked sees it."""
    dep = rig["dep"]
    _uid, token = await dep.user("policy-owner")
    device = await dep.device(token)
    await dep.agent(device)  # no --allow-private: 127.0.0.1 is refused by the device
    c = await dep.connection(token, device["remote_device_id"])
    cid, pw = c["connectionId"], c["password"]
    assert await socks5_code(dep.node.proxy_port, cid, pw, "127.0.0.1", targets.echo_port) == 0x02
    auth = base64.b64encode(f"{cid}:{pw}".encode()).decode()
    for request in (f"CONNECT 127.0.0.1:{targets.echo_port} HTTP/1.1\r\n",
                    f"GET http://127.0.0.1:{targets.http_port}/hello HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", dep.node.proxy_port)
        writer.write(f"{request}Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 403 "), head
    body = await wait_total(dep, token, 3)
    assert body["total"] == 3
    blocked = await all_logs(dep, token, action="blocked")
    assert blocked["total"] == 3
    assert sorted(e["protocol"] for e in blocked["entries"]) == ["http", "http", "socks5"]
    for e in blocked["entries"]:
        assert (e["action"], e["blockReason"], e["replyCode"]) == ("blocked", "device_policy", 2), e
        assert e["resolvedIp"] == "127.0.0.1" and "private" in e["error"]
    assert (await all_logs(dep, token, action="allowed"))["total"] == 0


async def test_outage_keeps_rows_and_replays_them_exactly_once(rig, targets):
    dep, token = rig["dep"], rig["token"]
    rig["fault"].write_text("down")
    for i in range(5):
        await socks_echo(rig, targets.echo_port, b"o" * (300 + i))
    await asyncio.sleep(1.0)
    m = await dep.metrics()
    assert m["proxyorch_request_log_batches_failed"] >= 1
    assert (await all_logs(dep, token))["total"] == len(rig["expected"]) - 5  # nothing arrived yet
    rig["fault"].unlink()
    body = await wait_total(dep, token, len(rig["expected"]))
    await asyncio.sleep(1.0)  # a double write would show up now
    body = await all_logs(dep, token)
    assert body["total"] == len(rig["expected"])


async def test_spooled_rows_survive_sigkill_of_the_node(rig, targets):
    dep, token = rig["dep"], rig["token"]
    spooled_before = (await dep.metrics())["proxyorch_request_log_rows_spooled"]
    rig["fault"].write_text("down")
    for i in range(6):
        await socks_echo(rig, targets.echo_port, b"k" * (200 + i))
    want = spooled_before + 12  # 6 log rows + 6 traffic deltas
    deadline = time.time() + 15
    while time.time() < deadline:
        if (await dep.metrics())["proxyorch_request_log_rows_spooled"] >= want:
            break
        await asyncio.sleep(0.2)
    assert (await dep.metrics())["proxyorch_request_log_rows_spooled"] >= want
    await dep.node.stop(sig=signal.SIGKILL)
    rig["fault"].unlink()
    await dep.node.start()
    body = await wait_total(dep, token, len(rig["expected"]))
    await asyncio.sleep(1.0)
    body = await all_logs(dep, token)
    assert body["total"] == len(rig["expected"])
    got = sorted((e["action"], e["protocol"], e["bytesIn"], e["bytesOut"]) for e in body["entries"])
    assert got == sorted(rig["expected"])
