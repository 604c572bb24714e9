"""Live and analytic views for the dashboard: open sessions with rates, per-domain analytics.

``GET /api/v2/proxy/sessions`` reads this node's session registry and, in a cluster, every other
live node's (:mod:`.sessions_fanout`; a node that does not answer in time is named in
``missingNodes``). A session is listed by the node its client reached (a relayed one too), so it is
listed once. The tenant rules are applied here, on the node that got the call.
``GET /api/v2/proxy/domains`` aggregates the request log in ClickHouse with the same validation and
tenant rules as ``/proxy/logs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web

from .auth import require_admin, require_user
from .bodies import json_response
from .context import CLUSTER, POOL, PROXY, SETTINGS
from .errors import ApiError
from .routes_logs import _scope, parse_int, parse_time, parse_uuid_param, read_log_store
from .sessions_fanout import SessionFanout

SAMPLE_INTERVAL_S = 1.0
FANOUT: web.AppKey[SessionFanout] = web.AppKey("sessions_fanout")


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
    """Open sessions of the caller's connections and devices on every live node, with live rates."""
    conns, devices = await _visible(request)  # authenticate first, then validate
    q = request.query
    connection_id = parse_uuid_param(q.get("connectionId"), "connectionId")
    device_id = parse_uuid_param(q.get("deviceId"), "deviceId")
    # What to ask the registries for: the narrowest id set; the tenant rule is checked on every row below.
    if connection_id is not None:
        ask_conns, ask_devices = {connection_id}, None
    elif device_id is not None:
        ask_conns, ask_devices = None, {device_id}
    else:
        ask_conns, ask_devices = conns, devices
    app = request.app
    rows = app[PROXY].sessions.snapshot(time.monotonic(), app[SETTINGS].node_name,
                                        connection_ids=ask_conns, device_ids=ask_devices)
    missing: list[str] = []
    presence = getattr(app[CLUSTER], "presence", None)
    if presence is not None:
        remote, missing = await app[FANOUT].collect(presence, ask_conns, ask_devices)
        if remote:
            seen = {r["sessionId"] for r in rows}
            rows.extend(r for r in remote if r.get("sessionId") not in seen)
            rows.sort(key=lambda r: (r.get("startedAt") or "", r.get("sessionId") or ""))
    rows = [r for r in rows if _keep(r, conns, devices, connection_id, device_id)]
    return json_response({"success": True, "total": len(rows), "sessions": rows, "missingNodes": missing})


def _keep(row: dict, conns: set[str] | None, devices: set[str] | None, connection_id: str | None,
          device_id: str | None) -> bool:
    """The tenant rule (``conns`` None: the admin) and the query's filters, for one session row."""
    if conns is not None and row.get("connectionId") not in conns and row.get("deviceId") not in (devices or ()):
        return False
    return (connection_id is None or row.get("connectionId") == connection_id) and (
        device_id is None or row.get("deviceId") == device_id)


_SESSION_FIELDS = {"sessionId": "string", "connectionId": ["string", "null"], "deviceId": ["string", "null"],
                   "node": "string", "clientAddress": "string", "target": "string", "protocol": "string",
                   "startedAt": ["string", "null"], "bytesIn": "integer", "bytesOut": "integer",
                   "rateIn": "number", "rateOut": "number"}
proxy_sessions.openapi = {  # type: ignore[attr-defined]
    "operation": {
        "description": "Open sessions of the caller's connections and of connections routed through the "
                       "caller's devices, on every live node of the cluster (`X-Admin-Token`: all). A node "
                       "that does not answer within a short timeout is left out and named in `missingNodes`. "
                       "Bytes as in the request log; rates in bytes/s over the last 5 s.",
        "parameters": [{"name": "connectionId", "in": "query", "required": False, "schema": {"type": "string"}},
                       {"name": "deviceId", "in": "query", "required": False, "schema": {"type": "string"}}],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ProxySessions"}}}},
            "400": {"description": "Bad request"}, "401": {"description": "Unauthorized"}}},
    "schemas": {
        "ProxySession": {"type": "object", "required": list(_SESSION_FIELDS),
                         "properties": {k: {"type": t} for k, t in _SESSION_FIELDS.items()}},
        "ProxySessions": {"type": "object", "required": ["success", "total", "sessions", "missingNodes"],
                          "properties": {
                              "success": {"type": "boolean"}, "total": {"type": "integer"},
                              "sessions": {"type": "array", "items": {"$ref": "#/components/schemas/ProxySession"}},
                              "missingNodes": {"type": "array", "items": {"type": "string"},
                                               "description": "Live nodes that did not answer in time: their "
                                                              "sessions are not in this list"}}}}}


async def device_presence(request: web.Request) -> web.Response:
    """Where the caller's devices are connected: online, node, last seen (the dashboard's device view)."""
    user = await require_user(request)
    rows = await request.app[POOL].fetch(
        "SELECT remote_device_id, online, node, last_seen, public_ip FROM devices WHERE user_id = $1 "
        "ORDER BY added, remote_device_id", user)
    return json_response({"success": True, "devices": [
        {"deviceId": str(r["remote_device_id"]), "online": bool(r["online"]), "node": r["node"],
         "lastSeen": r["last_seen"].isoformat().replace("+00:00", "Z") if r["last_seen"] else None,
         "publicIp": r["public_ip"]}
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
    await app[FANOUT].close()


def setup(app: web.Application) -> None:
    app[FANOUT] = SessionFanout(app[SETTINGS].cluster_secret, app[SETTINGS].node_name)  # closed by _sampler
    app.router.add_get("/api/v2/proxy/sessions", proxy_sessions)
    app.router.add_get("/api/v2/proxy/domains", proxy_domains)
    app.router.add_get("/api/v2/devices/presence", device_presence)
    app.cleanup_ctx.append(_sampler)
