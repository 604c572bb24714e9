"""Cluster presence: which node holds each device's tunnel, and which nodes are alive.

Two backends behind one interface:

* :class:`RedisPresence` (``REDIS_URL``): ``proxyorch:presence:<device>`` = ``node|epoch`` and
  ``proxyorch:node:<name>`` = ``{"name", "relay", "api", "last_seen"}``, both with a TTL of
  ``PRESENCE_TTL_S`` refreshed by a heartbeat every third of it. The epoch is a cluster-wide counter
  taken when a device's first tunnel comes up on a node, so the newest connection wins: a node only
  refreshes or deletes a device key that still carries its own value.
* :class:`PostgresPresence` (no Redis): ``devices.node`` (kept by the tunnel server's presence hook)
  plus the ``cluster_nodes`` heartbeat table.

Each node also publishes its API address (``API_ADVERTISE``) with its heartbeat:
:meth:`Presence.api_addresses` is what a node fans out to (the cluster-wide sessions list).

Every change is announced on the invalidation bus as ``presence:<device>`` so each node drops its
cached answer at once; cached answers also expire after ``CACHE_S``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

CACHE_S = 1.0
Publish = Callable[[str], Awaitable[None]]


class NodeNameTaken(RuntimeError):
    """Another live node already uses this NODE_NAME."""


class Presence:
    """Interface and the per-node cache shared by both backends."""

    def __init__(self, node_name: str, relay_address: str, ttl: float, publish: Publish | None,
                 api_address: str = "") -> None:
        self.node_name = node_name
        self.relay_address = relay_address
        self.api_address = api_address
        self.ttl = ttl
        self.publish = publish
        self.local: dict[str, int] = {}   # devices whose tunnel this node holds -> epoch
        self._cache: dict[str, tuple[float, tuple[str, str] | None]] = {}
        self._task: asyncio.Task[None] | None = None

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Register this node (NodeNameTaken while another live node has the name); start the heartbeat."""
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def close(self) -> None:
        """Stop the heartbeat and remove this node and its devices (a clean stop frees the name at once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            for device_id in list(self.local):
                await self.device_down(device_id)
            await self._unregister()
        except Exception as exc:
            log.warning("could not remove presence of node %s: %s", self.node_name, exc)

    async def refresh_now(self) -> None:
        """One heartbeat now (after slow start-up work); failures are logged, not raised."""
        try:
            await self._refresh()
        except Exception as exc:
            log.warning("presence heartbeat failed: %s", exc)

    async def _heartbeat(self) -> None:
        interval = max(0.2, self.ttl / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence heartbeat failed: %s", exc)

    # -- devices ---------------------------------------------------------------------------------
    async def device_up(self, device_id: str) -> None:
        self.local[device_id] = await self._claim(device_id)
        await self._announce(device_id)

    async def device_down(self, device_id: str) -> None:
        epoch = self.local.pop(device_id, None)
        if epoch is not None:
            await self._release(device_id, epoch)
            await self._announce(device_id)

    async def _announce(self, device_id: str) -> None:
        self._cache.pop(device_id, None)
        if self.publish is not None:
            try:
                await self.publish(f"presence:{device_id}")
            except Exception as exc:
                log.warning("could not announce presence of %s: %s", device_id, exc)

    def handle_event(self, event: str) -> None:
        """Bus event: ``presence:<device>`` drops that cached answer; ``flush`` drops all."""
        kind, _, ident = event.partition(":")
        if kind == "presence":
            self._cache.pop(ident, None)
        elif kind == "flush":
            self._cache.clear()

    def forget(self, device_id: str) -> None:
        """The answer proved wrong (relay failed): ask the store next time."""
        self._cache.pop(device_id, None)

    async def locate(self, device_id: str) -> tuple[str, str] | None:
        """(node, relay address) of the live node holding ``device_id``'s tunnel, or None."""
        now = time.monotonic()
        hit = self._cache.get(device_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await self._lookup(device_id)
        self._cache[device_id] = (now + (CACHE_S if found else 0.2), found)
        if len(self._cache) > 100_000:
            self._cache.clear()
        return found

    # -- backend ---------------------------------------------------------------------------------
    async def _register(self) -> None:
        raise NotImplementedError

    async def _unregister(self) -> None:
        raise NotImplementedError

    async def _refresh(self) -> None:
        raise NotImplementedError

    async def _claim(self, device_id: str) -> int:
        raise NotImplementedError

    async def _release(self, device_id: str, epoch: int) -> None:
        raise NotImplementedError

    async def _lookup(self, device_id: str) -> tuple[str, str] | None:
        raise NotImplementedError

    async def nodes(self) -> list[dict[str, Any]]:
        """The live nodes: ``[{"name", "relay", "last_seen"}]``."""
        raise NotImplementedError

    async def api_addresses(self) -> dict[str, str]:
        """Live node name -> its advertised API URL (``""`` for a node that advertises none)."""
        raise NotImplementedError


_REFRESH_DEVICES = """
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if (not v) or v == ARGV[i + 1] then redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1]) end
end
return 0
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class RedisPresence(Presence):
    """Presence in Redis with TTLs and a heartbeat."""

    PREFIX = "proxyorch:"

    def __init__(self, redis_url: str, node_name: str, relay_address: str, ttl: float,
                 publish: Publish | None, api_address: str = "") -> None:
        import redis.asyncio as aioredis

        super().__init__(node_name, relay_address, ttl, publish, api_address)
        self.redis = aioredis.from_url(redis_url)
        self._ttl_ms = max(200, int(ttl * 1000))

    def _node_key(self, name: str) -> str:
        return f"{self.PREFIX}node:{name}"

    def _device_key(self, device_id: str) -> str:
        return f"{self.PREFIX}presence:{device_id}"

    def _node_value(self) -> str:
        return json.dumps({"name": self.node_name, "relay": self.relay_address, "api": self.api_address,
                           "last_seen": time.time()})

    async def _register(self) -> None:
        ok = await self.redis.set(self._node_key(self.node_name), self._node_value(), px=self._ttl_ms, nx=True)
        if not ok:
            raise NodeNameTaken(f"node name {self.node_name!r} has a live presence in Redis "
                                f"(another node runs with it, or it died less than {self.ttl:g}s ago)")

    async def _unregister(self) -> None:
        await self.redis.delete(self._node_key(self.node_name))
        await self.redis.aclose()

    async def _refresh(self) -> None:
        await self.redis.set(self._node_key(self.node_name), self._node_value(), px=self._ttl_ms)
        items = list(self.local.items())
        for i in range(0, len(items), 1000):  # batches: one script never blocks Redis for long
            batch = items[i:i + 1000]
            keys = [self._device_key(d) for d, _ in batch]
            values = [f"{self.node_name}|{e}" for _, e in batch]
            await self.redis.eval(_REFRESH_DEVICES, len(keys), *keys, self._ttl_ms, *values)

    async def _claim(self, device_id: str) -> int:
        epoch = int(await self.redis.incr(f"{self.PREFIX}epoch"))
        await self.redis.set(self._device_key(device_id), f"{self.node_name}|{epoch}", px=self._ttl_ms)
        return epoch

    async def _release(self, device_id: str, epoch: int) -> None:
        await self.redis.eval(_RELEASE, 1, self._device_key(device_id), f"{self.node_name}|{epoch}")

    async def _lookup(self, device_id: str) -> tuple[str, str] | None:
        raw = await self.redis.get(self._device_key(device_id))
        if raw is None:
            return None
        node = (raw.decode() if isinstance(raw, bytes) else str(raw)).rpartition("|")[0]
        if not node or node == self.node_name:
            return None
        info = await self.redis.get(self._node_key(node))
        if info is None:
            return None  # the node is dead (its key expired): the device is online nowhere yet
        relay = json.loads(info).get("relay")
        return (node, relay) if relay else None

    async def _node_infos(self) -> list[dict[str, Any]]:
        keys = [k async for k in self.redis.scan_iter(match=self._node_key("*"), count=500)]
        values = await self.redis.mget(keys) if keys else []
        return [json.loads(raw) for raw in values if raw is not None]

    async def api_addresses(self) -> dict[str, str]:
        return {info["name"]: info.get("api") or "" for info in await self._node_infos() if info.get("name")}

    async def nodes(self) -> list[dict[str, Any]]:
        out = []
        for info in await self._node_infos():
            out.append({"name": info.get("name"), "relay": info.get("relay"),
                        "last_seen": _iso(float(info.get("last_seen") or 0))})
        return sorted(out, key=lambda n: n["name"] or "")


class PostgresPresence(Presence):
    """Presence in PostgreSQL: ``devices.node`` and the ``cluster_nodes`` heartbeat table."""

    def __init__(self, pool: Any, node_name: str, relay_address: str, ttl: float, publish: Publish | None,
                 api_address: str = "") -> None:
        super().__init__(node_name, relay_address, ttl, publish, api_address)
        self.pool = pool

    async def _register(self) -> None:
        row = await self.pool.fetchrow(
            """INSERT INTO cluster_nodes(name, relay, api, last_seen) VALUES ($1, $2, $4, now())
               ON CONFLICT (name) DO UPDATE SET relay = EXCLUDED.relay, api = EXCLUDED.api, last_seen = now()
               WHERE cluster_nodes.last_seen < now() - make_interval(secs => $3)
               RETURNING name""", self.node_name, self.relay_address, self.ttl, self.api_address)
        if row is None:
            raise NodeNameTaken(f"node name {self.node_name!r} has a live presence in PostgreSQL "
                                f"(another node runs with it, or it died less than {self.ttl:g}s ago)")

    async def _unregister(self) -> None:
        await self.pool.execute("DELETE FROM cluster_nodes WHERE name = $1", self.node_name)

    async def _refresh(self) -> None:
        await self.pool.execute("UPDATE cluster_nodes SET last_seen = now(), relay = $2, api = $3 WHERE name = $1",
                                self.node_name, self.relay_address, self.api_address)

    async def _claim(self, device_id: str) -> int:
        return 0  # devices.node is written by the tunnel server's presence hook (newest wins there)

    async def _release(self, device_id: str, epoch: int) -> None:
        return None

    async def _lookup(self, device_id: str) -> tuple[str, str] | None:
        row = await self.pool.fetchrow(
            """SELECT d.node, n.relay FROM devices d JOIN cluster_nodes n ON n.name = d.node
               WHERE d.remote_device_id = $1::uuid AND d.online
                 AND n.last_seen > now() - make_interval(secs => $2)""", device_id, self.ttl)
        if row is None or row["node"] == self.node_name or not row["relay"]:
            return None
        return row["node"], row["relay"]

    async def nodes(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT name, relay, last_seen FROM cluster_nodes WHERE last_seen > now() - make_interval(secs => $1) "
            "ORDER BY name", self.ttl)
        return [{"name": r["name"], "relay": r["relay"], "last_seen": _iso(r["last_seen"].timestamp())} for r in rows]

    async def api_addresses(self) -> dict[str, str]:
        rows = await self.pool.fetch(
            "SELECT name, api FROM cluster_nodes WHERE last_seen > now() - make_interval(secs => $1)", self.ttl)
        return {r["name"]: r["api"] or "" for r in rows}


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
