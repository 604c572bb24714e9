"""Jobs: create, public list, my jobs, details, status update, proof uniqueness."""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web

from . import idempotency, ledger
from .api_idempotency import USER_MESSAGE
from .api_idempotency import user as idempotent_user
from .auth import require_user
from .bodies import json_response, read_json
from .common import (
    can_edit,
    can_view,
    like_pattern,
    pages,
    parse_bool,
    parse_int,
    parse_money,
    parse_uuid,
    pool_of,
)
from .errors import ApiError, plain
from .job_views import render_jobs
from .paging import list_route
from .schema_validation import validate

SORT_COLUMNS = {"added": "j.added", "job_price": "j.job_price", "price": "j.job_price", "title": "j.title",
                "positions": "j.positions", "duration": "j.duration", "status": "j.status",
                "featured": "j.featured", "updated": "j.updated"}
JOB_TYPES = ("job", "devices_automation")
COUNTRY = re.compile(r"^(worldwide|[A-Za-z]{2})$")


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _str_field(body: dict, name: str, errors: list[str], required: bool, max_len: int) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            errors.append(f"{name} is required")
        return None
    if not isinstance(value, str):
        errors.append(f"{name} must be a string")
        return None
    if len(value) > max_len:
        errors.append(f"{name} must be at most {max_len} characters")
        return None
    return value.strip()


def _bool_field(body: dict, name: str, errors: list[str]) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        errors.append(f"{name} must be a boolean")
        return False
    return value


