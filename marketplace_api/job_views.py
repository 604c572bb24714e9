"""Rendering of jobs in the seed's shape (``_id``, ``totla_tasks_count``, ``Target_Workers`` …)."""

from __future__ import annotations

import asyncpg

from .common import can_view, iso, money, money_str

COUNTS_SQL = """
SELECT job_id,
       count(*) AS total,
       count(*) FILTER (WHERE status IN ('pending', 'confirmed')) AS done,
       count(*) FILTER (WHERE status = 'confirmed') AS confirmed,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM job_tasks WHERE job_id = ANY($1::uuid[]) GROUP BY job_id
"""


async def task_counts(conn: asyncpg.Connection | asyncpg.Pool, job_ids: list) -> dict:
    rows = await conn.fetch(COUNTS_SQL, job_ids)
    return {r["job_id"]: r for r in rows}


def job_json(j: asyncpg.Record, counts: asyncpg.Record | None, owner: asyncpg.Record | None,
             viewer: str) -> dict:
    jid = str(j["id"])
    out = {
        "_id": jid, "job_id": jid, "job_type": j["job_type"], "payment_type": j["payment_type"],
        "title": j["title"], "category": list(j["category"]), "description": j["description"], "proof": j["proof"],
        "is_proof_file": j["is_proof_file"], "auto_rate": j["auto_rate"],
        "Target_Workers": list(j["target_workers"]), "few_times": j["few_times"], "premium": j["premium"],
        "featured": j["featured"], "duration": str(j["duration"]), "positions": str(j["positions"]),
        "daily_limit": j["daily_limit"], "task_limit": j["task_limit"], "min_rating": money(j["min_rating"]),
        "job_price": money(j["job_price"]), "price": money_str(j["job_price"] * j["positions"]),
        "status": j["status"], "files": j["files"], "added": iso(j["added"]), "updated": iso(j["updated"]),
        "user": None if owner is None else {
            "_id": str(owner["id"]), "name": owner["name"], "country": owner["country"],
            "rating": money(owner["rating"])},
        "totla_tasks_count": counts["total"] if counts else 0,
        "tasks_done_count": counts["done"] if counts else 0,
        "tasks_confirmed_count": counts["confirmed"] if counts else 0,
        "tasks_running_count": counts["running"] if counts else 0,
        "tasks_pending_count": counts["pending"] if counts else 0,
        "automation_id": str(j["automation_id"]) if j["automation_id"] else None,
        "allow_sub_tasks": j["allow_sub_tasks"], "timeout": j["timeout"],
    }
    if can_view(j, viewer):
        out.update({
            "vcode": j["vcode"], "automation_parameters": j["automation_parameters"],
            "allowed_workers": [str(u) for u in j["allowed_workers"]],
            "Worker_Invites": [str(u) for u in j["worker_invites"]],
            "shared_view": [str(u) for u in j["shared_view"]], "shared_edit": [str(u) for u in j["shared_edit"]],
        })
    return out


async def render_jobs(conn: asyncpg.Connection | asyncpg.Pool, rows: list, viewer: str) -> list[dict]:
    if not rows:
        return []
    counts = await task_counts(conn, [r["id"] for r in rows])
    owners = {r["id"]: r for r in await conn.fetch(
        "SELECT id, name, country, rating FROM users WHERE id = ANY($1::uuid[])", list({r["user_id"] for r in rows}))}
    return [job_json(r, counts.get(r["id"]), owners.get(r["user_id"]), viewer) for r in rows]
