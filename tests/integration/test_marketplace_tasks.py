"""Tasks in manual mode: apply, submit gates, details, applicants review and pay-out, delete, reinitiate."""

from __future__ import annotations

import uuid

import pytest
from marketplace_fixtures import b64, funded_user, make_job

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def balance(dep, token: str) -> dict:
    status, body = await dep.call("GET", "/api/v2/user/balance", token)
    assert status == 200
    return body


async def submit(dep, token: str, job_id: str, proof: str = "done", **extra) -> tuple[int, dict]:
    return await dep.call("POST", "/api/v2/tasks/submit", token, json={"job_id": job_id, "job_proof": proof, **extra})


async def test_submit_details_and_confirm_pays_worker_and_referrer(deployment):
    _, employer = await funded_user(deployment, "emp", 10)
    referrer_id, referrer = await funded_user(deployment, "ref", 0)
    worker_id, worker = await funded_user(deployment, "Worker Bee", 0, country="IN", referrer_id=uuid.UUID(referrer_id))
    job_id = await make_job(deployment, employer, job_price=0.5, positions=2)
    status, body = await submit(deployment, worker, job_id, "proof-of-work")
    assert status == 201
    assert body["success"] is True and body["job_id"] == job_id
    task_id = body["job_task_id"]
    status, task = await deployment.call("POST", f"/api/v2/tasks/details?task_id={task_id}", worker)
    assert status == 200
    assert task["_id"] == task["job_task_id"] == task_id
    assert task["worker_id"] == worker_id and task["job_id"] == job_id
    assert task["job_title"] == "Create a Google account" and task["job_price"] == 0.5
    assert task["job_proof"] == "proof-of-work" and task["comment"] == ""
    assert task["country_code"] == "IN" and task["worker_ip"] == "127.0.0.1"
    assert task["status"] == "pending" and task["failureReason"] is None and task["reviewed"] is None
    assert task["device_owner_share"] is None and task["proof_files_info"] == []
    assert task["added"].endswith("Z") and task["updated"].endswith("Z")
    assert (await balance(deployment, worker))["pending_earnings"] == 0.5
    status, listing = await deployment.call("POST", "/api/v2/tasks/details", worker, json={"page": 1, "limit": 5})
    assert status == 200 and [t["_id"] for t in listing["tasks"]] == [task_id] and listing["counts"] == {"pending": 1}
    # the employer sees it among applicants
    status, apps = await deployment.call("POST", "/api/v2/jobs/applicants", employer, json={"job_id": job_id})
    assert status == 200
    assert apps["job"]["job_id"] == job_id and apps["total_tasks"] == 1 and apps["pending_tasks"] == 1
    assert apps["tasks"][0]["_id"] == task_id and apps["tasks"][0]["worker_name"] == "Worker Bee"
    assert apps["tasks"][0]["planned_task"] is None
    # confirm: worker +0.5, referrer +10 %
    status, body = await deployment.call("PUT", "/api/v2/jobs/applicants", employer, json={
        "JobTasks_Ids": [task_id], "status": "confirmed", "job_id": job_id, "comment": "great"})
    assert status == 200 and body["tasks"][0]["status"] == "confirmed" and body["tasks"][0]["comment"] == "great"
    assert await balance(deployment, worker) == {"balance": 0.5, "active_balance": 0.5, "pending_earnings": 0}
    assert (await balance(deployment, referrer))["active_balance"] == 0.05
    # confirming again pays nothing more; un-confirming is refused
    status, _ = await deployment.call("PUT", "/api/v2/jobs/applicants", employer, json={
        "JobTasks_Ids": [task_id], "status": "confirmed", "job_id": job_id})
    assert status == 200 and (await balance(deployment, worker))["active_balance"] == 0.5
    status, body = await deployment.call("PUT", "/api/v2/jobs/applicants", employer, json={
        "JobTasks_Ids": [task_id], "status": "declined", "job_id": job_id})
    assert status == 400 and "already confirmed" in body["error"]
    ledger_sum = await deployment.pool.fetchval("SELECT sum(amount) FROM ledger_entries WHERE user_id = $1",
                                                uuid.UUID(worker_id))
    assert str(ledger_sum) == "0.500000"
    status, job = await deployment.call("GET", "/api/v2/jobs/details", employer, params={"job_id": job_id})
    assert job["totla_tasks_count"] == 1 and job["tasks_confirmed_count"] == 1 and job["tasks_done_count"] == 1


