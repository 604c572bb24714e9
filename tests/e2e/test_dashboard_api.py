"""The dashboard's two API views against a real node and agent: live sessions and per-domain analytics."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, tmp_path_factory, targets):
    dep = await fresh_deployment(pg_root, tmp_path_factory.mktemp("dash"), LOG_BATCH_S="0.2")
    out = {"dep": dep}
    for tenant in ("a", "b"):
        _uid, token = await dep.user(f"dash-{tenant}")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"], name=f"conn {tenant}")
        out[tenant] = {"token": token, "device": device, "conn": conn}
    await dep.call("POST", f"/api/v2/proxy/connections/{out['a']['conn']['connectionId']}/blacklist",
                   out["a"]["token"], json={"domains": ["blocked.test"]})
    yield out
    await dep.close()
    await dep.node.stop()


def window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()}


async def open_echo(rig, tenant: str, payload: bytes):  # noqa: ANN201
    c = rig[tenant]["conn"]
    reader, writer, _ = await socks5_open(rig["dep"].node.proxy_port, c["connectionId"], c["password"],
                                          "127.0.0.1", rig["targets"].echo_port)
    writer.write(payload)
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    assert got == payload
    return reader, writer


async def sessions(rig, token: str | None = None, admin: bool = False, **params: str) -> tuple[int, dict]:
    return await rig["dep"].call("GET", "/api/v2/proxy/sessions", token, admin=admin, params=params)


async def test_open_sessions_show_the_bytes_the_clients_moved_with_a_rate(rig, targets):
    rig["targets"] = targets
    a, b = rig["a"], rig["b"]
    t0 = time.monotonic()
    ra, wa = await open_echo(rig, "a", b"x" * 300_000)
    t_moved = time.monotonic()
    rb, wb = await open_echo(rig, "b", b"y" * 1_000)
    try:
        await asyncio.sleep(2)
        t_before = time.monotonic()
        status, body = await sessions(rig, a["token"])
        t_after = time.monotonic()
        assert status == 200, body
        assert body["success"] is True and body["total"] == 1
        [s] = body["sessions"]
        assert set(s) == {"sessionId", "connectionId", "deviceId", "node", "clientAddress", "target", "protocol",
                          "startedAt", "bytesIn", "bytesOut", "rateIn", "rateOut"}
        assert s["connectionId"] == a["conn"]["connectionId"]
        assert s["deviceId"] == a["device"]["remote_device_id"]
        assert s["bytesIn"] == 300_000 and s["bytesOut"] == 300_000
        assert s["target"] == f"127.0.0.1:{targets.echo_port}" and s["protocol"] == "socks5"
        assert s["clientAddress"] == "127.0.0.1" and s["node"] == "test-node"
        # All bytes moved in the session's first moments, less than 5 s ago: rate = bytes / age.
        if t_after - t0 < 4.5:
            assert 300_000 / (t_after - t0) <= s["rateIn"] <= 300_000 / (t_before - t_moved)
            assert 300_000 / (t_after - t0) <= s["rateOut"] <= 300_000 / (t_before - t_moved)
        # Tenant isolation: b sees only its own; the admin sees both; filters narrow.
        status, body_b = await sessions(rig, b["token"])
        assert [x["connectionId"] for x in body_b["sessions"]] == [b["conn"]["connectionId"]]
        assert body_b["sessions"][0]["bytesIn"] == 1_000
        status, body_b = await sessions(rig, b["token"], connectionId=a["conn"]["connectionId"])
        assert status == 200 and body_b["total"] == 0
        status, body_b = await sessions(rig, b["token"], deviceId=a["device"]["remote_device_id"])
        assert status == 200 and body_b["total"] == 0
        status, everything = await sessions(rig, admin=True)
        assert status == 200 and {x["connectionId"] for x in everything["sessions"]} == \
            {a["conn"]["connectionId"], b["conn"]["connectionId"]}
        status, one = await sessions(rig, admin=True, deviceId=b["device"]["remote_device_id"])
        assert [x["connectionId"] for x in one["sessions"]] == [b["conn"]["connectionId"]]
        # Idle for more than the 5 s window: the rate falls to zero, the totals stay.
        deadline = time.time() + 20
        while True:
            status, body = await sessions(rig, a["token"])
            if body["sessions"][0]["rateIn"] == 0 or time.time() > deadline:
                break
            await asyncio.sleep(0.5)
        assert body["sessions"][0]["rateIn"] == body["sessions"][0]["rateOut"] == 0
        assert body["sessions"][0]["bytesIn"] == 300_000
        assert time.monotonic() - t_moved >= 5
    finally:
        wa.close()
        wb.close()
    deadline = time.time() + 10
    while (await sessions(rig, a["token"]))[1]["total"] and time.time() < deadline:
        await asyncio.sleep(0.1)
    assert (await sessions(rig, a["token"]))[1]["total"] == 0
    rig["a_rows"], rig["b_rows"] = 1, 1


async def test_sessions_view_refuses_bad_input_and_missing_tokens(rig):
    status, body = await sessions(rig, rig["a"]["token"], connectionId="not-a-uuid")
    assert status == 400 and body["success"] is False and "connectionId" in body["error"]
    status, body = await sessions(rig)
    assert status == 401
    status, body = await rig["dep"].call("GET", "/api/v2/proxy/sessions",
                                         headers={"X-Admin-Token": "wrong"})
    assert status == 401


async def _attempt(rig, tenant: str, host: str, port: int, payload: bytes = b"") -> int:
    c = rig[tenant]["conn"]
    if not payload:
        return await socks5_code(rig["dep"].node.proxy_port, c["connectionId"], c["password"], host, port)
    reader, writer, _ = await socks5_open(rig["dep"].node.proxy_port, c["connectionId"], c["password"], host, port)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert got == payload
    return 0


async def _log_rows(rig, tenant: str, n: int) -> int:
    """Waits until the tenant's request log has ``n`` rows in the window; returns the count."""
    deadline = time.time() + 30
    while True:
        _s, logs = await rig["dep"].call("GET", "/api/v2/proxy/logs", rig[tenant]["token"],
                                         params={**window(), "limit": "1"})
        if logs["total"] >= n or time.time() > deadline:
            return logs["total"]
        await asyncio.sleep(0.2)


