"""Tasks: apply (job variables), submit (manual and automation data-dump), details, delete, reinitiate."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import orjson
from aiohttp import web

from .agent_auth import AgentIdentity, agent_from_request, was_agent_token
from .auth import bearer_token, require_user
from .bodies import json_response, read_json
from .common import can_edit, pages, parse_int, parse_uuid, pool_of
from .errors import ApiError, plain, with_message
from .paging import list_route
from .storage import EXTENSION, decode_base64, read_json_limited, save_proof_file
from .task_views import TASK_SELECT, Unresolved, resolve_task_id, task_json

SUBMIT_BODY_LIMIT = 64 * 1024 * 1024
MAX_PROOF_CHARS = 100_000
RESERVATION_S = 3600
INACTIVE_STATUSES = ("declined", "failed", "notcomplete")
DUMP_STATUSES = ("pending", "failed", "declined")


def _client_ip(request: web.Request) -> str | None:
    forwarded = request.headers.get("X-Forwarded-For")
    return forwarded.split(",")[0].strip()[:64] if forwarded else request.remote


async def _worker_gates(conn: asyncpg.Connection | asyncpg.Pool, job: asyncpg.Record, user_id: str) -> None:
    """Job-level eligibility of a manual worker: owner, allowed workers, invites, rating, premium, country."""
    if job["status"] != "active":
        raise ApiError(400, "Job is not active")
    uid = uuid.UUID(user_id)
    if job["user_id"] == uid:
        raise ApiError(400, "You cannot work on your own job")
    if job["allowed_workers"] and uid not in job["allowed_workers"]:
        raise ApiError(403, "You are not in the allowed workers of this job")
    if uid in job["worker_invites"]:
        return  # invited workers are hand-picked by the employer: rating / premium / country do not apply
    worker = await conn.fetchrow("SELECT rating, is_premium, country FROM users WHERE id = $1", user_id)
    if Decimal(worker["rating"]) < Decimal(job["min_rating"]):
        raise ApiError(403, f"Your rating is below the minimum of {job['min_rating'].normalize()} for this job")
    if job["premium"] and not worker["is_premium"]:
        raise ApiError(403, "This job is for premium workers only")
    targets = [t.upper() for t in job["target_workers"]]
    if "WORLDWIDE" not in targets and (worker["country"] or "").upper() not in targets:
        raise ApiError(403, "This job is not available in your country")


async def apply(request: web.Request) -> web.Response:
    """Apply to an active job: reserves and returns one set of job variables (if the job has any)."""
    user = await require_user(request)
    job_id = parse_uuid(request.query.get("job_id"))
    if job_id is None:
        raise ApiError(400, "job_id is required" if not request.query.get("job_id") else "Invalid job id")
    pool = pool_of(request)
    async with pool.acquire() as conn, conn.transaction():
        job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        if job is None:
            raise ApiError(404, "Job not found")
        if job["job_type"] != "job":
            raise ApiError(400, "Automation jobs are worked by devices; they take no manual applications")
        await _worker_gates(conn, job, user)
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM planned_tasks WHERE job_id = $1)", job_id):
            return json_response({})
        planned = await conn.fetchrow(
            """SELECT * FROM planned_tasks WHERE job_id = $1 AND job_task_id IS NULL AND reserved_by = $2
               AND reserved_until > now() LIMIT 1""", job_id, user)
        if planned is None:
            planned = await conn.fetchrow(
                """SELECT * FROM planned_tasks WHERE job_id = $1 AND job_task_id IS NULL
                   AND (reserved_until IS NULL OR reserved_until < now()) AND remote_device_id IS NULL
                   ORDER BY added, id LIMIT 1 FOR UPDATE SKIP LOCKED""", job_id)
            if planned is None:
                raise ApiError(400, "No job variables are left for this job")
        await conn.execute(
            "UPDATE planned_tasks SET reserved_by = $2, reserved_until = now() + make_interval(secs => $3)"
            " WHERE id = $1", planned["id"], user, float(RESERVATION_S))
    try:
        values = orjson.loads(planned["input"])
    except orjson.JSONDecodeError:
        values = None
    out = values if isinstance(values, dict) else {"input": planned["input"]}
    return json_response({**out, "_id": str(planned["id"])})


async def _proof_files(request: web.Request, job: asyncpg.Record, given: object) -> list[tuple[dict, bytes]]:
    fields = {f["name"]: f for f in job["files"]}
    if given is None:
        given = []
    if not isinstance(given, list) or len(given) > 20:
        raise ApiError(400, "proof_files_base64 must be an array of at most 20 files")
    out, seen = [], set()
    for item in given:
        if not isinstance(item, dict) or not isinstance(item.get("fieldName"), str):
            raise ApiError(400, "each proof file needs fieldName, fileName and base64")
        name = item["fieldName"]
        if name not in fields:
            raise ApiError(400, f"proof file field '{name}' is not declared by this job")
        if name in seen:
            raise ApiError(400, f"proof file field '{name}' is given twice")
        seen.add(name)
        file_name = item.get("fileName") if isinstance(item.get("fileName"), str) else name
        out.append(({"fieldName": name, "fileName": file_name[:200]}, decode_base64(item.get("base64"), name)))
    missing = [n for n, f in fields.items() if f.get("required") and n not in seen]
    if missing:
        raise ApiError(400, f"missing required proof files: {', '.join(missing)}")
    return out


async def _submit_manual(request: web.Request, body: dict, job_id: str, user: str) -> web.Response:
    proof = body.get("job_proof")
    if not isinstance(proof, str) or not proof.strip():
        raise ApiError(400, "job_proof must be a non-empty string")
    if len(proof) > MAX_PROOF_CHARS:
        raise ApiError(400, f"job_proof must be at most {MAX_PROOF_CHARS} characters")
    pool = pool_of(request)
    async with pool.acquire() as conn, conn.transaction():
        job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1 FOR UPDATE", job_id)
        await _worker_gates(conn, job, user)
        counts = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE status <> ALL($2::text[])) AS active,
                      count(*) FILTER (WHERE worker_id = $3) AS mine,
                      count(*) FILTER (WHERE added >= date_trunc('day', now())) AS today
               FROM job_tasks WHERE job_id = $1""", job_id, list(INACTIVE_STATUSES), user)
        if counts["active"] >= job["positions"]:
            raise ApiError(400, "No positions left for this job")
        if not job["few_times"] and counts["mine"] >= 1:
            raise ApiError(400, "You have already submitted a task for this job")
        if job["task_limit"] is not None and counts["mine"] >= job["task_limit"]:
            raise ApiError(400, f"Task limit of {job['task_limit']} per worker reached for this job")
        if job["daily_limit"] and counts["today"] >= job["daily_limit"]:
            raise ApiError(400, "Daily limit of this job reached, try again tomorrow")
        planned_id = None
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM planned_tasks WHERE job_id = $1)", job_id):
            custom = body.get("custom_vars")
            if not isinstance(custom, dict) or parse_uuid(custom.get("_id")) is None:
                raise ApiError(400, "custom_vars from tasks/apply are required for this job")
            planned_id = await conn.fetchval(
                """SELECT id FROM planned_tasks WHERE id = $1 AND job_id = $2 AND reserved_by = $3
                   AND job_task_id IS NULL FOR UPDATE""", parse_uuid(custom["_id"]), job_id, user)
            if planned_id is None:
                raise ApiError(400, "custom_vars do not match the job variables assigned to you (call tasks/apply)")
        files = await _proof_files(request, job, body.get("proof_files_base64"))
        info = []
        for meta, raw in files:
            stored, url = await save_proof_file(request, raw, meta["fileName"].rsplit(".", 1)[0],
                                                "." + meta["fileName"].rsplit(".", 1)[1][:10]
                                                if "." in meta["fileName"] else "")
            info.append({**meta, "filename": stored, "url": url, "size": len(raw)})
        country = await conn.fetchval("SELECT country FROM users WHERE id = $1", user)
        task_id = str(uuid.uuid4())
        await conn.execute(
            """INSERT INTO job_tasks(id, job_id, worker_id, planned_task_id, mode, job_proof, country_code, worker_ip,
                                     status, proof_files_info)
               VALUES ($1, $2, $3, $4, 'manual', $5, $6, $7, 'pending', $8)""",
            task_id, job_id, user, planned_id, proof, country, _client_ip(request), info)
        if planned_id is not None:
            await conn.execute("UPDATE planned_tasks SET job_task_id = $2, updated = now() WHERE id = $1",
                               planned_id, task_id)
    return json_response({"success": True, "message": "Task submitted successfully", "job_task_id": task_id,
                          "job_id": job_id}, 201)


