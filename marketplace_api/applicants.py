"""Job applicants: list a job's tasks (employer view) and review them (confirm pays the worker)."""

from __future__ import annotations

from decimal import Decimal

from aiohttp import web

from . import idempotency, ledger
from .agent_auth import revoke_for_task
from .api_idempotency import USER_PLAIN
from .api_idempotency import user as idempotent_user
from .auth import require_user
from .bodies import json_response, read_json
from .common import can_edit, can_view, like_pattern, pages, parse_int, parse_uuid, pool_of
from .errors import ApiError, plain
from .job_views import render_jobs
from .paging import list_route
from .task_views import TASK_SELECT, Unresolved, planned_json, resolve_task_id, task_json

SORTS = {"added": "t.added", "updated": "t.updated", "status": "t.status", "worker_name": "u.name",
         "worker_ip": "t.worker_ip", "country_code": "t.country_code", "job_proof": "t.job_proof"}
TASK_STATUSES = ("processing", "confirmed", "notcomplete", "declined", "pending", "running", "failed")
REVIEW_STATUSES = ("processing", "confirmed", "notcomplete", "declined", "pending", "failed")


def _bad(message: str) -> ApiError:
    return plain(400, message)


async def _body(request: web.Request) -> dict:
    try:
        return await read_json(request)
    except ApiError as exc:
        raise plain(400, exc.message) from None


@list_route(100, 10, "body")
async def list_applicants(request: web.Request) -> web.Response:
    """A job's applicants (its job tasks) with counts; owner or shared users only."""
    user = await require_user(request)
    body = await _body(request)
    job_id = parse_uuid(body.get("job_id"))
    if job_id is None:
        raise _bad("job_id is required" if not body.get("job_id") else "Invalid job_id format")
    pool = pool_of(request)
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None or not can_view(job, user):
        raise plain(404, "Job with this Id not found")
    page = parse_int(body.get("page"), "page", 1, 1, 1_000_000, _bad)
    limit = parse_int(body.get("limit"), "limit", 10, 1, 100, _bad)
    sort = SORTS.get(body.get("sortby") or "added")
    if sort is None:
        raise _bad(f"sortby must be one of {', '.join(SORTS)}")
    order = (body.get("order") or "desc")
    if not isinstance(order, str) or order.lower() not in ("asc", "desc"):
        raise _bad("order must be 'asc' or 'desc'")
    where, args = ["t.job_id = $1"], [job_id]

    def add(cond: str, value: object) -> None:
        args.append(value)
        where.append(cond.replace("?", f"${len(args)}"))

    if body.get("task_id") not in (None, ""):
        ident = parse_uuid(body["task_id"])
        if ident is None:
            raise _bad("Invalid task_id format")
        try:
            add("t.id = ?", await resolve_task_id(pool, ident, job_id))
        except Unresolved as exc:
            if exc.kind == "unassigned":
                raise _bad(f"Planned task {ident} exists but has no associated job task (job_task_id is null)") from None
            raise plain(404, f"task_id {ident} is neither a valid job task ID nor a planned task ID") from None
    hours = parse_int(body.get("hours_ago"), "hours_ago", 0, 0, 24 * 3650, _bad)
    if hours:
        add("t.added >= now() - make_interval(hours => ?)", hours)
    if body.get("status") not in (None, ""):
        if body["status"] not in TASK_STATUSES:
            raise _bad(f"status must be one of {', '.join(TASK_STATUSES)}")
        add("t.status = ?", body["status"])
    if body.get("search") not in (None, ""):
        if not isinstance(body["search"], str):
            raise _bad("search must be a string")
        add("(u.name ILIKE ? OR t.job_proof ILIKE ? OR j.title ILIKE ? OR t.comment ILIKE ?"
            " OR t.worker_ip ILIKE ?)", like_pattern(body["search"][:500]))
    sql_where = " AND ".join(where)
    total = await pool.fetchval(
        f"SELECT count(*) FROM job_tasks t JOIN jobs j ON j.id = t.job_id JOIN users u ON u.id = t.worker_id"
        f" WHERE {sql_where}", *args)
    rows = await pool.fetch(
        f"{TASK_SELECT} WHERE {sql_where} ORDER BY {sort} {order.upper()}, t.id LIMIT ${len(args) + 1}"
        f" OFFSET ${len(args) + 2}", *args, limit, (page - 1) * limit)
    planned = {p["job_task_id"]: p for p in await pool.fetch(
        "SELECT * FROM planned_tasks WHERE job_task_id = ANY($1::uuid[])", [r["id"] for r in rows])}
    tasks = []
    for r in rows:
        item = task_json(r)
        item["worker_name"] = r["worker_name"]
        item["planned_task"] = planned_json(planned[r["id"]]) if r["id"] in planned else None
        tasks.append(item)
    counts = await pool.fetchrow(
        """SELECT count(*) AS total, count(*) FILTER (WHERE status IN ('pending', 'confirmed')) AS done,
                  count(*) FILTER (WHERE status = 'pending') AS pending,
                  count(*) FILTER (WHERE status = 'confirmed') AS confirmed,
                  count(*) FILTER (WHERE status = 'declined') AS declined,
                  count(*) FILTER (WHERE status IN ('failed', 'notcomplete')) AS failed
           FROM job_tasks WHERE job_id = $1""", job_id)
    return json_response({
        "job": (await render_jobs(pool, [job], user))[0], "tasks": tasks, "total": total, "page": page,
        "limit": limit, "pages": pages(total, limit), "total_tasks": counts["total"],
        "job_done_count": counts["done"], "pending_tasks": counts["pending"],
        "satisfied_tasks": counts["confirmed"], "declined_tasks": counts["declined"],
        "failed_tasks": counts["failed"]})


