"""Memory bounds of the tunnel (issue 21): 200 sessions whose clients never read, and 200 whose
targets never read, grow node and agent RSS by at most the tunnel memory budget (plus slack for
the per-session socket buffers and objects), and the tunnel keeps serving other sessions."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")
MiB = 1024 * 1024
BUDGET = 32 * MiB
SESSIONS = 200
# Besides the windows the budget bounds: per session the client (or target) socket's user-space
# buffer up to its 256 KiB high-water mark and the session objects, about 0.4 MiB per session.
SLACK = 96 * MiB


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def settle(progress, timeout: float = 60.0) -> int:
    """Wait until ``progress()`` stops growing for a second (every flow is stalled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = -1
    while loop.time() < deadline:
        await asyncio.sleep(1.0)
        now = progress()
        if now == last:
            return now
        last = now
    raise AssertionError("flows never stalled: back-pressure does not reach the source")


async def _setup(pg_root, tmp_path):
    dep = await fresh_deployment(pg_root, tmp_path, TUNNEL_MEMORY_BUDGET=str(BUDGET))
    _uid, token = await dep.user("memory")
    device = await dep.device(token)
    agent = await dep.agent(device, "--allow-private", "--tunnels", "1", "--memory-budget", str(BUDGET))
    conn = await dep.connection(token, device["remote_device_id"])
    return dep, agent, conn


async def test_200_clients_that_never_read_grow_the_node_by_at_most_the_budget(pg_root, tmp_path, targets):
    dep, agent, conn = await _setup(pg_root, tmp_path)
    port, cid, pw = dep.node.proxy_port, conn["connectionId"], conn["password"]
    writers = []
    try:
        for _ in range(5):  # warm up: imports, buffers, allocator arenas
            assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) == 0
        node0, agent0 = rss_mib(dep.node.proc.pid), rss_mib(agent.proc.pid)
        sent0 = targets.source_sent
        for _ in range(SESSIONS):
            _r, w, _ = await socks5_open(port, cid, pw, "127.0.0.1", targets.source_port)
            writers.append(w)
        await settle(lambda: targets.source_sent)
        pushed = targets.source_sent - sent0
        node1, agent1 = rss_mib(dep.node.proc.pid), rss_mib(agent.proc.pid)
        print(f"\n[clients never read] targets pushed {pushed / MiB:.0f} MiB; node RSS {node0:.0f} -> {node1:.0f} MiB "
              f"(+{node1 - node0:.0f}); agent RSS {agent0:.0f} -> {agent1:.0f} MiB (+{agent1 - agent0:.0f})")
        assert node1 - node0 <= (BUDGET + SLACK) / MiB
        assert agent1 - agent0 <= (BUDGET + SLACK) / MiB
        # the tunnel still serves a new session while 200 are stalled
        assert await asyncio.wait_for(socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port), 20) == 0
    finally:
        for w in writers:
            w.close()
        await dep.close()
        await dep.node.stop()


async def test_200_targets_that_never_read_grow_the_agent_by_at_most_the_budget(pg_root, tmp_path, targets):
    held: list[asyncio.StreamWriter] = []

    async def never_reads(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await asyncio.sleep(3600)

    sink = await asyncio.start_server(never_reads, "127.0.0.1", 0, limit=16 * 1024)
    sink_port = sink.sockets[0].getsockname()[1]
    dep, agent, conn = await _setup(pg_root, tmp_path)
    port, cid, pw = dep.node.proxy_port, conn["connectionId"], conn["password"]
    written = [0]
    tasks: list[asyncio.Task] = []
    block = b"u" * (256 * 1024)

    async def push() -> None:
        _r, w, _ = await socks5_open(port, cid, pw, "127.0.0.1", sink_port)
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                w.write(block)
                await w.drain()
                written[0] += len(block)

    try:
        for _ in range(5):
            assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port) == 0
        node0, agent0 = rss_mib(dep.node.proc.pid), rss_mib(agent.proc.pid)
        tasks = [asyncio.create_task(push()) for _ in range(SESSIONS)]
        await settle(lambda: written[0])
        node1, agent1 = rss_mib(dep.node.proc.pid), rss_mib(agent.proc.pid)
        print(f"\n[targets never read] clients pushed {written[0] / MiB:.0f} MiB; agent RSS {agent0:.0f} -> "
              f"{agent1:.0f} MiB (+{agent1 - agent0:.0f}); node RSS {node0:.0f} -> {node1:.0f} MiB "
              f"(+{node1 - node0:.0f})")
        assert agent1 - agent0 <= (BUDGET + SLACK) / MiB
        assert node1 - node0 <= (BUDGET + SLACK) / MiB
        assert await asyncio.wait_for(socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port), 20) == 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in held:
            w.close()
        sink.close()
        await dep.close()
        await dep.node.stop()
