"""Proxy connections (the RMS surface), blacklists, devices list/register/market."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from proxyorch import accounts
from proxyorch.tunnel_cert import agent_command
from rms.service import RmsError

from .auth import require_admin, require_user
from .bodies import json_response, read_json
from .context import LOG_STORE, POOL, RMS, SETTINGS, TUNNEL_FINGERPRINT, TUNNELS
from .errors import ApiError
from .paging import limit_offset, list_route
from .routes_limits import add_summaries


def _rms(request: web.Request):  # noqa: ANN202
    return request.app[RMS]


def _fail(exc: RmsError) -> ApiError:
    return ApiError(exc.status, exc.message)


@list_route(1000)
async def list_connections(request: web.Request) -> web.Response:
    user = await require_user(request)
    limit, offset = limit_offset(request, list_connections)
    connections = await _rms(request).list_for_user(user, limit, offset)
    await add_summaries(request, connections, "connectionId")  # limits, access, usage
    return json_response({"success": True, "connections": connections})


async def create_connection(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await read_json(request)
    try:
        conn = await _rms(request).create(user, body.get("device_id"), body.get("name"), pool=body.get("pool"))
    except RmsError as exc:
        raise _fail(exc) from None
    return json_response({"success": True, "connection": conn})


async def delete_connection(request: web.Request) -> web.Response:
    user = await require_user(request)
    try:
        await _rms(request).delete(user, request.match_info["connection_id"])
    except RmsError as exc:
        raise _fail(exc) from None
    return json_response({"success": True})


async def rotate_password(request: web.Request) -> web.Response:
    user = await require_user(request)
    try:
        password = await _rms(request).rotate_password(user, request.match_info["connection_id"])
    except RmsError as exc:
        raise _fail(exc) from None
    return json_response({"success": True, "password": password})


async def set_device(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await read_json(request)
    try:
        result = await _rms(request).set_device(user, request.match_info["connection_id"], body.get("device_id"),
                                                pool=body.get("pool"))
    except RmsError as exc:
        raise _fail(exc) from None
    return json_response({"success": True, **result})


async def dissociate(request: web.Request) -> web.Response:
    user = await require_user(request)
    try:
        await _rms(request).dissociate(user, request.match_info["connection_id"])
    except RmsError as exc:
        raise _fail(exc) from None
    return json_response({"success": True})


async def _blacklist(request: web.Request, scope: str, scope_id: str | None) -> web.Response:
    rms = _rms(request)
    limit, offset = limit_offset(request, global_blacklist)   # the same cap for the three scopes
    try:
        if request.method == "GET":
            domains = await rms.blacklist(scope, scope_id, limit, offset)
        else:
            body = await read_json(request)
            if request.method == "POST":
                domains = await rms.blacklist_add(scope, scope_id, body.get("domains"), limit)
            else:
                domains = await rms.blacklist_remove(scope, scope_id, body.get("domains"), limit)
    except RmsError as exc:
        raise _fail(exc) from None
    return json_response({"success": True, "domains": domains})


@list_route(10000)
async def connection_blacklist(request: web.Request) -> web.Response:
    user = await require_user(request)
    try:
        cid = await _rms(request).connection_blacklist_scope(user, request.match_info["connection_id"])
    except RmsError as exc:
        raise _fail(exc) from None
    return await _blacklist(request, "connection", cid)


@list_route(10000)
async def device_blacklist(request: web.Request) -> web.Response:
    user = await require_user(request)
    try:
        did = await _rms(request).device_blacklist_scope(user, request.match_info["device_id"])
    except RmsError as exc:
        raise _fail(exc) from None
    return await _blacklist(request, "device", did)


@list_route(10000)
async def global_blacklist(request: web.Request) -> web.Response:
    require_admin(request)
    return await _blacklist(request, "global", None)


@list_route(10000)
async def admin_proxies(request: web.Request) -> web.Response:
    require_admin(request)
    limit, offset = limit_offset(request, admin_proxies)
    proxies = await request.app[RMS].admin_list(limit, offset)
    counts = await _bandwidth_by_connection(request.app[LOG_STORE], [p["connection_id"] for p in proxies])
    for p in proxies:
        p["bytes_last_24h"], p["bytes_lifetime"] = counts.get(p["connection_id"], (0, 0))
    await add_summaries(request, proxies, "connection_id")  # limits, access, usage
    return json_response({"total": len(proxies), "proxies": proxies})


async def _bandwidth_by_connection(reader, connection_ids: list[str]) -> dict[str, tuple[int, int]]:  # noqa: ANN001
    if reader is None or not connection_ids:
        return {}
    from datetime import UTC, datetime

    try:
        counts = await reader.query("bytes_by_connection", connection_ids=connection_ids, now=datetime.now(UTC))
    except Exception as exc:
        raise ApiError(502, f"Could not reach the proxy orchestrator's log store: {exc}") from None
    return {k: (int(v[0]), int(v[1])) for k, v in counts.items()}


# -- devices ---------------------------------------------------------------------------------------
_DEVICE_SQL = """
SELECT d.*, COALESCE((SELECT array_agg(a.automation_id) FROM device_automations a
                      WHERE a.remote_device_id = d.remote_device_id), '{}') AS automations
