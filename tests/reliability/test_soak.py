"""Soak: a bounded run at steady load. Slow: `RUN_SLOW=1 bash scripts/test.sh tests/reliability/test_soak.py`.

200 concurrent clients churn sessions (SOCKS5 handshake, auth, CONNECT, 1-4 KiB echo, close) through
4 devices for SOAK_SECONDS (default 300). After a warm-up the node's RSS may not grow beyond a stated
bound, its file descriptors return to the baseline, and no session fails unexpectedly.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from conftest import fresh_deployment
from socks_client import socks5_open
from targets import TargetServers

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]
RSS_GROWTH_LIMIT_MIB = 64


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    """Open socket descriptors (sessions hold sockets; chDB's data-part files come and go with merges)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def all_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_soak_steady_churn_no_leaks(pg_root, tmp_path):
    duration = float(os.environ.get("SOAK_SECONDS", "300"))
    warmup = min(60.0, duration / 5)
    targets = await TargetServers().start()
    dep = await fresh_deployment(pg_root, tmp_path)
    try:
        _uid, token = await dep.user("soak")
        conns = []
        for _ in range(4):
            device = await dep.device(token)
            await dep.agent(device, "--allow-private")
            conns.append(await dep.connection(token, device["remote_device_id"]))
        pid = dep.node.proc.pid
        fd_base = fds(pid)
        stats = {"ok": 0, "errors": 0}
        errors: list[str] = []
        stop = time.monotonic() + duration

        async def client(i: int) -> None:
            rnd = random.Random(i)
            while time.monotonic() < stop:
                c = conns[i % 4]
                payload = rnd.randbytes(rnd.randint(1024, 4096))
                try:
                    reader, writer, _ = await socks5_open(dep.node.proxy_port, c["connectionId"], c["password"],
                                                          "127.0.0.1", targets.echo_port)
                    writer.write(payload)
                    writer.write_eof()
                    got = await asyncio.wait_for(reader.read(), 30)
                    writer.close()
                    if got != payload:
                        raise AssertionError("echo mismatch")
                    stats["ok"] += 1
                except Exception as exc:  # counted, reported
                    stats["errors"] += 1
                    if len(errors) < 5:
                        errors.append(repr(exc))

        tasks = [asyncio.create_task(client(i)) for i in range(200)]
        await asyncio.sleep(warmup)
        rss_warm = rss_mib(pid)
        fd_warm = fds(pid)  # pools (PostgreSQL, chDB) have grown to their working size by now
        await asyncio.gather(*tasks)
        rss_end = rss_mib(pid)
        await asyncio.sleep(2)
        fd_end = fds(pid)
        all_end = all_fds(pid)
        print(f"\nsoak {duration:.0f}s: sessions={stats['ok']} errors={stats['errors']} "
              f"rss warm={rss_warm:.1f}MiB end={rss_end:.1f}MiB sockets base={fd_base} warm={fd_warm} end={fd_end} "
              f"all fds end={all_end} "
              f"{errors}")
        assert stats["errors"] == 0, errors
        assert rss_end - rss_warm <= RSS_GROWTH_LIMIT_MIB
        assert fd_end <= max(fd_base, fd_warm) + 2  # no descriptor per session left behind
    finally:
        await dep.close()
        await dep.node.stop()
        await targets.stop()
