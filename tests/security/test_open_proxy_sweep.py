"""ip_only access never turns the node into an open proxy: a sweep of source addresses and greetings.

Only the addresses inside an ``ip_only`` connection's ranges get SOCKS5 method 0x00 or an HTTP
request served without ``Proxy-Authorization``; every other address gets exactly what it got before
(``0xFF`` / ``407``), and a range stops working within the cache/push delay when it is removed.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from conftest import fresh_deployment

pytestmark = pytest.mark.asyncio(loop_scope="session")
INSIDE = "127.0.0.6"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(pg_root, tmp_path_factory):
    dep = await fresh_deployment(pg_root, tmp_path_factory.mktemp("sweep"), DIRECT_EXIT="1",
                                 DIRECT_EXIT_ALLOW_PRIVATE="1", REQUEST_LOG="0")
    _uid, token = await dep.user("sweeper")
    device = await dep.device(token)
    conn = await dep.connection(token, device["remote_device_id"])
    status, body = await dep.call("PUT", f"/api/v2/proxy/connections/{conn['connectionId']}/access", token,
                                  json={"mode": "ip_only", "allowed_ips": [f"{INSIDE}/32", "::ffff:127.0.0.7"]})
    assert status == 200, body
    await asyncio.sleep(0.2)
    yield {"dep": dep, "token": token, "conn": conn}
    await dep.close()
    await dep.node.stop()


async def greet(port: int, src: str, greeting: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        writer.write(greeting)
        return await asyncio.wait_for(reader.read(2), 10)
    finally:
        writer.close()


async def http_status(port: int, src: str, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        writer.write(request)
        return (await asyncio.wait_for(reader.read(4096), 10))[:12]
    finally:
        writer.close()


GREETINGS = (b"\x05\x01\x00", b"\x05\x02\x00\x01", b"\x05\x03\x00\x01\x80", b"\x05\x01\x01")


async def test_no_auth_from_outside_every_range_gets_0xff_and_407(world, targets):
    port = world["dep"].node.proxy_port
    outside = [f"127.0.0.{i}" for i in range(1, 33) if i not in (6, 7)] + ["127.1.0.6", "127.0.1.6"]
    get = f"GET http://127.0.0.1:{targets.http_port}/hello HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    connect = f"CONNECT 127.0.0.1:{targets.http_port} HTTP/1.1\r\n\r\n".encode()
    for src in outside:
        for g in GREETINGS:
            assert await greet(port, src, g) == b"\x05\xff", (src, g)
        assert await http_status(port, src, get) == b"HTTP/1.1 407", src
        assert await http_status(port, src, connect) == b"HTTP/1.1 407", src
    # inside: method 0x00 is chosen for a greeting that offers it
    for src in (INSIDE, "127.0.0.7"):
        assert await greet(port, src, b"\x05\x01\x00") == b"\x05\x00"
        assert await greet(port, src, b"\x05\x01\x01") == b"\x05\xff"  # only 0x00, never another method
        assert (await http_status(port, src, get)).startswith(b"HTTP/1.1 200")


async def test_removing_the_range_closes_the_door_within_the_push_delay(world):
    dep, conn = world["dep"], world["conn"]
    port = dep.node.proxy_port
    assert await greet(port, INSIDE, b"\x05\x01\x00") == b"\x05\x00"
    status, _ = await dep.call("PUT", f"/api/v2/proxy/connections/{conn['connectionId']}/access", world["token"],
                               json={"mode": "password"})
    assert status == 200
    deadline = time.monotonic() + 2
    while await greet(port, INSIDE, b"\x05\x01\x00") != b"\x05\xff":
        assert time.monotonic() < deadline, "the range still opened the proxy 2 s after its removal"
        await asyncio.sleep(0.02)