FROM devices d WHERE d.user_id = $1 OR (d.rented_by = $1 AND d.payment_type = 'live')
ORDER BY d.added, d.remote_device_id LIMIT $2 OFFSET $3
"""


def device_json(r) -> dict:  # noqa: ANN001
    return {
        "remote_device_id": str(r["remote_device_id"]),
        "added": r["added"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "automations": [str(a) for a in (r["automations"] if "automations" in r.keys() else [])],
        "brand": r["brand"], "country": r["country"], "isEmulator": r["is_emulator"], "model": r["model"],
        "name": r["name"], "networkType": r["network_type"], "numberOfCores": r["number_of_cores"],
        "online": r["online"], "node": r["node"] if r["online"] else None, "processor": r["processor"], "ramMb": r["ram_mb"],
        "sdkVersion": r["sdk_version"], "version": r["version"],
        # issue 17 (mobile exits): the public IP the agent reported and the rotation timer
        "public_ip": r.get("public_ip"),
        "last_rotated_at": r["last_rotated_at"].strftime("%Y-%m-%dT%H:%M:%SZ") if r.get("last_rotated_at") else None,
        "rotation": {"interval_s": r.get("rotation_interval_s")},
    }


@list_route(1000)
async def list_devices(request: web.Request) -> web.Response:
    user = await require_user(request)
    pool = request.app[POOL]
    limit, offset = limit_offset(request, list_devices)
    try:
        rows = await pool.fetch(_DEVICE_SQL, user, limit, offset)
    except asyncpg.UndefinedTableError:  # device_automations arrives with the marketplace migration
        rows = await pool.fetch(
            "SELECT d.* FROM devices d WHERE d.user_id = $1 OR (d.rented_by = $1 AND d.payment_type = 'live') "
            "ORDER BY d.added, d.remote_device_id LIMIT $2 OFFSET $3", user, limit, offset)
    return json_response([device_json(r) for r in rows])


async def register_device(request: web.Request) -> web.Response:
    user = await require_user(request)
    body = await read_json(request, required=False)
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 100):
        raise ApiError(400, "name must be a non-empty string of at most 100 characters")
    try:
        device = await accounts.create_device(request.app[POOL], user, name.strip() if name else None)
    except asyncpg.UniqueViolationError:
        raise ApiError(409, "a device with this name already exists") from None
    fingerprint = request.app[TUNNEL_FINGERPRINT]
    command = agent_command(request.app[SETTINGS], device["remote_device_id"], device["device_token"], fingerprint,
                            request.app[TUNNELS].port)
    return json_response({"success": True, **device, "tunnel_fingerprint": fingerprint, "agent_command": command})


@list_route(1000)
async def market_devices(request: web.Request) -> web.Response:
    await require_user(request)
    country = request.query.get("country")
    direction = request.query.get("sortDirection", "asc").lower()
    if direction not in ("asc", "desc"):
        raise ApiError(400, "sortDirection must be asc or desc")
    pool = request.app[POOL]
    limit, offset = limit_offset(request, market_devices)
    has_tasks = await pool.fetchval("SELECT to_regclass('job_tasks') IS NOT NULL")
    busy = ("EXISTS (SELECT 1 FROM job_tasks t WHERE t.remote_device_id = d.remote_device_id "
            "AND t.status = 'running')") if has_tasks else "false"
    rows = await pool.fetch(
        f"""SELECT d.name, d.country, NOT {busy} AS available FROM devices d
            WHERE d.is_on_market AND d.payment_type = 'action' AND d.online
              AND ($1::text IS NULL OR d.country = $1)
            ORDER BY d.country {'DESC' if direction == 'desc' else 'ASC'} NULLS LAST, d.name
            LIMIT $2 OFFSET $3""", country, limit, offset)
    return json_response([{"name": r["name"], "country": r["country"], "isAvailable": r["available"]} for r in rows])


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v2/proxy/connections", list_connections)
    r.add_post("/api/v2/proxy/connections", create_connection)
    r.add_delete("/api/v2/proxy/connections/{connection_id}", delete_connection)
    r.add_post("/api/v2/proxy/connections/{connection_id}/password", rotate_password)
    r.add_put("/api/v2/proxy/connections/{connection_id}/device", set_device)
    r.add_delete("/api/v2/proxy/connections/{connection_id}/device", dissociate)
    for method in ("GET", "POST", "DELETE"):
        r.add_route(method, "/api/v2/proxy/connections/{connection_id}/blacklist", connection_blacklist)
        r.add_route(method, "/api/v2/devices/{device_id}/blacklist", device_blacklist)
        r.add_route(method, "/api/v2/admin/blacklist", global_blacklist)
    r.add_get("/api/v2/admin/proxies", admin_proxies)
    r.add_get("/api/v2/devices", list_devices)
    r.add_post("/api/v2/devices/register", register_device)
    r.add_get("/api/v2/devices/market", market_devices)
