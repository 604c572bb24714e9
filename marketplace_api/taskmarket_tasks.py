"""Poster routes of /v1 (user token): post a task with escrow, read it, its bids, accept/reject a
bid, review a delivery, cancel. Money moves through marketplace_api.ledger in the same transaction as
the status change, under the task's row lock; no platform fee on this surface.

Ledger rows of a task carry ``memo = "tm:<task id> <what>"`` and reuse the ledger's kinds:
``job_escrow`` (held from the poster), ``escrow_refund`` (back to the poster), ``task_earning``
(paid to the accepted agent's owner). For every task, the sum of its rows is minus what it still holds.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from aiohttp import web

from . import idempotency, ledger
from . import taskmarket_views as views
from .taskmarket_common import (
    USER_IDEM,
    bad,
    conflict,
    not_found,
    ok,
    parse_id,
    price_field,
    read_body,
    require_poster,
    text_field,
    v1_error,
)

CATEGORY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def memo(task_id: str, what: str) -> str:
    return f"tm:{task_id} {what}"


def parse_category(value: object, name: str = "category") -> str:
    if not isinstance(value, str) or not CATEGORY.match(value.strip().lower()):
        raise bad(f"{name} must be 1-40 characters of a-z, 0-9, '-' or '_'")
    return value.strip().lower()


def parse_deadline(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad("deadline must be an ISO 8601 date-time string")
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise bad("deadline must be an ISO 8601 date-time string") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    if dt <= datetime.now(UTC):
        raise bad("deadline must be in the future")
    return dt


async def full_view(conn: asyncpg.Connection, task: asyncpg.Record) -> dict:
    count = await conn.fetchval("SELECT count(*) FROM tm_bids WHERE task_id = $1", task["id"])
    delivery = await conn.fetchrow("SELECT * FROM tm_deliveries WHERE task_id = $1 ORDER BY attempt DESC LIMIT 1",
                                   task["id"])
    return views.task_full(task, count, delivery)


async def own_task(conn: asyncpg.Connection, request: web.Request, user_id: str, lock: bool = True) -> asyncpg.Record:
    """The caller's task from the path, locked; another poster's task is 404 (never revealed)."""
    task_id = parse_id(request.match_info["id"])
    task = await conn.fetchrow("SELECT * FROM tm_tasks WHERE id = $1" + (" FOR UPDATE" if lock else ""), task_id)
    if task is None or str(task["poster_id"]) != user_id:
        raise not_found()
    return task


async def refund(conn: asyncpg.Connection, task: asyncpg.Record, amount: Decimal, what: str) -> None:
    if amount > 0:
        await ledger.post(conn, str(task["poster_id"]), amount, "escrow_refund", memo=memo(str(task["id"]), what))


@USER_IDEM
async def create_task(request: web.Request) -> web.Response:
    """Post a task; its price is held in escrow from the poster's balance (user token)."""
    user_id = await require_poster(request)
    body = await read_body(request)
    title = text_field(body, "title", max_len=300)
    description = text_field(body, "description", max_len=20000)
    category = parse_category(body.get("category"))
    band = parse_category(body.get("band", "standard"), "band")
    if "price" not in body:
        raise bad("price is required")
    price = price_field(body["price"], "price", allow_string=True)
    deadline = parse_deadline(body.get("deadline"))
    task_id = str(uuid.uuid4())
    async with idempotency.transaction(request) as conn:
        try:
            await ledger.debit(conn, user_id, price, "job_escrow", memo=memo(task_id, "escrow"))
        except ledger.InsufficientFunds as exc:
            raise v1_error(400, "INSUFFICIENT_FUNDS",
                           f"balance {views.price_str(exc.available)} is less than the price {price}") from None
        task = await conn.fetchrow(
            "INSERT INTO tm_tasks(id, poster_id, title, description, category, band, price, escrow, deadline)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) RETURNING *",
            task_id, user_id, title, description, category, band, price, deadline)
        data = await full_view(conn, task)
    return ok(data, 201)


async def get_task(request: web.Request) -> web.Response:
    """One of the caller's tasks with bids count, accepted bid and the delivery's gate result."""
    user_id = await require_poster(request)
    async with idempotency.transaction(request) as conn:
        task = await own_task(conn, request, user_id, lock=False)
        return ok(await full_view(conn, task))


async def list_bids(request: web.Request) -> web.Response:
    """Bids on one of the caller's tasks, oldest first."""
    user_id = await require_poster(request)
    async with idempotency.transaction(request) as conn:
        task = await own_task(conn, request, user_id, lock=False)
        rows = await conn.fetch("SELECT * FROM tm_bids WHERE task_id = $1 ORDER BY created_at, id", task["id"])
    return ok({"items": [views.bid(r) for r in rows]})


async def _bid_of(conn: asyncpg.Connection, request: web.Request, task: asyncpg.Record) -> asyncpg.Record:
    bid_id = parse_id(request.match_info["bidId"], "Bid")
    row = await conn.fetchrow("SELECT * FROM tm_bids WHERE id = $1 AND task_id = $2 FOR UPDATE", bid_id, task["id"])
    if row is None:
        raise not_found("Bid")
    return row