async def domains(rig, token: str | None, admin: bool = False, **params: str) -> tuple[int, dict]:
    return await rig["dep"].call("GET", "/api/v2/proxy/domains", token, admin=admin,
                                 params={**window(), **params})


async def test_domains_group_by_public_suffix_and_count_blocked_and_failed(rig, targets):
    rig["targets"] = targets
    a, b = rig["a"], rig["b"]
    n_before = rig.get("a_rows", 0)  # the first test's session, when it ran
    echo = targets.echo_port
    assert await _attempt(rig, "a", "127.0.0.1", echo, b"1" * 5_000) == 0
    assert await _attempt(rig, "a", "127.0.0.1", echo, b"2" * 7_000) == 0
    assert await _attempt(rig, "a", "localhost", echo, b"3" * 2_000) == 0
    assert await _attempt(rig, "a", "x.blocked.test", 443) == 0x02
    assert await _attempt(rig, "a", "y.z.Blocked.test", 443) == 0x02
    for host in ("a.b.example.co.uk", "c.example.co.uk"):  # no DNS for these: the device fails them
        assert await _attempt(rig, "a", host, 443) not in (0, 0x02)
    assert await _attempt(rig, "b", "127.0.0.1", echo, b"4" * 900) == 0
    assert await _log_rows(rig, "a", n_before + 7) == n_before + 7
    assert await _log_rows(rig, "b", rig.get("b_rows", 0) + 1) == rig.get("b_rows", 0) + 1
    status, body = await domains(rig, a["token"])
    assert status == 200 and body["success"] is True, body
    got = {d["domain"]: d for d in body["domains"]}
    # The first test's 300 000-byte session is in the window too (when it ran).
    extra = 300_000 * n_before
    assert got["127.0.0.1"] | {"firstSeen": None, "lastSeen": None} == {
        "domain": "127.0.0.1", "sessions": 2 + n_before, "blocked": 0, "failed": 0, "bytesIn": 12_000 + extra,
        "bytesOut": 12_000 + extra, "firstSeen": None, "lastSeen": None}
    assert (got["localhost"]["sessions"], got["localhost"]["bytesIn"], got["localhost"]["bytesOut"]) == (1, 2_000, 2_000)
    assert (got["blocked.test"]["sessions"], got["blocked.test"]["blocked"], got["blocked.test"]["failed"]) == (2, 2, 0)
    assert got["blocked.test"]["bytesIn"] == got["blocked.test"]["bytesOut"] == 0
    assert (got["example.co.uk"]["sessions"], got["example.co.uk"]["blocked"], got["example.co.uk"]["failed"]) == (2, 0, 2)
    assert set(got) == {"127.0.0.1", "localhost", "blocked.test", "example.co.uk"}
    assert [d["domain"] for d in body["domains"]][:2] == ["127.0.0.1", "localhost"]  # by bytes, descending
    assert got["127.0.0.1"]["firstSeen"] <= got["127.0.0.1"]["lastSeen"]
    status, top = await domains(rig, a["token"], limit="1")
    assert [d["domain"] for d in top["domains"]] == ["127.0.0.1"]
    status, by_conn = await domains(rig, a["token"], connectionId=b["conn"]["connectionId"])
    assert status == 200 and by_conn["domains"] == []  # b's connection on b's device: not a's to see
    # Tenant isolation: b sees only its own sessions to 127.0.0.1 (this one, and the first test's).
    status, body_b = await domains(rig, b["token"])
    nb = rig.get("b_rows", 0)
    assert [(d["domain"], d["sessions"], d["bytesIn"]) for d in body_b["domains"]] == \
        [("127.0.0.1", 1 + nb, 900 + 1_000 * nb)]
    status, body_b = await domains(rig, b["token"], deviceId=a["device"]["remote_device_id"])
    assert status == 403
    status, everything = await domains(rig, None, admin=True)
    assert status == 200 and {d["domain"]: d["sessions"] for d in everything["domains"]}["127.0.0.1"] == \
        3 + n_before + nb


