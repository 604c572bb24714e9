"""Settlement of escrow jobs: settle, approve, dispute, admin resolution — every movement a ledger row.

Money of one job: the owner's ``job_escrow`` debits (creation, resize up) minus ``escrow_refund``
credits (resize down, unused places, refunded places) equal what is still held; on approve each
completed place pays the tester ``amount_cents`` (``escrow_payout``) and the platform the rest of
the place (``platform_fee``), unused places go back to the owner. Once a job is settled, the rows
with its ``escrow_job_id`` sum to exactly zero. Every function here runs inside the caller's
transaction with the job row locked (``SELECT … FOR UPDATE``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from . import ledger
from .escrow_http import iso
from .escrow_money import PLATFORM_USER_ID, units


async def lock_job(conn: asyncpg.Connection, job_id: str, owner_id: str | None = None) -> asyncpg.Record | None:
    """The job row locked for update (and owned by ``owner_id`` when given), or None."""
    if owner_id is None:
        return await conn.fetchrow("SELECT * FROM escrow_jobs WHERE id = $1 FOR UPDATE", job_id)
    return await conn.fetchrow("SELECT * FROM escrow_jobs WHERE id = $1 AND owner_id = $2 FOR UPDATE",
                               job_id, owner_id)


async def active_count(conn: asyncpg.Connection, job_id: object) -> int:
    return await conn.fetchval("SELECT count(*) FROM escrow_assignments WHERE job_id = $1 AND status = 'active'",
                               job_id)


async def completed_count(conn: asyncpg.Connection, job_id: object) -> int:
    return await conn.fetchval("SELECT count(*) FROM escrow_assignments WHERE job_id = $1 AND status = 'completed'",
                               job_id)


async def eligible(conn: asyncpg.Connection, job: asyncpg.Record) -> bool:
    """Closing with no active assignment, or every place completed (and not yet settled)."""
    if job["settlement_status"] != "none" or job["status"] in ("completed", "cancelled"):
        return False
    if job["status"] == "closing" and await active_count(conn, job["id"]) == 0:
        return True
    return await completed_count(conn, job["id"]) >= job["target_testers"]


async def settle(conn: asyncpg.Connection, job: asyncpg.Record, now: datetime, deadline_s: float) -> dict:
    """Begin settlement of an eligible job; no completed assignment → cancelled with a full refund."""
    job_id = str(job["id"])
    if await completed_count(conn, job["id"]) == 0:
        if job["escrow_hold_cents"]:
            await ledger.post(conn, str(job["owner_id"]), units(job["escrow_hold_cents"]), "escrow_refund",
                              escrow_job_id=job_id, memo="escrow job cancelled: full refund")
        await conn.execute("UPDATE escrow_jobs SET status = 'cancelled', settlement_status = 'cancelled',"
                           " updated_at = $2 WHERE id = $1", job["id"], now)
        return {"ok": True, "cancelled": True, "settlementStatus": "cancelled", "settlementDeadline": None}
    deadline = now + timedelta(seconds=deadline_s)
    await conn.execute("UPDATE escrow_jobs SET status = 'closing', settlement_status = 'pending_approval',"
                       " settlement_deadline = $2, updated_at = $3 WHERE id = $1", job["id"], deadline, now)
    # Active assignments cannot exist on an eligible job unless every place is completed; none remain.
    return {"ok": True, "cancelled": False, "settlementStatus": "pending_approval", "settlementDeadline": iso(deadline)}


async def _pay_place(conn: asyncpg.Connection, job: asyncpg.Record, assignment: asyncpg.Record) -> None:
    job_id, aid = str(job["id"]), str(assignment["id"])
    await ledger.post(conn, str(assignment["tester_id"]), units(job["amount_cents"]), "escrow_payout",
                      escrow_job_id=job_id, escrow_assignment_id=aid)
    fee = job["place_cents"] - job["amount_cents"]
    if fee > 0:
        await ledger.post(conn, PLATFORM_USER_ID, units(fee), "platform_fee", escrow_job_id=job_id,
                          escrow_assignment_id=aid)
    await conn.execute("UPDATE escrow_assignments SET payout_status = 'paid' WHERE id = $1", assignment["id"])


async def _refund_place(conn: asyncpg.Connection, job: asyncpg.Record, assignment: asyncpg.Record) -> None:
    await ledger.post(conn, str(job["owner_id"]), units(job["place_cents"]), "escrow_refund",
                      escrow_job_id=str(job["id"]), escrow_assignment_id=str(assignment["id"]),
                      memo="disputed place refunded")
    await conn.execute("UPDATE escrow_assignments SET payout_status = 'refunded' WHERE id = $1", assignment["id"])


async def _disburse(conn: asyncpg.Connection, job: asyncpg.Record, withheld: set[str]) -> int:
    """Pay every completed place not in ``withheld`` and refund the unused places; returns withheld count."""
    rows = await conn.fetch("SELECT * FROM escrow_assignments WHERE job_id = $1 AND status = 'completed'"
                            " AND payout_status = 'none' ORDER BY created_at, id", job["id"])
    held = 0
    for a in rows:
        if str(a["tester_id"]) in withheld:
            await conn.execute("UPDATE escrow_assignments SET payout_status = 'withheld' WHERE id = $1", a["id"])
            held += 1
        else:
            await _pay_place(conn, job, a)
    unused = job["target_testers"] - len(rows)
    if unused > 0:
        await ledger.post(conn, str(job["owner_id"]), units(unused * job["place_cents"]), "escrow_refund",
                          escrow_job_id=str(job["id"]), memo=f"{unused} unused place(s) refunded")
    return held


async def approve(conn: asyncpg.Connection, job: asyncpg.Record, now: datetime) -> dict:
    """Pay every completed place, refund the rest (irreversible). The job must be pending approval."""
    await _disburse(conn, job, set())
    await conn.execute("UPDATE escrow_jobs SET status = 'completed', settlement_status = 'approved',"
                       " updated_at = $2 WHERE id = $1", job["id"], now)
    return {"ok": True, "settlementStatus": "approved"}


async def completed_testers(conn: asyncpg.Connection, job_id: object) -> set[str]:
    rows = await conn.fetch("SELECT tester_id FROM escrow_assignments WHERE job_id = $1 AND status = 'completed'",
                            job_id)
    return {str(r["tester_id"]) for r in rows}


async def dispute(conn: asyncpg.Connection, job: asyncpg.Record, body: dict, now: datetime) -> dict:
    """Withhold the listed testers' places; pay the others and refund unused places as on approve."""
    withheld = {t["testerUserId"] for t in body["testers"]}
    await _disburse(conn, job, withheld)
    await conn.execute("UPDATE escrow_jobs SET settlement_status = 'disputed', dispute = $2, updated_at = $3"
                       " WHERE id = $1", job["id"], body, now)
    return {"ok": True, "settlementStatus": "disputed"}


async def resolve(conn: asyncpg.Connection, job: asyncpg.Record, decisions: list[dict], now: datetime) -> dict:
    """Admin: pay or refund withheld places; the settlement is approved once none is withheld."""
    for d in decisions:
        a = await conn.fetchrow("SELECT * FROM escrow_assignments WHERE job_id = $1 AND tester_id = $2"
                                " AND payout_status = 'withheld'", job["id"], d["testerUserId"])
        if a is None:
            raise LookupError(d["testerUserId"])
        if d["resolution"] == "pay":
            await _pay_place(conn, job, a)
        else:
            await _refund_place(conn, job, a)
    left = await conn.fetchval("SELECT count(*) FROM escrow_assignments WHERE job_id = $1"
                               " AND payout_status = 'withheld'", job["id"])
    if left:
        return {"ok": True, "settlementStatus": "disputed"}
    await conn.execute("UPDATE escrow_jobs SET status = 'completed', settlement_status = 'approved',"
                       " updated_at = $2 WHERE id = $1", job["id"], now)
    return {"ok": True, "settlementStatus": "approved"}
