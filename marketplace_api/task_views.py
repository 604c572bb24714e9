"""Rendering of job tasks and planned tasks in the seed's shape, and id resolution."""

from __future__ import annotations

import asyncpg

from .common import iso, money

TASK_SELECT = """
SELECT t.*, j.title AS job_title, j.job_price, u.name AS worker_name
FROM job_tasks t JOIN jobs j ON j.id = t.job_id JOIN users u ON u.id = t.worker_id
"""


def task_json(t: asyncpg.Record) -> dict:
    tid = str(t["id"])
    return {
        "_id": tid, "job_task_id": tid, "worker_id": str(t["worker_id"]), "job_id": str(t["job_id"]),
        "job_title": t["job_title"], "job_price": money(t["job_price"]), "job_proof": t["job_proof"],
        "comment": t["comment"], "country_code": t["country_code"], "worker_ip": t["worker_ip"],
        "status": t["status"], "failureReason": t["failure_reason"], "reviewed": t["reviewed"],
        "device_owner_share": money(t["device_owner_share"]), "added": iso(t["added"]),
        "updated": iso(t["updated"]), "proof_files_info": t["proof_files_info"],
        "planned_task_id": str(t["planned_task_id"]) if t["planned_task_id"] else None,
        "remote_device_id": str(t["remote_device_id"]) if t["remote_device_id"] else None,
        "parent_task_id": str(t["parent_task_id"]) if t["parent_task_id"] else None,
    }


def planned_json(p: asyncpg.Record) -> dict:
    return {
        "planned_task_id": str(p["id"]), "job_id": str(p["job_id"]), "input": p["input"],
        "remote_device_id": str(p["remote_device_id"]) if p["remote_device_id"] else None,
        "job_task_id": str(p["job_task_id"]) if p["job_task_id"] else None, "added": iso(p["added"]),
    }


class Unresolved(Exception):
    """An id that is neither a job task nor a planned task (``kind='missing'``), or a planned task
    without a job task (``kind='unassigned'``)."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.ident = ident


async def resolve_task_id(conn: asyncpg.Connection | asyncpg.Pool, ident: str, job_id: str | None = None) -> str:
    """A job_task_id from a job-task id or a planned-task id (optionally within one job)."""
    found = await conn.fetchval("SELECT id FROM job_tasks WHERE id = $1 AND ($2::uuid IS NULL OR job_id = $2)",
                                ident, job_id)
    if found is not None:
        return str(found)
    planned = await conn.fetchrow("SELECT job_task_id FROM planned_tasks WHERE id = $1"
                                  " AND ($2::uuid IS NULL OR job_id = $2)", ident, job_id)
    if planned is None:
        raise Unresolved("missing", ident)
    if planned["job_task_id"] is None:
        raise Unresolved("unassigned", ident)
    return str(planned["job_task_id"])
