"""Planned tasks: list the unassigned ones, submit new ones (optionally pinned and run at once), delete."""

from __future__ import annotations

import uuid

import orjson
from aiohttp import web

from .assignment import assign_with_retries
from .auth import require_user
from .bodies import json_response, read_json
from .common import can_edit, can_view, like_pattern, parse_bool, parse_int, parse_uuid, pool_of
from .context import SETTINGS
from .errors import ApiError, with_message
from .job_views import render_jobs
from .paging import list_route
from .schema_validation import validate
from .task_views import planned_json

MAX_INPUT_CHARS = 10_000
MAX_INPUTS = 1000


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


@list_route(100, 10)
async def list_planned(request: web.Request) -> web.Response:
    """Unassigned planned tasks of a job (owner or shared users), searchable and paginated."""
    user = await require_user(request)
    q = request.query
    job_id = parse_uuid(q.get("job_id"))
    if job_id is None:
        raise _bad("Invalid job id")
    search = q.get("search") or None
    if search is not None and len(search) > MAX_INPUT_CHARS:
        raise _bad(f"search must be at most {MAX_INPUT_CHARS} characters")
    page = parse_int(q.get("page"), "page", 1, 1, 1_000_000, _bad)
    limit = parse_int(q.get("limit"), "limit", 10, 1, 100, _bad)
    order = (q.get("sortOrder") or "desc").lower()
    if order not in ("asc", "desc"):
        raise _bad("sortOrder must be 'asc' or 'desc'")
    pool = pool_of(request)
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None or not can_view(job, user):
        raise ApiError(404, "Job not found")
    pattern = like_pattern(search) if search else None
    where = "job_id = $1 AND job_task_id IS NULL AND ($2::text IS NULL OR input ILIKE $2)"
    total = await pool.fetchval(f"SELECT count(*) FROM planned_tasks WHERE {where}", job_id, pattern)
    rows = await pool.fetch(f"SELECT * FROM planned_tasks WHERE {where} ORDER BY added {order.upper()},"
                            f" id {order.upper()} LIMIT $3 OFFSET $4", job_id, pattern, limit, (page - 1) * limit)
    return json_response({"success": True, "data": {
        "job": (await render_jobs(pool, [job], user))[0], "plannedTasks": [planned_json(r) for r in rows],
        "total": total}})


async def _pinned_device(request: web.Request, body: dict, job_owner: uuid.UUID) -> str | None:
    pool = pool_of(request)
    if body.get("remote_device_id") not in (None, ""):
        device_id = parse_uuid(body["remote_device_id"])
        if device_id is None:
            raise _bad("Invalid remote_device_id")
        row = await pool.fetchrow("SELECT user_id, rented_by FROM devices WHERE remote_device_id = $1", device_id)
    elif body.get("device_name") not in (None, ""):
        if not isinstance(body["device_name"], str) or len(body["device_name"]) > 100:
            raise _bad("Invalid device_name")
        rows = await pool.fetch("SELECT remote_device_id, user_id, rented_by FROM devices"
                                " WHERE lower(name) = lower($1)", body["device_name"].strip())
        if len(rows) > 1:
            raise _bad("device_name matches more than one device; use remote_device_id")
        row = rows[0] if rows else None
        device_id = str(row["remote_device_id"]) if row else None
    else:
        return None
    if row is None or job_owner not in (row["user_id"], row["rented_by"]):
        raise ApiError(404, "Device not found")
    return device_id


async def submit_planned(request: web.Request) -> web.Response:
    """Add planned tasks to a job, optionally pinned to one device and assigned immediately."""
    user = await require_user(request)
    body = await read_json(request)
    job_id = parse_uuid(body.get("job_id"))
    if job_id is None:
        raise _bad("Invalid job id")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS:
        raise _bad(f"inputs must be an array of 1 to {MAX_INPUTS} strings")
    for i, item in enumerate(inputs):
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_INPUT_CHARS:
            raise _bad(f"inputs[{i}] must be a string of 1 to {MAX_INPUT_CHARS} characters")
    run_now = parse_bool(body.get("run_immediately"), "run_immediately", _bad, False)
    pool = pool_of(request)
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None or not can_edit(job, user):
        raise ApiError(404, "Job not found")
    if job["automation_id"] is not None:
        schema = await pool.fetchval("SELECT job_variables_schema FROM automations WHERE id = $1",
                                     job["automation_id"])
        for i, item in enumerate(inputs):
            try:
                value = orjson.loads(item)
            except orjson.JSONDecodeError:
                raise _bad(f"inputs[{i}] must be a JSON object for automation jobs") from None
            problems = validate(schema, value)
            if problems:
                raise ApiError(400, f"inputs[{i}]: {'; '.join(problems)}",
                               {"success": False, "error": f"inputs[{i}]: {'; '.join(problems)}",
                                "errors": problems})
    device_id = await _pinned_device(request, body, job["user_id"])
    ids = [str(uuid.uuid4()) for _ in inputs]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job_id)
        used = await conn.fetchval(
            """SELECT count(*) FROM planned_tasks p LEFT JOIN job_tasks t ON t.id = p.job_task_id
               WHERE p.job_id = $1 AND (t.status IS NULL OR t.status NOT IN ('failed', 'declined', 'notcomplete'))""",
            job_id)
        excess = used + len(inputs) - job["positions"]
        if excess > 0:
            raise with_message(400, f"No enough positions left. Received {excess} tasks in excess.")
        # creation order is input order (one microsecond apart within the transaction's now())
        await conn.executemany(
            "INSERT INTO planned_tasks(id, job_id, input, remote_device_id, added)"
            " VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
            [(pid, job_id, item, device_id, i / 1e6) for i, (pid, item) in enumerate(zip(ids, inputs, strict=True))])
    out: dict = {"success": True, "inserted_ids": [{"planned_task_id": pid, "input": item}
                                                   for pid, item in zip(ids, inputs, strict=True)]}
    if run_now:
        out["assignment_results"] = await assign_with_retries(pool, ids, request.app[SETTINGS].assign_retry_delay_s)
    return json_response(out)


async def delete_planned(request: web.Request) -> web.Response:
    """Delete planned tasks that are not assigned to a running, pending or confirmed job task."""
    user = await require_user(request)
    body = await read_json(request)
    raw = body.get("planned_task_ids")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_INPUTS:
        raise with_message(400, "planned_task_ids must be a non-empty array")
    ids = [parse_uuid(i) for i in raw]
    if any(i is None for i in ids):
        raise with_message(400, "Invalid planned task id")
    pool = pool_of(request)
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """SELECT p.id, p.job_task_id, t.status, j.user_id, j.shared_edit, j.shared_view
               FROM planned_tasks p JOIN jobs j ON j.id = p.job_id LEFT JOIN job_tasks t ON t.id = p.job_task_id
               WHERE p.id = ANY($1::uuid[]) FOR UPDATE OF p""", list(set(ids)))
        if len(rows) != len(set(ids)) or not all(can_edit(r, user) for r in rows):
            raise with_message(404, "Planned task not found")
        if any(r["status"] in ("pending", "confirmed", "running", "processing") for r in rows):
            raise with_message(400, "Cannot delete a planned task that is assigned to a pending / successful job task")
        await conn.execute("DELETE FROM planned_tasks WHERE id = ANY($1::uuid[])", list(set(ids)))
    return json_response({"success": True})