async def test_applicants_filters_errors_and_isolation(deployment):
    _, employer = await funded_user(deployment)
    _, stranger = await funded_user(deployment)
    _, w1 = await funded_user(deployment, "Alice Searchable", 0)
    _, w2 = await funded_user(deployment, "Bob", 0)
    job_id = await make_job(deployment, employer, few_times=True)
    t1 = (await submit(deployment, w1, job_id, "alpha proof"))[1]["job_task_id"]
    t2 = (await submit(deployment, w2, job_id, "beta proof"))[1]["job_task_id"]
    call = deployment.call
    path = "/api/v2/jobs/applicants"

    async def ids(**body) -> list[str]:
        status, data = await call("POST", path, employer, json={"job_id": job_id, **body})
        assert status == 200, data
        return [t["_id"] for t in data["tasks"]]

    assert await ids(order="asc") == [t1, t2]
    assert await ids(order="desc") == [t2, t1]
    assert await ids(search="searchable") == [t1]
    assert await ids(search="beta") == [t2]
    assert await ids(task_id=t2) == [t2]
    assert await ids(status="confirmed") == []
    assert await ids(hours_ago=1, sortby="worker_name", order="asc") == [t1, t2]
    assert await ids(limit=1, page=2, order="asc") == [t2]
    await call("PUT", path, employer, json={"JobTasks_Ids": [t2], "status": "declined", "job_id": job_id})
    assert await ids(status="declined") == [t2]
    assert await call("POST", path, employer, json={"job_id": job_id, "task_id": "zz"}) == (
        400, {"error": "Invalid task_id format"})
    missing = str(uuid.uuid4())
    assert await call("POST", path, employer, json={"job_id": job_id, "task_id": missing}) == (
        404, {"error": f"task_id {missing} is neither a valid job task ID nor a planned task ID"})
    assert await call("POST", path, stranger, json={"job_id": job_id}) == (404, {"error": "Job with this Id not found"})
    assert (await call("POST", path, employer, json={"job_id": job_id, "sortby": "bogus"}))[0] == 400
    assert (await call("POST", path, employer, json={"job_id": job_id, "status": "bogus"}))[0] == 400
    assert (await call("POST", path, employer, json={}))[0] == 400
    assert (await call("PUT", path, employer, json={"JobTasks_Ids": [t1], "status": "bogus", "job_id": job_id}))[0] == 400
    assert await call("PUT", path, employer, json={"JobTasks_Ids": [missing], "status": "confirmed",
                                                    "job_id": job_id}) == (
        404, {"error": f"ID {missing} is neither a valid job task ID nor a planned task ID"})
    assert (await call("PUT", path, stranger, json={"JobTasks_Ids": [t1], "status": "confirmed",
                                                     "job_id": job_id}))[0] == 404


async def test_manual_gates(deployment):
    _, employer = await funded_user(deployment, amount=100)
    worker_id, worker = await funded_user(deployment, amount=0, country="FR", rating=3)
    # own job
    own = await make_job(deployment, employer)
    assert (await submit(deployment, employer, own))[0] == 400
    # rating
    job = await make_job(deployment, employer, min_rating=4)
    assert (await submit(deployment, worker, job))[0] == 403
    # country
    job = await make_job(deployment, employer, Target_Workers=["US"])
    status, body = await submit(deployment, worker, job)
    assert status == 403 and "country" in body["error"]
    # premium
    job = await make_job(deployment, employer, premium=True)
    assert (await submit(deployment, worker, job))[0] == 403
    # invited workers skip rating / country / premium
    job = await make_job(deployment, employer, premium=True, Target_Workers=["US"], min_rating=5,
                         Worker_Invites=[worker_id])
    assert (await submit(deployment, worker, job))[0] == 201
    # allowed workers
    job = await make_job(deployment, employer, allowed_workers=[str(uuid.uuid4())])
    assert (await submit(deployment, worker, job))[0] == 403
    # few_times false: once
    job = await make_job(deployment, employer)
    assert (await submit(deployment, worker, job))[0] == 201
    status, body = await submit(deployment, worker, job)
    assert status == 400 and "already submitted" in body["error"]
    # task_limit with few_times
    job = await make_job(deployment, employer, few_times=True, task_limit=2, positions=5)
    assert [(await submit(deployment, worker, job))[0] for _ in range(3)] == [201, 201, 400]
    # positions
    job = await make_job(deployment, employer, few_times=True, positions=1)
    assert (await submit(deployment, worker, job))[0] == 201
    status, body = await submit(deployment, worker, job)
    assert status == 400 and "positions" in body["error"]
    # daily limit
    job = await make_job(deployment, employer, few_times=True, daily_limit=1, positions=3)
    assert [(await submit(deployment, worker, job))[0] for _ in range(2)] == [201, 400]
    # inactive
    job = await make_job(deployment, employer)
    await deployment.call("PUT", "/api/v2/jobs/update-status", employer, json={"job_id": job, "status": "inactive"})
    assert (await submit(deployment, worker, job))[0] == 400
    # bad input
    assert (await submit(deployment, worker, str(uuid.uuid4())))[0] == 404
    assert (await submit(deployment, worker, "nope"))[0] == 400
    assert (await deployment.call("POST", "/api/v2/tasks/submit", worker, json={"job_id": job, "job_proof": 5}))[0] == 400
    assert (await submit(deployment, None, job))[0] == 401