def _dump_agent(agent: AgentIdentity | None) -> AgentIdentity:
    if agent is None:
        raise ApiError(403, "Caller is not a running agent: the token must carry remote_device_id and job_task_id")
    if agent.task_status != "running":
        raise ApiError(403, "The agent has no currently-running task")
    return agent


async def _submit_dump(request: web.Request, body: dict, job: asyncpg.Record,
                       caller: AgentIdentity | None) -> web.Response:
    agent = _dump_agent(caller)
    pool = pool_of(request)
    parent = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", agent.job_id)
    if parent is None:
        raise ApiError(404, "Running task's job not found")
    if parent["automation_id"] != job["automation_id"]:
        raise ApiError(403, "The running job and the target job do not share the same automation_id")
    owner = parent["user_id"]
    if owner != job["user_id"] and owner not in job["shared_view"] and owner not in job["shared_edit"]:
        raise ApiError(403, "The running job's owner has no access to the target job")
    device = await pool.fetchrow("SELECT user_id FROM devices WHERE remote_device_id = $1", agent.remote_device_id)
    if device is None:
        raise ApiError(404, "Device not found")
    if job["status"] != "active":
        raise ApiError(400, "Job is not active")
    raw_proof = body.get("job_proof")
    if not isinstance(raw_proof, str):
        raise ApiError(400, "job_proof must be a string")
    if len(raw_proof) > MAX_PROOF_CHARS:
        raise ApiError(400, f"job_proof must be at most {MAX_PROOF_CHARS} characters")
    try:
        proof = orjson.loads(raw_proof)
    except orjson.JSONDecodeError:
        raise ApiError(400, "job_proof must be valid JSON in automation data-dump mode") from None
    status = body.get("status") or "pending"
    if status not in DUMP_STATUSES:
        raise ApiError(400, "status must be one of pending, failed, declined")
    files = body.get("files") or []
    if not isinstance(files, list) or len(files) > 20:
        raise ApiError(400, "files must be an array of at most 20 files")
    if files and not isinstance(proof, dict):
        raise ApiError(400, "job_proof must be a JSON object when files are attached")
    decoded = []
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"].strip():
            raise ApiError(400, f"files[{i}].name must be a non-empty string")
        ext = f.get("extension")
        if not isinstance(ext, str) or not EXTENSION.match(ext):
            raise ApiError(400, f"files[{i}].extension must be a short alphanumeric extension")
        decoded.append((f["name"][:100], "." + ext.lstrip("."), decode_base64(f.get("base64Data"), f["name"])))
    for name, ext, raw in decoded:
        _, url = await save_proof_file(request, raw, name, ext)
        proof[name] = url
    task_id = str(uuid.uuid4())
    await pool.execute(
        """INSERT INTO job_tasks(id, job_id, worker_id, remote_device_id, parent_task_id, mode, job_proof, worker_ip,
                                 status, device_owner_share, finished)
           VALUES ($1, $2, $3, $4, $5, 'dump', $6, $7, $8, $9, $10)""",
        task_id, job["id"], device["user_id"], agent.remote_device_id, agent.job_task_id,
        orjson.dumps(proof).decode(), _client_ip(request), status, job["job_price"], status != "pending")
    return json_response({"success": True, "message": "Task submitted successfully", "job_task_id": task_id,
                          "job_id": str(job["id"])}, 201)


