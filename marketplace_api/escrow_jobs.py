"""Owner routes of escrow jobs (seed 002): create with escrow, list, read, lifecycle, resize, settlement.

A job holds ``place_cents × targetTesters`` from the owner's ledger balance, taken in the same
transaction that creates it. Minutes (posting limit, task limit) are ``MARKET_MINUTE_S`` seconds.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from aiohttp import web

from proxyorch.tokens import hash_token

from . import escrow_settlement as settlement
from . import idempotency, ledger
from .bodies import json_response
from .context import SETTINGS, pool_of
from .escrow_http import (
    EscrowError,
    bad,
    conflict,
    decode_cursor,
    encode_cursor,
    iso,
    not_found,
    page_limit,
    path_uuid,
    read_body,
    require_user,
)
from .escrow_money import escrow_cents, place_cents, units
from .escrow_validation import Invalid, validate_dispute, validate_job

JOB_STATUSES = ("scheduled", "active", "paused", "closing", "completed", "cancelled")
SETTLEMENT_STATUSES = ("none", "pending_approval", "approved", "disputed", "cancelled")


def now() -> datetime:
    return datetime.now(UTC)


def settings_of(request: web.Request):  # noqa: ANN201
    return request.app[SETTINGS]


def insufficient(needed_cents: int) -> EscrowError:
    return EscrowError(400, f"balance does not cover the escrow of {needed_cents} cents", "INSUFFICIENT_FUNDS")


async def create_job(request: web.Request) -> web.Response:
    """Create a job with one or more variants; its escrow is held from the owner's balance."""
    owner = await require_user(request)
    try:
        job = validate_job(await read_body(request))
    except Invalid as exc:
        raise bad("invalid job: " + exc.details[0]["field"] + " " + exc.details[0]["message"], exc.details) from None
    s = settings_of(request)
    fee = s.platform_fee_bps
    place = place_cents(job["amountCents"], fee)
    escrow = escrow_cents(job["amountCents"], fee, job["targetTesters"])
    t = now()
    starts = job["startsAt"] if job["startsAt"] and job["startsAt"] > t else None
    ends = (starts or t) + timedelta(seconds=job["jobPostingTimeLimitMinutes"] * s.market_minute_s)
    job_id = str(uuid.uuid4())
    password = job.pop("password")
    spec = {k: (iso(v) if isinstance(v, datetime) else v) for k, v in job.items() if k != "variants"}
    status = "scheduled" if starts else "active"
    async with idempotency.transaction(request) as conn:
        # The owner's row first: the job's foreign key would otherwise take a share lock that two
        # concurrent creates of one owner then both try to upgrade (a deadlock).
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", owner)
        await conn.execute(
            """INSERT INTO escrow_jobs(id, owner_id, title, category, description, description_mime_type, status,
                   target_testers, amount_cents, place_cents, escrow_hold_cents, posting_minutes, task_hard_minutes,
                   task_paid_minutes, starts_at, posting_ends_at, proof_password_hash, spec, created_at, updated_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $19)""",
            job_id, owner, job["title"], job["category"], job["description"], job["descriptionMimeType"], status,
            job["targetTesters"], job["amountCents"], place, escrow, job["jobPostingTimeLimitMinutes"],
            job["taskHardTimeLimitMinutes"], job["taskPaidTimeLimitMinutes"], starts, ends,
            hash_token(password) if password else None, spec, t)
        for i, v in enumerate(job["variants"]):
            await conn.execute(
                "INSERT INTO escrow_variants(id, job_id, position, description, url, target_min, target_max,"
                " feedback_questions, spec) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                str(uuid.uuid4()), job_id, i, v["description"], v["url"], v["targetTestersMin"],
                v["targetTestersMax"], v["feedbackQuestions"], v)
        try:
            await ledger.debit(conn, owner, units(escrow), "job_escrow", escrow_job_id=job_id)
        except ledger.InsufficientFunds:
            raise insufficient(escrow) from None
    return json_response({"id": job_id, "status": status, "title": job["title"], "escrowHoldCents": escrow,
                          "createdAt": iso(t)}, 201)


def _summary(r: asyncpg.Record) -> dict:
    return {"id": str(r["id"]), "title": r["title"], "status": r["status"], "targetTesters": r["target_testers"],
            "escrowHoldCents": r["escrow_hold_cents"], "settlementStatus": r["settlement_status"],
            "createdAt": iso(r["created_at"])}


