"""Connection floods on the proxy port: at most MAX_UNAUTH_PER_IP unauthenticated connections per
client address (authenticated sessions do not count), and slowloris clients closed by the handshake
timeout while honest clients are served."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _connect(port: int, source: str) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


async def _closed_within(s: socket.socket, seconds: float) -> bool:
    """True if the peer closes (EOF or reset) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if s.recv(1 << 12) == b"":
                return True
        except BlockingIOError:
            pass
        except OSError:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_the_65th_unauthenticated_connection_of_an_address_is_closed_at_once(pg_root, tmp_path, targets):
    deployment = await fresh_deployment(pg_root, tmp_path)  # MAX_UNAUTH_PER_IP: the default, 64
    _uid, token = await deployment.user("flood-owner")
    device = await deployment.device(token)
    await deployment.agent(device, "--allow-private")
    conn = await deployment.connection(token, device["remote_device_id"])
    port, src = deployment.node.proxy_port, "127.0.0.66"
    # authenticated, relaying sessions from the address do not count
    sessions = [await socks5_open(port, conn["connectionId"], conn["password"], "127.0.0.1", targets.echo_port,
                                  local_addr=src) for _ in range(10)]
    idle = [_connect(port, src) for _ in range(64)]
    extra = None
    try:
        await asyncio.sleep(0.3)
        assert not any([await _closed_within(s, 0.01) for s in idle])  # all 64 are held
        before = (await deployment.metrics())["proxyorch_unauth_refused_total"]
        extra = _connect(port, src)
        t0 = time.monotonic()
        assert await _closed_within(extra, 2)
        print(f"65th unauthenticated connection closed after {(time.monotonic() - t0) * 1000:.0f} ms")
        assert (await deployment.metrics())["proxyorch_unauth_refused_total"] == before + 1
        # another address is not affected, and the relaying sessions go on
        assert await socks5_code(port, conn["connectionId"], conn["password"], "127.0.0.1", targets.echo_port,
                                 local_addr="127.0.0.67") == 0
        for reader, writer, _ in sessions:
            writer.write(b"on")
            assert await asyncio.wait_for(reader.readexactly(2), 10) == b"on"
        # a slot freed is a slot to use: close one idle connection, a real client gets in
        idle.pop().close()
        await asyncio.sleep(0.3)
        assert await socks5_code(port, conn["connectionId"], conn["password"], "127.0.0.1", targets.echo_port,
                                 local_addr=src) == 0
    finally:
        for s in idle + ([extra] if extra else []):
            s.close()
        for _r, writer, _ in sessions:
            writer.close()
        await deployment.close()
        await deployment.node.stop()


SLOW_CLIENTS = 2000


async def test_slowloris_connections_are_closed_by_the_handshake_timeout_while_clients_are_served(
        pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path, HANDSHAKE_TIMEOUT_S="4")
    slow: list[socket.socket] = []
    try:
        _uid, token = await dep.user("slowloris")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        port = dep.node.proxy_port
        # 2 000 clients from 40 addresses (50 each, within MAX_UNAUTH_PER_IP), each trickling an HTTP
        # request head one byte a second
        for i in range(SLOW_CLIENTS):
            slow.append(_connect(port, f"127.0.1.{i % 40 + 1}"))
            if i % 500 == 499:
                await asyncio.sleep(0.1)
        t0 = time.monotonic()
        head = b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n"
        latencies = []
        alive = set(slow)
        step = 0
        while alive and time.monotonic() - t0 < 20:
            for s in list(alive):
                try:
                    s.send(head[step % len(head):step % len(head) + 1])
                except OSError:
                    alive.discard(s)
            step += 1
            t = time.monotonic()
            assert await socks5_code(port, conn["connectionId"], conn["password"], "127.0.0.1",
                                     targets.echo_port) == 0
            latencies.append(time.monotonic() - t)
            for s in list(alive):
                try:
                    if s.recv(1 << 12) == b"":
                        alive.discard(s)
                except BlockingIOError:
                    pass
                except OSError:
                    alive.discard(s)
            await asyncio.sleep(1.0)
        took = time.monotonic() - t0
        latencies.sort()
        print(f"{SLOW_CLIENTS} slowloris connections all closed {took:.1f}s after their first byte "
              f"(HANDSHAKE_TIMEOUT_S=4); honest SOCKS sessions meanwhile: median "
              f"{latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
        assert not alive, f"{len(alive)} slow connections still open"
        assert took >= 3  # they were held until the timeout, not refused
    finally:
        for s in slow:
            s.close()
        await dep.close()
        await dep.node.stop()
