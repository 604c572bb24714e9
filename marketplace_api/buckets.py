"""Per-(job, device) buckets (employer surface) and per-device buckets (shallow merge)."""

from __future__ import annotations

import uuid

from aiohttp import web

from .agent_auth import agent_from_request
from .auth import require_user
from .bodies import json_response, read_json
from .common import can_edit, can_view, iso, pages, parse_int, parse_uuid, pool_of
from .errors import ApiError, plain
from .paging import list_route
from .schema_validation import validate


def _bucket_json(r, with_name: bool = False) -> dict:  # noqa: ANN001
    out = {"_id": str(r["id"]), "job_id": str(r["job_id"]), "remote_device_id": str(r["remote_device_id"]),
           "data": r["data"], "updated_at": iso(r["updated_at"])}
    if with_name:
        out["device_name"] = r["device_name"]
    return out


async def _job(request: web.Request, edit: bool):  # noqa: ANN202
    user = await require_user(request)
    job_id = parse_uuid(request.match_info["job_id"])
    if job_id is None:
        raise plain(404, "Job not found")
    job = await pool_of(request).fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None or not (can_edit(job, user) if edit else can_view(job, user)):
        raise plain(404, "Job not found")
    return job


def _device(request: web.Request, missing: str) -> str:
    device_id = parse_uuid(request.match_info["device_id"])
    if device_id is None:
        raise plain(404, missing)
    return device_id


@list_route(100, 20)
async def list_buckets(request: web.Request) -> web.Response:
    """Every bucket of a job, newest first, with device names."""
    job = await _job(request, edit=False)
    bad = lambda m: plain(400, m)  # noqa: E731
    page = parse_int(request.query.get("page"), "page", 1, 1, 1_000_000, bad)
    limit = min(parse_int(request.query.get("limit"), "limit", 20, 1, 1_000_000, bad), 100)
    pool = pool_of(request)
    total = await pool.fetchval("SELECT count(*) FROM job_buckets WHERE job_id = $1", job["id"])
    rows = await pool.fetch(
        """SELECT b.*, d.name AS device_name FROM job_buckets b JOIN devices d USING (remote_device_id)
           WHERE b.job_id = $1 ORDER BY b.updated_at DESC, b.id LIMIT $2 OFFSET $3""",
        job["id"], limit, (page - 1) * limit)
    return json_response({"buckets": [_bucket_json(r, True) for r in rows], "total": total, "page": page,
                          "pages": pages(total, limit)})


async def wipe_buckets(request: web.Request) -> web.Response:
    """Delete every bucket of a job (edit access)."""
    job = await _job(request, edit=True)
    result = await pool_of(request).execute("DELETE FROM job_buckets WHERE job_id = $1", job["id"])
    return json_response({"success": True, "deleted": int(result.split()[-1])})


async def get_bucket(request: web.Request) -> web.Response:
    """The bucket of one (job, device) pair."""
    job = await _job(request, edit=False)
    device_id = _device(request, "Bucket not found")
    row = await pool_of(request).fetchrow(
        "SELECT * FROM job_buckets WHERE job_id = $1 AND remote_device_id = $2", job["id"], device_id)
    if row is None:
        raise plain(404, "Bucket not found")
    return json_response({"bucket": _bucket_json(row)})


async def put_bucket(request: web.Request) -> web.Response:
    """Replace the bucket of one (job, device) pair, validated against the automation's bucket_schema."""
    job = await _job(request, edit=True)
    device_id = _device(request, "Device not found")
    try:
        body = await read_json(request)
    except ApiError:
        raise plain(400, "Invalid bucket data") from None
    data = body.get("data")
    if not isinstance(data, dict):
        raise plain(400, "Invalid bucket data")
    pool = pool_of(request)
    if job["automation_id"] is not None:
        schema = await pool.fetchval("SELECT bucket_schema FROM automations WHERE id = $1", job["automation_id"])
        problems = validate(schema, data)
        if problems:
            raise ApiError(400, "Invalid bucket data", {"error": "Invalid bucket data", "details": problems})
    if not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM devices WHERE remote_device_id = $1)", device_id):
        raise plain(404, "Device not found")
    row = await pool.fetchrow(
        """INSERT INTO job_buckets(id, job_id, remote_device_id, data) VALUES ($1, $2, $3, $4)
           ON CONFLICT (job_id, remote_device_id) DO UPDATE SET data = EXCLUDED.data, updated_at = now()
           RETURNING *""", str(uuid.uuid4()), job["id"], device_id, data)
    return json_response({"success": True, "bucket": _bucket_json(row)})


async def delete_bucket(request: web.Request) -> web.Response:
    """Remove the bucket of one (job, device) pair."""
    job = await _job(request, edit=True)
    device_id = _device(request, "Bucket not found")
    result = await pool_of(request).execute(
        "DELETE FROM job_buckets WHERE job_id = $1 AND remote_device_id = $2", job["id"], device_id)
    if result == "DELETE 0":
        raise plain(404, "Bucket not found")
    return json_response({"success": True})


# -- device buckets ---------------------------------------------------------------------------------
async def _device_context(request: web.Request) -> tuple[str, dict]:
    """(device, body): the device of the agent token, or a device the user token's owner owns or rents.

    Authenticates before it reads the body, so a caller without a valid token gets 401, never a 400.
    """
    agent = await agent_from_request(request)
    user = None if agent is not None else await require_user(request)
    try:
        body = await read_json(request, required=False)
    except ApiError as exc:
        raise plain(400, exc.message) from None
    if agent is not None:
        return agent.remote_device_id, body
    raw = body.get("remote_device_id")
    if raw in (None, ""):
        raise plain(400, "Device bucket requires a device context (remote_device_id)")
    device_id = parse_uuid(raw)
    if device_id is None:
        raise plain(400, "Invalid remote_device_id")
    ok = await pool_of(request).fetchval(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE remote_device_id = $1 AND (user_id = $2 OR rented_by = $2))",
        device_id, user)
    if not ok:
        raise plain(404, "Device not found")
    return device_id, body


async def read_device_bucket(request: web.Request) -> web.Response:
    """The device-scoped bucket (``{}`` before the first write)."""
    device_id, _body = await _device_context(request)
    data = await pool_of(request).fetchval("SELECT data FROM device_buckets WHERE remote_device_id = $1", device_id)
    return json_response({"deviceBucket": data or {}})


async def merge_device_bucket(request: web.Request) -> web.Response:
    """Shallow-merge an object into the device-scoped bucket; returns the merged bucket."""
    device_id, body = await _device_context(request)
    data = body.get("data")
    if not isinstance(data, dict):
        raise plain(400, "Invalid data. Must be a non-null object.")
    merged = await pool_of(request).fetchval(
        """INSERT INTO device_buckets(remote_device_id, data) VALUES ($1, $2)
           ON CONFLICT (remote_device_id) DO UPDATE SET data = device_buckets.data || EXCLUDED.data,
                                                         updated_at = now()
           RETURNING data""", device_id, data)
    return json_response({"success": True, "deviceBucket": merged})