@pytest.mark.parametrize(("params", "fragment"), [
    ({"from": None}, "`from` is required"),
    ({"to": "yesterday"}, "`to` is not a valid"),
    ({"limit": "0"}, "`limit` must be between"),
    ({"limit": "x"}, "`limit` must be an integer"),
    ({"deviceId": "nope"}, "`deviceId` must be a UUID"),
    ({"from": "2030-01-01T00:00:00Z"}, "`from` must not be after `to`"),
])
async def test_domains_refuses_bad_input_with_a_clear_error(rig, params, fragment):
    query = {**window(), **params}
    query = {k: v for k, v in query.items() if v is not None}
    status, body = await rig["dep"].call("GET", "/api/v2/proxy/domains", rig["a"]["token"], params=query)
    assert status == 400 and body["success"] is False and fragment in body["error"], body


async def test_domains_needs_a_token(rig):
    status, _body = await rig["dep"].call("GET", "/api/v2/proxy/domains", params=window())
    assert status == 401


async def test_presence_lists_only_the_callers_devices(rig):
    a, b = rig["a"], rig["b"]
    status, body = await rig["dep"].call("GET", "/api/v2/devices/presence", a["token"])
    assert status == 200 and body["success"] is True
    assert [(d["deviceId"], d["online"], d["node"]) for d in body["devices"]] == \
        [(a["device"]["remote_device_id"], True, "test-node")]
    status, body = await rig["dep"].call("GET", "/api/v2/devices/presence", b["token"])
    assert [d["deviceId"] for d in body["devices"]] == [b["device"]["remote_device_id"]]
    status, body = await rig["dep"].call("GET", "/api/v2/devices/presence")
    assert status == 401