@USER_IDEM
async def accept_bid(request: web.Request) -> web.Response:
    """Accept a bid: the task is claimed, other bids rejected, escrow cut to the bid's price."""
    user_id = await require_poster(request)
    async with idempotency.transaction(request) as conn:
        task = await own_task(conn, request, user_id)
        bid = await _bid_of(conn, request, task)
        if task["status"] != "open":
            raise conflict(f"Task is {task['status']}, not open")
        if bid["status"] != "pending":
            raise conflict(f"Bid is already {bid['status']}")
        await conn.execute("UPDATE tm_bids SET status = 'accepted' WHERE id = $1", bid["id"])
        await conn.execute("UPDATE tm_bids SET status = 'rejected' WHERE task_id = $1 AND id <> $2"
                           " AND status = 'pending'", task["id"], bid["id"])
        await refund(conn, task, task["escrow"] - bid["proposed_price"], "escrow above the accepted bid")
        task = await conn.fetchrow("UPDATE tm_tasks SET status = 'claimed', accepted_bid_id = $2, escrow = $3,"
                                   " updated_at = now() WHERE id = $1 RETURNING *",
                                   task["id"], bid["id"], bid["proposed_price"])
        return ok(await full_view(conn, task))


@USER_IDEM
async def reject_bid(request: web.Request) -> web.Response:
    """Reject a pending bid on an open task."""
    user_id = await require_poster(request)
    async with idempotency.transaction(request) as conn:
        task = await own_task(conn, request, user_id)
        bid = await _bid_of(conn, request, task)
        if bid["status"] != "pending" or task["status"] != "open":
            raise conflict(f"Bid is {bid['status']} on a task that is {task['status']}")
        row = await conn.fetchrow("UPDATE tm_bids SET status = 'rejected' WHERE id = $1 RETURNING *", bid["id"])
    return ok(views.bid(row))


@USER_IDEM
async def review_task(request: web.Request) -> web.Response:
    """Review a passed delivery: accept pays the agent's owner from escrow, reject refunds the poster."""
    user_id = await require_poster(request)
    body = await read_body(request)
    decision = body.get("decision")
    if decision not in ("accept", "reject"):
        raise bad("decision must be 'accept' or 'reject'")
    comment = text_field(body, "comment", required=False, max_len=5000) or None
    async with idempotency.transaction(request) as conn:
        task = await own_task(conn, request, user_id)
        if task["status"] != "delivered":
            raise conflict(f"Task is {task['status']}, not delivered")
        task_id = str(task["id"])
        if decision == "accept":
            owner = await conn.fetchval("SELECT a.user_id FROM tm_bids b JOIN tm_agents a ON a.id = b.agent_id"
                                        " WHERE b.id = $1", task["accepted_bid_id"])
            await ledger.post(conn, str(owner), task["escrow"], "task_earning", memo=memo(task_id, "payment"))
        else:
            await refund(conn, task, task["escrow"], "delivery rejected in review")
        task = await conn.fetchrow("UPDATE tm_tasks SET status = $2, escrow = 0, review_comment = $3,"
                                   " updated_at = now() WHERE id = $1 RETURNING *", task["id"],
                                   "completed" if decision == "accept" else "rejected", comment)
        return ok(await full_view(conn, task))


@USER_IDEM
async def cancel_task(request: web.Request) -> web.Response:
    """Cancel an open task (or one whose resubmit window closed): escrow refunded, pending bids rejected."""
    user_id = await require_poster(request)
    async with idempotency.transaction(request) as conn:
        task = await own_task(conn, request, user_id)
        lapsed = task["status"] == "pdqg_rejected" and await conn.fetchval("SELECT now() > $1::timestamptz",
                                                                           task["resubmit_deadline"])
        if task["status"] != "open" and not lapsed:
            raise conflict(f"Task is {task['status']}; only open tasks or lapsed resubmits can be cancelled")
        await refund(conn, task, task["escrow"], "task cancelled")
        await conn.execute("UPDATE tm_bids SET status = 'rejected' WHERE task_id = $1 AND status = 'pending'",
                           task["id"])
        task = await conn.fetchrow("UPDATE tm_tasks SET status = 'cancelled', escrow = 0, updated_at = now()"
                                   " WHERE id = $1 RETURNING *", task["id"])
        return ok(await full_view(conn, task))


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/tasks", create_task)
    app.router.add_get("/v1/tasks/{id}", get_task)
    app.router.add_get("/v1/tasks/{id}/bids", list_bids)
    app.router.add_post("/v1/tasks/{id}/bids/{bidId}/accept", accept_bid)
    app.router.add_post("/v1/tasks/{id}/bids/{bidId}/reject", reject_bid)
    app.router.add_post("/v1/tasks/{id}/review", review_task)
    app.router.add_post("/v1/tasks/{id}/cancel", cancel_task)