def _int_field(body: dict, name: str, errors: list[str], required: bool, lo: int, hi: int,
               default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            errors.append(f"{name} is required")
        return default
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text.startswith("-") else text
        # ASCII digits, one sign at most, bounded: '²'.isdigit() is true yet int() refuses it (and '--5', 5000 digits)
        if digits.isascii() and digits.isdigit() and len(digits) <= 18:
            value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        errors.append(f"{name} must be an integer between {lo} and {hi}")
        return default
    return value


def _uuid_list(body: dict, name: str, errors: list[str]) -> list[str]:
    value = body.get(name) or []
    if not isinstance(value, list) or len(value) > 1000:
        errors.append(f"{name} must be an array of user ids")
        return []
    out = [parse_uuid(v) for v in value]
    if any(v is None for v in out):
        errors.append(f"{name} must contain valid user ids")
        return []
    return [v for v in out if v]


def _file_fields(value: Any, errors: list[str]) -> list[dict]:
    """Predeclared proof-file fields: ``[{"name": "screenshot", "required": true}]``."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 20:
        errors.append("files must be an array of at most 20 file fields")
        return []
    out, seen = [], set()
    for item in value:
        if isinstance(item, str):
            item = {"name": item, "required": True}
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.strip() or len(name) > 100 or name in seen:
            errors.append("each file field needs a unique non-empty name")
            return []
        required = item.get("required", True)
        if not isinstance(required, bool):
            errors.append(f"files.{name}.required must be a boolean")
            return []
        seen.add(name)
        out.append({"name": name.strip(), "required": required})
    return out


@USER_MESSAGE
async def submit_job(request: web.Request) -> web.Response:
    """Create a job posting (its budget, job_price × positions, is escrowed from the balance).

    Honours ``Idempotency-Key``."""
    user = await idempotent_user(request)
    try:
        body = await read_json(request)
    except ApiError as exc:
        raise ApiError(400, exc.message, {"success": False, "message": "Validation failed",
                                          "errors": [exc.message]}) from None
    errors: list[str] = []
    title = _str_field(body, "title", errors, True, 200)
    description = _str_field(body, "description", errors, True, 10000)
    proof = _str_field(body, "proof", errors, True, 5000)
    vcode = _str_field(body, "vcode", errors, False, 100)
    category = body.get("category")
    if isinstance(category, str) and category.strip():
        categories = [category.strip()]
    elif isinstance(category, list) and category and all(isinstance(c, str) and c.strip() for c in category):
        categories = [c.strip() for c in category][:20]
    else:
        categories = []
        errors.append("category is required" if not category else "category must be a string or array of strings")
    targets = body.get("Target_Workers") or ["worldwide"]
    if not isinstance(targets, list) or not all(isinstance(t, str) and COUNTRY.match(t) for t in targets):
        errors.append("Target_Workers must be an array of country codes or 'worldwide'")
        targets = ["worldwide"]
    targets = [t.lower() if t.lower() == "worldwide" else t.upper() for t in targets]
    flags = {k: _bool_field(body, k, errors) for k in ("is_proof_file", "auto_rate", "few_times", "premium",
                                                         "featured", "allow_sub_tasks")}
    duration = _int_field(body, "duration", errors, True, 1, 3650)
    positions = _int_field(body, "positions", errors, True, 1, 1_000_000)
    daily_limit = _int_field(body, "daily_limit", errors, False, 0, 1_000_000, 0)
    task_limit = _int_field(body, "task_limit", errors, False, 1, 1_000_000)
    timeout = _int_field(body, "timeout", errors, False, 10, 7 * 86400, 3600)
    price = parse_money(body.get("job_price"))
    if body.get("job_price") is None:
        errors.append("job_price is required")
    elif price is None or price <= 0:
        errors.append("job_price must be a positive number with at most 6 decimals")
    min_rating = parse_money(body.get("min_rating", 0))
    if min_rating is None or not 0 <= min_rating <= 5:
        errors.append("min_rating must be a number between 0 and 5")
    job_type = body.get("job_type", "job")
    if job_type not in JOB_TYPES:
        errors.append("job_type must be 'job' or 'devices_automation'")
    payment_type = body.get("payment_type", "action")
    if payment_type not in ("action", "live"):
        errors.append("payment_type must be 'action' or 'live'")
    files = _file_fields(body.get("files"), errors)
    lists = {k: _uuid_list(body, k, errors) for k in ("allowed_workers", "Worker_Invites", "shared_view",
                                                        "shared_edit")}
    automation_id, automation = body.get("automation_id"), None
    if automation_id is not None:
        automation_id = parse_uuid(automation_id)
        if automation_id is None:
            errors.append("automation_id must be a valid id")
        else:
            async with idempotency.transaction(request) as conn:  # the key's connection, if any
                automation = await conn.fetchrow("SELECT * FROM automations WHERE id = $1", automation_id)
            if automation is None:
                errors.append("automation_id does not reference an existing automation")
    if job_type == "devices_automation" and automation_id is None and "automation_id is required" not in errors:
        errors.append("automation_id is required for devices_automation jobs")
    params = body.get("automation_parameters")
    if params is not None and not isinstance(params, dict):
        errors.append("automation_parameters must be an object")
    elif automation is not None:
        errors += [f"automation_parameters.{e}" for e in
                   validate(automation["automation_parameters_schema"], params or {})]
    if errors:
        raise ApiError(400, errors[0], {"success": False, "message": "Validation failed", "errors": errors})
    job_id = str(uuid.uuid4())
    budget = price * positions
    async with idempotency.transaction(request) as conn:
        await conn.execute(
            """INSERT INTO jobs(id, user_id, job_type, payment_type, title, category, description, proof,
                 is_proof_file, auto_rate, vcode, target_workers, few_times, premium, featured, duration, positions,
                 daily_limit, task_limit, min_rating, job_price, files, allowed_workers, worker_invites, shared_view,
                 shared_edit, automation_id, automation_parameters, allow_sub_tasks, timeout)
               VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23,$24,$25,
                       $26,$27,$28,$29,$30)""",
            job_id, user, job_type, payment_type, title, categories, description, proof, flags["is_proof_file"],
            flags["auto_rate"], vcode, targets, flags["few_times"], flags["premium"], flags["featured"], duration,
            positions, daily_limit, task_limit, min_rating, price, files, lists["allowed_workers"],
            lists["Worker_Invites"], lists["shared_view"], lists["shared_edit"], automation_id, params,
            flags["allow_sub_tasks"], timeout)
        try:
            await ledger.debit(conn, user, budget, "job_escrow", job_id=job_id)
        except ledger.InsufficientFunds as exc:
            msg = f"Insufficient balance to fund this job: needs {budget.normalize()}, available {exc.available.normalize()}"
            raise ApiError(400, msg, {"success": False, "message": "Validation failed", "errors": [msg]}) from None
    return json_response({"success": True, "message": "Job created successfully", "job_id": job_id}, 201)


def _sort(value: Any, orientation: Any, default_dir: str) -> str:
    column = SORT_COLUMNS.get(value or "added")
    if column is None:
        raise _bad(f"SortBY must be one of {', '.join(SORT_COLUMNS)}")
    direction = (orientation or default_dir).lower() if isinstance(orientation or default_dir, str) else None
    if direction not in ("asc", "desc"):
        raise _bad("orientation must be 'asc' or 'desc'")
    return f"{column} {direction.upper()}, j.id {direction.upper()}"


async def _page(request: web.Request, where: list[str], args: list, order: str, page: int, limit: int,
                viewer: str) -> web.Response:
    pool = pool_of(request)
    sql_where = " AND ".join(where) or "true"
    total = await pool.fetchval(f"SELECT count(*) FROM jobs j WHERE {sql_where}", *args)
    rows = await pool.fetch(f"SELECT j.* FROM jobs j WHERE {sql_where} ORDER BY {order} LIMIT ${len(args) + 1}"
                            f" OFFSET ${len(args) + 2}", *args, limit, (page - 1) * limit)
    return json_response({"jobs": await render_jobs(pool, rows, viewer), "total": total, "page": page,
                          "limit": limit, "pages": pages(total, limit)})


@list_route(100, 10)
async def list_jobs(request: web.Request) -> web.Response:
    """Public, filtered list of active jobs."""
    user = await require_user(request)
    q = request.query
    page = parse_int(q.get("page"), "page", 1, 1, 1_000_000, _bad)
    limit = parse_int(q.get("limit"), "limit", 10, 1, 100, _bad)
    where = ["j.status = 'active'", "j.added + make_interval(days => j.duration) > now()"]
    args: list = []

    def add(cond: str, value: Any) -> None:
        args.append(value)
        where.append(cond.replace("?", f"${len(args)}"))

    if q.get("searchTerm"):
        add("(j.title ILIKE ? OR j.description ILIKE ?)", like_pattern(q["searchTerm"][:200]))
    if q.get("job_category"):
        add("EXISTS (SELECT 1 FROM unnest(j.category) c WHERE lower(c) = lower(?))", q["job_category"][:200])
    if q.get("min_price"):
        price = parse_money(q["min_price"])
        if price is None:
            raise _bad("min_price must be a number")
        add("j.job_price >= ?", price)
    if q.get("location"):
        add("(? = ANY(j.target_workers) OR 'worldwide' = ANY(j.target_workers))", q["location"].upper()[:10])
    for param, column in (("Featured", "featured"), ("Premium", "premium")):
        flag = parse_bool(q.get(param), param, _bad)
        if flag is not None:
            add(f"j.{column} = ?", flag)
    order = _sort(q.get("SortBY"), q.get("orientation"), "desc")
    if q.get("SortBY") in (None, "", "added"):
        order = "j.featured DESC, " + order
    return await _page(request, where, args, order, page, limit, user)


@list_route(100, 10, "body")
async def my_jobs(request: web.Request) -> web.Response:
    """Jobs the caller posted, paginated, filtered and sorted."""
    user = await require_user(request)
    body = await read_json(request, required=False)
    page = parse_int(body.get("page"), "page", 1, 1, 1_000_000, _bad)
    limit = parse_int(body.get("limit"), "limit", 10, 1, 100, _bad)
    where, args = ["j.user_id = $1"], [user]
    if body.get("job_id") not in (None, ""):
        job_id = parse_uuid(body["job_id"])
        if job_id is None:
            raise _bad("Invalid job_id")
        args.append(job_id)
        where.append(f"j.id = ${len(args)}")
    if body.get("status") not in (None, ""):
        if body["status"] not in ("active", "inactive", "completed"):
            raise _bad("status must be one of active, inactive, completed")
        args.append(body["status"])
        where.append(f"j.status = ${len(args)}")
    if body.get("Query") not in (None, ""):
        if not isinstance(body["Query"], str):
            raise _bad("Query must be a string")
        args.append(like_pattern(body["Query"][:200]))
        where.append(f"(j.title ILIKE ${len(args)} OR j.description ILIKE ${len(args)})")
    order = _sort(body.get("SortBY"), body.get("orientation"), "asc")
    return await _page(request, where, args, order, page, limit, user)


async def job_details(request: web.Request) -> web.Response:
    """Job details, with the automation's schemas when the job is linked to one."""
    user = await require_user(request)
    raw = request.query.get("job_id")
    if not raw:
        raise plain(400, "job_id is required")
    job_id = parse_uuid(raw)
    if job_id is None:
        raise plain(400, "Invalid job_id")
    pool = pool_of(request)
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None or (job["status"] != "active" and not can_view(job, user)):
        raise plain(404, "Job not found")
    out = (await render_jobs(pool, [job], user))[0]
    schemas = None
    if job["automation_id"] is not None:
        schemas = await pool.fetchrow("SELECT automation_parameters_schema, job_variables_schema, bucket_schema"
                                      " FROM automations WHERE id = $1", job["automation_id"])
    for key in ("automation_parameters_schema", "job_variables_schema", "bucket_schema"):
        out[key] = schemas[key] if schemas is not None else None
    return json_response(out)


