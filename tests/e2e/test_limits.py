"""Per-connection limits and access modes (issue 16), end to end: a real node (its own direct exit),
real clients (raw SOCKS5, curl), the real API and PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import pytest_asyncio
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(pg_root, tmp_path_factory):
    dep = await fresh_deployment(pg_root, tmp_path_factory.mktemp("limits"), DIRECT_EXIT="1",
                                 DIRECT_EXIT_ALLOW_PRIVATE="1")
    _uid, token = await dep.user("owner")
    device = await dep.device(token)
    _uid2, other = await dep.user("other")
    yield {"dep": dep, "token": token, "device": device, "other": other}
    await dep.close()
    await dep.node.stop()


async def new_connection(world) -> dict:
    return await world["dep"].connection(world["token"], world["device"]["remote_device_id"])


async def put(world, conn: dict, what: str, body: object, token: str | None = None) -> tuple[int, object]:
    return await world["dep"].call("PUT", f"/api/v2/proxy/connections/{conn['connectionId']}/{what}",
                                   token or world["token"], json=body)


async def get(world, conn: dict, what: str, token: str | None = None) -> tuple[int, object]:
    return await world["dep"].call("GET", f"/api/v2/proxy/connections/{conn['connectionId']}/{what}",
                                   token or world["token"])


async def read_for(reader: asyncio.StreamReader, seconds: float) -> int:
    got = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            break
        if not chunk:
            break
        got += len(chunk)
    return got


DOWNLOAD_REQUEST = b"GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def download_until_closed(port: int, cid: str, pw: str, http_port: int) -> tuple[int, bool]:
    """Send DOWNLOAD_REQUEST through the proxy; (bytes received, closed by the proxy before 20 s idle)."""
    r, w, _ = await socks5_open(port, cid, pw, "127.0.0.1", http_port)
    w.write(DOWNLOAD_REQUEST)
    got, closed = 0, False
    try:
        while chunk := await asyncio.wait_for(r.read(65536), 20):
            got += len(chunk)
        closed = True
    except (TimeoutError, ConnectionError):
        pass
    w.close()
    return got, closed


async def two_direct_nodes(url: str, base, env: dict[str, str], prefix: str, user: str) -> dict:  # noqa: ANN001
    """Two direct-exit nodes ``<prefix>-a`` / ``<prefix>-b`` on one database (a cluster: shared secret and
    RMS key) and a user with a device; close with :func:`stop_two_nodes`."""
    from conftest import Deployment, NodeProcess

    env = {"DIRECT_EXIT": "1", "DIRECT_EXIT_ALLOW_PRIVATE": "1", "REQUEST_LOG": "0",
           # a cluster shares its secret, RMS key and admin token (start-up refuses it otherwise)
           "CLUSTER_SECRET": f"{prefix}-" + "s" * 16, "RMS_KEY": "cm90YXRpb24ta2V5LXJvdGF0aW9uLWtleS0zMmJ5dGU=", **env}
    a = await NodeProcess(url, base / "a", {**env, "NODE_NAME": f"{prefix}-a"}).start()
    b = await NodeProcess(url, base / "b", {**env, "NODE_NAME": f"{prefix}-b"}).start()
    dep = Deployment(a)
    await dep.open()
    _uid, token = await dep.user(user)
    device = await dep.device(token)
    return {"dep": dep, "a": a, "b": b, "token": token, "device": device}


async def stop_two_nodes(rig: dict) -> None:
    await rig["dep"].close()
    await rig["b"].stop()
    await rig["a"].stop()


async def test_limits_defaults_bad_bodies_and_tenants(world):
    conn = await new_connection(world)
    status, data = await get(world, conn, "limits")
    assert status == 200 and data == {"download_bytes_per_s": None, "upload_bytes_per_s": None,
                                      "max_concurrent_sessions": None, "quota_bytes": None, "quota_period": None}
    status, data = await put(world, conn, "limits", {"download_bytes_per_s": 5000})
    assert status == 200 and data["download_bytes_per_s"] == 5000
    for bad in ({"download_bytes_per_s": -1}, {"download_bytes_per_s": "fast"}, {"quota_period": "week"},
                {"max_concurrent_sessions": 0}, {"quota_bytes": 1.5}, {"speed": 1}, {"upload_bytes_per_s": True},
                [1, 2]):
        status, data = await put(world, conn, "limits", bad)
        assert status == 400, (bad, data)
    status, data = await get(world, conn, "limits")
    assert data["download_bytes_per_s"] == 5000 and data["quota_period"] is None  # nothing changed
    status, data = await put(world, conn, "limits", {"quota_bytes": 1000})
    assert data["quota_bytes"] == 1000 and data["quota_period"] == "total" and data["download_bytes_per_s"] == 5000
    status, data = await put(world, conn, "limits", {"download_bytes_per_s": None})
    assert data["download_bytes_per_s"] is None and data["quota_bytes"] == 1000
    for bad in ({"mode": "open"}, {"mode": "ip_only", "allowed_ips": []}, {"mode": "ip_only"},
                {"mode": "ip_only", "allowed_ips": ["10.0.0.1/33"]}, {"mode": "ip_only", "allowed_ips": ["10.0.0.1/8"]},
                {"mode": "password", "allowed_ips": "10.0.0.0/8"}, {"mode": "password", "extra": 1},
                {"mode": "ip_only", "allowed_ips": ["0.0.0.0/0"]}, {"mode": "ip_only", "allowed_ips": ["::/0"]}):
        status, data = await put(world, conn, "access", bad)
        assert status == 400, (bad, data)
    assert (await get(world, conn, "access"))[1] == {"mode": "password", "allowed_ips": []}
    status, data = await put(world, conn, "access", {"mode": "password_and_ip",
                                                     "allowed_ips": ["::ffff:10.1.2.0/120", "10.9.9.9"]})
    assert status == 200 and data == {"mode": "password_and_ip", "allowed_ips": ["10.1.2.0/24", "10.9.9.9/32"]}
    # another tenant: no read, no write, nothing changed
    for what in ("limits", "access", "usage"):
        status, _ = await get(world, conn, what, world["other"])
        assert status in (403, 404)
    status, _ = await put(world, conn, "limits", {"quota_bytes": 5}, world["other"])
    assert status in (403, 404)
    assert (await get(world, conn, "limits"))[1]["quota_bytes"] == 1000
    status, _ = await world["dep"].call("GET", "/api/v2/proxy/connections/00000000-0000-4000-8000-000000000000/limits",
                                        world["token"])
    assert status == 404
    # shown in the lists
    status, data = await world["dep"].call("GET", "/api/v2/proxy/connections", world["token"])
    mine = next(c for c in data["connections"] if c["connectionId"] == conn["connectionId"])
    assert mine["limits"]["quota_bytes"] == 1000 and mine["access"]["mode"] == "password_and_ip"
    assert mine["usage"]["used_bytes"] == 0 and mine["usage"]["remaining_bytes"] == 1000
    status, data = await world["dep"].call("GET", "/api/v2/admin/proxies", admin=True)
    row = next(p for p in data["proxies"] if p["connection_id"] == conn["connectionId"])
    assert row["limits"]["quota_bytes"] == 1000 and "usage" in row and row["access"]["allowed_ips"]
    status, doc = await world["dep"].call("GET", "/api/v2/openapi.json")
    paths = doc["paths"]
    for p in ("limits", "access", "usage"):
        assert f"/api/v2/proxy/connections/{{connection_id}}/{p}" in paths


async def test_device_owner_of_a_routed_through_connection_may_read_not_write(world):
    conn = await new_connection(world)
    other_dev = await world["dep"].device(world["other"])
    # route the owner's connection through the other user's device (as a rented device would be)
    await world["dep"].pool.execute("UPDATE proxy_credentials SET device_id = $2 WHERE connection_id = $1",
                                    conn["connectionId"], other_dev["remote_device_id"])
    assert (await put(world, conn, "limits", {"quota_bytes": 10}))[0] == 200
    for what in ("limits", "access", "usage"):
        status, body = await get(world, conn, what, world["other"])
        assert status == 200, (what, body)
    assert (await get(world, conn, "limits", world["other"]))[1]["quota_bytes"] == 10
    for what, body in (("limits", {"quota_bytes": 99}), ("access", {"mode": "password"})):
        status, _ = await put(world, conn, what, body, world["other"])
        assert status == 403
    assert (await get(world, conn, "limits"))[1]["quota_bytes"] == 10


async def test_quota_closes_crossing_session_refuses_next_and_survives_restart(world, targets):
    conn = await new_connection(world)
    cid, pw = conn["connectionId"], conn["password"]
    quota = 300_000
    assert (await put(world, conn, "limits", {"quota_bytes": quota}))[0] == 200
    port = world["dep"].node.proxy_port
    r, w, _ = await socks5_open(port, cid, pw, "127.0.0.1", targets.http_port)
    request = f"GET /bytes/1000000 HTTP/1.1\r\nHost: 127.0.0.1:{targets.http_port}\r\n\r\n".encode()
    w.write(request)
    received = 0
    while chunk := await asyncio.wait_for(r.read(65536), 20):
        received += len(chunk)
    w.close()
    assert received + len(request) == quota  # no byte beyond the quota, the session closed
    assert await socks5_code(port, cid, pw, "127.0.0.1", targets.http_port) == 0x02
    # HTTP CONNECT: 403 with a reason
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    import base64
    auth = base64.b64encode(f"{cid}:{pw}".encode()).decode()
    writer.write(f"CONNECT 127.0.0.1:{targets.http_port} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 403") and b"quota" in head
    await asyncio.sleep(1.5)  # one flush
    status, usage = await get(world, conn, "usage")
    assert usage["used_bytes"] == quota and usage["remaining_bytes"] == 0 and usage["quota_period"] == "total"
    node = world["dep"].node
    await node.stop()
    await node.start()
    status, usage = await get(world, conn, "usage")
    assert status == 200 and usage["used_bytes"] == quota
    assert await socks5_code(node.proxy_port, cid, pw, "127.0.0.1", targets.http_port) == 0x02
    # raising the quota admits again within 100 ms (push + cache)
    assert (await put(world, conn, "limits", {"quota_bytes": quota + 100_000}))[0] == 200
    await asyncio.sleep(0.15)
    assert await socks5_code(node.proxy_port, cid, pw, "127.0.0.1", targets.http_port) == 0


async def test_usage_is_exact_and_survives_sigkill_after_a_flush(world, targets):
    conn = await new_connection(world)
    cid, pw = conn["connectionId"], conn["password"]
    node = world["dep"].node
    r, w, _ = await socks5_open(node.proxy_port, cid, pw, "127.0.0.1", targets.http_port)
    request = b"GET /bytes/500000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    w.write(request)
    received = 0
    while chunk := await asyncio.wait_for(r.read(65536), 20):
        received += len(chunk)
    w.close()
    await asyncio.sleep(1.5)  # longer than USAGE_FLUSH_S (1 s)
    await node.stop(sig=9)
    await node.start()
    status, usage = await get(world, conn, "usage")
    assert status == 200 and usage["used_bytes"] == received + len(request), (usage, received)
    assert usage["quota_bytes"] is None and usage["remaining_bytes"] is None


async def test_session_limit_refuses_next_and_closing_one_admits_one(world, targets):
    conn = await new_connection(world)
    cid, pw = conn["connectionId"], conn["password"]
    assert (await put(world, conn, "limits", {"max_concurrent_sessions": 2}))[0] == 200
    await asyncio.sleep(0.15)
    port = world["dep"].node.proxy_port
    opened = [await socks5_open(port, cid, pw, "127.0.0.1", targets.echo_port) for _ in range(2)]
    assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) == 0x02
    status, usage = await get(world, conn, "usage")
    assert usage["active_sessions"] == 2
    # HTTP CONNECT: 429 with Retry-After
    import base64
    auth = base64.b64encode(f"{cid}:{pw}".encode()).decode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT 127.0.0.1:{targets.echo_port} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 429") and b"Retry-After:" in head
    opened[0][1].close()
    deadline = time.monotonic() + 5
    while await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    opened[1][1].close()


async def test_password_and_ip_from_allowed_and_other_addresses(world, targets):
    conn = await new_connection(world)
    cid, pw = conn["connectionId"], conn["password"]
    assert (await put(world, conn, "access", {"mode": "password_and_ip", "allowed_ips": ["127.0.0.2/32"]}))[0] == 200
    await asyncio.sleep(0.15)
    port = world["dep"].node.proxy_port
    assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port, local_addr="127.0.0.2") == 0
    # the right password from another address is refused like a wrong one
    assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port, local_addr="127.0.0.3") == 0x101
    assert await socks5_code(port, cid, "x" * 16, "127.0.0.1", targets.echo_port, local_addr="127.0.0.3") == 0x101


@needs_curl
async def test_ip_only_socks5_without_credentials_and_plain_http(world, targets):
    conn = await new_connection(world)
    assert (await put(world, conn, "access", {"mode": "ip_only", "allowed_ips": ["127.0.0.4/32"]}))[0] == 200
    await asyncio.sleep(0.15)
    port = world["dep"].node.proxy_port
    url = f"http://127.0.0.1:{targets.http_port}/hello"

    async def curl(*args: str) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "20", *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, _err = await proc.communicate()
        return proc.returncode, out

    rc, out = await curl("--interface", "127.0.0.4", "--socks5", f"127.0.0.1:{port}", url)
    assert rc == 0 and out == b"hello through the tunnel\n"
    rc, out = await curl("--interface", "127.0.0.5", "--socks5", f"127.0.0.1:{port}", url)
    assert rc != 0
    rc, out = await curl("--interface", "127.0.0.4", "--proxy", f"http://127.0.0.1:{port}", url)
    assert rc == 0 and out == b"hello through the tunnel\n"
    rc, out = await curl("--interface", "127.0.0.5", "-o", "/dev/null", "-w", "%{http_code}", "--proxy",
                         f"http://127.0.0.1:{port}", url)
    assert out == b"407"
    # the password keeps working from any address
    rc, out = await curl("--interface", "127.0.0.5", "--proxy",
                         f"socks5h://{conn['connectionId']}:{conn['password']}@127.0.0.1:{port}", url)
    assert rc == 0 and out == b"hello through the tunnel\n"
    # overlapping ip_only ranges, of any user: 409
    other_dev = await world["dep"].device(world["other"])
    other = await world["dep"].connection(world["other"], other_dev["remote_device_id"])
    status, data = await put(world, other, "access", {"mode": "ip_only", "allowed_ips": ["127.0.0.0/29"]},
                             world["other"])
    assert status == 409, data
    status, _ = await put(world, other, "access", {"mode": "ip_only", "allowed_ips": ["127.0.0.8/29"]}, world["other"])
    assert status == 200


async def test_download_speed_limit_and_live_lowering(world, targets):
    conn = await new_connection(world)
    cid, pw = conn["connectionId"], conn["password"]
    rate = 1_000_000
    assert (await put(world, conn, "limits", {"download_bytes_per_s": rate}))[0] == 200
    await asyncio.sleep(0.15)
    port = world["dep"].node.proxy_port
    r, w, _ = await socks5_open(port, cid, pw, "127.0.0.1", targets.source_port)
    await read_for(r, 1.0)  # past the initial burst
    got = await read_for(r, 4.0)
    print(f"measured download rate at a {rate} B/s limit: {got / 4.0:.0f} B/s")
    assert 0.85 * rate * 4 <= got <= 1.1 * rate * 4 + 300_000
    # lowering it slows the open download within a second
    assert (await put(world, conn, "limits", {"download_bytes_per_s": 200_000}))[0] == 200
    await read_for(r, 1.0)
    got = await read_for(r, 3.0)
    print(f"after lowering to 200000 B/s: {got / 3.0:.0f} B/s")
    assert got <= 200_000 * 3 * 1.1 + 300_000
    w.close()


@needs_curl
async def test_absolute_form_http_download_is_paced_too(world, targets):
    conn = await new_connection(world)
    rate = 500_000
    assert (await put(world, conn, "limits", {"download_bytes_per_s": rate}))[0] == 200
    await asyncio.sleep(0.15)
    proxy = f"http://{conn['connectionId']}:{conn['password']}@127.0.0.1:{world['dep'].node.proxy_port}"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", "--max-time", "4", "--proxy", proxy,
        f"http://127.0.0.1:{targets.http_port}/bytes/100000000", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, _err = await proc.communicate()
    got = int(out or b"0")
    print(f"absolute-form download at a {rate} B/s limit: {got / 4:.0f} B/s over 4 s (incl. the 0.5 s burst)")
    assert 0.7 * rate * 4 <= got <= 1.1 * rate * 4.5 + 300_000


async def test_upload_speed_limit_paces_the_client(world, targets):
    conn = await new_connection(world)
    rate = 300_000
    assert (await put(world, conn, "limits", {"upload_bytes_per_s": rate}))[0] == 200
    await asyncio.sleep(0.15)
    r, w, _ = await socks5_open(world["dep"].node.proxy_port, conn["connectionId"], conn["password"], "127.0.0.1",
                                targets.echo_port)
    block = b"u" * 65536

    async def pump() -> None:
        try:
            while True:
                w.write(block)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    task = asyncio.create_task(pump())
    await read_for(r, 1.0)
    got = await read_for(r, 4.0)  # what the echo target received (and sent back) in 4 s
    task.cancel()
    w.close()
    print(f"measured upload rate at a {rate} B/s limit: {got / 4:.0f} B/s")
    assert 0.8 * rate * 4 <= got <= 1.1 * rate * 4 + 200_000


@pytest.mark.slow
async def test_download_through_1mb_limit_for_10s_within_10_percent(world, targets):
    conn = await new_connection(world)
    rate = 1_000_000
    assert (await put(world, conn, "limits", {"download_bytes_per_s": rate}))[0] == 200
    await asyncio.sleep(0.15)
    r, w, _ = await socks5_open(world["dep"].node.proxy_port, conn["connectionId"], conn["password"], "127.0.0.1",
                                targets.source_port)
    await read_for(r, 1.0)
    got = await read_for(r, 10.0)
    w.close()
    print(f"measured over 10 s at a {rate} B/s limit: {got / 10:.0f} B/s")
    assert 0.9 * rate * 10 <= got <= 1.1 * rate * 10


async def test_refusals_are_blocked_rows_with_their_reason(world):
    """Runs after the tests above: their quota, session and address refusals are request-log rows."""
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    params = {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat(),
              "limit": "10000"}
    deadline = time.monotonic() + 20
    while True:
        status, body = await world["dep"].call("GET", "/api/v2/proxy/logs", world["token"], params=params)
        assert status == 200, body
        reasons = {e["blockReason"] for e in body["entries"] if e["action"] == "blocked"}
        if {"quota", "sessions", "ip"} <= reasons or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert {"quota", "sessions", "ip"} <= reasons, reasons


@pytest.mark.slow
async def test_download_through_a_real_agent_at_1mb_for_10s(deployment, targets):
    """The same limit with the traffic leaving through a device agent's tunnel (credit withheld while paused)."""
    _uid, token = await deployment.user("limited")
    device = await deployment.device(token)
    await deployment.agent(device, "--allow-private")
    conn = await deployment.connection(token, device["remote_device_id"])
    rate = 1_000_000
    status, _ = await deployment.call("PUT", f"/api/v2/proxy/connections/{conn['connectionId']}/limits", token,
                                      json={"download_bytes_per_s": rate})
    assert status == 200
    await asyncio.sleep(0.15)
    r, w, _ = await socks5_open(deployment.node.proxy_port, conn["connectionId"], conn["password"], "127.0.0.1",
                                targets.source_port)
    await read_for(r, 1.0)
    windows = [await read_for(r, 5.0) for _ in range(2)]
    w.close()
    print(f"through the agent at a {rate} B/s limit, two 5 s windows: {[x / 5 for x in windows]} B/s")
    for got in windows:
        assert 0.9 * rate * 5 <= got <= 1.1 * rate * 5
