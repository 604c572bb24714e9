"""A node at its descriptor limit (RLIMIT_NOFILE) under a connection flood: accepting pauses instead
of spinning on ``accept4 = EMFILE``, open sessions keep relaying, API routes that need a file answer
503 with Retry-After, and once the flood ends a new client is served."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import psutil
import pytest
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOOD = 400  # connections beyond what the node can accept (they wait in its backlog)
HEADROOM = 40  # descriptors the node may still open once its limit is lowered


def _flood(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def _upload_form(content: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", content, filename="x.bin", content_type="application/octet-stream")
    return form


async def _fresh_get(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(url) as r:  # a new connection
        return r.status


async def _metrics(api: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with api.get(url + "/metrics") as r:
        text = await r.text()
    return {k: float(v) for k, _, v in (line.partition(" ") for line in text.splitlines() if line)}


async def test_at_emfile_accepting_pauses_sessions_relay_files_503_and_clients_return(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path, HANDSHAKE_TIMEOUT_S="120", MAX_UNAUTH_PER_IP="100000")
    flood: list[socket.socket] = []
    api = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))  # one keep-alive API connection
    try:
        _uid, token = await dep.user("exhausted")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        port, cid, pw = dep.node.proxy_port, conn["connectionId"], conn["password"]
        reader, writer, _ = await socks5_open(port, cid, pw, "127.0.0.1", targets.echo_port)
        auth = {"Authorization": f"Bearer {token}"}
        base = dep.node.api
        async with api.post(base + "/api/v2/files/upload", data=_upload_form(b"kept" * 1000), headers=auth) as r:
            assert r.status == 200
            stored = (await r.json())["data"]["url"]

        node = psutil.Process(dep.node.proc.pid)
        limit = node.num_fds() + HEADROOM
        node.rlimit(psutil.RLIMIT_NOFILE, (limit, psutil.Process().rlimit(psutil.RLIMIT_NOFILE)[1]))
        flood = _flood(port, FLOOD) + _flood(dep.node.tunnel_port, 50)
        deadline = time.time() + 20
        while True:
            m = await _metrics(api, base)
            if m.get('proxyorch_accept_paused_total{port="proxy"}', 0) >= 1 and node.num_fds() >= limit - 2:
                break
            assert time.time() < deadline, "the node never reached its descriptor limit"
            await asyncio.sleep(0.2)

        # a new API connection arrives too (it waits in the backlog; the listener must not spin on it)
        late_api = asyncio.create_task(asyncio.wait_for(_fresh_get(base + "/healthz"), 60))
        # at the limit: a few accept calls a second, not a spinning core
        await asyncio.sleep(1.0)
        t0, c0 = time.monotonic(), node.cpu_times()
        await asyncio.sleep(4.0)
        t1, c1 = time.monotonic(), node.cpu_times()
        cpu = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0)
        print(f"node CPU at the descriptor limit: {cpu:.1%} of a core ({node.num_fds()} fds, limit {limit})")
        assert cpu < 0.20, f"node uses {cpu:.0%} of a core at EMFILE"
        m = await _metrics(api, base)
        assert m['proxyorch_accept_paused{port="proxy"}'] in (0, 1)
        assert m['proxyorch_accept_paused_total{port="tunnel"}'] >= 1

        # the open session keeps relaying
        writer.write(b"still relaying")
        assert await asyncio.wait_for(reader.readexactly(14), 10) == b"still relaying"
        # routes that need a file: 503 + Retry-After in the API's shape (not 404 / 500)
        async with api.post(base + "/api/v2/files/upload", data=_upload_form(b"new"), headers=auth) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) > 0
            assert (await r.json())["success"] is False
        async with api.get(stored, headers=auth) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) > 0
            assert (await r.json())["success"] is False
        assert not late_api.done()

        # the flood ends: accepting resumes, the waiting API request and a new proxy client are served
        for s in flood:
            s.close()
        flood = []
        assert await late_api == 200
        assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) == 0
        async with api.get(stored, headers=auth) as r:
            assert r.status == 200 and await r.read() == b"kept" * 1000
        writer.close()
    finally:
        for s in flood:
            s.close()
        await api.close()
        await dep.close()
        await dep.node.stop()
