"""Assigning planned tasks of ``devices_automation`` jobs to online devices.

A device is eligible for a job when it is online, owned by or rented to the job's owner, and has no
``running`` task. A planned task pinned to a device (``remote_device_id``) only goes to that device.
Rows are claimed with ``SELECT … FOR UPDATE SKIP LOCKED`` on both the planned task and the device,
so concurrent assigners never hand one planned task out twice nor give one device two tasks (the
partial unique index ``job_tasks_one_running_per_device`` backs the latter up).

An assignment creates a ``running`` job task, links it from the planned task, mints an agent token
(returned once, stored as a hash) and sends ``pg_notify('task_assigned', '<job_task_id>:<device>')``
for the agent surface to deliver.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import asyncpg

from .agent_auth import mint_agent_token, revoke_for_task

log = logging.getLogger(__name__)
RETRY_ATTEMPTS = 3

_CANDIDATES = """
SELECT p.id, p.job_id, p.input, p.remote_device_id, p.parent_task_id, j.user_id AS owner, j.timeout, j.job_price
FROM planned_tasks p JOIN jobs j ON j.id = p.job_id
WHERE p.job_task_id IS NULL AND j.status = 'active' AND j.job_type = 'devices_automation'
  AND (p.reserved_until IS NULL OR p.reserved_until < now())
  AND ($1::uuid IS NULL OR p.id = $1) AND ($2::uuid IS NULL OR p.job_id = $2)
  AND p.id <> ALL($3::uuid[])
ORDER BY p.added, p.id
LIMIT 1
FOR UPDATE OF p SKIP LOCKED
"""

_DEVICE = """
SELECT d.remote_device_id, d.user_id FROM devices d
WHERE d.online AND (d.user_id = $1 OR d.rented_by = $1)
  AND ($2::uuid IS NULL OR d.remote_device_id = $2)
  AND NOT EXISTS (SELECT 1 FROM job_tasks t WHERE t.remote_device_id = d.remote_device_id AND t.status = 'running')
ORDER BY d.last_seen DESC NULLS LAST, d.remote_device_id
LIMIT 1
FOR UPDATE OF d SKIP LOCKED
"""


@dataclass(frozen=True)
class Assignment:
    planned_task_id: str
    job_task_id: str
    job_id: str
    remote_device_id: str
    agent_token: str


async def _assign_in(conn: asyncpg.Connection, planned_id: str | None, job_id: str | None,
                     scan: int) -> Assignment | None:
    """Claim candidates one at a time (so concurrent assigners spread over the rows) until one has a device."""
    tried: list = []
    for _ in range(scan):
        pt = await conn.fetchrow(_CANDIDATES, planned_id, job_id, tried)
        if pt is None:
            return None
        tried.append(pt["id"])
        device = await conn.fetchrow(_DEVICE, pt["owner"], pt["remote_device_id"])
        if device is None:
            continue
        task_id = str(uuid.uuid4())
        await conn.execute(
            """INSERT INTO job_tasks(id, job_id, worker_id, remote_device_id, planned_task_id, parent_task_id, mode,
                                     job_proof, status, device_owner_share, timeout)
               VALUES ($1, $2, $3, $4, $5, $6, 'automation', $7, 'running', $8, $9)""",
            task_id, pt["job_id"], device["user_id"], device["remote_device_id"], pt["id"], pt["parent_task_id"],
            pt["input"], pt["job_price"], pt["timeout"])
        await conn.execute(
            "UPDATE planned_tasks SET job_task_id = $2, attempts = attempts + 1, updated = now() WHERE id = $1",
            pt["id"], task_id)
        token = await mint_agent_token(conn, task_id, str(device["remote_device_id"]), pt["timeout"])
        await conn.execute("SELECT pg_notify('task_assigned', $1)", f"{task_id}:{device['remote_device_id']}")
        return Assignment(str(pt["id"]), task_id, str(pt["job_id"]), str(device["remote_device_id"]), token)
    return None


async def assign(pool: asyncpg.Pool, planned_task_id: str | None = None, job_id: str | None = None,
                 scan: int = 20, retries: int = 5) -> Assignment | None:
    """Assign one planned task (that one, or the oldest assignable of ``job_id`` / of any job).

    A device that got its running task in a transaction that committed after our statement's
    snapshot trips the one-running-task index; the attempt is then retried with a fresh snapshot.
    """
    for _ in range(retries):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await _assign_in(conn, planned_task_id, job_id, 1 if planned_task_id else scan)
        except asyncpg.UniqueViolationError:
            continue
    return None


async def assign_with_retries(pool: asyncpg.Pool, planned_ids: list[str], delay_s: float) -> list[dict]:
    """``run_immediately``: up to RETRY_ATTEMPTS rounds, ``delay_s`` (ASSIGN_RETRY_DELAY_S) apart."""
    assigned: dict[str, bool] = dict.fromkeys(planned_ids, False)
    for attempt in range(RETRY_ATTEMPTS):
        for pid in [p for p, ok in assigned.items() if not ok]:
            assigned[pid] = await assign(pool, planned_task_id=pid) is not None
        if all(assigned.values()) or attempt == RETRY_ATTEMPTS - 1:
            break
        await asyncio.sleep(delay_s)
    return [{"planned_task_id": pid, "assigned": ok} for pid, ok in assigned.items()]


async def expire_running(pool: asyncpg.Pool) -> int:
    """Fail running tasks past their timeout and revoke their agent tokens."""
    rows = await pool.fetch(
        """UPDATE job_tasks SET status = 'failed', failure_reason = 'timeout', finished = true, updated = now()
           WHERE status = 'running' AND added + make_interval(secs => timeout) < now() RETURNING id""")
    for r in rows:
        await revoke_for_task(pool, str(r["id"]))
    return len(rows)


async def sweeper(pool: asyncpg.Pool, interval_s: float) -> None:
    """Background loop every ``interval_s`` (ASSIGN_SWEEP_INTERVAL_S): expire overdue running tasks,
    then assign whatever can be assigned."""
    while True:
        try:
            await expire_running(pool)
            for _ in range(200):
                if await assign(pool) is None:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("assignment sweep failed")
        await asyncio.sleep(interval_s)