async def test_the_page_and_its_files_are_served_with_a_strict_policy(rig):
    dep = rig["dep"]
    async with dep.http.get(dep.node.api + "/") as r:
        html = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert 'data-testid="signin-token"' in html and "/dashboard/app.js" in html
    for path, ctype in (("/dashboard/app.js", "javascript"), ("/dashboard/vendor/uPlot.iife.min.js", "javascript"),
                        ("/dashboard/vendor/uPlot.LICENSE", "")):
        async with dep.http.get(dep.node.api + path) as r:
            assert r.status == 200 and ctype in r.content_type, path
            assert r.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/dashboard/../../../pyproject.toml", "/dashboard/%2e%2e/__init__.py", "/dashboard/nope.js"):
        async with dep.http.get(dep.node.api + path) as r:
            assert r.status in (403, 404), path
            assert "proxyorch" not in await r.text()


async def test_http_proxy_sessions_are_listed_with_their_protocol_and_bytes(rig, targets):
    import base64

    dep, c = rig["dep"], rig["a"]["conn"]
    auth = base64.b64encode(f"{c['connectionId']}:{c['password']}".encode()).decode()
    # CONNECT tunnel
    r1, w1 = await asyncio.open_connection("127.0.0.1", dep.node.proxy_port)
    w1.write(f"CONNECT 127.0.0.1:{targets.echo_port} HTTP/1.1\r\nHost: x\r\n"
             f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
    assert b" 200 " in await r1.readuntil(b"\r\n\r\n")
    w1.write(b"e" * 4_321)
    assert await asyncio.wait_for(r1.readexactly(4_321), 10) == b"e" * 4_321
    # absolute-form forwarding on a kept-alive connection: the current request is shown
    r2, w2 = await asyncio.open_connection("127.0.0.1", dep.node.proxy_port)
    request = (f"GET http://127.0.0.1:{targets.http_port}/bytes/2000 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Proxy-Authorization: Basic {auth}\r\n\r\n").encode()
    w2.write(request)
    head = await r2.readuntil(b"\r\n\r\n")
    body = await asyncio.wait_for(r2.readexactly(2000), 10)
    assert b" 200 " in head and len(body) == 2000
    try:
        _s, live = await sessions(rig, rig["a"]["token"])
        by_target = {x["target"]: x for x in live["sessions"]}
        tunnel = by_target[f"127.0.0.1:{targets.echo_port}"]
        assert (tunnel["protocol"], tunnel["bytesIn"], tunnel["bytesOut"]) == ("http", 4_321, 4_321)
        fwd = by_target[f"127.0.0.1:{targets.http_port}"]
        assert fwd["protocol"] == "http" and fwd["startedAt"] is not None
        assert fwd["bytesIn"] == len(head) + 2000, (fwd, len(head), len(request))
        assert fwd["bytesOut"] > 0
        assert live["total"] == 2
    finally:
        w1.close()
        w2.close()


async def test_presence_shows_the_public_ip_the_agent_reported(rig, targets):
    dep = rig["dep"]
    _uid, token = await dep.user("dash-ip")
    device = await dep.device(token)
    status, body = await dep.call("GET", "/api/v2/devices/presence", token)
    assert status == 200 and [d["publicIp"] for d in body["devices"]] == [None]  # nothing reported yet
    # The agent asks the echo URL for its address (from its source address) and reports it in HELLO.
    await dep.agent(device, "--allow-private", "--source-address", "127.0.0.2",
                    "--ip-echo-url", f"http://127.0.0.1:{targets.http_port}/peer")
    status, body = await dep.call("GET", "/api/v2/devices/presence", token)
    assert status == 200
    assert [(d["deviceId"], d["online"], d["publicIp"]) for d in body["devices"]] == \
        [(device["remote_device_id"], True, "127.0.0.2")]
    status, body = await dep.call("GET", "/api/v2/devices/presence", rig["b"]["token"])
    assert device["remote_device_id"] not in [d["deviceId"] for d in body["devices"]]
