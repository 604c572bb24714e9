"""Helpers shared by the escrow-job integration tests (seed 002; real node, real PostgreSQL)."""

from __future__ import annotations

import uuid
from decimal import Decimal

from marketplace_fixtures import funded_user

PLATFORM = uuid.UUID("00000000-0000-0000-0000-00000000fee0")


def job_body(**over: object) -> dict:
    body = {
        "title": "Rate my landing page", "targetTesters": 5, "category": "web-design",
        "jobPostingTimeLimitMinutes": 60, "paymentRules": [{"type": "fixed", "amountCents": 300}],
        "variants": [{"description": "Visit the landing page and rate the design.",
                      "url": "https://example.com/landing", "targetTestersMin": 5,
                      "feedbackQuestions": [{"id": "rating", "questionMarkdown": "Rate the overall design",
                                             "inputType": "star_rating"}]}]}
    body.update(over)
    return body


async def make(dep, token: str, **over: object) -> dict:
    status, body = await dep.call("POST", "/jobs", token, json=job_body(**over))
    assert status == 201, body
    return body


async def ledger_cents(dep, user_id: str | uuid.UUID) -> int:
    total = await dep.pool.fetchval("SELECT COALESCE(sum(amount), 0) FROM ledger_entries WHERE user_id = $1",
                                    uuid.UUID(str(user_id)))
    cents = Decimal(total) * 100
    assert cents == cents.to_integral_value()
    return int(cents)


async def job_ledger(dep, job_id: str) -> list:
    return await dep.pool.fetch("SELECT user_id, amount, kind FROM ledger_entries WHERE escrow_job_id = $1",
                                uuid.UUID(job_id))


async def make_testers(dep, n: int) -> list[tuple[str, str]]:
    return [await funded_user(dep, f"tester{i}", amount=0) for i in range(n)]


async def take(dep, token: str, job_id: str) -> tuple[int, dict]:
    return await dep.call("POST", f"/tester/jobs/{job_id}/assignments", token)


async def submit(dep, token: str, assignment_id: str, answers: object, **extra: object) -> tuple[int, dict]:
    return await dep.call("POST", f"/tester/assignments/{assignment_id}/submit", token,
                          json={"answers": answers, **extra})


async def complete(dep, job_id: str, n: int) -> list[tuple[str, str]]:
    people = await make_testers(dep, n)
    for _uid, tok in people:
        s, a = await take(dep, tok, job_id)
        assert s == 201, a
        s, done = await submit(dep, tok, a["assignmentId"], {"rating": 4})
        assert s == 200 and done["status"] == "completed", done
    return people
