"""What a phone's network does to the tunnel: a network change leaves a dead TCP connection without FIN
(black-holed relay), and an idle agent must cost next to nothing (one keep-alive per interval)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from conftest import fresh_deployment
from relays import BlackholeRelay, tls_records
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (no psutil in the default test install)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_agent_detects_blackholed_tunnel_reconnects_and_clients_get_eof(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path, TUNNEL_PING_S="0.5", TUNNEL_DEAD_AFTER="3")
    relay = await BlackholeRelay(dep.node.tunnel_port).start()
    try:
        _uid, token = await dep.user("phone-blackhole")
        device = await dep.device(token)
        agent = await dep.agent(device, "--allow-private", "--ping-interval", "0.5", "--dead-after", "3",
                                server=f"127.0.0.1:{relay.port}")
        conn = await dep.connection(token, device["remote_device_id"])
        reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                              "127.0.0.1", targets.echo_port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        relay.blackholed = True  # Wi-Fi -> mobile: the old path silently drops everything
        writer.write(b"lost")
        assert await asyncio.wait_for(reader.read(), 20) == b""  # the client's session ends, no hang
        writer.close()
        await agent.wait_log("peer silent for", 20)  # the agent noticed on its own, within dead-after
        await dep.wait_online(device["remote_device_id"], online=False, timeout=20)
        relay.blackholed = False  # the new network works
        await dep.wait_online(device["remote_device_id"], timeout=60)
        assert relay.connections >= 2
        reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                              "127.0.0.1", targets.echo_port)
        writer.write(b"after")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"after"
        writer.close()
    finally:
        relay.close()
        await dep.close()
        await dep.node.stop()


async def test_idle_agent_sends_one_keepalive_per_interval_and_burns_no_cpu(pg_root, tmp_path, targets):
    # The node pings rarely, so what the agent sends is its own keep-alives (plus nothing else).
    dep = await fresh_deployment(pg_root, tmp_path, TUNNEL_PING_S="30", TUNNEL_DEAD_AFTER="90")
    relay = await BlackholeRelay(dep.node.tunnel_port).start()
    sessions = []
    try:
        _uid, token = await dep.user("phone-idle")
        device = await dep.device(token)
        agent = await dep.agent(device, "--allow-private", "--ping-interval", "0.5",
                                server=f"127.0.0.1:{relay.port}")
        conn = await dep.connection(token, device["remote_device_id"])
        for with_streams in (False, True):
            if with_streams:  # 50 open, idle streams must not add timers or traffic
                for _ in range(50):
                    sessions.append(await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                                      "127.0.0.1", targets.echo_port))
            await asyncio.sleep(1.0)
            up = relay.up[-1]
            records0 = sum(1 for t, _ in tls_records(bytes(up)) if t == 23)
            cpu0, t0 = cpu_seconds(agent.proc.pid), time.monotonic()
            await asyncio.sleep(6.0)
            records = sum(1 for t, _ in tls_records(bytes(up)) if t == 23) - records0
            cpu, elapsed = cpu_seconds(agent.proc.pid) - cpu0, time.monotonic() - t0
            print(f"\nidle agent ({len(sessions)} streams): {records} records in {elapsed:.1f}s, CPU {cpu:.3f}s")
            assert elapsed / 0.5 / 2 <= records <= elapsed / 0.5 + 2  # keep-alives happen, one per interval
            assert cpu < 0.5  # no busy loop (a spinning agent burns a whole core: ~6 s here)
    finally:
        for _r, w, _ in sessions:
            w.close()
        relay.close()
        await dep.close()
        await dep.node.stop()
