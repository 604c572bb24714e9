"""Agent routes of /v1 (``ak_`` key), exactly as seed 003 shows them: discovery, bids, delivery
through the Pre-Delivery Quality Gate, resubmit, progress traces (and reading them, agent or poster)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
from aiohttp import web

from . import idempotency
from . import taskmarket_views as views
from .context import SETTINGS
from .quality_gate import score_delivery
from .taskmarket_common import (
    AGENT_IDEM,
    Agent,
    bad,
    conflict,
    forbidden,
    not_found,
    ok,
    parse_id,
    price_field,
    read_body,
    require_agent,
    require_any,
    text_field,
)
from .taskmarket_tasks import refund

TRACE_CHANNEL = "tm_traces"
WORKING = ("claimed", "pdqg_rejected", "delivered")
MAX_CONTENT = 200_000
OPEN = "status = 'open' AND (deadline IS NULL OR deadline > now())"
SECRETS = web.AppKey("tm_secrets", dict)


async def cursor_secret(request: web.Request, conn: asyncpg.Connection) -> bytes:
    """The cursor HMAC key, shared by every node through PostgreSQL (read once per app)."""
    cache = request.app[SECRETS]
    if "cursor" not in cache:
        cache["cursor"] = bytes(await conn.fetchval("SELECT value FROM tm_secrets WHERE name = 'cursor'"))
    return cache["cursor"]


async def available(request: web.Request) -> web.Response:
    """Open tasks, newest first, in cursor pages (stable while tasks are added)."""
    await require_agent(request)
    q = request.query
    raw_limit = q.get("limit", "20").strip()
    # at most 3 ASCII digits: '²'.isdigit() is true yet int() refuses it, and 5000 digits
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 3) or not 1 <= int(raw_limit) <= 100:
        raise bad("limit must be an integer between 1 and 100")
    limit = int(raw_limit)
    category = q.get("category") or None
    if category is not None:
        category = category.strip().lower()
    async with idempotency.transaction(request) as conn:
        secret = await cursor_secret(request, conn)
        after = views.decode_cursor(secret, q["cursor"], category) if q.get("cursor") else 2**63 - 1
        rows = await conn.fetch(f"SELECT * FROM tm_tasks WHERE {OPEN} AND ($1::text IS NULL OR category = $1)"
                                " AND seq < $2 ORDER BY seq DESC LIMIT $3", category, after, limit + 1)
        total = await conn.fetchval(f"SELECT count(*) FROM tm_tasks WHERE {OPEN}"
                                    " AND ($1::text IS NULL OR category = $1)", category)
    more = len(rows) > limit
    rows = rows[:limit]
    return ok({"items": [views.task_item(r) for r in rows],
               "pagination": {"next_cursor": views.encode_cursor(secret, rows[-1]["seq"], category) if more else None,
                              "has_more": more, "total_estimate": total}})


async def _task_for_agent(conn: asyncpg.Connection, request: web.Request) -> asyncpg.Record:
    """The path's task, locked, with ``accepted_agent_id``; 404 when there is none."""
    task_id = parse_id(request.match_info["taskId"])
    task = await conn.fetchrow("SELECT t.*, b.agent_id AS accepted_agent_id FROM tm_tasks t"
                               " LEFT JOIN tm_bids b ON b.id = t.accepted_bid_id WHERE t.id = $1 FOR UPDATE OF t",
                               task_id)
    if task is None:
        raise not_found()
    return task


def _assigned(task: asyncpg.Record, agent: Agent) -> None:
    if task["accepted_agent_id"] is None or str(task["accepted_agent_id"]) != agent.id:
        raise forbidden("Not the assigned agent")


@AGENT_IDEM
async def place_bid(request: web.Request) -> web.Response:
    """Bid on an open task: 0 < proposedPrice <= the task's price; one bid per agent."""
    agent = await require_agent(request)
    body = await read_body(request)
    if "proposedPrice" not in body:
        raise bad("proposedPrice is required")
    price = price_field(body["proposedPrice"], "proposedPrice", allow_string=False)
    letter = text_field(body, "coverLetter", required=False, max_len=10000)
    async with idempotency.transaction(request) as conn:
        task = await _task_for_agent(conn, request)
        if str(task["poster_id"]) == agent.user_id:
            raise forbidden("An agent cannot bid on its owner's task")
        if task["status"] != "open":
            raise conflict(f"Task is {task['status']}, no longer open for bids")
        if task["deadline"] is not None and await conn.fetchval("SELECT now() >= $1::timestamptz", task["deadline"]):
            raise conflict("The task's deadline has passed")
        if price > task["price"]:
            raise bad(f"proposedPrice must not exceed the task's price {views.price_str(task['price'])}")
        row = await conn.fetchrow("INSERT INTO tm_bids(id, task_id, agent_id, proposed_price, cover_letter)"
                                  " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (task_id, agent_id) DO NOTHING RETURNING *",
                                  str(uuid.uuid4()), task["id"], agent.id, price, letter)
        if row is None:
            raise conflict("Bid already placed on this task")
    return ok(views.bid(row), 201)


async def _gate(conn: asyncpg.Connection, task: asyncpg.Record, agent: Agent, content: str, attempt: int) -> dict:
    result = score_delivery(task["title"], task["description"], content)
    row = await conn.fetchrow("INSERT INTO tm_deliveries(id, task_id, agent_id, attempt, content, score, verdict,"
                              " checks) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *", str(uuid.uuid4()),
                              task["id"], agent.id, attempt, content, result.score, result.verdict, result.checks)
    return {"delivery": views.delivery(row), "score": result.score, "verdict": result.verdict}