async def test_job_variables_via_apply_and_custom_vars(deployment):
    _, employer = await funded_user(deployment)
    _, worker = await funded_user(deployment, amount=0)
    job_id = await make_job(deployment, employer, positions=2)
    status, body = await deployment.call("POST", "/api/v2/tasks/planned", employer, json={
        "job_id": job_id, "inputs": ['{"var1": "a"}', '{"var1": "b"}']})
    assert status == 200
    status, vars1 = await deployment.call("GET", "/api/v2/tasks/apply", worker, params={"job_id": job_id})
    assert status == 200 and vars1["var1"] in ("a", "b") and vars1["_id"]
    status, again = await deployment.call("GET", "/api/v2/tasks/apply", worker, params={"job_id": job_id})
    assert again == vars1  # the same reservation
    status, body = await submit(deployment, worker, job_id)
    assert status == 400 and "custom_vars" in body["error"]
    status, body = await submit(deployment, worker, job_id, custom_vars={"_id": str(uuid.uuid4())})
    assert status == 400
    status, body = await submit(deployment, worker, job_id, custom_vars=vars1)
    assert status == 201
    status, apps = await deployment.call("POST", "/api/v2/jobs/applicants", employer,
                                         json={"job_id": job_id, "task_id": vars1["_id"]})
    assert [t["_id"] for t in apps["tasks"]] == [body["job_task_id"]]
    assert apps["tasks"][0]["planned_task"]["planned_task_id"] == vars1["_id"]
    assert (await deployment.call("GET", "/api/v2/tasks/apply", worker, params={"job_id": "x"}))[0] == 400
    assert (await deployment.call("GET", "/api/v2/tasks/apply", worker,
                                  params={"job_id": str(uuid.uuid4())}))[0] == 404
    # a job without variables returns {}
    plain = await make_job(deployment, employer)
    assert await deployment.call("GET", "/api/v2/tasks/apply", worker, params={"job_id": plain}) == (200, {})


async def test_proof_files(deployment):
    _, employer = await funded_user(deployment)
    _, worker = await funded_user(deployment, amount=0)
    job_id = await make_job(deployment, employer, few_times=True,
                            files=[{"name": "screenshot", "required": True}, {"name": "extra", "required": False}])
    status, body = await submit(deployment, worker, job_id)
    assert status == 400 and "screenshot" in body["error"]
    status, body = await submit(deployment, worker, job_id, proof_files_base64=[
        {"fieldName": "other", "fileName": "a.png", "base64": b64(b"x")}])
    assert status == 400
    status, body = await submit(deployment, worker, job_id, proof_files_base64=[
        {"fieldName": "screenshot", "fileName": "a.png", "base64": "!!notbase64"}])
    assert status == 400 and "base64" in body["error"]
    status, body = await submit(deployment, worker, job_id, proof_files_base64=[
        {"fieldName": "screenshot", "fileName": "a.png", "base64": b64(b"\0" * (5 * 1024 * 1024 + 1))}])
    assert status == 400 and "5 MB" in body["error"]
    status, body = await submit(deployment, worker, job_id, proof_files_base64=[
        {"fieldName": "screenshot", "fileName": "shot.png", "base64": b64(b"PNGDATA")}])
    assert status == 201
    status, task = await deployment.call("POST", f"/api/v2/tasks/details?task_id={body['job_task_id']}", worker)
    info = task["proof_files_info"][0]
    assert info["fieldName"] == "screenshot" and info["fileName"] == "shot.png" and info["size"] == 7
    async with deployment.http.get(info["url"]) as r:
        assert r.status == 200 and await r.read() == b"PNGDATA"


