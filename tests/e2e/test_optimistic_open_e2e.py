"""OPTIMISTIC_OPEN=1 end to end (real node, real agent, TLS tunnel): the client's bytes equal what the
target got and sent back; a target that refuses resets the client and its row has the real reply code."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from conftest import free_port, fresh_deployment
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, tmp_path_factory, targets):
    dep = await fresh_deployment(pg_root, tmp_path_factory.mktemp("optimistic"), OPTIMISTIC_OPEN="1",
                                 LOG_BATCH_S="0.2")
    _uid, token = await dep.user("optimist")
    device = await dep.device(token)
    await dep.agent(device, "--allow-private")
    conn = await dep.connection(token, device["remote_device_id"])
    yield {"dep": dep, "token": token, "conn": conn}
    await dep.close()
    await dep.node.stop()


async def rows(dep, token, n: int, timeout: float = 30) -> list[dict]:
    now = datetime.now(UTC)
    params = {"from": (now - timedelta(hours=2)).isoformat(), "to": (now + timedelta(hours=2)).isoformat(),
              "limit": "1000"}
    deadline = time.time() + timeout
    while True:
        status, body = await dep.call("GET", "/api/v2/proxy/logs", token, params=params)
        assert status == 200, body
        if body["total"] >= n or time.time() > deadline:
            return body["entries"]
        await asyncio.sleep(0.2)


async def test_bytes_through_an_optimistic_open_are_exact(rig, targets):
    dep, c = rig["dep"], rig["conn"]
    for size in (64, 200_000, 1_000_000):  # within, and far beyond, what goes out before the answer
        payload = bytes((i * 7 + size) & 0xFF for i in range(size))
        reader, writer, bound = await socks5_open(dep.node.proxy_port, c["connectionId"], c["password"],
                                                  "127.0.0.1", targets.echo_port)
        assert bound == ("0.0.0.0", 0)  # answered before the device connected
        writer.write(payload)
        writer.write_eof()  # a half-close while the stream may still be opening
        got = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert got == payload
    # HTTP CONNECT, bytes pipelined right behind the head
    auth = base64.b64encode(f"{c['connectionId']}:{c['password']}".encode()).decode()
    reader, writer = await asyncio.open_connection("127.0.0.1", dep.node.proxy_port)
    writer.write(f"CONNECT 127.0.0.1:{targets.echo_port} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
                 .encode() + b"pipelined")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.write(b" and more")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b"pipelined and more"
    writer.close()
    got = [e for e in await rows(dep, rig["token"], 4) if e["action"] == "allowed"]
    assert sorted(e["bytesOut"] for e in got) == sorted([64, 200_000, 1_000_000, len(b"pipelined and more")])
    assert all(e["replyCode"] == 0 and e["bytesIn"] == e["bytesOut"] for e in got)


async def test_refused_target_resets_the_client_and_logs_the_real_reply_code(rig):
    dep, c = rig["dep"], rig["conn"]
    closed = free_port()  # nothing listens here: the device's connect is refused
    before = len(await rows(dep, rig["token"], 0, timeout=0))
    for proto in ("socks5", "http"):
        if proto == "socks5":
            reader, writer, _ = await socks5_open(dep.node.proxy_port, c["connectionId"], c["password"],
                                                  "127.0.0.1", closed)
        else:
            auth = base64.b64encode(f"{c['connectionId']}:{c['password']}".encode()).decode()
            reader, writer = await asyncio.open_connection("127.0.0.1", dep.node.proxy_port)
            writer.write(f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
                         .encode())
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200 ")
        writer.write(b"hello?")
        with pytest.raises(ConnectionResetError):  # a reset, never a clean end that looks like success
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
    got = await rows(dep, rig["token"], before + 2)
    refused = [e for e in got if e["port"] == closed]
    assert sorted(e["protocol"] for e in refused) == ["http", "socks5"]
    for e in refused:
        assert (e["action"], e["replyCode"], e["bytesIn"]) == ("allowed", 5, 0), e
        assert "refused" in e["error"].lower() or "connect" in e["error"].lower(), e
