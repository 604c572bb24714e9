"""IP rotation of a device: rotate now, rotate on a timer, the rotation history (issue 17).

The device's owner, or the user it is rented to live (as ``GET /api/v2/devices`` lists it), may use
them; anyone else gets 404. The work is done by the node's :class:`proxyorch.rotation.RotationManager`.
Shared resources are reached only through :func:`_pool`, :func:`_settings` and :func:`_rotations`.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from proxyorch.rotation import RotationError

from .auth import require_user
from .bodies import json_response, read_json
from .context import POOL, ROTATIONS, SETTINGS
from .errors import ApiError
from .paging import list_route

MAX_INTERVAL_S = 30 * 86400
MAX_HISTORY = 500


def _pool(request: web.Request):  # noqa: ANN202
    return request.app[POOL]


def _settings(request: web.Request):  # noqa: ANN202
    return request.app[SETTINGS]


def _rotations(request: web.Request):  # noqa: ANN202
    return request.app[ROTATIONS]


def _device_id(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["device_id"]))
    except ValueError:
        raise ApiError(400, "device_id must be a UUID") from None


async def _accessible(request: web.Request) -> str:
    """The device id when the caller owns it or rents it live; else 404 (others' devices do not exist)."""
    user = await require_user(request)
    device_id = _device_id(request)
    ok = await _pool(request).fetchval(
        """SELECT true FROM devices WHERE remote_device_id = $1
             AND (user_id = $2 OR (rented_by = $2 AND payment_type = 'live'))""", device_id, uuid.UUID(user))
    if not ok:
        raise ApiError(404, "Device not found")
    return device_id


def _iso(ts) -> str | None:  # noqa: ANN001
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts else None


async def rotate_ip(request: web.Request) -> web.Response:
    """Change the device's public IP now: {old_ip, new_ip, changed, took_ms}."""
    device_id = await _accessible(request)
    try:
        result = await _rotations(request).rotate(device_id, "api")
    except RotationError as exc:
        if exc.status == 429:
            resp = json_response({"success": False, "error": exc.message}, 429)
            resp.headers["Retry-After"] = str(exc.retry_after)
            return resp
        raise ApiError(exc.status, exc.message) from None
    return json_response({"success": True, **result})


async def set_rotation(request: web.Request) -> web.Response:
    """Rotate the device's IP on a timer: {"interval_s": N} (N >= 60) or {"interval_s": null} (off)."""
    device_id = await _accessible(request)
    body = await read_json(request)
    if "interval_s" not in body:
        raise ApiError(400, "interval_s is required (seconds, or null to stop the timer)")
    unknown = sorted(set(body) - {"interval_s"})
    if unknown:  # as the limits and access bodies: a misspelt key is not silently ignored
        raise ApiError(400, f"unknown keys: {', '.join(unknown)}")
    interval = body["interval_s"]
    minimum = _settings(request).rotation_min_timer_s
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise ApiError(400, "interval_s must be a whole number of seconds or null")
        if not minimum <= interval <= MAX_INTERVAL_S:
            raise ApiError(400, f"interval_s must be between {minimum} and {MAX_INTERVAL_S} seconds")
    await _pool(request).execute(
        "UPDATE devices SET rotation_interval_s = $2, rotation_since = CASE WHEN $2::int IS NULL THEN NULL ELSE now() END "
        "WHERE remote_device_id = $1", device_id, interval)
    return json_response({"success": True, "remote_device_id": device_id, "rotation": {"interval_s": interval}})


@list_route(500, 50)
async def list_rotations(request: web.Request) -> web.Response:
    """The device's rotations, newest first (?limit=, default 50, at most 500)."""
    device_id = await _accessible(request)
    raw = request.query.get("limit", "50")
    # at most 3 ASCII digits: str.isdigit() is also true of '²', and int() refuses 5000 digits
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or not 1 <= int(raw) <= MAX_HISTORY:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_HISTORY}")
    rows = await _pool(request).fetch(
        """SELECT id, old_ip, new_ip, changed, trigger, started_at, took_ms, error FROM device_rotations
           WHERE remote_device_id = $1 ORDER BY started_at DESC, id DESC LIMIT $2""", device_id, int(raw))
    return json_response({"success": True, "rotations": [
        {"id": r["id"], "old_ip": r["old_ip"], "new_ip": r["new_ip"], "changed": r["changed"], "trigger": r["trigger"],
         "started_at": _iso(r["started_at"]), "took_ms": r["took_ms"], "error": r["error"]} for r in rows]})


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v2/devices/{device_id}/rotate-ip", rotate_ip)
    r.add_put("/api/v2/devices/{device_id}/rotation", set_rotation)
    r.add_get("/api/v2/devices/{device_id}/rotations", list_rotations)