async def test_task_details_isolation(deployment):
    _, employer = await funded_user(deployment)
    _, worker = await funded_user(deployment, amount=0)
    _, stranger = await funded_user(deployment, amount=0)
    job_id = await make_job(deployment, employer)
    task_id = (await submit(deployment, worker, job_id))[1]["job_task_id"]
    assert (await deployment.call("POST", f"/api/v2/tasks/details?task_id={task_id}", employer))[0] == 200
    assert await deployment.call("POST", f"/api/v2/tasks/details?task_id={task_id}", stranger) == (
        404, {"error": "Task not found"})
    assert (await deployment.call("POST", "/api/v2/tasks/details?task_id=bad", worker))[0] == 400
    status, listing = await deployment.call("POST", "/api/v2/tasks/details", stranger)
    assert status == 200 and listing["tasks"] == [] and listing["total"] == 0


async def test_delete_and_reinitiate(deployment):
    _, employer = await funded_user(deployment)
    _, worker = await funded_user(deployment, amount=0)
    _, stranger = await funded_user(deployment, amount=0)
    job_id = await make_job(deployment, employer, few_times=True, positions=3)
    await deployment.call("POST", "/api/v2/tasks/planned", employer, json={"job_id": job_id, "inputs": ['{"v": 1}']})
    vars1 = (await deployment.call("GET", "/api/v2/tasks/apply", worker, params={"job_id": job_id}))[1]
    task_id = (await submit(deployment, worker, job_id, custom_vars=vars1))[1]["job_task_id"]
    planned_id = vars1["_id"]
    call = deployment.call
    assert await call("DELETE", "/api/v2/tasks/delete", employer, json={"task_id": planned_id}) == (
        400, {"success": False, "message": "Cannot delete job task with status 'pending'. Only tasks with status:"
                                           " failed, declined can be deleted."})
    assert await call("POST", "/api/v2/tasks/reinitiate", employer, json={"task_id": task_id}) == (
        400, {"success": False, "message": "Cannot reinitiate task with status 'pending'. Only failed or declined"
                                           " tasks can be reinitiated."})
    await call("PUT", "/api/v2/jobs/applicants", employer,
               json={"JobTasks_Ids": [planned_id], "status": "declined", "job_id": job_id})
    assert await call("DELETE", "/api/v2/tasks/delete", stranger, json={"task_id": task_id}) == (
        403, {"success": False, "message": "You don't have permission to delete this job task"})
    assert await call("POST", "/api/v2/tasks/reinitiate", stranger, json={"task_ids": [task_id]}) == (
        403, {"success": False, "message": "You don't have permission to reinitiate this task"})
    assert await call("POST", "/api/v2/tasks/reinitiate", employer, json={"task_ids": [task_id]}) == (
        200, {"success": True, "message": "Task successfully reinitiated"})
    # the planned task is free again (listed), so deleting via it now says it has no job task
    status, listing = await call("GET", "/api/v2/tasks/planned", employer, params={"job_id": job_id})
    assert [p["planned_task_id"] for p in listing["data"]["plannedTasks"]] == [planned_id]
    assert await call("DELETE", "/api/v2/tasks/delete", employer, json={"task_id": planned_id}) == (
        400, {"success": False, "error": f"Planned task {planned_id} exists but has no associated job task"
                                         " (job_task_id is null)"})
    assert await call("POST", "/api/v2/tasks/reinitiate", employer, json={"task_id": task_id}) == (
        404, {"success": False, "message": "No planned task is associated with this job task"})
    assert await call("DELETE", "/api/v2/tasks/delete", employer, json={"task_id": task_id}) == (
        200, {"success": True, "message": "Job task deleted successfully"})
    missing = str(uuid.uuid4())
    assert await call("DELETE", "/api/v2/tasks/delete", employer, json={"task_id": missing}) == (
        404, {"success": False, "error": f"task_id {missing} is neither a valid job task ID nor a planned task ID"})
    assert await call("DELETE", "/api/v2/tasks/delete", employer, json={"task_id": "x"}) == (
        400, {"success": False, "error": "Invalid task id"})
    assert (await call("POST", "/api/v2/tasks/reinitiate", employer, json={"task_id": missing}))[0] == 404
    assert (await call("POST", "/api/v2/tasks/reinitiate", employer, json={}))[0] == 400
    assert await deployment.pool.fetchval("SELECT count(*) FROM planned_tasks WHERE id = $1",
                                          uuid.UUID(planned_id)) == 1
