"""The task market (seed 003, /v1) end to end against a real node and PostgreSQL: a poster funds and
posts, three agents discover (cursor pages across inserts) and bid, the poster accepts one, traces
stream live while the agent works, a poor delivery is rejected and the resubmit passes, the review
pays to the cent and the ledger balances; the final-fail, review-reject and cancel paths refund."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal

import pytest
from taskmarket_fixtures import GOOD, POOR, SSE, agent, balance, bid, claimed_task, key, post_task, poster

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def task_ledger_sum(dep, task_id: str) -> Decimal:
    return Decimal(await dep.pool.fetchval("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries"
                                           " WHERE memo LIKE $1", f"tm:{task_id} %"))


async def test_whole_story_bids_live_traces_resubmit_review_pays_to_the_cent(deployment):
    dep = deployment
    poster_id, poster_tok = await poster(dep, 100)
    category = f"research-{uuid.uuid4().hex[:6]}"
    task = await post_task(dep, poster_tok, category=category, price=20.37)
    assert task["status"] == "open" and task["price"] == "20.37" and task["escrow"] == "20.37"
    assert await balance(dep, poster_id) == Decimal("79.63")
    # Three more tasks in the category so discovery pages.
    for _ in range(3):
        await post_task(dep, poster_tok, category=category, price="1.00")
    agents = [await agent(dep) for _ in range(3)]
    # Discovery in pages of two; tasks inserted between pages neither repeat nor shift what follows.
    status, page1 = await dep.call("GET", "/v1/tasks/available", agents[0]["apiKey"],
                                   params={"category": category, "limit": "2"})
    assert status == 200 and page1["ok"] is True
    p1 = page1["data"]
    assert len(p1["items"]) == 2 and p1["pagination"]["has_more"] is True and p1["pagination"]["total_estimate"] == 4
    assert set(p1["items"][0]) == {"id", "title", "description", "category", "status", "band", "price", "createdAt"}
    late = await post_task(dep, poster_tok, category=category, price="2.00")
    status, page2 = await dep.call("GET", "/v1/tasks/available", agents[0]["apiKey"],
                                   params={"category": category, "limit": "2",
                                           "cursor": p1["pagination"]["next_cursor"]})
    assert status == 200
    p2 = page2["data"]
    assert p2["pagination"]["has_more"] is False and p2["pagination"]["next_cursor"] is None
    seen = [t["id"] for t in p1["items"] + p2["items"]]
    assert len(seen) == len(set(seen)) == 4 and task["id"] in seen and late["id"] not in seen
    status, fresh = await dep.call("GET", "/v1/tasks/available", agents[0]["apiKey"], params={"category": category})
    assert late["id"] == fresh["data"]["items"][0]["id"] and fresh["data"]["pagination"]["total_estimate"] == 5

    bids = [await bid(dep, a["apiKey"], task["id"], price) for a, price in zip(agents, (19.5, 12.25, 18), strict=True)]
    assert bids[1]["status"] == "pending" and bids[1]["proposedPrice"] == 12.25 and bids[1]["agentId"] == agents[1]["id"]
    status, listed = await dep.call("GET", f"/v1/tasks/{task['id']}/bids", poster_tok)
    assert status == 200 and [b["id"] for b in listed["data"]["items"]] == [b["id"] for b in bids]
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/bids/{bids[1]['id']}/accept", poster_tok,
                                  headers=key())
    assert status == 200, body
    claimed = body["data"]
    assert claimed["status"] == "claimed" and claimed["acceptedBidId"] == bids[1]["id"] and claimed["escrow"] == "12.25"
    assert await balance(dep, poster_id) == Decimal("100") - Decimal("12.25") - 3 - 2
    status, listed = await dep.call("GET", f"/v1/tasks/{task['id']}/bids", poster_tok)
    assert [b["status"] for b in listed["data"]["items"]] == ["rejected", "accepted", "rejected"]
    # Late bid, and a bid by an agent that already bid: 409.
    late_agent = await agent(dep)
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/bids", late_agent["apiKey"],
                                  json={"proposedPrice": 5, "coverLetter": "late"}, headers=key())
    assert status == 409 and body == {"ok": False, "error": {"code": "CONFLICT", "message": body["error"]["message"]}}
    status, _ = await dep.call("POST", f"/v1/tasks/{task['id']}/bids", agents[0]["apiKey"],
                               json={"proposedPrice": 5, "coverLetter": "again"}, headers=key())
    assert status == 409
    # The task is no longer discoverable.
    status, avail = await dep.call("GET", "/v1/tasks/available", agents[0]["apiKey"], params={"category": category})
    assert task["id"] not in [t["id"] for t in avail["data"]["items"]]

    worker = agents[1]
    url = f"{dep.node.api}/v1/tasks/{task['id']}/traces/stream"
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/progress", worker["apiKey"], headers=key(),
                                  json={"event": "started", "message": "Downloading the report", "metadata": {}})
    assert status == 201, body
    first = body["data"]
    async with SSE(url, poster_tok) as watcher:
        assert watcher.status == 200
        ev_id, data = await watcher.next()
        assert ev_id == first["id"] and data == first  # past traces first
        delays = []
        for i in range(5):
            t0 = time.monotonic()
            status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/progress", worker["apiKey"], headers=key(),
                                          json={"event": "step_completed", "message": f"Parsed part {i}",
                                                "metadata": {"pagesProcessed": 10 * i, "totalPages": 120}})
            assert status == 201
            ev_id, data = await watcher.next()
            delays.append(time.monotonic() - t0)
            assert ev_id == body["data"]["id"] and data["metadata"] == {"pagesProcessed": 10 * i, "totalPages": 120}
        # Generous bound (shared CI machine); the design target is <100 ms after the POST returns.
        assert sorted(delays)[len(delays) // 2] < 1.0, delays
    # The assigned agent may watch too, and resumes after Last-Event-ID.
    status, traces = await dep.call("GET", f"/v1/tasks/{task['id']}/traces", worker["apiKey"])
    items = traces["data"]["items"]
    assert status == 200 and len(items) == 6 and items[0] == first
    async with SSE(url, worker["apiKey"], last_event_id=items[3]["id"]) as resumed:
        assert [(await resumed.next())[0] for _ in range(2)] == [items[4]["id"], items[5]["id"]]
        with pytest.raises(TimeoutError):
            await resumed.next(timeout=0.5)

    # A poor delivery is rejected by the gate; the resubmit passes.
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/deliver", worker["apiKey"], headers=key(),
                                  json={"content": POOR})
    assert status == 201, body
    assert body["data"]["verdict"] == "rejected" and body["data"]["score"] < 0.4
    assert body["data"]["delivery"]["content"] == POOR
    status, view = await dep.call("GET", f"/v1/tasks/{task['id']}", poster_tok)
    assert view["data"]["status"] == "pdqg_rejected" and view["data"]["resubmitDeadline"]
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/deliver", worker["apiKey"], headers=key(),
                                  json={"content": GOOD})
    assert status == 409  # not claimed any more: resubmit is the way
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/review", poster_tok, headers=key(),
                                  json={"decision": "accept"})
    assert status == 409  # nothing passed yet
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/resubmit", worker["apiKey"], headers=key(),
                                  json={"content": GOOD})
    assert status == 201 and body["data"]["verdict"] == "passed" and body["data"]["score"] > 0.65, body
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/resubmit", worker["apiKey"], headers=key(),
                                  json={"content": GOOD})
    assert status == 409  # one resubmit only
    status, view = await dep.call("GET", f"/v1/tasks/{task['id']}", poster_tok)
    v = view["data"]
    assert v["status"] == "delivered" and v["bidsCount"] == 3 and v["acceptedBidId"] == bids[1]["id"]
    assert v["delivery"]["verdict"] == "passed" and v["delivery"]["attempt"] == 2

    owner_before = await balance(dep, worker["userId"])
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/review", poster_tok, headers=key(),
                                  json={"decision": "accept", "comment": "Great summary"})
    assert status == 200, body
    assert body["data"]["status"] == "completed" and body["data"]["escrow"] == "0.00"
    assert await balance(dep, worker["userId"]) - owner_before == Decimal("12.25")  # no platform fee
    assert await balance(dep, poster_id) == Decimal("100") - Decimal("12.25") - 3 - 2
    assert await task_ledger_sum(dep, task["id"]) == 0  # what left the poster reached the agent's owner
    status, _ = await dep.call("POST", f"/v1/tasks/{task['id']}/review", poster_tok, headers=key(),
                               json={"decision": "accept"})
    assert status == 409  # paid once
    status, _ = await dep.call("POST", f"/v1/tasks/{task['id']}/progress", worker["apiKey"], headers=key(),
                               json={"event": "late"})
    assert status == 409


async def test_final_fail_refunds_the_poster_and_a_passed_warning_can_be_rejected(deployment):
    dep = deployment
    task, worker, (poster_id, poster_tok) = await claimed_task(dep, 15)
    before = await balance(dep, poster_id)
    for path in ("deliver", "resubmit"):
        status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/{path}", worker["apiKey"], headers=key(),
                                      json={"content": POOR})
        assert status == 201 and body["data"]["verdict"] == "rejected"
    status, view = await dep.call("GET", f"/v1/tasks/{task['id']}", poster_tok)
    assert view["data"]["status"] == "pdqg_final_fail" and view["data"]["escrow"] == "0.00"
    assert await balance(dep, poster_id) - before == Decimal("15")
    assert await task_ledger_sum(dep, task["id"]) == 0
    status, _ = await dep.call("POST", f"/v1/tasks/{task['id']}/review", poster_tok, headers=key(),
                               json={"decision": "accept"})
    assert status == 409

    task, worker, (poster_id, poster_tok) = await claimed_task(dep, 10)
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/deliver", worker["apiKey"], headers=key(),
                                  json={"content": GOOD})
    assert status == 201 and body["data"]["verdict"] == "passed"
    before = await balance(dep, poster_id)
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/review", poster_tok, headers=key(),
                                  json={"decision": "reject", "comment": "Not what I asked"})
    assert status == 200 and body["data"]["status"] == "rejected"
    assert await balance(dep, poster_id) - before == Decimal("10")
    assert await balance(dep, worker["userId"]) == 0
    assert await task_ledger_sum(dep, task["id"]) == 0


async def test_resubmit_window_closes(deployment):
    dep = deployment
    task, worker, (poster_id, poster_tok) = await claimed_task(dep)
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/deliver", worker["apiKey"], headers=key(),
                                  json={"content": POOR})
    assert status == 201 and body["data"]["verdict"] == "rejected"
    status, _ = await dep.call("POST", f"/v1/tasks/{task['id']}/cancel", poster_tok, headers=key())
    assert status == 409  # the agent's resubmit window is still open
    row = await dep.pool.fetchrow("SELECT resubmit_deadline - updated_at AS window FROM tm_tasks WHERE id = $1",
                                  uuid.UUID(task["id"]))
    assert abs(row["window"].total_seconds() - 6 * 3600) < 5  # RESUBMIT_WINDOW_S default
    await dep.pool.execute("UPDATE tm_tasks SET resubmit_deadline = now() - interval '1 second' WHERE id = $1",
                           uuid.UUID(task["id"]))
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/resubmit", worker["apiKey"], headers=key(),
                                  json={"content": GOOD})
    assert status == 409 and body["error"]["code"] == "CONFLICT"
    # The poster gets the escrow back by cancelling the lapsed task.
    before = await balance(dep, poster_id)
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/cancel", poster_tok, headers=key())
    assert status == 200 and body["data"]["status"] == "cancelled"
    assert await balance(dep, poster_id) - before == Decimal("15")


async def test_cancel_refunds_and_rejects_pending_bids_and_insufficient_funds_makes_no_task(deployment):
    dep = deployment
    poster_id, tok = await poster(dep, 30)
    task = await post_task(dep, tok, price="25.50")
    a = await agent(dep)
    b = await bid(dep, a["apiKey"], task["id"], 20)
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/cancel", tok, headers=key())
    assert status == 200 and body["data"]["status"] == "cancelled"
    assert await balance(dep, poster_id) == Decimal("30")
    status, bids = await dep.call("GET", f"/v1/tasks/{task['id']}/bids", tok)
    assert bids["data"]["items"][0]["id"] == b["id"] and bids["data"]["items"][0]["status"] == "rejected"
    status, _ = await dep.call("POST", f"/v1/tasks/{task['id']}/cancel", tok, headers=key())
    assert status == 409
    count = await dep.pool.fetchval("SELECT count(*) FROM tm_tasks WHERE poster_id = $1", uuid.UUID(poster_id))
    status, body = await dep.call("POST", "/v1/tasks", tok, headers=key(),
                                  json={"title": "t", "description": "d", "category": "coding", "price": 30.01})
    assert status == 400 and body["error"]["code"] == "INSUFFICIENT_FUNDS"
    assert await dep.pool.fetchval("SELECT count(*) FROM tm_tasks WHERE poster_id = $1", uuid.UUID(poster_id)) == count
    assert await balance(dep, poster_id) == Decimal("30")


async def test_concurrent_task_posts_never_overdraw(deployment):
    dep = deployment
    poster_id, tok = await poster(dep, 50)

    async def one():
        return (await dep.call("POST", "/v1/tasks", tok, headers=key(),
                               json={"title": "t", "description": "d", "category": "coding", "price": "10.00"}))[0]

    statuses = await asyncio.gather(*(one() for _ in range(8)))
    assert statuses.count(201) == 5 and statuses.count(400) == 3
    assert await balance(dep, poster_id) == 0
