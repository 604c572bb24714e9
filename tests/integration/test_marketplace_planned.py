"""Planned tasks, assignment to online devices, agent tokens and the automation data-dump mode."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import asyncpg
import orjson
import pytest
import pytest_asyncio
from conftest import fresh_deployment
from marketplace_fixtures import b64, funded_user, make_automation, make_job

from marketplace_api.agent_auth import authenticate_agent
from marketplace_api.assignment import assign
from proxyorch.tokens import hash_token

pytestmark = pytest.mark.asyncio(loop_scope="session")

VARS = {"job_variables_schema": {"fields": [{"name": "email", "type": "string", "required": True, "max": 50}]},
        "bucket_schema": {"fields": [{"name": "sessionToken", "type": "string"}]}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def quiet(pg_root, tmp_path_factory):
    """A node of its own whose background assigner stays out of the way, with short retry delays."""
    dep = await fresh_deployment(pg_root, tmp_path_factory.mktemp("planned"), ASSIGN_RETRY_DELAY_S="0.2",
                                 ASSIGN_SWEEP_INTERVAL_S="3600")
    yield dep
    await dep.close()
    await dep.node.stop()


async def automation_job(dep, token: str, automation_id: str | None = None, **overrides) -> tuple[str, str]:
    automation_id = automation_id or await make_automation(dep, **VARS)
    job_id = await make_job(dep, token, job_type="devices_automation", automation_id=automation_id,
                            positions=overrides.pop("positions", 20), **overrides)
    return job_id, automation_id


def inputs(n: int) -> list[str]:
    return [orjson.dumps({"email": f"u{i}@example.com"}).decode() for i in range(n)]


async def test_planned_submit_list_delete(quiet):
    dep = quiet
    _, owner = await funded_user(dep)
    _, stranger = await funded_user(dep)
    job_id, _ = await automation_job(dep, owner, positions=3)
    status, body = await dep.call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": inputs(2)})
    assert status == 200 and body["success"] is True and "assignment_results" not in body
    assert [i["input"] for i in body["inserted_ids"]] == inputs(2)
    ids = [i["planned_task_id"] for i in body["inserted_ids"]]
    assert await dep.call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": inputs(2)}) == (
        400, {"success": False, "message": "No enough positions left. Received 1 tasks in excess."})
    status, body = await dep.call("POST", "/api/v2/tasks/planned", owner,
                                  json={"job_id": job_id, "inputs": ['{"email": 5}']})
    assert status == 400 and body["errors"] == ["email: must be of type string"]
    status, body = await dep.call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": ["{}"]})
    assert status == 400 and body["errors"] == ["email: is required"]
    assert (await dep.call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": []}))[0] == 400
    assert (await dep.call("POST", "/api/v2/tasks/planned", owner,
                           json={"job_id": job_id, "inputs": ["x" * 10_001]}))[0] == 400
    assert await dep.call("POST", "/api/v2/tasks/planned", owner, json={"job_id": "bad", "inputs": ["a"]}) == (
        400, {"success": False, "error": "Invalid job id"})
    assert await dep.call("POST", "/api/v2/tasks/planned", stranger, json={"job_id": job_id, "inputs": ["a"]}) == (
        404, {"success": False, "error": "Job not found"})
    # listing
    status, body = await dep.call("GET", "/api/v2/tasks/planned", owner, params={"job_id": job_id})
    assert status == 200 and body["success"] is True and body["data"]["total"] == 2
    assert body["data"]["job"]["job_id"] == job_id
    assert [p["planned_task_id"] for p in body["data"]["plannedTasks"]] == ids[::-1]
    first = body["data"]["plannedTasks"][-1]
    assert set(first) >= {"planned_task_id", "job_id", "input", "added"}
    status, body = await dep.call("GET", "/api/v2/tasks/planned", owner,
                                  params={"job_id": job_id, "sortOrder": "asc", "limit": "1", "search": "U1@"})
    assert [p["planned_task_id"] for p in body["data"]["plannedTasks"]] == [ids[1]] and body["data"]["total"] == 1
    for bad in ({"job_id": "x"}, {"job_id": job_id, "limit": "101"}, {"job_id": job_id, "sortOrder": "up"},
                {"job_id": job_id, "page": "0"}):
        status, body = await dep.call("GET", "/api/v2/tasks/planned", owner, params=bad)
        assert status == 400 and body["success"] is False
    assert await dep.call("GET", "/api/v2/tasks/planned", stranger, params={"job_id": job_id}) == (
        404, {"success": False, "error": "Job not found"})
    # deleting
    assert await dep.call("DELETE", "/api/v2/tasks/planned", stranger, json={"planned_task_ids": ids}) == (
        404, {"success": False, "message": "Planned task not found"})
    assert (await dep.call("DELETE", "/api/v2/tasks/planned", owner, json={"planned_task_ids": ["x"]}))[0] == 400
    assert await dep.call("DELETE", "/api/v2/tasks/planned", owner, json={"planned_task_ids": ids[:1]}) == (
        200, {"success": True})
    status, body = await dep.call("GET", "/api/v2/tasks/planned", owner, params={"job_id": job_id})
    assert body["data"]["total"] == 1


async def test_pinning_validation(quiet):
    dep = quiet
    _, owner = await funded_user(dep)
    _, stranger = await funded_user(dep)
    foreign = await dep.device(stranger)
    job_id, _ = await automation_job(dep, owner)
    for extra, code in (({"remote_device_id": "nope"}, 400), ({"remote_device_id": str(uuid.uuid4())}, 404),
                        ({"remote_device_id": foreign["remote_device_id"]}, 404),
                        ({"device_name": foreign["name"]}, 404), ({"device_name": "No Such Device"}, 404)):
        status, body = await dep.call("POST", "/api/v2/tasks/planned", owner,
                                      json={"job_id": job_id, "inputs": inputs(1), **extra})
        assert status == code and body["success"] is False, extra


async def test_run_immediately_assigns_to_pinned_online_device_and_mints_agent_token(quiet):
    dep = quiet
    owner_id, owner = await funded_user(dep)
    device = await dep.device(owner)
    other = await dep.device(owner)
    await dep.agent(device, "--allow-private")
    job_id, _ = await automation_job(dep, owner)
    status, body = await dep.call("POST", "/api/v2/tasks/planned", owner, json={
        "job_id": job_id, "inputs": inputs(1), "device_name": device["name"], "run_immediately": True})
    assert status == 200, body
    planned_id = body["inserted_ids"][0]["planned_task_id"]
    assert body["assignment_results"] == [{"planned_task_id": planned_id, "assigned": True}]
    task = await dep.pool.fetchrow("SELECT * FROM job_tasks WHERE planned_task_id = $1", uuid.UUID(planned_id))
    assert task["status"] == "running" and str(task["remote_device_id"]) == device["remote_device_id"]
    assert str(task["worker_id"]) == owner_id
    tokens = await dep.pool.fetch("SELECT * FROM agent_tokens WHERE job_task_id = $1", task["id"])
    # one token from the assignment, plus one more when the node delivers the task over the tunnel
    assert 1 <= len(tokens) <= 2
    assert all(len(bytes(t["token_hash"])) == 32 and not t["revoked"] for t in tokens)
    # the busy device is not available on the market
    await dep.pool.execute("UPDATE devices SET is_on_market = true, payment_type = 'action' WHERE remote_device_id"
                           " = $1", uuid.UUID(device["remote_device_id"]))
    status, market = await dep.call("GET", "/api/v2/devices/market", owner)
    assert {"name": device["name"], "country": None, "isAvailable": False} in market
    # pinned to an offline device: three attempts, then reported unassigned (and left for later)
    status, body = await dep.call("POST", "/api/v2/tasks/planned", owner, json={
        "job_id": job_id, "inputs": inputs(1), "remote_device_id": other["remote_device_id"],
        "run_immediately": True})
    assert status == 200 and body["assignment_results"][0]["assigned"] is False
    # applicants accept the planned task id and resolve it to its job task
    status, apps = await dep.call("POST", "/api/v2/jobs/applicants", owner, json={"job_id": job_id,
                                                                                "task_id": planned_id})
    assert [t["_id"] for t in apps["tasks"]] == [str(task["id"])] and apps["tasks"][0]["status"] == "running"
    unassigned = body["inserted_ids"][0]["planned_task_id"]
    status, apps = await dep.call("POST", "/api/v2/jobs/applicants", owner, json={"job_id": job_id,
                                                                                "task_id": unassigned})
    assert (status, apps) == (400, {"error": f"Planned task {unassigned} exists but has no associated job task"
                                             " (job_task_id is null)"})
    # a running (pending / successful) planned task cannot be deleted
    assert await dep.call("DELETE", "/api/v2/tasks/planned", owner, json={"planned_task_ids": [planned_id]}) == (
        400, {"success": False,
              "message": "Cannot delete a planned task that is assigned to a pending / successful job task"})


async def test_fifty_concurrent_assignments_of_ten_planned_tasks(quiet):
    dep = quiet
    _, owner = await funded_user(dep)
    devices = [await dep.device(owner) for _ in range(12)]
    # presence as the tunnel would record it (the real agent path is covered above)
    await dep.pool.execute("UPDATE devices SET online = true WHERE remote_device_id = ANY($1::uuid[])",
                           [uuid.UUID(d["remote_device_id"]) for d in devices])
    job_id, _ = await automation_job(dep, owner)
    status, body = await dep.call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": inputs(10)})
    planned = {i["planned_task_id"] for i in body["inserted_ids"]}
    pool = await asyncpg.create_pool(dep.node.database_url, min_size=10, max_size=50)
    try:
        results = await asyncio.gather(*(assign(pool, job_id=job_id) for _ in range(50)))
    finally:
        await pool.close()
    won = [r for r in results if r is not None]
    assert len(won) == 10
    assert {r.planned_task_id for r in won} == planned
    assert len({r.remote_device_id for r in won}) == 10  # one running task per device
    rows = await dep.pool.fetch("SELECT planned_task_id, remote_device_id FROM job_tasks WHERE job_id = $1",
                                uuid.UUID(job_id))
    assert len(rows) == 10 and max(Counter(r["planned_task_id"] for r in rows).values()) == 1
    assert await dep.pool.fetchval("SELECT count(*) FROM planned_tasks WHERE job_id = $1 AND job_task_id IS NULL",
                                   uuid.UUID(job_id)) == 0
    # agent tokens resolve to their task and device, and only the hash is stored
    for r in won[:3]:
        ident = await authenticate_agent(dep.pool, r.agent_token)
        assert ident is not None and ident.job_task_id == r.job_task_id
        assert ident.remote_device_id == r.remote_device_id and ident.job_id == job_id
        assert await dep.pool.fetchval("SELECT count(*) FROM agent_tokens WHERE token_hash = $1",
                                       hash_token(r.agent_token)) == 1
    assert await authenticate_agent(dep.pool, "agt_forged") is None
    # an agent token is not a user token
    assert (await dep.call("GET", "/api/v2/user/balance", won[0].agent_token))[0] == 401
    assert (await dep.call("POST", "/api/v2/jobs/myjobs", won[0].agent_token, json={}))[0] == 401
    # but it carries its device context for the device bucket
    status, body = await dep.call("POST", "/api/v2/device-bucket/merge", won[0].agent_token, json={"data": {"k": 1}})
    assert (status, body) == (200, {"success": True, "deviceBucket": {"k": 1}})
    status, body = await dep.call("POST", "/api/v2/device-bucket/read", owner,
                                  json={"remote_device_id": won[0].remote_device_id})
    assert body == {"deviceBucket": {"k": 1}}
    await dep.pool.execute("UPDATE devices SET online = false WHERE remote_device_id = ANY($1::uuid[])",
                           [uuid.UUID(d["remote_device_id"]) for d in devices])


async def _running_agent(dep, owner: str, automation_id: str) -> tuple[str, object]:
    device = await dep.device(owner)
    await dep.pool.execute("UPDATE devices SET online = true WHERE remote_device_id = $1",
                           uuid.UUID(device["remote_device_id"]))
    job_id, _ = await automation_job(dep, owner, automation_id)
    await dep.call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": inputs(1)})
    result = await assign(dep.pool, job_id=job_id)
    assert result is not None
    return job_id, result


async def test_data_dump_mode(quiet):
    dep = quiet
    owner_id, owner = await funded_user(dep)
    _, other_owner = await funded_user(dep)
    automation_id = await make_automation(dep, **VARS)
    parent_job, running = await _running_agent(dep, owner, automation_id)
    sink, _ = await automation_job(dep, owner, automation_id, positions=5)
    token = running.agent_token
    call = dep.call
    status, body = await call("POST", "/api/v2/tasks/submit", token, json={
        "job_id": sink, "job_proof": orjson.dumps({"email": "lead@example.com"}).decode(),
        "files": [{"name": "snapshot", "extension": ".jpg", "base64Data": b64(b"JPEG")}]})
    assert status == 201, body
    assert body["success"] is True and body["job_id"] == sink
    task = await dep.pool.fetchrow("SELECT * FROM job_tasks WHERE id = $1", uuid.UUID(body["job_task_id"]))
    proof = orjson.loads(task["job_proof"])
    assert proof["email"] == "lead@example.com" and proof["snapshot"].endswith(".jpg")
    assert task["status"] == "pending" and str(task["remote_device_id"]) == running.remote_device_id
    assert str(task["worker_id"]) == owner_id and str(task["parent_task_id"]) == running.job_task_id
    async with dep.http.get(proof["snapshot"]) as r:
        assert r.status == 200 and await r.read() == b"JPEG"
    status, body = await call("POST", "/api/v2/tasks/submit", token,
                              json={"job_id": sink, "job_proof": "{}", "status": "failed"})
    assert status == 201
    # validation
    for payload in ({"job_proof": "not json"}, {"job_proof": "{}", "status": "confirmed"}, {"job_proof": 7},
                    {"job_proof": "{}", "files": [{"name": "a", "extension": ".png", "base64Data": "@@"}]},
                    {"job_proof": "[]", "files": [{"name": "a", "extension": ".png", "base64Data": b64(b"x")}]},
                    {"job_proof": "{}", "files": [{"name": "a", "extension": "../x", "base64Data": b64(b"x")}]},
                    {"job_proof": "{}", "files": [{"name": "a", "extension": "png",
                                                   "base64Data": b64(b"\0" * (5 * 1024 * 1024 + 1))}]}):
        status, body = await call("POST", "/api/v2/tasks/submit", token, json={"job_id": sink, **payload})
        assert status == 400 and body["success"] is False, payload
    # authorization
    status, body = await call("POST", "/api/v2/tasks/submit", owner, json={"job_id": sink, "job_proof": "{}"})
    assert status == 403 and "running agent" in body["error"]
    other_sink, _ = await automation_job(dep, owner)  # another automation
    status, body = await call("POST", "/api/v2/tasks/submit", token, json={"job_id": other_sink, "job_proof": "{}"})
    assert status == 403 and "automation_id" in body["error"]
    foreign_sink, _ = await automation_job(dep, other_owner, automation_id)
    status, body = await call("POST", "/api/v2/tasks/submit", token, json={"job_id": foreign_sink, "job_proof": "{}"})
    assert status == 403 and "access" in body["error"]
    shared_sink, _ = await automation_job(dep, other_owner, automation_id, shared_view=[owner_id])
    status, _ = await call("POST", "/api/v2/tasks/submit", token, json={"job_id": shared_sink, "job_proof": "{}"})
    assert status == 201
    # once the running task is finished its token stops working
    await call("PUT", "/api/v2/jobs/applicants", owner, json={"JobTasks_Ids": [running.job_task_id],
                                                             "status": "failed", "job_id": parent_job})
    status, _ = await call("POST", "/api/v2/tasks/submit", token, json={"job_id": sink, "job_proof": "{}"})
    assert status == 403
