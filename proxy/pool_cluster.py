"""Pool routing on a cluster node: pool members held by other nodes, sticky bindings shared in Redis.

:class:`proxy.pool_routing.PoolRouter` decides synchronously from what this node knows. Before a pool
(or sticky) session is routed on a cluster node, :meth:`ClusterPools.prepare` learns the rest:

* where the members this node does not hold are (the presence map; a member online on another node
  is usable, its session is relayed), remembered for ``SEEN_S``;
* with Redis, the device a sticky token (``-session-TOKEN``) is bound to cluster-wide, so the token
  picks the same device whichever node its client lands on. A binding is the key
  ``proxyorch:sticky:<connection>:<token>`` = device id; it is set when a node binds the token
  (expiring ``max(ttl, HOLD_S)`` later, refreshed by every session that uses it) and set to expire
  ``ttl`` after the last session on a node ended.

Redis trouble never fails a session: the node then routes with what it knows.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

Locate = Callable[[str], Awaitable[tuple[str, str] | None]]
SEEN_S = 1.0       # a member found on another node stays usable this long without asking again
HOLD_S = 600       # a binding with sessions somewhere lives at least this long (refreshed on use)
MAX_PENDING_WRITES = 10_000
PREPARE_TIMEOUT = 2.0
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def sticky_key(connection_id: str, token: str) -> str:
    return f"proxyorch:sticky:{connection_id}:{token}"


class ClusterPools:
    """One per cluster node (with a relaying exit); ``redis_url`` empty = no shared sticky bindings."""

    def __init__(self, locate: Locate, is_local: Callable[[str], bool], redis_url: str = "") -> None:
        self.locate = locate
        self.is_local = is_local
        self._seen: dict[str, float] = {}  # device -> monotonic time until which it is known online elsewhere
        self.redis: Any = None
        self._release_script: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(redis_url)
            self._release_script = self.redis.register_script(_RELEASE)
        self.tasks: set[asyncio.Task[Any]] = set()
        self._writes: collections.deque[Callable[[], Awaitable[Any]]] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self.errors = 0

    def online_elsewhere(self, device_id: str) -> bool:
        """The device was found on another node within the last ``SEEN_S``."""
        until = self._seen.get(device_id)
        return until is not None and until > time.monotonic()

    def needs_prepare(self, members: Sequence[str], token: str | None) -> bool:
        """False when this node already knows enough: every member is here and no binding to fetch."""
        if token is not None and self.redis is not None:
            return True
        return not all(self.is_local(d) or self.online_elsewhere(d) for d in members)

    async def prepare(self, connection_id: str, members: Sequence[str], token: str | None) -> str | None:
        """Locate the members not held here; the device ``token`` is bound to cluster-wide (or None)."""
        try:
            return await asyncio.wait_for(self._prepare(connection_id, members, token), PREPARE_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # presence or Redis trouble: route with what this node knows
            self.errors += 1
            log.warning("cluster pool routing: %s", exc)
            return None

    async def _prepare(self, connection_id: str, members: Sequence[str], token: str | None) -> str | None:
        away = [d for d in members if not self.is_local(d) and not self.online_elsewhere(d)]
        calls = [self.locate(d) for d in away]
        shared = token is not None and self.redis is not None
        if shared:
            calls.append(self.redis.get(sticky_key(connection_id, token)))
        results = await asyncio.gather(*calls)
        found, bound = (results[:-1], results[-1]) if shared else (results, None)
        until = time.monotonic() + SEEN_S
        for device_id, where in zip(away, found, strict=True):
            if where is not None:
                self._seen[device_id] = until
            else:
                self._seen.pop(device_id, None)
        if len(self._seen) > 100_000:
            self._seen.clear()
        return bound.decode() if isinstance(bound, bytes) else bound

    def bound(self, connection_id: str, token: str, device_id: str) -> None:
        """A session of ``token`` uses ``device_id``: (re)write the shared binding."""
        if self.redis is not None:
            key = sticky_key(connection_id, token)
            self._write(lambda: self.redis.set(key, device_id, ex=HOLD_S))

    def idle(self, connection_id: str, token: str, device_id: str, ttl: float) -> None:
        """The token's last session on this node ended: the binding expires ``ttl`` from now."""
        if self._release_script is not None:
            key, ms = sticky_key(connection_id, token), max(1, int(ttl * 1000))
            self._write(lambda: self._release_script(keys=[key], args=[device_id, ms]))

    def _write(self, command: Callable[[], Awaitable[Any]]) -> None:
        """Queue a Redis write; one writer sends them in order (a binding's SET before its expiry)."""
        if len(self._writes) >= MAX_PENDING_WRITES:
            self.errors += 1
            return
        self._writes.append(command)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
            self.own(self._writer)

    async def _drain(self) -> None:
        while self._writes:
            command = self._writes.popleft()
            try:
                await command()
            except Exception as exc:
                self.errors += 1
                log.warning("sticky binding not shared: %s", exc)

    def own(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` referenced until it ends; cancelled by :meth:`close`."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()
