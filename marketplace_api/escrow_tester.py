"""Tester routes of escrow jobs: open jobs, taking a place, submitting answers, abandoning; the profile.

Taking a place locks the job row, so concurrent testers serialise and a job never has more
active + completed assignments than ``targetTesters``. Expired assignments of a job are timed out
under that same lock before places are counted (the sweep does the same for every job).
"""

from __future__ import annotations

import hmac
import uuid
from datetime import datetime, timedelta

import asyncpg
from aiohttp import web

from proxyorch.tokens import hash_token

from . import escrow_settlement as settlement
from .bodies import json_response
from .context import pool_of
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
from .escrow_jobs import now, settings_of
from .escrow_validation import Invalid, validate_answers, validate_profile, variant_accepts


async def profile_of(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> dict:
    return await conn.fetchval("SELECT profile FROM tester_profiles WHERE user_id = $1", user_id) or {}


async def put_profile(request: web.Request) -> web.Response:
    """Set the caller's tester profile (e.g. country, languages) that audience filters match."""
    user = await require_user(request)
    try:
        profile = validate_profile(await read_body(request))
    except Invalid as exc:
        raise bad("invalid profile", exc.details) from None
    await pool_of(request).execute(
        "INSERT INTO tester_profiles(user_id, profile) VALUES ($1, $2) ON CONFLICT (user_id)"
        " DO UPDATE SET profile = EXCLUDED.profile, updated_at = now()", user, profile)
    return json_response({"ok": True, "profile": profile})


async def expire_assignments(conn: asyncpg.Connection, t: datetime, job_id: object | None = None) -> int:
    """Time out active assignments past their hard limit (their places reopen); returns how many."""
    result = await conn.execute(
        "UPDATE escrow_assignments SET status = 'timed_out' WHERE status = 'active' AND expires_at <= $1"
        " AND ($2::uuid IS NULL OR job_id = $2)", t, job_id)
    return int(result.split()[-1])


async def open_jobs(request: web.Request) -> web.Response:
    """Active jobs with open places the caller may take (audience filters applied), cursor pages."""
    user = await require_user(request)
    limit = page_limit(request)
    cursor = decode_cursor(request.query.get("cursor"))
    pool = pool_of(request)
    profile = await profile_of(pool, user)
    out: list[dict] = []
    last_seq, more = cursor, False
    while len(out) <= limit:
        rows = await pool.fetch(
            """SELECT j.*, (SELECT count(*) FROM escrow_assignments a WHERE a.job_id = j.id
                              AND a.status IN ('active', 'completed')) AS taken,
                      (SELECT jsonb_agg(v.spec) FROM escrow_variants v WHERE v.job_id = j.id) AS specs
               FROM escrow_jobs j
               WHERE j.status = 'active' AND j.posting_ends_at > now() AND j.owner_id <> $1
                 AND ($2::bigint IS NULL OR j.seq < $2)
                 AND NOT EXISTS (SELECT 1 FROM escrow_assignments a WHERE a.job_id = j.id AND a.tester_id = $1)
               ORDER BY j.seq DESC LIMIT 200""", user, last_seq)
        for r in rows:
            last_seq = r["seq"]
            if r["taken"] >= r["target_testers"] or not any(variant_accepts(s, profile) for s in r["specs"] or []):
                continue
            if len(out) == limit:
                more = True
                break
            out.append({"id": str(r["id"]), "title": r["title"], "category": r["category"],
                        "openPlaces": r["target_testers"] - r["taken"], "amountCents": r["amount_cents"],
                        "createdAt": iso(r["created_at"]), "_seq": r["seq"]})
        if more or len(rows) < 200:
            break
    next_cursor = encode_cursor(out[-1]["_seq"]) if more and out else None
    for item in out:
        del item["_seq"]
    return json_response({"data": out, "next": next_cursor})


async def take_place(request: web.Request) -> web.Response:
    """Take a place on a job: the matching variant with the fewest assignments below its max."""
    user = await require_user(request)
    job_id = path_uuid(request)
    t = now()
    s = settings_of(request)
    async with pool_of(request).acquire() as conn, conn.transaction():
        job = await settlement.lock_job(conn, job_id)
        if job is None:
            raise not_found()
        if str(job["owner_id"]) == user:
            raise EscrowError(403, "the owner cannot test their own job")
        if job["status"] == "scheduled":
            raise conflict("job has not started")
        if job["status"] != "active":
            raise conflict(f"job is {job['status']}")
        if job["posting_ends_at"] <= t:
            raise conflict("job posting time limit has ended")
        if await conn.fetchval("SELECT 1 FROM escrow_assignments WHERE job_id = $1 AND tester_id = $2",
                               job_id, user):
            raise conflict("you already hold a place on this job")
        await expire_assignments(conn, t, job["id"])
        taken = await conn.fetchval("SELECT count(*) FROM escrow_assignments WHERE job_id = $1"
                                    " AND status IN ('active', 'completed')", job_id)
        if taken >= job["target_testers"]:
            raise conflict("job is full")
        profile = await profile_of(conn, user)
        variants = await conn.fetch(
            """SELECT v.*, (SELECT count(*) FROM escrow_assignments a WHERE a.variant_id = v.id
                             AND a.status IN ('active', 'completed')) AS taken
               FROM escrow_variants v WHERE v.job_id = $1 ORDER BY v.position""", job_id)
        fitting = [v for v in variants if variant_accepts(v["spec"], profile)]
        if not fitting:
            raise EscrowError(403, "your tester profile does not match this job's audience")
        open_ = [v for v in fitting if v["taken"] < (v["target_max"] or job["target_testers"])]
        if not open_:
            raise conflict("job is full")
        variant = min(open_, key=lambda v: (v["taken"], v["position"]))
        aid = str(uuid.uuid4())
        expires = t + timedelta(seconds=job["task_hard_minutes"] * s.market_minute_s)
        await conn.execute("INSERT INTO escrow_assignments(id, job_id, variant_id, tester_id, status, created_at,"
                           " expires_at) VALUES ($1, $2, $3, $4, 'active', $5, $6)",
                           aid, job_id, variant["id"], user, t, expires)
    return json_response({"assignmentId": aid, "jobId": job_id, "variantId": str(variant["id"]),
                          "description": variant["description"], "url": variant["url"],
                          "feedbackQuestions": variant["feedback_questions"], "expiresAt": iso(expires)}, 201)


def _assignment(a: asyncpg.Record) -> dict:
    return {"assignmentId": str(a["id"]), "jobId": str(a["job_id"]), "variantId": str(a["variant_id"]),
            "status": a["status"], "durationMinutes": a["duration_minutes"], "answers": a["answers"],
            "createdAt": iso(a["created_at"]), "expiresAt": iso(a["expires_at"]),
            "completedAt": iso(a["completed_at"])}


async def _own_assignment(conn: asyncpg.Connection, request: web.Request, user: str) -> tuple:
    aid = path_uuid(request, what="assignment")
    job_id = await conn.fetchval("SELECT job_id FROM escrow_assignments WHERE id = $1 AND tester_id = $2", aid, user)
    if job_id is None:
        raise not_found("assignment")
    job = await settlement.lock_job(conn, job_id)  # job first, then assignment: one lock order everywhere
    a = await conn.fetchrow("SELECT * FROM escrow_assignments WHERE id = $1 FOR UPDATE", aid)
    return job, a


async def submit_assignment(request: web.Request) -> web.Response:
    """Submit answers for an active assignment (validated against the variant's questions)."""
    user = await require_user(request)
    body = await read_body(request)
    t = now()
    minute = settings_of(request).market_minute_s
    async with pool_of(request).acquire() as conn, conn.transaction():
        job, a = await _own_assignment(conn, request, user)
        if a["status"] == "active" and a["expires_at"] <= t:
            await conn.execute("UPDATE escrow_assignments SET status = 'timed_out' WHERE id = $1", a["id"])
            raise conflict("assignment timed out")
        if a["status"] != "active":
            raise conflict(f"assignment is {a['status']}")
        questions = await conn.fetchval("SELECT feedback_questions FROM escrow_variants WHERE id = $1",
                                        a["variant_id"])
        try:
            answers = validate_answers(questions, body.get("answers"))
        except Invalid as exc:
            raise bad("invalid answers", exc.details) from None
        if job["proof_password_hash"] is not None:
            given = body.get("password")
            if not isinstance(given, str) or not hmac.compare_digest(hash_token(given), job["proof_password_hash"]):
                raise bad("proof of completion password is wrong",
                          [{"field": "password", "message": "does not match the job's proof of completion"}])
        duration = int((t - a["created_at"]).total_seconds() // minute)
        row = await conn.fetchrow("UPDATE escrow_assignments SET status = 'completed', answers = $2, completed_at = $3,"
                                  " duration_minutes = $4 WHERE id = $1 RETURNING *", a["id"], answers, t, duration)
    return json_response(_assignment(row))


async def abandon_assignment(request: web.Request) -> web.Response:
    """Give up an active assignment; its place reopens."""
    user = await require_user(request)
    async with pool_of(request).acquire() as conn, conn.transaction():
        _job, a = await _own_assignment(conn, request, user)
        if a["status"] != "active":
            raise conflict(f"assignment is {a['status']}")
        row = await conn.fetchrow("UPDATE escrow_assignments SET status = 'abandoned' WHERE id = $1 RETURNING *",
                                  a["id"])
    return json_response(_assignment(row))
