"""Escrow jobs (seed 002) against a real node and PostgreSQL: escrow in the ledger, places taken
concurrently, answers, lifecycle, settlement (approve, cancel, dispute + admin), resize, cursor
pages, every 4xx, and tenant isolation on every route."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
from escrow_fixtures import (
    PLATFORM,
    complete,
    job_body,
    job_ledger,
    ledger_cents,
    make,
    make_testers,
    submit,
    take,
)
from marketplace_fixtures import funded_user

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_create_holds_escrow_by_the_formula_in_the_ledger(deployment):
    dep = deployment
    owner, tok = await funded_user(dep, "owner", amount=100)
    before = await ledger_cents(dep, owner)
    created = await make(dep, tok)
    assert set(created) == {"id", "status", "title", "escrowHoldCents", "createdAt"}
    assert created["status"] == "active" and created["escrowHoldCents"] == 1950
    assert created["title"] == "Rate my landing page" and created["createdAt"].endswith("Z")
    assert await ledger_cents(dep, owner) == before - 1950
    rows = await job_ledger(dep, created["id"])
    assert [(r["kind"], r["amount"]) for r in rows] == [("job_escrow", Decimal("-19.500000"))]
    five = await make(dep, tok, paymentRules=[{"type": "fixed", "amountCents": 500}])
    assert five["escrowHoldCents"] == 3250
    odd = await make(dep, tok, targetTesters=3, paymentRules=[{"type": "fixed", "amountCents": 5}],
                     variants=[{**job_body()["variants"][0], "targetTestersMin": 1}])
    assert odd["escrowHoldCents"] == 3 * 7  # 5 × 1.3 = 6.5 → 7 (half up)
    later = await make(dep, tok, startsAt="2100-01-01T00:00:00Z")
    assert later["status"] == "scheduled"
    status, detail = await dep.call("GET", f"/jobs/{created['id']}", tok)
    assert status == 200 and detail["settlementStatus"] == "none" and detail["escrowHoldCents"] == 1950
    v = detail["variants"][0]
    assert (v["assignmentCount"], v["completedCount"], v["completedAssignments"]) == (0, 0, [])
    s, _ = await take(dep, (await make_testers(dep, 1))[0][1], later["id"])
    assert s == 409


async def test_insufficient_funds_creates_no_job(deployment):
    dep = deployment
    owner, tok = await funded_user(dep, "poor", amount=19.49)
    status, body = await dep.call("POST", "/jobs", tok, json=job_body())
    assert status == 400 and body["ok"] is False and body["error"]["code"] == "INSUFFICIENT_FUNDS"
    assert await dep.pool.fetchval("SELECT count(*) FROM escrow_jobs WHERE owner_id = $1", uuid.UUID(owner)) == 0
    assert await ledger_cents(dep, owner) == 1949
    assert (await dep.call("POST", "/jobs", (await funded_user(dep, "exact", amount=19.5))[1], json=job_body()))[0] == 201


async def test_twenty_testers_race_for_five_places(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok)
    people = await make_testers(dep, 20)
    results = await asyncio.gather(*(take(dep, t, job["id"]) for _u, t in people))
    won = [b for s, b in results if s == 201]
    assert len(won) == 5
    assert all(s == 409 and b["error"]["code"] == "CONFLICT" for s, b in results if s != 201)
    assert set(won[0]) == {"assignmentId", "jobId", "variantId", "description", "url", "feedbackQuestions",
                           "expiresAt"}
    count = await dep.pool.fetchval("SELECT count(*) FROM escrow_assignments WHERE job_id = $1",
                                    uuid.UUID(job["id"]))
    assert count == 5
    s, detail = await dep.call("GET", f"/jobs/{job['id']}", tok)
    assert detail["variants"][0]["assignmentCount"] == 5


async def test_submit_validates_answers_and_password(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=100)
    questions = [{"id": "rating", "questionMarkdown": "Rate", "inputType": "star_rating"},
                 {"id": "why", "questionMarkdown": "Why?", "inputType": "text"},
                 {"id": "pick", "questionMarkdown": "Pick", "inputType": "single_choice", "options": ["a", "b"]},
                 {"id": "many", "questionMarkdown": "Many", "inputType": "multiple_choice", "options": ["x", "y", "z"]},
                 {"id": "ok", "questionMarkdown": "OK?", "inputType": "yes_no"}]
    job = await make(dep, tok, proofOfCompletion={"method": "password", "password": "s3cret"},
                     variants=[{**job_body()["variants"][0], "feedbackQuestions": questions}])
    stored = await dep.pool.fetchrow("SELECT proof_password_hash, spec FROM escrow_jobs WHERE id = $1",
                                     uuid.UUID(job["id"]))
    assert b"s3cret" not in bytes(stored["proof_password_hash"]) and "s3cret" not in str(stored["spec"])
    (tid, ttok), = await make_testers(dep, 1)
    s, a = await take(dep, ttok, job["id"])
    assert s == 201 and [q["id"] for q in a["feedbackQuestions"]] == ["rating", "why", "pick", "many", "ok"]
    bad = {"rating": 6, "why": "", "pick": "c", "many": ["x", "x"], "ok": "yes", "extra": 1}
    s, body = await submit(dep, ttok, a["assignmentId"], bad, password="s3cret")
    assert s == 400 and body["error"]["code"] == "BAD_REQUEST"
    fields = {d["field"] for d in body["error"]["details"]}
    assert fields == {"answers.rating", "answers.why", "answers.pick", "answers.many", "answers.ok", "answers.extra"}
    s, body = await submit(dep, ttok, a["assignmentId"], {"rating": 4})
    assert s == 400 and {d["field"] for d in body["error"]["details"]} == {
        "answers.why", "answers.pick", "answers.many", "answers.ok"}
    good = {"rating": 5, "why": "clean", "pick": "a", "many": ["x", "z"], "ok": True}
    s, body = await submit(dep, ttok, a["assignmentId"], good, password="wrong")
    assert s == 400 and "password" in body["error"]["message"]
    s, body = await submit(dep, ttok, a["assignmentId"], good, password="s3cret")
    assert s == 200 and body["status"] == "completed" and body["answers"] == good
    assert body["durationMinutes"] == 0
    s, body = await submit(dep, ttok, a["assignmentId"], good, password="s3cret")
    assert s == 409
    assert (await dep.call("POST", f"/tester/assignments/{a['assignmentId']}/abandon", ttok))[0] == 409
    s, detail = await dep.call("GET", f"/jobs/{job['id']}", tok)
    done = detail["variants"][0]["completedAssignments"]
    assert done == [{"testerId": tid, "status": "completed", "durationMinutes": 0,
                     "feedbackData": {"_meta": {"source": "tester_input", "untrusted": True}, "answers": good}}]


async def test_lifecycle_pause_resume_stop_and_409s(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok)
    jid = job["id"]
    (_, t1), (_, t2), (_, t3) = await make_testers(dep, 3)
    s, a1 = await take(dep, t1, jid)
    assert s == 201
    call = dep.call
    assert (await call("POST", f"/owner/jobs/{jid}/resume", tok))[0] == 409
    assert await call("POST", f"/owner/jobs/{jid}/pause", tok) == (200, {"id": jid, "status": "paused"})
    assert (await call("POST", f"/owner/jobs/{jid}/pause", tok))[0] == 409
    s, body = await take(dep, t2, jid)
    assert s == 409 and "paused" in body["error"]["message"]
    s, listed = await call("GET", "/tester/jobs", t2)
    assert jid not in {j["id"] for j in listed["data"]}
    assert await call("POST", f"/owner/jobs/{jid}/resume", tok) == (200, {"id": jid, "status": "active"})
    s, listed = await call("GET", "/tester/jobs", t2)
    mine = [j for j in listed["data"] if j["id"] == jid]
    assert mine and mine[0]["openPlaces"] == 4 and mine[0]["amountCents"] == 300 and mine[0]["category"] == "web-design"
    assert (await call("POST", f"/owner/jobs/{jid}/settle", tok))[0] == 409  # active, not full
    assert await call("POST", f"/owner/jobs/{jid}/stop", tok) == (200, {"id": jid, "status": "closing"})
    for route in ("pause", "resume", "stop"):
        assert (await call("POST", f"/owner/jobs/{jid}/{route}", tok))[0] == 409, route
    assert (await take(dep, t3, jid))[0] == 409
    assert (await call("POST", f"/owner/jobs/{jid}/settle", tok))[0] == 409  # one assignment still active
    assert (await call("POST", f"/owner/jobs/{jid}/approve", tok))[0] == 409
    s, body = await submit(dep, t1, a1["assignmentId"], {"rating": 3})  # running ones continue
    assert s == 200
    s, settled = await call("POST", f"/owner/jobs/{jid}/settle", tok)
    if s == 409:  # the sweep (MARKET_SWEEP_S) began the settlement first: the same outcome
        settled = {"ok": True, "cancelled": False, "settlementStatus": "pending_approval"}
    assert settled["ok"] is True and settled["cancelled"] is False
    assert settled["settlementStatus"] == "pending_approval"
    s, detail = await call("GET", f"/jobs/{jid}", tok)
    assert detail["settlementStatus"] == "pending_approval" and detail["settlementDeadline"].endswith("Z")


async def test_settle_approve_ledger_sums_to_the_cent(deployment):
    dep = deployment
    owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok, targetTesters=4, paymentRules=[{"type": "fixed", "amountCents": 333}],
                     variants=[{**job_body()["variants"][0], "targetTestersMin": 1}])
    jid = job["id"]
    place = (333 * 13000 + 5000) // 10000  # 433
    assert job["escrowHoldCents"] == 4 * place
    people = await complete(dep, jid, 4)
    s, settled = await dep.call("POST", f"/owner/jobs/{jid}/settle", tok)  # every place completed
    assert s == 200 and settled["settlementStatus"] == "pending_approval" and settled["cancelled"] is False
    owner_before = await ledger_cents(dep, owner)
    platform_before = await ledger_cents(dep, PLATFORM)
    assert await dep.call("POST", f"/owner/jobs/{jid}/approve", tok) == (200, {"ok": True,
                                                                              "settlementStatus": "approved"})
    assert (await dep.call("POST", f"/owner/jobs/{jid}/approve", tok))[0] == 409  # irreversible, once
    for uid, _ in people:
        assert await ledger_cents(dep, uid) == 333
    assert await ledger_cents(dep, PLATFORM) - platform_before == 4 * (place - 333)
    assert await ledger_cents(dep, owner) == owner_before  # nothing unused
    rows = await job_ledger(dep, jid)
    assert sum(r["amount"] for r in rows) == 0
    credits = sum(r["amount"] for r in rows if r["amount"] > 0)
    assert credits * 100 == job["escrowHoldCents"]
    s, detail = await dep.call("GET", f"/jobs/{jid}", tok)
    assert (detail["status"], detail["settlementStatus"]) == ("completed", "approved")
    s, page = await dep.call("GET", "/jobs", tok, params={"settlementStatus": "approved"})
    assert [j["id"] for j in page["data"]] == [jid]
    assert page["data"][0] == {"id": jid, "title": "Rate my landing page", "status": "completed", "targetTesters": 4,
                               "escrowHoldCents": 4 * place, "settlementStatus": "approved",
                               "createdAt": job["createdAt"]}


async def test_partial_completion_refunds_unused_places(deployment):
    dep = deployment
    owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok)
    jid = job["id"]
    await complete(dep, jid, 2)
    (_, quitter), = await make_testers(dep, 1)
    s, a = await take(dep, quitter, jid)
    assert (await dep.call("POST", f"/tester/assignments/{a['assignmentId']}/abandon", quitter))[0] == 200
    assert (await take(dep, quitter, jid))[0] == 409  # one place per tester per job
    await dep.call("POST", f"/owner/jobs/{jid}/stop", tok)
    s, body = await dep.call("POST", f"/owner/jobs/{jid}/settle", tok)
    assert s in (200, 409)  # 409: the sweep began it first
    before = await ledger_cents(dep, owner)
    assert (await dep.call("POST", f"/owner/jobs/{jid}/approve", tok))[0] == 200
    assert await ledger_cents(dep, owner) - before == 3 * 390
    assert sum(r["amount"] for r in await job_ledger(dep, jid)) == 0


async def test_settle_with_no_completion_cancels_and_refunds_everything(deployment):
    dep = deployment
    owner, tok = await funded_user(dep, "owner", amount=100)
    before = await ledger_cents(dep, owner)
    job = await make(dep, tok)
    jid = job["id"]
    await dep.call("POST", f"/owner/jobs/{jid}/stop", tok)
    s, body = await dep.call("POST", f"/owner/jobs/{jid}/settle", tok)
    if s == 200:
        assert body == {"ok": True, "cancelled": True, "settlementStatus": "cancelled", "settlementDeadline": None}
    s, detail = await dep.call("GET", f"/jobs/{jid}", tok)
    assert (detail["status"], detail["settlementStatus"]) == ("cancelled", "cancelled")
    assert await ledger_cents(dep, owner) == before
    assert (await dep.call("POST", f"/owner/jobs/{jid}/settle", tok))[0] == 409


async def test_dispute_withholds_listed_testers_until_admin_resolves(deployment):
    dep = deployment
    owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok)
    jid = job["id"]
    (u1, _), (u2, _), (u3, _) = await complete(dep, jid, 3)
    await dep.call("POST", f"/owner/jobs/{jid}/stop", tok)
    s, _ = await dep.call("POST", f"/owner/jobs/{jid}/settle", tok)
    assert s in (200, 409)
    path = f"/owner/jobs/{jid}/dispute"
    s, body = await dep.call("POST", path, tok, json={"platformIssue": True})
    assert s == 400 and body["error"]["details"][0]["field"] == "platformIssueDescription"
    s, body = await dep.call("POST", path, tok, json={"billingDiscrepancy": True, "billingDiscrepancyDescription": ""})
    assert s == 400
    s, body = await dep.call("POST", path, tok, json={"lowQuality": True, "testers": [
        {"testerUserId": str(uuid.uuid4()), "category": "low_quality"}]})
    assert s == 400  # not a tester of this job
    owner_before = await ledger_cents(dep, owner)
    dispute = {"lowQuality": True, "suspectedFraud": False, "testers": [
        {"testerUserId": u1, "category": "low_quality", "description": "Single-word answers"},
        {"testerUserId": u2, "category": "suspected_fraud"}]}
    assert await dep.call("POST", path, tok, json=dispute) == (200, {"ok": True, "settlementStatus": "disputed"})
    assert (await dep.call("POST", path, tok, json=dispute))[0] == 409
    assert (await dep.call("POST", f"/owner/jobs/{jid}/approve", tok))[0] == 409
    assert [await ledger_cents(dep, u) for u in (u1, u2, u3)] == [0, 0, 300]
    assert await ledger_cents(dep, owner) - owner_before == 2 * 390  # unused places
    resolve = f"/api/v2/admin/disputes/{jid}/resolve"
    pay1 = {"testers": [{"testerUserId": u1, "resolution": "pay"}]}
    assert (await dep.call("POST", resolve, tok, json=pay1))[0] == 401  # a user token is no admin token
    assert (await dep.call("POST", resolve, admin=True, json={"testers": [{"testerUserId": u1,
                                                                           "resolution": "maybe"}]}))[0] == 400
    assert (await dep.call("POST", resolve, admin=True, json={"testers": [{"testerUserId": u3,
                                                                           "resolution": "pay"}]}))[0] == 400
    s, body = await dep.call("POST", f"/api/v2/admin/disputes/{uuid.uuid4()}/resolve", admin=True, json=pay1)
    assert s == 404 and body["error"]["code"] == "NOT_FOUND"
    assert await dep.call("POST", resolve, admin=True, json=pay1) == (200, {"ok": True, "settlementStatus": "disputed"})
    assert await ledger_cents(dep, u1) == 300
    assert (await dep.call("POST", resolve, admin=True, json=pay1))[0] == 400  # no longer withheld
    refund2 = {"testers": [{"testerUserId": u2, "resolution": "refund"}]}
    assert await dep.call("POST", resolve, admin=True, json=refund2) == (200, {"ok": True,
                                                                              "settlementStatus": "approved"})
    assert await ledger_cents(dep, u2) == 0
    assert await ledger_cents(dep, owner) - owner_before == 3 * 390
    assert sum(r["amount"] for r in await job_ledger(dep, jid)) == 0
    s, detail = await dep.call("GET", f"/jobs/{jid}", tok)
    assert (detail["status"], detail["settlementStatus"]) == ("completed", "approved")
    assert (await dep.call("POST", resolve, admin=True, json=refund2))[0] == 409


async def test_resize_up_and_down_with_the_seed_fields(deployment):
    dep = deployment
    owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok, paymentRules=[{"type": "fixed", "amountCents": 500}])
    jid = job["id"]
    before = await ledger_cents(dep, owner)
    s, body = await dep.call("POST", f"/owner/jobs/{jid}/resize", tok, json={"targetTesters": 10})
    assert (s, body) == (200, {"previousTargetTesters": 5, "newTargetTesters": 10, "previousEscrowHoldCents": 3250,
                               "newEscrowHoldCents": 6500, "escrowDeltaCents": 3250})
    assert await ledger_cents(dep, owner) == before - 3250
    await complete(dep, jid, 6)
    s, body = await dep.call("POST", f"/owner/jobs/{jid}/resize", tok, json={"targetTesters": 5})
    assert s == 400 and "6" in body["error"]["message"]
    s, body = await dep.call("POST", f"/owner/jobs/{jid}/resize", tok, json={"targetTesters": 7})
    assert body == {"previousTargetTesters": 10, "newTargetTesters": 7, "previousEscrowHoldCents": 6500,
                    "newEscrowHoldCents": 4550, "escrowDeltaCents": -1950}
    assert await ledger_cents(dep, owner) == before - 3250 + 1950
    s, body = await dep.call("POST", f"/owner/jobs/{jid}/resize", tok, json={"targetTesters": 100000})
    assert s == 400
    s, body = await dep.call("POST", f"/owner/jobs/{jid}/resize", tok, json={"targetTesters": 9000})
    assert s == 400 and body["error"]["code"] == "INSUFFICIENT_FUNDS"
    for bad in ({}, {"targetTesters": "7"}, {"targetTesters": 0}, {"targetTesters": True}):
        assert (await dep.call("POST", f"/owner/jobs/{jid}/resize", tok, json=bad))[0] == 400, bad
    s, detail = await dep.call("GET", f"/jobs/{jid}", tok)
    assert detail["targetTesters"] == 7 and detail["escrowHoldCents"] == 4550
    await dep.call("POST", f"/owner/jobs/{jid}/stop", tok)
    assert (await dep.call("POST", f"/owner/jobs/{jid}/resize", tok, json={"targetTesters": 8}))[0] == 409


async def test_cursor_pages_are_stable_under_concurrent_inserts(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=5000)
    first = [(await make(dep, tok, title=f"job {i}"))["id"] for i in range(23)]
    seen: list[str] = []
    cursor = None
    inserted: list[str] = []
    while True:
        params = {"limit": "5", **({"cursor": cursor} if cursor else {})}
        (s, page), new = await asyncio.gather(dep.call("GET", "/jobs", tok, params=params),
                                              make(dep, tok, title="inserted meanwhile"))
        assert s == 200, page
        inserted.append(new["id"])
        seen += [j["id"] for j in page["data"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))  # no row twice
    assert set(first) <= set(seen)  # none missing
    assert [i for i in seen if i in first] == list(reversed(first))  # newest first
    await asyncio.gather(*(make(dep, tok, title="more") for _ in range(30)))
    s, page = await dep.call("GET", "/jobs", tok, params={"limit": "50"})
    assert len(page["data"]) == 50 and page["next"]
    s, rest = await dep.call("GET", "/jobs", tok, params={"limit": "50", "cursor": page["next"]})
    assert not {j["id"] for j in page["data"]} & {j["id"] for j in rest["data"]}
    for bad in ({"limit": "0"}, {"limit": "51"}, {"limit": "x"}, {"cursor": "!!"}, {"cursor": "bm9wZQ"},
                {"status": "weird"}, {"settlementStatus": "weird"}):
        s, body = await dep.call("GET", "/jobs", tok, params=bad)
        assert s == 400 and body["ok"] is False and body["error"]["code"] == "BAD_REQUEST", bad
    s, page = await dep.call("GET", "/jobs", tok, params={"status": "cancelled"})
    assert s == 200 and page == {"data": [], "next": None}
    s, page = await dep.call("GET", "/tester/jobs", (await make_testers(dep, 1))[0][1], params={"limit": "3"})
    assert s == 200 and len(page["data"]) == 3 and page["next"]
    assert (await dep.call("GET", "/tester/jobs", tok, params={"limit": "99"}))[0] == 400


async def test_create_rejects_every_bad_field(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=100)
    v = job_body()["variants"][0]
    q = v["feedbackQuestions"][0]
    cases = {
        "title": {"title": None}, "category": {"category": 5}, "targetTesters": {"targetTesters": 0},
        "jobPostingTimeLimitMinutes": {"jobPostingTimeLimitMinutes": 4},
        "jobPostingTimeLimitMinutes ": {"jobPostingTimeLimitMinutes": 10081},
        "paymentRules": {"paymentRules": []}, "paymentRules[0].type": {"paymentRules": [{"type": "hourly"}]},
        "paymentRules[0].amountCents": {"paymentRules": [{"type": "fixed", "amountCents": 1.5}]},
        "variants": {"variants": []}, "variants ": {"variants": [{**v, "targetTestersMin": 3}, {**v, "targetTestersMin": 3}]},
        "variants[0].description": {"variants": [{**v, "description": ""}]},
        "variants[0].feedbackQuestions": {"variants": [{**v, "feedbackQuestions": [q, q]}]},
        "variants[0].feedbackQuestions[0].inputType": {"variants": [{**v, "feedbackQuestions": [
            {**q, "inputType": "slider"}]}]},
        "variants[0].feedbackQuestions[0].options": {"variants": [{**v, "feedbackQuestions": [
            {**q, "inputType": "single_choice"}]}]},
        "variants[0].url": {"variants": [{**v, "url": "javascript:alert(1)"}]},
        "variants[0].placement": {"variants": [{**v, "placement": {"type": "popup"}}]},
        "variants[0].audienceFilters[0].values": {"variants": [{**v, "audienceFilters": [{"field": "country"}]}]},
        "variants[0].techConstraints[0].type": {"variants": [{**v, "techConstraints": [{"type": "cpu",
                                                                                       "values": ["x"]}]}]},
        "startsAt": {"startsAt": "tomorrow"}, "projectId": {"projectId": "p1"},
        "descriptionMimeType": {"descriptionMimeType": "text/html"},
        "proofOfCompletion.method": {"proofOfCompletion": {"method": "photo"}},
        "legalAgreements[0]": {"legalAgreements": [{"title": "NDA"}]},
        "taskHardTimeLimitMinutes": {"taskHardTimeLimitMinutes": -1},
        "taskPaidTimeLimitMinutes": {"taskPaidTimeLimitMinutes": "10"},
        "projectTestersOnly": {"projectTestersOnly": "yes"}, "description": {"description": 7},
        "variants[0].targetTestersMin": {"variants": [{k: x for k, x in v.items() if k != "targetTestersMin"}]},
        "variants[0].targetTestersMax": {"variants": [{**v, "targetTestersMin": 2, "targetTestersMax": 1}]},
        "variants[0].screenCapture[0]": {"variants": [{**v, "screenCapture": [{"type": "webcam"}]}]},
        "variants[0].descriptionMimeType": {"variants": [{**v, "descriptionMimeType": "application/pdf"}]},
        "variants[0].feedbackQuestions[0].questionMarkdown": {"variants": [{**v, "feedbackQuestions": [
            {"id": "q", "inputType": "text"}]}]},
        "variants[0].feedbackQuestions[0].id": {"variants": [{**v, "feedbackQuestions": [{**q, "id": "a b"}]}]},
    }
    for field, over in cases.items():
        s, body = await dep.call("POST", "/jobs", tok, json=job_body(**over))
        assert s == 400 and body["ok"] is False and body["error"]["code"] == "BAD_REQUEST", (field, body)
        assert any(d["field"] == field.strip() for d in body["error"]["details"]), (field, body)
    for raw in (b"{{", b"[]", b"", b'"x"'):
        s, body = await dep.call("POST", "/jobs", tok, data=raw, headers={"Content-Type": "application/json"})
        assert s == 400 and body["error"]["code"] == "BAD_REQUEST", raw
    s, body = await dep.call("POST", "/jobs", tok, json=job_body(title="a\u0000b"))
    assert s == 400
    s, body = await dep.call("POST", "/jobs", tok, json=job_body(description="x" * 2_000_000))
    assert s == 400 and body["error"]["code"] == "BAD_REQUEST"  # over MAX_BODY_BYTES, in this surface's shape
    s, body = await dep.call("DELETE", "/jobs", tok)
    assert s == 405 and body["error"]["code"] == "METHOD_NOT_ALLOWED"
    s, body = await dep.call("GET", "/jobs/not-a-uuid", tok)
    assert s == 404 and body == {"ok": False, "error": {"code": "NOT_FOUND", "message": "job not found"}}


async def test_401_403_404_409_of_tester_routes(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=100)
    job = await make(dep, tok, targetTesters=1, variants=[{**job_body()["variants"][0], "targetTestersMin": 1}])
    jid = job["id"]
    s, body = await take(dep, tok, jid)
    assert s == 403 and body["error"]["code"] == "FORBIDDEN"
    (_, t1), (_, t2) = await make_testers(dep, 2)
    s, a = await take(dep, t1, jid)
    assert s == 201
    assert (await take(dep, t1, jid))[0] == 409  # a second place
    s, body = await take(dep, t2, jid)
    assert s == 409 and "full" in body["error"]["message"]
    assert (await take(dep, t2, str(uuid.uuid4())))[0] == 404
    assert (await submit(dep, t2, a["assignmentId"], {"rating": 1}))[0] == 404  # not theirs
    assert (await dep.call("POST", f"/tester/assignments/{a['assignmentId']}/abandon", t2))[0] == 404
    assert (await dep.call("POST", f"/tester/assignments/{a['assignmentId']}/abandon", t1))[0] == 200
    assert (await submit(dep, t1, a["assignmentId"], {"rating": 1}))[0] == 409  # abandoned
    assert (await take(dep, t2, jid))[0] == 201  # the place reopened
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{jid}"), ("GET", "/tester/jobs"),
                         ("PUT", "/tester/profile"), ("POST", f"/owner/jobs/{jid}/pause"),
                         ("POST", f"/tester/jobs/{jid}/assignments")):
        for bad_token in (None, "po_nope"):
            s, body = await dep.call(method, path, bad_token, json={})
            assert s == 401 and body["error"]["code"] == "UNAUTHORIZED", (method, path)


async def test_audience_filters_match_the_tester_profile(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=100)
    v = {**job_body()["variants"][0], "targetTestersMin": 1,
         "audienceFilters": [{"field": "country", "values": ["DE", "AT"]},
                             {"field": "languages", "values": ["de"]}]}
    job = await make(dep, tok, targetTesters=2, variants=[v])
    (_, de), (_, us) = await make_testers(dep, 2)
    assert (await dep.call("PUT", "/tester/profile", de, json={"country": "DE", "languages": ["en", "de"]}))[0] == 200
    assert (await dep.call("PUT", "/tester/profile", us, json={"country": "US", "languages": ["en"]}))[0] == 200
    assert (await dep.call("PUT", "/tester/profile", us, json={"country": {"x": 1}}))[0] == 400
    assert (await dep.call("PUT", "/tester/profile", us, json={"languages": []}))[0] == 400
    ids = lambda page: {j["id"] for j in page["data"]}  # noqa: E731
    assert job["id"] in ids((await dep.call("GET", "/tester/jobs", de, params={"limit": "50"}))[1])
    assert job["id"] not in ids((await dep.call("GET", "/tester/jobs", us, params={"limit": "50"}))[1])
    assert (await take(dep, us, job["id"]))[0] == 403
    s, detail = await dep.call("GET", f"/jobs/{job['id']}", tok)
    assert detail["variants"][0]["audienceFilters"] == v["audienceFilters"]
    assert (await take(dep, de, job["id"]))[0] == 201
    assert job["id"] not in ids((await dep.call("GET", "/tester/jobs", de, params={"limit": "50"}))[1])


async def test_variants_fill_evenly(deployment):
    dep = deployment
    _owner, tok = await funded_user(dep, "owner", amount=100)
    base = job_body()["variants"][0]
    job = await make(dep, tok, targetTesters=5, variants=[{**base, "targetTestersMin": 1, "targetTestersMax": 1},
                                                          {**base, "targetTestersMin": 1, "description": "B"}])
    people = await make_testers(dep, 5)
    got = [(await take(dep, t, job["id"]))[1]["variantId"] for _u, t in people]
    s, detail = await dep.call("GET", f"/jobs/{job['id']}", tok)
    first, second = (v["id"] for v in detail["variants"])
    assert got.count(first) == 1 and got.count(second) == 4


async def test_tenant_isolation_on_every_escrow_route(deployment):
    dep = deployment
    a_id, a_tok = await funded_user(dep, "owner-a", amount=100)
    _b_id, b_tok = await funded_user(dep, "owner-b", amount=100)
    job = await make(dep, a_tok, title="A's secret job")
    jid = job["id"]
    (_, tester), = await make_testers(dep, 1)
    s, a = await take(dep, tester, jid)
    snapshot = lambda: dep.pool.fetchrow(  # noqa: E731
        "SELECT j.status, j.target_testers, j.escrow_hold_cents, j.settlement_status,"
        " (SELECT count(*) FROM ledger_entries WHERE escrow_job_id = j.id) AS rows,"
        " (SELECT status FROM escrow_assignments WHERE job_id = j.id) AS a FROM escrow_jobs j WHERE id = $1",
        uuid.UUID(jid))
    before = await snapshot()
    for route in ("pause", "resume", "stop", "settle", "approve", "dispute", "resize"):
        body = {"targetTesters": 9} if route == "resize" else {"lowQuality": True} if route == "dispute" else None
        s, answer = await dep.call("POST", f"/owner/jobs/{jid}/{route}", b_tok, json=body)
        assert s == 404 and answer["error"]["code"] == "NOT_FOUND", route
        s, _ = await dep.call("POST", f"/owner/jobs/{jid}/{route}", tester, json=body)
        assert s == 404, route
    s, body = await dep.call("GET", f"/jobs/{jid}", b_tok)
    assert s == 404 and "secret" not in str(body)
    s, page = await dep.call("GET", "/jobs", b_tok, params={"limit": "50"})
    assert jid not in str(page)
    s, page = await dep.call("GET", "/tester/jobs", a_tok, params={"limit": "50"})
    assert jid not in str(page)  # never one's own job
    for route in ("submit", "abandon"):
        s, _ = await dep.call("POST", f"/tester/assignments/{a['assignmentId']}/{route}", b_tok,
                              json={"answers": {"rating": 1}})
        assert s == 404, route
        s, _ = await dep.call("POST", f"/tester/assignments/{a['assignmentId']}/{route}", a_tok,
                              json={"answers": {"rating": 1}})
        assert s == 404, route  # the job's owner is not the assignment's tester
    s, _ = await dep.call("POST", f"/api/v2/admin/disputes/{jid}/resolve", a_tok, json={"testers": []})
    assert s == 401
    assert await snapshot() == before
    assert await ledger_cents(dep, a_id) == 10000 - 1950


async def test_openapi_documents_the_escrow_surface(deployment):
    s, doc = await deployment.call("GET", "/api/v2/openapi.json")
    assert s == 200
    paths = doc["paths"]
    for path, method in (("/jobs", "post"), ("/jobs", "get"), ("/jobs/{id}", "get"),
                         ("/owner/jobs/{id}/resize", "post"), ("/tester/jobs/{id}/assignments", "post"),
                         ("/tester/assignments/{id}/submit", "post"), ("/tester/profile", "put"),
                         ("/api/v2/admin/disputes/{job_id}/resolve", "post")):
        assert method in paths[path], (path, method)
    create = paths["/jobs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CreateJob"}
    schemas = doc["components"]["schemas"]
    for name in ("FeedbackQuestion", "PaymentRule", "Placement", "ScreenCaptureRule", "AudienceFilter",
                 "TechConstraint", "LegalAgreement", "Variant", "EscrowError"):
        assert name in schemas, name
    assert schemas["FeedbackQuestion"]["properties"]["inputType"]["enum"] == [
        "star_rating", "text", "single_choice", "multiple_choice", "yes_no"]
    assert paths["/api/v2/admin/disputes/{job_id}/resolve"]["post"]["security"] == [{"admin": []}]