async def list_jobs(request: web.Request) -> web.Response:
    """The caller's jobs, newest first: filters status and settlementStatus, cursor pages."""
    owner = await require_user(request)
    limit = page_limit(request)
    cursor = decode_cursor(request.query.get("cursor"))
    status, settled = request.query.get("status"), request.query.get("settlementStatus")
    if status is not None and status not in JOB_STATUSES:
        raise bad(f"status must be one of {', '.join(JOB_STATUSES)}")
    if settled is not None and settled not in SETTLEMENT_STATUSES:
        raise bad(f"settlementStatus must be one of {', '.join(SETTLEMENT_STATUSES)}")
    rows = await pool_of(request).fetch(
        """SELECT * FROM escrow_jobs WHERE owner_id = $1 AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR settlement_status = $3) AND ($4::bigint IS NULL OR seq < $4)
           ORDER BY seq DESC LIMIT $5""", owner, status, settled, cursor, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": [_summary(r) for r in rows],
                          "next": encode_cursor(rows[-1]["seq"]) if more else None})


def _feedback(a: asyncpg.Record) -> dict:
    return {"testerId": str(a["tester_id"]), "status": a["status"], "durationMinutes": a["duration_minutes"],
            "feedbackData": {"_meta": {"source": "tester_input", "untrusted": True}, "answers": a["answers"]}}


async def get_job(request: web.Request) -> web.Response:
    """Full job details: variant progress and completed assignments with feedback data."""
    owner = await require_user(request)
    job_id = path_uuid(request)
    pool = pool_of(request)
    job = await pool.fetchrow("SELECT * FROM escrow_jobs WHERE id = $1 AND owner_id = $2", job_id, owner)
    if job is None:
        raise not_found()
    variants = await pool.fetch("SELECT * FROM escrow_variants WHERE job_id = $1 ORDER BY position", job_id)
    assignments = await pool.fetch("SELECT * FROM escrow_assignments WHERE job_id = $1 ORDER BY created_at, id",
                                   job_id)
    out_variants = []
    for v in variants:
        mine = [a for a in assignments if a["variant_id"] == v["id"]]
        done = [a for a in mine if a["status"] == "completed"]
        out_variants.append({
            "id": str(v["id"]), "description": v["description"], "url": v["url"],
            "targetTestersMin": v["target_min"], "targetTestersMax": v["target_max"],
            "feedbackQuestions": v["feedback_questions"],
            **{k: v["spec"].get(k) for k in ("descriptionMimeType", "placement", "screenCapture", "audienceFilters",
                                             "techConstraints")},
            "assignmentCount": sum(a["status"] in ("active", "completed") for a in mine),
            "completedCount": len(done), "completedAssignments": [_feedback(a) for a in done]})
    spec = job["spec"]
    body = {**_summary(job), "description": job["description"], "descriptionMimeType": job["description_mime_type"],
            "category": job["category"], "amountCents": job["amount_cents"],
            "jobPostingTimeLimitMinutes": job["posting_minutes"], "taskHardTimeLimitMinutes": job["task_hard_minutes"],
            "taskPaidTimeLimitMinutes": job["task_paid_minutes"], "startsAt": iso(job["starts_at"]),
            "postingEndsAt": iso(job["posting_ends_at"]), "settlementDeadline": iso(job["settlement_deadline"]),
            "paymentRules": [{"type": "fixed", "amountCents": job["amount_cents"]}],
            "legalAgreements": spec.get("legalAgreements", []), "projectId": spec.get("projectId"),
            "projectTestersOnly": spec.get("projectTestersOnly"),
            "proofOfCompletion": {"method": "password"} if job["proof_password_hash"] else None,
            "variants": out_variants}
    return json_response(body)


async def _transition(request: web.Request, allowed: tuple[str, ...], to: str) -> web.Response:
    owner = await require_user(request)
    job_id = path_uuid(request)
    async with pool_of(request).acquire() as conn, conn.transaction():
        job = await settlement.lock_job(conn, job_id, owner)
        if job is None:
            raise not_found()
        if job["status"] not in allowed or job["settlement_status"] != "none":
            raise conflict(f"cannot {request.path.rsplit('/', 1)[-1]} a job that is {job['status']}")
        await conn.execute("UPDATE escrow_jobs SET status = $2, updated_at = now() WHERE id = $1", job_id, to)
    return json_response({"id": job_id, "status": to})


async def pause_job(request: web.Request) -> web.Response:
    """Pause an active job: no new assignments; running ones continue."""
    return await _transition(request, ("active",), "paused")


async def resume_job(request: web.Request) -> web.Response:
    """Resume a paused job back to active."""
    return await _transition(request, ("paused",), "active")


async def stop_job(request: web.Request) -> web.Response:
    """Graceful shutdown: existing testers finish, no new testers join; settlement then begins by itself."""
    return await _transition(request, ("scheduled", "active", "paused"), "closing")