async def submit(request: web.Request) -> web.Response:
    """Submit a task: manual mode, or automation data-dump mode for sink jobs (agent token).

    Authenticates before it reads the body: an agent token or a user token, else 401.
    """
    agent = await agent_from_request(request)
    if agent is None and await was_agent_token(pool_of(request), bearer_token(request)):
        raise ApiError(403, "The agent has no currently-running task (its token was revoked or has expired)")
    user = None if agent is not None else await require_user(request)
    body = await read_json_limited(request, SUBMIT_BODY_LIMIT)
    job_id = parse_uuid(body.get("job_id"))
    if job_id is None:
        raise ApiError(400, "job_id is required" if not body.get("job_id") else "Invalid job id")
    pool = pool_of(request)
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None:
        raise ApiError(404, "Job not found")
    dump = (job["job_type"] == "devices_automation" and job["automation_id"] is not None
            and not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM planned_tasks WHERE job_id = $1)", job_id))
    if dump:
        return await _submit_dump(request, body, job, agent)
    if job["job_type"] == "devices_automation":
        raise ApiError(400, "Tasks of this automation job are created by assignment, not submitted")
    if user is None:
        raise ApiError(401, "Missing or invalid API token")
    return await _submit_manual(request, body, job_id, user)


@list_route(100, 10, "body")
async def details(request: web.Request) -> web.Response:
    """Recent tasks of the caller, or one task (``task_id``) of the caller or of the caller's job."""
    user = await require_user(request)
    body = await read_json(request, required=False)
    pool = pool_of(request)
    raw = request.query.get("task_id") or body.get("task_id")
    if raw:
        task_id = parse_uuid(raw)
        if task_id is None:
            raise plain(400, "Invalid task id")
        row = await pool.fetchrow(
            f"""{TASK_SELECT} WHERE t.id = $1 AND (t.worker_id = $2 OR j.user_id = $2 OR $2 = ANY(j.shared_view)
                 OR $2 = ANY(j.shared_edit))""", task_id, user)
        if row is None:
            raise plain(404, "Task not found")
        return json_response(task_json(row))
    bad = lambda m: plain(400, m)  # noqa: E731
    page = parse_int(body.get("page"), "page", 1, 1, 1_000_000, bad)
    limit = parse_int(body.get("limit"), "limit", 10, 1, 100, bad)
    rows = await pool.fetch(f"{TASK_SELECT} WHERE t.worker_id = $1 ORDER BY t.added DESC, t.id LIMIT $2 OFFSET $3",
                            user, limit, (page - 1) * limit)
    counts = {r["status"]: r["n"] for r in await pool.fetch(
        "SELECT status, count(*) AS n FROM job_tasks WHERE worker_id = $1 GROUP BY status", user)}
    total = sum(counts.values())
    return json_response({"tasks": [task_json(r) for r in rows], "total": total, "page": page, "limit": limit,
                          "pages": pages(total, limit), "counts": counts})