async def update_status(request: web.Request) -> web.Response:
    """Set a job's status to active or inactive (owner or shared-edit)."""
    user = await require_user(request)
    try:
        body = await read_json(request)
    except ApiError as exc:
        raise plain(400, exc.message) from None
    job_id = parse_uuid(body.get("job_id"))
    if job_id is None:
        raise plain(404 if body.get("job_id") else 400, "Invalid job_id" if body.get("job_id") else "job_id is required")
    status = body.get("status")
    if status not in ("active", "inactive"):
        raise plain(400, "status must be 'active' or 'inactive'")
    pool = pool_of(request)
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    if job is None:
        raise plain(404, "Job not found")
    if not can_edit(job, user):
        raise plain(401 if job["status"] == "active" else 404,
                    "Unauthorized action" if job["status"] == "active" else "Job not found")
    await pool.execute("UPDATE jobs SET status = $2, updated = now() WHERE id = $1", job_id, status)
    return web.Response(status=204)


async def check_uniqueness(request: web.Request) -> web.Response:
    """Whether a term appears in the proofs of the caller's jobs' tasks or of the caller's own tasks."""
    user = await require_user(request)
    try:
        body = await read_json(request)
    except ApiError as exc:
        raise plain(400, exc.message) from None
    search = body.get("search")
    if not isinstance(search, str) or not search.strip():
        raise plain(400, "search is required")
    if len(search) > 1000:
        raise plain(400, "search must be at most 1000 characters")
    option = body.get("option", "word") or "word"
    if option == "word":
        cond = "t.job_proof ~* $2"
        arg = r"(^|[^[:alnum:]_])" + re.sub(r"([^A-Za-z0-9_ ])", r"\\\1", search.strip()) + r"($|[^[:alnum:]_])"
    elif option == "charactor":
        cond, arg = "t.job_proof ILIKE $2", like_pattern(search)
    else:
        raise plain(400, "Invalid option: use 'word' or 'charactor'")
    found = await pool_of(request).fetchval(
        f"""SELECT EXISTS (SELECT 1 FROM job_tasks t JOIN jobs j ON j.id = t.job_id
                           WHERE (j.user_id = $1 OR t.worker_id = $1) AND {cond})""", user, arg)
    return json_response({"success": True, "unique": not found, "exists": found})
