"""The invalidation bus: how credential/blacklist changes and session kills reach every node.

Two implementations behind one interface: PostgreSQL ``LISTEN/NOTIFY`` (default; the store's
triggers notify inside the writing transaction) and Redis pub/sub (when ``REDIS_URL`` is set, the
way several nodes share changes). Events are short strings defined in :mod:`proxyorch.bus_events`; after a reconnect the bus
delivers ``flush`` because events may have been missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from .bus_events import CHANNEL, FLUSH, encode

log = logging.getLogger(__name__)
EventCallback = Callable[[str], None]


class InvalidationBus:
    """Interface: ``start(callback)``, ``publish(event)``, ``close()``."""

    async def start(self, callback: EventCallback) -> None:
        raise NotImplementedError

    async def publish(self, event: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class PostgresBus(InvalidationBus):
    """LISTEN on a dedicated connection; reconnects (and flushes) when it drops."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = None
        self._callback: EventCallback | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()

    async def start(self, callback: EventCallback) -> None:
        self._callback = callback
        await self._connect()
        self._task = asyncio.create_task(self._watch())

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.url)
        await conn.add_listener(CHANNEL, self._on_notify)
        self._conn = conn
        self.connected.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if self._callback is not None:
            self._callback(payload)

    async def _watch(self) -> None:
        while not self._closing:
            await asyncio.sleep(0.5)
            conn = self._conn
            if conn is not None and not conn.is_closed():
                continue
            self.connected.clear()
            try:
                await self._connect()
                log.info("invalidation bus reconnected")
                if self._callback is not None:
                    self._callback(encode(FLUSH))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("invalidation bus down: %s", exc)

    async def publish(self, event: str) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, event)
            finally:
                await conn.close()
            return
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, event)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()


class RedisBus(InvalidationBus):
    """Redis pub/sub on channel ``proxyorch:invalidate``."""

    def __init__(self, url: str, channel: str = "proxyorch:invalidate") -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(url)
        self.channel = channel
        self._task: asyncio.Task[None] | None = None
        self._callback: EventCallback | None = None
        self.connected = asyncio.Event()

    async def start(self, callback: EventCallback) -> None:
        self._callback = callback
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._listen(ready))
        await asyncio.wait_for(ready, 10)

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        first = True
        while True:
            try:
                pubsub = self.redis.pubsub()
                await pubsub.subscribe(self.channel)
                self.connected.set()
                if not ready.done():
                    ready.set_result(None)
                if not first and self._callback is not None:
                    self._callback(encode(FLUSH))
                first = False
                async for message in pubsub.listen():
                    if message.get("type") == "message" and self._callback is not None:
                        data = message["data"]
                        self._callback(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost: retry
                self.connected.clear()
                log.warning("redis bus down: %s", exc)
                if not ready.done():
                    ready.set_exception(exc)
                    return
                await asyncio.sleep(0.5)

    async def publish(self, event: str) -> None:
        await self.redis.publish(self.channel, event)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.redis.aclose()


def make_bus(database_url: str, redis_url: str) -> InvalidationBus:
    """Redis when configured, else PostgreSQL LISTEN/NOTIFY."""
    return RedisBus(redis_url) if redis_url else PostgresBus(database_url)