async def delete_task(request: web.Request) -> web.Response:
    """Delete a failed or declined job task (a planned task it came from is kept, unassigned)."""
    user = await require_user(request)
    body = await read_json(request)
    ident = parse_uuid(body.get("task_id"))
    if ident is None:
        raise ApiError(400, "Invalid task id")
    pool = pool_of(request)
    async with pool.acquire() as conn, conn.transaction():
        try:
            task_id = await resolve_task_id(conn, ident)
        except Unresolved as exc:
            if exc.kind == "unassigned":
                raise ApiError(400, f"Planned task {ident} exists but has no associated job task"
                                    " (job_task_id is null)") from None
            raise ApiError(404, f"task_id {ident} is neither a valid job task ID nor a planned task ID") from None
        task = await conn.fetchrow("SELECT * FROM job_tasks WHERE id = $1 FOR UPDATE", task_id)
        if task is None:
            raise with_message(404, "Job task not found")
        job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", task["job_id"])
        if not can_edit(job, user):
            raise with_message(403, "You don't have permission to delete this job task")
        if task["status"] not in ("failed", "declined"):
            raise with_message(400, f"Cannot delete job task with status '{task['status']}'. Only tasks with"
                                    " status: failed, declined can be deleted.")
        await conn.execute("DELETE FROM job_tasks WHERE id = $1", task_id)
    return json_response({"success": True, "message": "Job task deleted successfully"})


async def reinitiate(request: web.Request) -> web.Response:
    """Re-initiate failed or declined tasks: their planned tasks become available again."""
    user = await require_user(request)
    body = await read_json(request)
    raw = body.get("task_ids") if body.get("task_ids") is not None else (
        [body["task_id"]] if body.get("task_id") is not None else None)
    if not isinstance(raw, list) or not raw or len(raw) > 1000:
        raise ApiError(400, "Invalid task id: give task_id or a non-empty task_ids array")
    ids = [parse_uuid(i) for i in raw]
    if any(i is None for i in ids):
        raise ApiError(400, "Invalid task id")
    pool = pool_of(request)
    async with pool.acquire() as conn, conn.transaction():
        for task_id in ids:
            task = await conn.fetchrow("SELECT * FROM job_tasks WHERE id = $1 FOR UPDATE", task_id)
            if task is None:
                raise with_message(404, "Job task not found")
            job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", task["job_id"])
            if not can_edit(job, user):
                raise with_message(403, "You don't have permission to reinitiate this task")
            if task["status"] not in ("failed", "declined"):
                raise with_message(400, f"Cannot reinitiate task with status '{task['status']}'. Only failed or"
                                        " declined tasks can be reinitiated.")
            freed = await conn.execute(
                "UPDATE planned_tasks SET job_task_id = NULL, reserved_by = NULL, reserved_until = NULL,"
                " updated = now() WHERE id = $1 AND job_task_id = $2", task["planned_task_id"], task_id)
            if freed == "UPDATE 0":
                raise with_message(404, "No planned task is associated with this job task")
    return json_response({"success": True, "message": "Task successfully reinitiated"})