@USER_PLAIN
async def update_applicants(request: web.Request) -> web.Response:
    """Set the status of job tasks; confirming pays the worker (and the referrer's bonus) once.

    Honours ``Idempotency-Key``."""
    user = await idempotent_user(request)
    body = await _body(request)
    ids = body.get("JobTasks_Ids")
    if not isinstance(ids, list) or not ids or len(ids) > 1000:
        raise _bad("JobTasks_Ids must be a non-empty array of at most 1000 ids")
    status = body.get("status")
    if status not in REVIEW_STATUSES:
        raise _bad(f"Invalid status: must be one of {', '.join(REVIEW_STATUSES)}")
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 5000):
        raise _bad("comment must be a string of at most 5000 characters")
    job_id = parse_uuid(body.get("job_id"))
    if job_id is None:
        raise _bad("job_id is required" if not body.get("job_id") else "Invalid job_id")
    parsed = [parse_uuid(i) for i in ids]
    if any(p is None for p in parsed):
        raise _bad("JobTasks_Ids must contain valid ids")
    async with idempotency.transaction(request) as conn:
        job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        if job is None or not can_edit(job, user):
            raise plain(404, "Job with this Id not found")
        task_ids = []
        for ident in parsed:
            try:
                task_ids.append(await resolve_task_id(conn, ident, job_id))
            except Unresolved as exc:
                if exc.kind == "unassigned":
                    raise _bad(f"Planned task {ident} exists but has no associated job task"
                               " (job_task_id is null)") from None
                raise plain(404, f"ID {ident} is neither a valid job task ID nor a planned task ID") from None
        rows = await conn.fetch("SELECT * FROM job_tasks WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
                                sorted(set(task_ids)))
        if not rows:
            raise plain(404, "Job Task with this Id not found")
        for t in rows:
            if t["status"] == "confirmed" and status != "confirmed":
                raise _bad(f"Task {t['id']} is already confirmed and paid; its status cannot change")
        price = Decimal(job["job_price"])
        for t in rows:
            if t["status"] == "confirmed":
                continue
            await conn.execute(
                "UPDATE job_tasks SET status = $2, comment = COALESCE($3, comment), reviewed = true,"
                " finished = true, updated = now() WHERE id = $1", t["id"], status, comment)
            if t["status"] == "running":
                await revoke_for_task(conn, str(t["id"]))
            if status == "confirmed":
                await ledger.pay_task(conn, t, price)
        updated = await conn.fetch(f"{TASK_SELECT} WHERE t.id = ANY($1::uuid[]) ORDER BY t.added",
                                   [t["id"] for t in rows])
    return json_response({"success": True, "tasks": [task_json(t) for t in updated]})