@AGENT_IDEM
async def deliver(request: web.Request) -> web.Response:
    """Deliver work; the quality gate scores it (rejected < 0.40, warning to 0.65, passed above)."""
    agent = await require_agent(request)
    content = text_field(await read_body(request), "content", max_len=MAX_CONTENT)
    window = float(request.app[SETTINGS].resubmit_window_s)
    async with idempotency.transaction(request) as conn:
        task = await _task_for_agent(conn, request)
        _assigned(task, agent)
        if task["status"] != "claimed":
            raise conflict(f"Task is {task['status']}, not claimed")
        data = await _gate(conn, task, agent, content, 1)
        if data["verdict"] == "rejected":
            await conn.execute("UPDATE tm_tasks SET status = 'pdqg_rejected', updated_at = now(),"
                               " resubmit_deadline = now() + $2::interval WHERE id = $1", task["id"],
                               timedelta(seconds=window))
        else:
            await conn.execute("UPDATE tm_tasks SET status = 'delivered', updated_at = now() WHERE id = $1", task["id"])
    return ok(data, 201)


@AGENT_IDEM
async def resubmit(request: web.Request) -> web.Response:
    """The one resubmit after a gate rejection, within RESUBMIT_WINDOW_S; failing again is final."""
    agent = await require_agent(request)
    content = text_field(await read_body(request), "content", max_len=MAX_CONTENT)
    async with idempotency.transaction(request) as conn:
        task = await _task_for_agent(conn, request)
        _assigned(task, agent)
        if task["status"] != "pdqg_rejected" or task["resubmitted"]:
            raise conflict(f"Task is {task['status']}; only a delivery rejected by the quality gate can be resubmitted")
        if await conn.fetchval("SELECT now() > $1::timestamptz", task["resubmit_deadline"]):
            raise conflict("The resubmit window has closed")
        data = await _gate(conn, task, agent, content, 2)
        status = "pdqg_final_fail" if data["verdict"] == "rejected" else "delivered"
        if status == "pdqg_final_fail":
            await refund(conn, task, task["escrow"], "final quality-gate failure")
        await conn.execute("UPDATE tm_tasks SET status = $2, resubmitted = true, updated_at = now(),"
                           " escrow = CASE WHEN $2 = 'pdqg_final_fail' THEN 0 ELSE escrow END WHERE id = $1",
                           task["id"], status)
    return ok(data, 201)


@AGENT_IDEM
async def progress(request: web.Request) -> web.Response:
    """Report a progress trace (assigned agent); watchers of the live stream get it at once."""
    agent = await require_agent(request)
    body = await read_body(request)
    event = text_field(body, "event", max_len=100)
    message = text_field(body, "message", required=False, max_len=5000)
    metadata = body.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise bad("metadata must be an object")
    visibility = body.get("visibility", "public")
    if visibility not in ("public", "private"):
        raise bad("visibility must be 'public' or 'private'")
    async with idempotency.transaction(request) as conn:
        task = await _task_for_agent(conn, request)
        _assigned(task, agent)
        if task["status"] not in WORKING:
            raise conflict(f"Task is {task['status']}; progress is reported while the task is worked on")
        row = await conn.fetchrow("INSERT INTO tm_traces(id, task_id, agent_id, event, message, metadata, visibility)"
                                  " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *", str(uuid.uuid4()), task["id"],
                                  agent.id, event, message, metadata, visibility)
        await conn.execute("SELECT pg_notify($1, $2)", TRACE_CHANNEL, str(task["id"]))
    return ok(views.trace(row), 201)


async def trace_reader(conn: asyncpg.Connection, request: web.Request, key: str) -> asyncpg.Record:
    """The path's task if the caller (assigned agent or poster) may read its traces."""
    caller = await require_any(request)
    task_id = parse_id(request.match_info[key])
    task = await conn.fetchrow("SELECT t.id, t.poster_id, b.agent_id AS accepted_agent_id FROM tm_tasks t"
                               " LEFT JOIN tm_bids b ON b.id = t.accepted_bid_id WHERE t.id = $1", task_id)
    if isinstance(caller, Agent):
        if task is None:
            raise not_found()
        _assigned(task, caller)
    elif task is None or str(task["poster_id"]) != caller:
        raise not_found()
    return task


async def traces(request: web.Request) -> web.Response:
    """Progress traces of a task in order (the assigned agent or the poster)."""
    async with idempotency.transaction(request) as conn:
        task = await trace_reader(conn, request, "taskId")
        rows = await conn.fetch("SELECT * FROM tm_traces WHERE task_id = $1 ORDER BY seq", task["id"])
    return ok({"items": [views.trace(r) for r in rows]})


def setup(app: web.Application) -> None:
    app[SECRETS] = {}
    app.router.add_get("/v1/tasks/available", available)
    app.router.add_post("/v1/tasks/{taskId}/bids", place_bid)
    app.router.add_post("/v1/tasks/{taskId}/deliver", deliver)
    app.router.add_post("/v1/tasks/{taskId}/resubmit", resubmit)
    app.router.add_post("/v1/tasks/{taskId}/progress", progress)
    app.router.add_get("/v1/tasks/{taskId}/traces", traces)
