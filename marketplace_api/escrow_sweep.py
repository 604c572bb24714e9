"""The escrow sweep: starts scheduled jobs, closes jobs whose posting time ended, times out
assignments, begins settlement of closing jobs with no active assignment, and approves
settlements nobody approved or disputed by their deadline. One pass is :func:`sweep_once`
(clock passed in); :func:`sweeper` runs it every ``MARKET_SWEEP_S`` until cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

import asyncpg

from . import escrow_settlement as settlement
from .escrow_tester import expire_assignments

log = logging.getLogger(__name__)


async def sweep_once(pool: asyncpg.Pool, t: datetime, deadline_s: float) -> dict[str, int]:
    """One pass at time ``t``; returns how many objects each step changed."""
    counts = {"started": 0, "closed": 0, "timed_out": 0, "settled": 0, "auto_approved": 0}
    async with pool.acquire() as conn:
        r = await conn.execute("UPDATE escrow_jobs SET status = 'active', updated_at = $1"
                               " WHERE status = 'scheduled' AND starts_at <= $1", t)
        counts["started"] = int(r.split()[-1])
        r = await conn.execute("UPDATE escrow_jobs SET status = 'closing', updated_at = $1"
                               " WHERE status IN ('active', 'paused', 'scheduled') AND posting_ends_at <= $1", t)
        counts["closed"] = int(r.split()[-1])
        counts["timed_out"] = await expire_assignments(conn, t)
        closing = await conn.fetch(
            "SELECT id FROM escrow_jobs j WHERE status = 'closing' AND settlement_status = 'none' AND NOT EXISTS"
            " (SELECT 1 FROM escrow_assignments a WHERE a.job_id = j.id AND a.status = 'active')")
        for row in closing:
            async with conn.transaction():
                job = await settlement.lock_job(conn, row["id"])
                if job is not None and await settlement.eligible(conn, job):
                    await settlement.settle(conn, job, t, deadline_s)
                    counts["settled"] += 1
        due = await conn.fetch("SELECT id FROM escrow_jobs WHERE settlement_status = 'pending_approval'"
                               " AND settlement_deadline <= $1", t)
        for row in due:
            async with conn.transaction():
                job = await settlement.lock_job(conn, row["id"])
                if job is not None and job["settlement_status"] == "pending_approval":
                    await settlement.approve(conn, job, t)
                    counts["auto_approved"] += 1
    return counts


async def sweeper(pool: asyncpg.Pool, interval_s: float, deadline_s: float,
                  clock: Callable[[], datetime]) -> None:
    """Run :func:`sweep_once` every ``interval_s`` until cancelled; errors are logged, never fatal."""
    while True:
        try:
            await sweep_once(pool, clock(), deadline_s)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            log.warning("escrow sweep failed (database unavailable): %r", exc)  # retried next interval
        except Exception:
            log.exception("escrow sweep failed")
        await asyncio.sleep(interval_s)
