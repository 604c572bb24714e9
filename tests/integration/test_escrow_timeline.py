"""The escrow timeline on a node of its own with MARKET_MINUTE_S = 0.2 s: assignments time out and
their places reopen, the posting limit closes a job, closing jobs settle by themselves, unanswered
settlements are approved at their deadline, scheduled jobs start — all by the sweep, in seconds."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from conftest import Deployment, NodeProcess, create_database
from escrow_fixtures import job_body, ledger_cents, make, make_testers, submit, take
from marketplace_fixtures import funded_user

pytestmark = pytest.mark.asyncio(loop_scope="session")
MINUTE_S = 0.2


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fast(pg_root, tmp_path_factory):
    url = await create_database(pg_root[0])
    node = await NodeProcess(url, tmp_path_factory.mktemp("escrow-fast"), {
        "MARKET_MINUTE_S": str(MINUTE_S), "MARKET_SWEEP_S": "0.2", "SETTLEMENT_DEADLINE_S": "2"}).start()
    dep = Deployment(node)
    await dep.open()
    yield dep
    await dep.close()
    await node.stop()


async def until(check, timeout: float = 20.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def job_state(dep, job_id: str) -> tuple[str, str]:
    row = await dep.pool.fetchrow("SELECT status, settlement_status FROM escrow_jobs WHERE id = $1",
                                  uuid.UUID(job_id))
    return row["status"], row["settlement_status"]


async def test_timed_out_assignment_reopens_its_place_and_late_submit_is_409(fast):
    dep = fast
    _o, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok, targetTesters=1, taskHardTimeLimitMinutes=5,  # 5 × 0.2 s = 1 s
                     variants=[{**job_body()["variants"][0], "targetTestersMin": 1}])
    (_, slow), (_, next_) = await make_testers(dep, 2)
    s, a = await take(dep, slow, job["id"])
    assert s == 201
    assert (await take(dep, next_, job["id"]))[0] == 409  # full
    started = time.monotonic()

    async def timed_out() -> bool:
        return await dep.pool.fetchval("SELECT status FROM escrow_assignments WHERE id = $1",
                                       uuid.UUID(a["assignmentId"])) == "timed_out"
    await until(timed_out)
    assert time.monotonic() - started >= 0.8  # not before its limit
    s, body = await submit(dep, slow, a["assignmentId"], {"rating": 5})
    assert s == 409 and body["error"]["code"] == "CONFLICT"
    s, b = await take(dep, next_, job["id"])
    assert s == 201
    await asyncio.sleep(3 * MINUTE_S)
    s, done = await submit(dep, next_, b["assignmentId"], {"rating": 5})
    assert s == 200 and done["durationMinutes"] >= 2


async def test_posting_limit_closes_then_settles_then_auto_approves(fast):
    dep = fast
    owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok, jobPostingTimeLimitMinutes=5)  # 1 s
    (tester, ttok), = await make_testers(dep, 1)
    s, a = await take(dep, ttok, job["id"])
    assert s == 201
    assert (await submit(dep, ttok, a["assignmentId"], {"rating": 4}))[0] == 200
    before = await ledger_cents(dep, owner)

    async def pending() -> bool:
        return await job_state(dep, job["id"]) == ("closing", "pending_approval")
    await until(pending)
    s, detail = await dep.call("GET", f"/jobs/{job['id']}", tok)
    deadline = datetime.fromisoformat(detail["settlementDeadline"].replace("Z", "+00:00"))
    assert timedelta(0) < deadline - datetime.now(UTC) <= timedelta(seconds=3)
    (_, late), = await make_testers(dep, 1)
    assert (await take(dep, late, job["id"]))[0] == 409  # closing

    async def approved() -> bool:
        return await job_state(dep, job["id"]) == ("completed", "approved")
    await until(approved)
    assert await ledger_cents(dep, tester) == 300
    assert await ledger_cents(dep, owner) - before == 4 * 390


async def test_stop_with_an_active_assignment_settles_when_it_times_out(fast):
    dep = fast
    owner, tok = await funded_user(dep, "owner", amount=100)
    before = await ledger_cents(dep, owner)
    job = await make(dep, tok, taskHardTimeLimitMinutes=5)
    (_, ttok), = await make_testers(dep, 1)
    assert (await take(dep, ttok, job["id"]))[0] == 201
    assert (await dep.call("POST", f"/owner/jobs/{job['id']}/stop", tok))[1]["status"] == "closing"
    await asyncio.sleep(0.5)
    assert await job_state(dep, job["id"]) == ("closing", "none")  # waits for the active tester

    async def cancelled() -> bool:
        return await job_state(dep, job["id"]) == ("cancelled", "cancelled")
    await until(cancelled)
    assert await ledger_cents(dep, owner) == before  # full refund


async def test_scheduled_job_starts_at_starts_at(fast):
    dep = fast
    _o, tok = await funded_user(dep, "owner", amount=100)
    starts = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    job = await make(dep, tok, startsAt=starts)
    assert job["status"] == "scheduled"
    (_, ttok), = await make_testers(dep, 1)
    s, body = await take(dep, ttok, job["id"])
    assert s == 409 and "not started" in body["error"]["message"]

    async def active() -> bool:
        return (await job_state(dep, job["id"]))[0] == "active"
    await until(active)
    assert (await take(dep, ttok, job["id"]))[0] == 201


async def test_node_stops_cleanly_with_the_sweep_running(fast):
    rc = await fast.node.stop()
    assert rc == 0
    log = fast.node.log_path.read_text()
    assert "escrow sweep failed" not in log and "Task was destroyed" not in log
