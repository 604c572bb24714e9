"""`proxyorch serve --workers 2`: two node processes on shared ports behave as one node."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import psutil
import pytest
import pytest_asyncio
from conftest import AgentProcess, Deployment, NodeProcess, create_database, free_port, stop_postgres
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Workers(NodeProcess):
    """A ``serve --workers N`` supervisor (same ports and env as a NodeProcess)."""

    def __init__(self, database_url: str, data_dir, n: int, env: dict[str, str] | None = None) -> None:
        super().__init__(database_url, data_dir, {"NODE_NAME": "wk", **(env or {})})
        self.n = n
        while len({self.proxy_port, self.tunnel_port, self.api_port}) < 3:  # free_port() may repeat itself
            self.proxy_port, self.tunnel_port, self.api_port = free_port(), free_port(), free_port()

    async def _start_once(self) -> Workers:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "proxyorch", "serve", "--workers", str(self.n)],
                                     env=self.env(), stdout=self.log, stderr=subprocess.STDOUT, cwd=str(self.data_dir))
        await self.wait_all_ready()
        return self

    def children(self) -> list[psutil.Process]:
        """Live worker processes (``proxyorch serve`` children of the supervisor)."""
        out = []
        for c in psutil.Process(self.proc.pid).children():
            try:
                if "serve" in c.cmdline() and c.status() != psutil.STATUS_ZOMBIE:
                    out.append(c)
            except psutil.NoSuchProcess:
                pass
        return out

    async def node_names(self, tries: int = 40) -> set[str]:
        """Node names answering /healthz on the shared API port (fresh connections: SO_REUSEPORT spreads them)."""
        names = set()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(tries):
                try:
                    async with http.get(f"{self.api}/healthz") as r:
                        if r.status == 200:
                            names.add((await r.json())["node"])
                except aiohttp.ClientError:
                    pass
        return names

    async def wait_all_ready(self, timeout: float = 90) -> None:
        want = {f"wk-{i}" for i in range(self.n)}
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited: {self.log_path.read_text()[-3000:]}")
            if len(self.children()) == self.n and await self.node_names() >= want:
                return
            await asyncio.sleep(0.3)
        raise RuntimeError(f"workers did not all start: {self.log_path.read_text()[-3000:]}")


def tunnel_holders(w: Workers) -> set[int]:
    """Pids of the workers holding an established device connection on the tunnel port."""
    pids = set()
    for c in w.children():
        try:
            conns = c.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(k.status == psutil.CONN_ESTABLISHED and k.laddr.port == w.tunnel_port for k in conns):
            pids.add(c.pid)
    return pids


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(pg_root, tmp_path_factory, targets):
    base = tmp_path_factory.mktemp("workers")
    url = await create_database(pg_root[0])
    w = await Workers(url, base / "sup", 2, {"LOG_BATCH_S": "0.2"}).start()
    dep = Deployment(w)
    await dep.open()
    _uid, token = await dep.user("workers")
    device = await dep.device(token)
    # Many tunnels of one device: with SO_REUSEPORT both workers end up holding some of them.
    agent = AgentProcess(w, device["remote_device_id"], device["device_token"], "--allow-private",
                         "--tunnels", "12").start()
    dep.agents.append(agent)
    await dep.wait_online(device["remote_device_id"])
    conn = await dep.connection(token, device["remote_device_id"])
    yield {"w": w, "dep": dep, "token": token, "device": device, "conn": conn, "targets": targets, "sent": 0}
    await dep.close()
    await w.stop(timeout=60)


async def echo_session(rig, payload: bytes = b"hello workers") -> None:
    c = rig["conn"]
    reader, writer, _ = await socks5_open(rig["w"].proxy_port, c["connectionId"], c["password"], "127.0.0.1",
                                          rig["targets"].echo_port)
    writer.write(payload)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 15) == payload
    writer.close()
    rig["sent"] += 1


async def logs_by_node(rig) -> tuple[int, dict[str, int]]:
    now = datetime.now(UTC)
    status, body = await rig["dep"].call("GET", "/api/v2/proxy/logs", rig["token"], params={
        "from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat(),
        "limit": "10000"})
    assert status == 200, body
    counts: dict[str, int] = {}
    for e in body["entries"]:
        counts[e["serverNode"]] = counts.get(e["serverNode"], 0) + 1
    return body["total"], counts


async def test_two_workers_share_the_ports_and_both_serve_clients(rig) -> None:
    w = rig["w"]
    workers = w.children()
    assert len(workers) == 2 and len({p.pid for p in workers}) == 2
    for p in workers:  # each worker listens on the shared ports itself
        ports = {k.laddr.port for k in p.net_connections(kind="tcp") if k.status == psutil.CONN_LISTEN}
        assert {w.proxy_port, w.tunnel_port, w.api_port} <= ports, ports
    deadline = time.time() + 20
    while len(tunnel_holders(w)) < 2 and time.time() < deadline:
        await asyncio.sleep(0.2)
    assert len(tunnel_holders(w)) == 2, "the device's 12 tunnels all landed on one worker"
    for _ in range(30):
        await echo_session(rig)


async def test_logs_of_both_workers_land_exactly_once_in_worker_0s_store(rig) -> None:
    deadline = time.time() + 40
    while True:
        total, counts = await logs_by_node(rig)
        if total >= rig["sent"] or time.time() > deadline:
            break
        await asyncio.sleep(0.3)
    assert total == rig["sent"] and set(counts) == {"wk-0", "wk-1"}, (total, counts)
    await asyncio.sleep(1.5)
    for _ in range(6):  # reads through either worker (the API port is shared too) see the same rows
        assert (await logs_by_node(rig))[0] == rig["sent"]


async def test_a_killed_worker_is_restarted(rig) -> None:
    w = rig["w"]
    victim = next(p for p in w.children() if p.environ().get("NODE_NAME") == "wk-1")
    victim.send_signal(signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline:
        pids = {p.pid for p in w.children()}
        if len(pids) == 2 and victim.pid not in pids and "wk-1" in await w.node_names():
            break
        await asyncio.sleep(0.3)
    else:
        raise AssertionError(f"worker 1 was not restarted: {w.log_path.read_text()[-2000:]}")
    assert w.proc.poll() is None
    # The agent moved its tunnels to worker 0 while worker 1 was down; without the relay a client
    # landing on worker 1 needs tunnels there again: restart the agent to spread them anew.
    dep, device = rig["dep"], rig["device"]
    for a in dep.agents:
        a.kill(15)
    dep.agents.append(AgentProcess(w, device["remote_device_id"], device["device_token"], "--allow-private",
                                   "--tunnels", "12").start())
    deadline = time.time() + 30
    while len(tunnel_holders(w)) < 2 and time.time() < deadline:
        await asyncio.sleep(0.2)
    assert len(tunnel_holders(w)) == 2
    await dep.wait_online(device["remote_device_id"])
    for _ in range(10):
        await echo_session(rig)


@pytest.mark.parametrize("relay", ["RELAY_PORT", "default"])
async def test_a_device_on_worker_1_serves_clients_landing_on_worker_0(pg_root, tmp_path, targets, relay) -> None:
    """A phone's one tunnel is on one worker; clients land on both. "default": no RELAY_PORT, the
    supervisor gives its workers private relay ports on 127.0.0.1 by itself."""
    url = await create_database(pg_root[0])
    env = {"RELAY_PORT": str(20000 + os.getpid() % 20000)} if relay == "RELAY_PORT" else {}
    w = await Workers(url, tmp_path / "sup", 2, env).start()
    dep = Deployment(w)
    await dep.open()
    try:
        _uid, token = await dep.user("relayed")
        device = await dep.device(token)
        dep.agents.append(AgentProcess(w, device["remote_device_id"], device["device_token"],
                                       "--allow-private").start())  # one tunnel: on one worker only
        await dep.wait_online(device["remote_device_id"])
        conn = await dep.connection(token, device["remote_device_id"])
        for _ in range(20):  # the kernel spreads these over both workers
            reader, writer, _ = await socks5_open(w.proxy_port, conn["connectionId"], conn["password"],
                                                  "127.0.0.1", targets.echo_port)
            writer.write(b"x" * 1000)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 15) == b"x" * 1000
            writer.close()
        # the workers relayed over TLS 1.3 with the one certificate they share (the agent's pin)
        from device_tunnel.tls import client_context, peer_fingerprint

        ports = sorted(int(p.environ()["RELAY_PORT"]) for p in w.children())
        if relay == "RELAY_PORT":
            assert ports == [int(env["RELAY_PORT"]), int(env["RELAY_PORT"]) + 1]
        for port in ports:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(pin=w.fingerprint))
            assert writer.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert peer_fingerprint(writer.transport) == w.fingerprint
            assert b'"relay":1' in await asyncio.wait_for(reader.readline(), 5)
            writer.close()
    finally:
        await dep.close()
        await w.stop(timeout=60)


async def test_sigterm_ends_the_supervisor_and_every_worker(pg_root, tmp_path) -> None:
    url = await create_database(pg_root[0])
    w = await Workers(url, tmp_path / "sup", 2).start()
    kids = w.children()
    everything = psutil.Process(w.proc.pid).children(recursive=True)
    assert len(kids) == 2 and any("redis-server" in " ".join(p.cmdline()) for p in everything)
    secret = (tmp_path / "sup" / "cluster.secret")
    assert secret.exists() and secret.stat().st_mode & 0o777 == 0o600
    assert len({p.environ()["CLUSTER_SECRET"] for p in kids}) == 1
    code = await w.stop(signal.SIGTERM, timeout=60)
    assert code == 0, w.log_path.read_text()[-2000:]
    gone, alive = psutil.wait_procs(everything, timeout=5)
    assert not alive, alive


async def test_the_supervisor_starts_the_embedded_postgresql_once_for_all_workers() -> None:
    base = Path(tempfile.mkdtemp(prefix="proxyorch-workers-"))
    os.chmod(base, 0o755)  # the embedded server runs as its own system user when the tests run as root
    w = Workers("", base / "sup", 2)  # no DATABASE_URL: the embedded default
    pgdata = (base / "sup" / "postgres").resolve()
    try:
        await w.start()
        urls = {p.environ()["DATABASE_URL"] for p in w.children()}
        assert len(urls) == 1 and urls.pop().startswith("postgres")
        postmasters = [p for p in psutil.process_iter(["cmdline"])
                       if p.info["cmdline"] and "postgres" in p.info["cmdline"][0] and "-D" in p.info["cmdline"]
                       and str(pgdata) in " ".join(p.info["cmdline"])]
        assert len(postmasters) == 1, postmasters
        assert not (base / "sup" / "workers" / "1" / "postgres").exists()
        code = await w.stop(signal.SIGTERM, timeout=60)
        assert code == 0, w.log_path.read_text()[-2000:]
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        await w.stop(signal.SIGKILL)
        stop_postgres(pgdata)
        shutil.rmtree(base, ignore_errors=True)