async def resize_job(request: web.Request) -> web.Response:
    """Change targetTesters: raising holds the extra escrow, lowering refunds it."""
    owner = await require_user(request)
    job_id = path_uuid(request)
    body = await read_body(request)
    new = body.get("targetTesters")
    if isinstance(new, bool) or not isinstance(new, int) or not 1 <= new <= 10000:
        raise bad("targetTesters must be an integer between 1 and 10000",
                  [{"field": "targetTesters", "message": "must be an integer between 1 and 10000"}])
    async with idempotency.transaction(request) as conn:
        job = await settlement.lock_job(conn, job_id, owner)
        if job is None:
            raise not_found()
        if job["status"] not in ("scheduled", "active", "paused") or job["settlement_status"] != "none":
            raise conflict(f"cannot resize a job that is {job['status']}")
        taken = await conn.fetchval("SELECT count(*) FROM escrow_assignments WHERE job_id = $1"
                                    " AND status IN ('active', 'completed')", job_id)
        if new < taken:
            raise bad(f"targetTesters cannot go below the {taken} places already taken")
        mins = await conn.fetchval("SELECT COALESCE(sum(target_min), 0) FROM escrow_variants WHERE job_id = $1",
                                   job_id)
        if new < mins:
            raise bad(f"targetTesters cannot go below the variants' targetTestersMin sum of {mins}")
        old, old_escrow = job["target_testers"], job["escrow_hold_cents"]
        new_escrow = job["place_cents"] * new
        delta = new_escrow - old_escrow
        if delta > 0:
            try:
                await ledger.debit(conn, owner, units(delta), "job_escrow", escrow_job_id=job_id)
            except ledger.InsufficientFunds:
                raise insufficient(delta) from None
        elif delta < 0:
            await ledger.post(conn, owner, units(-delta), "escrow_refund", escrow_job_id=job_id,
                              memo=f"resize {old} -> {new}")
        await conn.execute("UPDATE escrow_jobs SET target_testers = $2, escrow_hold_cents = $3, updated_at = now()"
                           " WHERE id = $1", job_id, new, new_escrow)
    return json_response({"previousTargetTesters": old, "newTargetTesters": new,
                          "previousEscrowHoldCents": old_escrow, "newEscrowHoldCents": new_escrow,
                          "escrowDeltaCents": delta})


async def settle_job(request: web.Request) -> web.Response:
    """Close an eligible job and begin settlement (no completed assignment: cancelled, full refund)."""
    owner = await require_user(request)
    job_id = path_uuid(request)
    async with idempotency.transaction(request) as conn:
        job = await settlement.lock_job(conn, job_id, owner)
        if job is None:
            raise not_found()
        if not await settlement.eligible(conn, job):
            raise conflict("job is not eligible for settlement (stop it and let active assignments finish,"
                           " or fill every place)")
        answer = await settlement.settle(conn, job, now(), settings_of(request).settlement_deadline_s)
    return json_response(answer)


async def approve_job(request: web.Request) -> web.Response:
    """Approve a pending settlement. Irreversible: pays testers, refunds unused places."""
    owner = await require_user(request)
    job_id = path_uuid(request)
    async with idempotency.transaction(request) as conn:
        job = await settlement.lock_job(conn, job_id, owner)
        if job is None:
            raise not_found()
        if job["settlement_status"] != "pending_approval":
            raise conflict(f"settlement is {job['settlement_status']}, not pending_approval")
        answer = await settlement.approve(conn, job, now())
    return json_response(answer)


async def dispute_job(request: web.Request) -> web.Response:
    """Dispute a pending settlement: listed testers' payouts are withheld, the others are paid."""
    owner = await require_user(request)
    job_id = path_uuid(request)
    try:
        body = validate_dispute(await read_body(request))
    except Invalid as exc:
        raise bad("invalid dispute: " + exc.details[0]["field"] + " " + exc.details[0]["message"],
                  exc.details) from None
    async with idempotency.transaction(request) as conn:
        job = await settlement.lock_job(conn, job_id, owner)
        if job is None:
            raise not_found()
        if job["settlement_status"] != "pending_approval":
            raise conflict(f"settlement is {job['settlement_status']}, not pending_approval")
        testers = await settlement.completed_testers(conn, job["id"])
        unknown = [t["testerUserId"] for t in body["testers"] if t["testerUserId"] not in testers]
        if unknown:
            raise bad("testers must have a completed assignment on this job",
                      [{"field": "testers", "message": f"{u} has no completed assignment"} for u in unknown])
        answer = await settlement.dispute(conn, job, body, now())
    return json_response(answer)
