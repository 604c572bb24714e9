"""Helpers shared by the marketplace integration tests (real node, real PostgreSQL)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

JOB = {"title": "Create a Google account", "category": "Google", "description": "Create a Google account.",
       "proof": "Google account email.", "duration": 3, "positions": 3, "job_price": 0.06}


async def funded_user(dep: Any, name: str = "user", amount: float = 100, **fields: Any) -> tuple[str, str]:
    user_id, token = await dep.user(name)
    if amount:
        status, body = await dep.call("POST", "/api/v2/admin/deposits", admin=True,
                                      json={"user_id": user_id, "amount": amount})
        assert status == 200, body
    if fields:
        sets = ", ".join(f"{k} = ${i + 2}" for i, k in enumerate(fields))
        await dep.pool.execute(f"UPDATE users SET {sets} WHERE id = $1", user_id, *fields.values())
    return user_id, token


async def make_job(dep: Any, token: str, **overrides: Any) -> str:
    status, body = await dep.call("POST", "/api/v2/jobs/submit", token, json={**JOB, **overrides})
    assert status == 201, body
    return body["job_id"]


async def make_automation(dep: Any, **schemas: Any) -> str:
    payload = {"name": f"auto-{uuid.uuid4().hex[:6]}", **schemas}
    status, body = await dep.call("POST", "/api/v2/admin/automations", admin=True, json=payload)
    assert status == 201, body
    return body["automation"]["automation_id"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
