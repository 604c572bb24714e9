"""A cluster of real ``proxyorch serve`` processes: one PostgreSQL database, one redis-server, one
CLUSTER_SECRET, one tunnel certificate (TUNNEL_TLS_CERT/KEY: the device tunnels and the relay links are
TLS, agents and nodes pin one fingerprint), a relay port each, distinct node names."""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from pathlib import Path

from conftest import Deployment, NodeProcess, PortTaken, create_database, free_port

SECRET = "cluster-secret-" + uuid.uuid4().hex
RMS_KEY = base64.b64encode(os.urandom(32)).decode()
PRESENCE_TTL_S = 4.0


class ClusterNode(NodeProcess):
    """A node with a relay port, which is chosen again (like the others) when it was taken meanwhile."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.relay_port = free_port()

    def env(self) -> dict[str, str]:
        return {**super().env(), "RELAY_PORT": str(self.relay_port)}

    @property
    def fingerprint(self) -> str:
        from device_tunnel.tls import fingerprint_pem

        return fingerprint_pem(Path(self.env()["TUNNEL_TLS_CERT"]).read_text())

    async def _start_once(self) -> NodeProcess:
        try:
            return await super()._start_once()
        except PortTaken:
            self.relay_port = free_port()
            raise


class Cluster:
    """Nodes ``1..n`` (index 0 unused); ``dep(i)`` is a Deployment whose API calls go to node i."""

    def __init__(self, database_url: str, redis_url: str, base: Path, tag: str) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.base = base
        self.tag = tag
        self.nodes: dict[int, NodeProcess] = {}
        self.deps: dict[int, Deployment] = {}
        self.admin_token = uuid.uuid4().hex

    def certificate(self, name: str = "shared") -> dict[str, str]:
        """TUNNEL_TLS_CERT/KEY of a certificate made once under ``base/tls-<name>``."""
        from proxyorch.config import load_settings
        from proxyorch.tunnel_cert import load_or_create

        cert = load_or_create(load_settings({"DATA_DIR": str(self.base / f"tls-{name}"), "NODE_NAME": name}))
        return {"TUNNEL_TLS_CERT": cert.cert_file, "TUNNEL_TLS_KEY": cert.key_file}

    def name(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    def make_node(self, i: int, secret: str = SECRET, **env: str) -> NodeProcess:
        node = ClusterNode(self.database_url, self.base / f"n{i}", {
            "NODE_NAME": self.name(i), "REDIS_URL": self.redis_url, "CLUSTER_SECRET": secret,
            "PRESENCE_TTL_S": str(PRESENCE_TTL_S), "RMS_KEY": RMS_KEY,
            "ADMIN_TOKEN": self.admin_token, **self.certificate(), **env})
        node.admin_token = self.admin_token
        return node

    async def start(self, count: int) -> Cluster:
        nodes = [self.make_node(i) for i in range(1, count + 1)]
        await asyncio.gather(*(n.start() for n in nodes))
        for i, node in enumerate(nodes, 1):
            await self.attach(i, node)
        return self

    async def attach(self, i: int, node: NodeProcess) -> Deployment:
        dep = Deployment(node)
        await dep.open()
        self.nodes[i], self.deps[i] = node, dep
        return dep

    def dep(self, i: int) -> Deployment:
        return self.deps[i]

    def servers(self, *indexes: int) -> str:
        return ",".join(f"127.0.0.1:{self.nodes[i].tunnel_port}" for i in indexes)

    async def device_node(self, device_id: str) -> str | None:
        row = await self.deps[1].pool.fetchrow("SELECT online, node FROM devices WHERE remote_device_id = $1",
                                               device_id)
        return row["node"] if row and row["online"] else None

    async def wait_device_on(self, device_id: str, i: int, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if await self.device_node(device_id) == self.name(i):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"device {device_id} never came online on {self.name(i)}")

    async def close(self) -> None:
        for dep in self.deps.values():
            await dep.close()
        await asyncio.gather(*(n.stop() for n in self.nodes.values()))


async def start_cluster(pg_root: tuple[str, Path], redis_url: str, base: Path, count: int = 3) -> Cluster:
    url = await create_database(pg_root[0])
    return await Cluster(url, redis_url, base, "c" + uuid.uuid4().hex[:6]).start(count)
