"""``GET /v1/tasks/{id}/traces/stream``: the "Watch It Work" live view as Server-Sent Events.

Past traces first, then each new one as the agent posts it. Every node LISTENs on the PostgreSQL
channel ``tm_traces`` (the progress route NOTIFYs it with the task id in the insert's transaction),
so a watcher on any node hears a trace posted on any other. A watcher re-reads its task's traces
after ``seq`` on each notification, on reconnection of the listener, and every ``POLL_S`` as a safety
net, so a lost notification delays a trace but never drops it. The event id is the trace's id;
``Last-Event-ID`` resumes after it. Credentials only in the ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import asyncpg
import orjson
from aiohttp import web

from . import idempotency
from . import taskmarket_views as views
from .context import POOL
from .taskmarket_common import bad, parse_id
from .taskmarket_work import TRACE_CHANNEL, trace_reader

log = logging.getLogger(__name__)
POLL_S = 5.0
KEEPALIVE_S = 15.0
BATCH = 500
URL_CREDENTIALS = ("token", "access_token", "apiKey", "api_key", "key", "authorization")


class TraceHub:
    """One LISTEN connection per app; wakes the watchers of a task when a trace of it is posted."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.watchers: dict[str, set[asyncio.Event]] = {}
        self.closing = False
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self.watchers.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            group = self.watchers.get(task_id)
            if group is not None:
                group.discard(event)
                if not group:
                    del self.watchers[task_id]

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for event in self.watchers.get(payload, ()):
            event.set()

    def wake_all(self) -> None:
        for group in self.watchers.values():
            for event in group:
                event.set()

    def close(self) -> None:
        self.closing = True
        self.wake_all()

    async def run(self) -> None:
        """Hold a LISTEN connection; reconnect with back-off when it is lost."""
        delay = 0.2
        while True:
            try:
                async with self.pool.acquire() as conn:
                    lost = asyncio.Event()

                    def on_lost(_conn: object, ev: asyncio.Event = lost) -> None:
                        ev.set()

                    conn.add_termination_listener(on_lost)
                    await conn.add_listener(TRACE_CHANNEL, self._notified)
                    try:
                        self.listening.set()
                        self.wake_all()  # anything posted while we were not listening
                        delay = 0.2
                        while not lost.is_set():
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(lost.wait(), 30)
                            if not lost.is_set():
                                await conn.fetchval("SELECT 1")  # notice a dead connection
                    finally:
                        self.listening.clear()
                        conn.remove_termination_listener(on_lost)
                        if not conn.is_closed():
                            with contextlib.suppress(Exception):
                                await conn.remove_listener(TRACE_CHANNEL, self._notified)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("trace listener lost (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


HUB = web.AppKey("tm_trace_hub", TraceHub)


def _sse(row: asyncpg.Record) -> bytes:
    return b"id: " + str(row["id"]).encode() + b"\nevent: trace\ndata: " + orjson.dumps(views.trace(row)) + b"\n\n"


async def stream_traces(request: web.Request) -> web.StreamResponse:
    """Live progress traces (Server-Sent Events; poster or assigned agent, Bearer header only)."""
    if any(name in request.query for name in URL_CREDENTIALS):
        raise bad("credentials are accepted only in the Authorization header, never in the URL")
    hub = request.app[HUB]
    pool = request.app[POOL]
    async with idempotency.transaction(request) as conn:
        task = await trace_reader(conn, request, "id")
        task_id = str(task["id"])
        after = 0
        resume = request.headers.get("Last-Event-ID", "").strip()
        if resume:
            seq = await conn.fetchval("SELECT seq FROM tm_traces WHERE id = $1 AND task_id = $2",
                                      parse_id(resume, "Trace"), task_id)
            if seq is None:
                raise bad("Last-Event-ID is not a trace of this task")
            after = seq
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    with hub.watch(task_id) as wake:
        try:
            await response.write(b"retry: 1000\n\n")
            while not hub.closing:
                wake.clear()
                rows = await pool.fetch("SELECT * FROM tm_traces WHERE task_id = $1 AND seq > $2 ORDER BY seq"
                                        " LIMIT $3", task_id, after, BATCH)
                if rows:
                    await response.write(b"".join(_sse(r) for r in rows))
                    after = rows[-1]["seq"]
                    if len(rows) == BATCH:
                        continue
                for _ in range(int(KEEPALIVE_S / POLL_S)):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), POLL_S)
                    if wake.is_set() or hub.closing:
                        break
                else:
                    await response.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass  # the watcher left
    return response


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = TraceHub(app[POOL])
    app[HUB] = hub
    task = asyncio.create_task(hub.run(), name="tm-trace-listener")
    yield
    hub.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _on_shutdown(app: web.Application) -> None:
    if HUB in app:
        app[HUB].close()  # open streams end, so the server does not wait for them


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_hub_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/v1/tasks/{id}/traces/stream", stream_traces)
