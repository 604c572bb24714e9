"""Live and analytic views for the dashboard: open sessions with rates, per-domain analytics.

``GET /api/v2/proxy/sessions`` reads this node's session registry (cluster-wide aggregation is not
done yet: a session on another node is not listed). ``GET /api/v2/proxy/domains`` aggregates the
request log in ClickHouse with the same validation and tenant rules as ``/proxy/logs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web

from .auth import require_admin, require_user
from .bodies import json_response
from .context import POOL, PROXY, SETTINGS
from .errors import ApiError
from .routes_logs import _scope, parse_int, parse_time, parse_uuid_param, read_log_store

SAMPLE_INTERVAL_S = 1.0


async def _visible(request: web.Request) -> tuple[set[str] | None, set[str] | None]:
    """(connection ids, device ids) whose sessions the caller sees; (None, None) for the admin."""
    if request.headers.get("X-Admin-Token"):
        require_admin(request)
        return None, None
    user = await require_user(request)
    pool = request.app[POOL]
    conns = {str(r[0]) for r in await pool.fetch(
        "SELECT connection_id FROM rms_connections WHERE owner_user_id = $1", user)}
    devices = {str(r[0]) for r in await pool.fetch(
        "SELECT remote_device_id FROM devices WHERE user_id = $1", user)}
    return conns, devices


async def proxy_sessions(request: web.Request) -> web.Response:
    """Open sessions of the caller's connections and devices on this node, with live rates."""
    conns, devices = await _visible(request)  # authenticate first, then validate
    q = request.query
    connection_id = parse_uuid_param(q.get("connectionId"), "connectionId")
    device_id = parse_uuid_param(q.get("deviceId"), "deviceId")
    rows = request.app[PROXY].sessions.snapshot(time.monotonic(), request.app[SETTINGS].node_name,
                                        connection_ids=conns, device_ids=devices)
    if connection_id is not None or device_id is not None:
        rows = [r for r in rows if (connection_id is None or r["connectionId"] == connection_id)
                and (device_id is None or r["deviceId"] == device_id)]
    return json_response({"success": True, "total": len(rows), "sessions": rows})


async def device_presence(request: web.Request) -> web.Response:
    """Where the caller's devices are connected: online, node, last seen (the dashboard's device view)."""
    user = await require_user(request)
    rows = await request.app[POOL].fetch(
        "SELECT remote_device_id, online, node, last_seen FROM devices WHERE user_id = $1 "
        "ORDER BY added, remote_device_id", user)
    return json_response({"success": True, "devices": [
        {"deviceId": str(r["remote_device_id"]), "online": bool(r["online"]), "node": r["node"],
         "lastSeen": r["last_seen"].isoformat().replace("+00:00", "Z") if r["last_seen"] else None,
         "publicIp": None}  # not reported by the agent yet
        for r in rows]})


async def proxy_domains(request: web.Request) -> web.Response:
    """Per registrable domain (public suffix list) in a time window, by bytes descending."""
    admin = bool(request.headers.get("X-Admin-Token"))
    if admin:  # authenticate first, then validate
        require_admin(request)
        user = None
    else:
        user = await require_user(request)
    q = request.query
    start = parse_time(q.get("from"), "from", True)
    end = parse_time(q.get("to"), "to", True)
    if start > end:  # type: ignore[operator]
        raise ApiError(400, "`from` must not be after `to`")
    from proxy.request_log.domain_stats import MAX_DOMAINS

    limit = parse_int(q.get("limit"), "limit", 100, 1, MAX_DOMAINS)
    connection_id = parse_uuid_param(q.get("connectionId"), "connectionId")
    device_id = parse_uuid_param(q.get("deviceId"), "deviceId")
    if user is None:
        device_ids = None if device_id is None else [device_id]
    else:
        device_ids = await _scope(request, user, device_id)
    domains = await read_log_store(request, "domains", device_ids=device_ids, start=start, end=end,
                                   connection_id=connection_id, limit=limit)
    return json_response({"success": True, "domains": domains})


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    """Owns the task that samples session byte counters once a second (for the 5 s rates)."""
    async def run() -> None:
        while True:
            proxy = app.get(PROXY)
            if proxy is not None:
                proxy.sessions.sample(time.monotonic())
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    task = asyncio.get_running_loop().create_task(run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v2/proxy/sessions", proxy_sessions)
    app.router.add_get("/api/v2/proxy/domains", proxy_domains)
    app.router.add_get("/api/v2/devices/presence", device_presence)
    app.cleanup_ctx.append(_sampler)
