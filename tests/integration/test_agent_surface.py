"""The automation-agent surface through the SDK: every call's success shape, and the failure shape
``{success: false, error}`` for finished tasks, foreign ids, too many ids, forbidden targets and
callers without access; agent tokens versus user tokens; useAnotherTask under concurrency."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
import pytest_asyncio
from conftest import fresh_deployment
from marketplace_fixtures import b64, funded_user, make_automation, make_job

from marketplace_api.assignment import assign
from marketplace_api.sdk import Agent, UserClient

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCHEMAS = {"job_variables_schema": {"fields": [{"name": "email", "type": "string", "required": True}]},
           "bucket_schema": {"fields": [{"name": "cookie", "type": "string"}]}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dep(pg_root, tmp_path_factory):
    """A node of its own; nothing is assigned behind the tests' backs, run_immediately retries fast."""
    d = await fresh_deployment(pg_root, tmp_path_factory.mktemp("agent"), ASSIGN_RETRY_DELAY_S="0.1",
                               ASSIGN_SWEEP_INTERVAL_S="3600")
    yield d
    await d.close()
    await d.node.stop()


def inputs(*emails: str) -> list[str]:
    return [orjson.dumps({"email": e}).decode() for e in emails]


async def online_devices(dep, token: str, n: int) -> list[dict]:
    devices = [await dep.device(token) for _ in range(n)]
    await dep.pool.execute("UPDATE devices SET online = true WHERE remote_device_id = ANY($1::uuid[])",
                           [uuid.UUID(d["remote_device_id"]) for d in devices])
    return devices


async def automation_job(dep, token: str, automation_id: str, **overrides) -> str:
    return await make_job(dep, token, job_type="devices_automation", automation_id=automation_id,
                          positions=overrides.pop("positions", 50), **overrides)


async def running_tasks(dep, token: str, job_id: str, n: int, devices: int | None = None) -> list:
    """``n`` running tasks of ``job_id`` on fresh online devices, with their agent tokens."""
    await online_devices(dep, token, devices or n)
    emails = [f"u{i}@example.com" for i in range(n)]
    status, body = await dep.call("POST", "/api/v2/tasks/planned", token,
                                  json={"job_id": job_id, "inputs": inputs(*emails)})
    assert status == 200, body
    out = []
    for _ in range(n):
        result = await assign(dep.pool, job_id=job_id)
        assert result is not None
        out.append(result)
    return out


def agent_for(dep, assignment) -> Agent:  # noqa: ANN001
    return Agent(dep.node.api, assignment.agent_token)


async def test_every_call_and_its_failure_shapes(dep):
    owner_id, owner = await funded_user(dep, "owner")
    stranger_id, stranger = await funded_user(dep, "stranger")
    automation_id = await make_automation(dep, **SCHEMAS)
    other_automation = await make_automation(dep, **SCHEMAS)
    job_id = await automation_job(dep, owner, automation_id)
    first, second = await running_tasks(dep, owner, job_id, 2)
    api = dep.node.api
    async with agent_for(dep, first) as agent, agent_for(dep, second) as other, \
            UserClient(api, owner) as employer, Agent(api, owner) as user_as_agent:
        job = agent.utils.job
        # -- getCurrentTask
        task = await job.getCurrentTask()
        assert task["success"] is True and task["parent_task_id"] == first.job_task_id
        assert task["job_proof"] == {"email": "u0@example.com"} and task["timeout"] == 3600
        assert task["job_id"] == job_id
        # -- a user token is not an agent token (and an agent token is not a user token)
        res = await user_as_agent.utils.job.getCurrentTask()
        assert res["success"] is False and "agent token" in res["error"]
        assert await Agent(api, "agt_forged").utils.job.getCurrentTask() == {"success": False,
                                                                             "error": "Invalid agent token"}
        async with UserClient(api, first.agent_token) as agent_as_user:
            assert (await agent_as_user.balance())["success"] is False
            assert (await agent_as_user.getApplicants(job_id))["success"] is False
            res = await agent_as_user.launchAutomation(first.remote_device_id, "start", "x")
            assert res["success"] is False

        # -- addSubTasks: the three call forms, device pinning
        res = await job.addSubTasks([{"email": "a@example.com"}, {"email": "b@example.com"}], False)
        assert res["success"] is True and "assignment_results" not in res
        assert [i["input"] for i in res["inserted_ids"]] == inputs("a@example.com", "b@example.com")
        mine = [i["planned_task_id"] for i in res["inserted_ids"]]
        res = await job.addSubTasks([{"email": "c@example.com"}], False, job_id)
        assert res["success"] is True
        mine.append(res["inserted_ids"][0]["planned_task_id"])
        res = await job.addSubTasks({"job_variables": [{"email": "d@example.com"}], "run_immediately": False,
                                     "remote_device_id": second.remote_device_id})
        assert res["success"] is True
        pinned = res["inserted_ids"][0]["planned_task_id"]
        mine.append(pinned)
        assert str(await dep.pool.fetchval("SELECT remote_device_id FROM planned_tasks WHERE id = $1",
                                           uuid.UUID(pinned))) == second.remote_device_id
        rows = await dep.pool.fetch("SELECT parent_task_id FROM planned_tasks WHERE id = ANY($1::uuid[])",
                                    [uuid.UUID(p) for p in mine])
        assert {str(r["parent_task_id"]) for r in rows} == {first.job_task_id}
        # run_immediately with no idle device: reported unassigned
        res = await job.addSubTasks([{"email": "e@example.com"}])
        assert res["success"] is True and res["assignment_results"][0]["assigned"] is False
        mine.append(res["inserted_ids"][0]["planned_task_id"])
        # addSubTasks failures
        foreign_device = (await dep.device(stranger))["remote_device_id"]
        for args, needle in (
                (([{"email": 5}],), "email"),
                (([],), "job_variables"),
                (({"run_immediately": False},), "job_variables"),
                (({"job_variables": [{"email": "x@example.com"}], "remote_device_id": foreign_device},),
                 "Device not found"),
                (([{"email": "x@example.com"}], False, str(uuid.uuid4())), "Job not found"),
                (([{"email": "x@example.com"}], False, "not-an-id"), "Invalid job_id")):
            res = await job.addSubTasks(*args)
            assert res["success"] is False and needle in res["error"], (args, res)
        no_subtasks = await automation_job(dep, owner, automation_id)
        res = await job.addSubTasks([{"email": "x@example.com"}], False, no_subtasks)
        assert res == {"success": False,
                       "error": "The target job does not allow sub tasks (allow_sub_tasks is off)"}
        foreign_job = await automation_job(dep, stranger, automation_id, allow_sub_tasks=True)
        res = await job.addSubTasks([{"email": "x@example.com"}], False, foreign_job)
        assert res["success"] is False and "shared_edit" in res["error"]
        shared_job = await automation_job(dep, stranger, automation_id, allow_sub_tasks=True,
                                          shared_edit=[owner_id])
        res = await job.addSubTasks([{"email": "x@example.com"}], False, shared_job)
        assert res["success"] is True
        mine.append(res["inserted_ids"][0]["planned_task_id"])
        full = await automation_job(dep, owner, automation_id, positions=1, allow_sub_tasks=True)
        res = await job.addSubTasks([{"email": "x@example.com"}, {"email": "y@example.com"}], False, full)
        assert res == {"success": False, "error": "No enough positions left. Received 1 tasks in excess."}

        # -- getSubTasks: statuses, foreign ids, more than 100 ids
        res = await job.getSubTasks(mine)
        assert res["success"] is True and set(res["tasks"]) == set(mine)
        assert {t["status"] for t in res["tasks"].values()} == {"planned"}
        assert all(t["parent_task_id"] == first.job_task_id and t["job_proof"] is None
                   for t in res["tasks"].values())
        theirs = (await other.utils.job.addSubTasks([{"email": "o@example.com"}], False))["inserted_ids"]
        res = await job.getSubTasks([mine[0], theirs[0]["planned_task_id"]])
        assert res["success"] is False and theirs[0]["planned_task_id"] in res["error"]
        res = await job.getSubTasks([first.planned_task_id])  # a planned task, but not a sub-task of mine
        assert res["success"] is False and "Not sub-tasks" in res["error"]
        res = await job.getSubTasks([str(uuid.uuid4()) for _ in range(101)])
        assert res == {"success": False, "error": "At most 100 planned_task_ids per call (got 101)"}
        assert (await job.getSubTasks(["nope"]))["success"] is False
        assert (await job.getSubTasks([]))["success"] is False
        # a deleted planned task reads "deleted"; an assigned one its job task's status
        assert (await employer.deletePlannedTasks([mine[1]]))["success"] is True
        await online_devices(dep, owner, 1)
        assert (await assign(dep.pool, planned_task_id=mine[0])) is not None
        res = await job.getSubTasks(mine[:2])
        assert res["tasks"][mine[0]]["status"] == "running" and res["tasks"][mine[1]]["status"] == "deleted"
        assert res["tasks"][mine[0]]["job_proof"] == {"email": "a@example.com"}

        # -- submitTaskToAnotherJob (data-dump mode)
        sink = await automation_job(dep, owner, automation_id, positions=5)
        res = await job.submitTaskToAnotherJob(sink, {"lead": 1})
        assert res["success"] is True and res["job_id"] == sink
        assert set(res) == {"success", "job_task_id", "job_id"}
        shot = [{"name": "shot", "extension": "png", "base64Data": b64(b"img")}]
        res = await job.submitTaskToAnotherJob(sink, {"lead": 2}, "failed", shot)
        assert res["success"] is True
        other_sink = await automation_job(dep, owner, other_automation, positions=5)
        res = await job.submitTaskToAnotherJob(other_sink, {"lead": 3})
        assert res["success"] is False and "automation_id" in res["error"]
        foreign_sink = await automation_job(dep, stranger, automation_id, positions=5)
        res = await job.submitTaskToAnotherJob(foreign_sink, {"lead": 4})
        assert res["success"] is False and "access" in res["error"]
        res = await job.submitTaskToAnotherJob(sink, {"lead": 5}, "confirmed")
        assert res["success"] is False and "status" in res["error"]
        res = await user_as_agent.utils.job.submitTaskToAnotherJob(sink, {"lead": 6})
        assert res["success"] is False and "running agent" in res["error"]

        # -- automation variables
        assert await agent.utils.getAutomationVariables() == {"success": True, "automation_variables": {}}
        assert await agent.utils.setAutomationVariables({"stage": "one", "n": 1}) == {
            "success": True, "automation_variables": {"stage": "one", "n": 1}}
        res = await agent.utils.getAutomationVariables()
        assert res["automation_variables"] == {"stage": "one", "n": 1}
        assert (await other.utils.getAutomationVariables())["automation_variables"] == {}
        status, body = await dep.call("PUT", "/api/v2/agent/variables", first.agent_token, json={"x": 1})
        assert status == 400 and body["success"] is False

        # -- buckets: this job on this device; the device bucket
        assert (await agent.utils.bucket.get())["data"] == {}
        res = await agent.utils.bucket.set({"cookie": "abc"})
        assert res["success"] is True and res["data"] == {"cookie": "abc"}
        assert (await agent.utils.bucket.get())["data"] == {"cookie": "abc"}
        assert (await other.utils.bucket.get())["data"] == {}
        res = await agent.utils.bucket.set({"cookie": 5})
        assert res["success"] is False and res["error"] == "Invalid bucket data"
        bucket = await employer.getJobBucket(job_id, first.remote_device_id)
        assert bucket["bucket"]["data"] == {"cookie": "abc"}
        assert (await agent.utils.deviceBucket.merge({"k": 1}))["deviceBucket"] == {"k": 1}
        assert (await agent.utils.deviceBucket.read())["deviceBucket"] == {"k": 1}

        # -- verified phone number
        assert await agent.info.getVerifiedPhoneNumber() is None
        await dep.pool.execute("UPDATE devices SET phone_number = '+14155550123',"
                               " phone_number_verified = true WHERE remote_device_id = $1",
                               uuid.UUID(first.remote_device_id))
        assert await agent.info.getVerifiedPhoneNumber() == "+14155550123"
        status, body = await dep.call("GET", "/api/v2/devices/verified-phone-number", first.agent_token)
        assert (status, body) == (200, {"phoneNumber": "+14155550123"})
        status, body = await dep.call("GET", "/api/v2/devices/verified-phone-number", second.agent_token)
        assert (status, body) == (200, None)
        status, body = await dep.call("GET", "/api/v2/devices/verified-phone-number", owner)
        assert status == 400 and body["success"] is False and "not bound to a device" in body["error"]
        assert (await dep.call("GET", "/api/v2/devices/verified-phone-number", "nope"))[0] == 401
        assert (await dep.call("GET", "/api/v2/devices/verified-phone-number"))[0] == 401
        res = await user_as_agent.info.getVerifiedPhoneNumber()
        assert res["success"] is False and "not bound" in res["error"]

        # -- submitTask: progress, validation, the final submission, then nothing more
        assert await job.submitTask("running", {"step": 1}, False, [
            {"name": "ignored", "extension": "png", "base64Data": "not base64 at all"}]) == {"success": True}
        row = await dep.pool.fetchrow("SELECT * FROM job_tasks WHERE id = $1", uuid.UUID(first.job_task_id))
        assert row["status"] == "running" and row["automation_status"] == "running"
        assert orjson.loads(row["job_proof"]) == {"step": 1}
        for args, needle in ((("done", {}, True, []), "automationStatus"),
                             (("running", {}, True, []), "cannot finish"),
                             (("success", [1], True, []), "data"),
                             (("success", {}, True, [{"name": "x", "extension": "png", "base64Data": "@@"}]),
                              "base64")):
            res = await job.submitTask(*args)
            assert res["success"] is False and needle in res["error"], (args, res)
        res = await job.submitTask("declined", {"reason": "Item out of stock"}, True, [])
        assert res == {"success": True}
        row = await dep.pool.fetchrow("SELECT * FROM job_tasks WHERE id = $1", uuid.UUID(first.job_task_id))
        assert row["status"] == "declined" and row["finished"]
        assert row["failure_reason"] == "Item out of stock"
        assert await dep.pool.fetchval("SELECT bool_and(revoked) FROM agent_tokens WHERE job_task_id = $1",
                                       uuid.UUID(first.job_task_id))
        # every method of a finished task answers the failure shape
        finished = [await job.submitTask("success", {}, True, []), await job.getCurrentTask(),
                    await job.addSubTasks([{"email": "z@example.com"}], False),
                    await job.getSubTasks(mine[:1]),
                    await job.submitTaskToAnotherJob(sink, {"late": True}), await job.useAnotherTask(),
                    await agent.utils.getAutomationVariables(), await agent.utils.setAutomationVariables({}),
                    await agent.utils.bucket.get(), await agent.utils.bucket.set({})]
        for res in finished:
            assert res["success"] is False and isinstance(res["error"], str), res
        assert "finished" in finished[0]["error"] and "finished" in finished[1]["error"]
        phone = await agent.info.getVerifiedPhoneNumber()
        assert phone["success"] is False
        # the other task is untouched
        assert (await other.utils.job.getCurrentTask())["success"] is True
        # timeouts: an expired task's token is refused too
        await dep.pool.execute("UPDATE job_tasks SET added = now() - interval '2 hours' WHERE id = $1",
                               uuid.UUID(second.job_task_id))
        from marketplace_api.assignment import expire_running

        assert await expire_running(dep.pool) >= 1
        res = await other.utils.job.getCurrentTask()
        assert res["success"] is False and "finished" in res["error"]


async def test_use_another_task_hands_each_waiting_task_out_once(dep):
    _, owner = await funded_user(dep, "coordinator")
    automation_id = await make_automation(dep, **SCHEMAS)
    job_id = await automation_job(dep, owner, automation_id)
    tasks = await running_tasks(dep, owner, job_id, 25)
    waiting, callers = tasks[:5], tasks[5:]
    api = dep.node.api
    for i, t in enumerate(waiting):
        async with agent_for(dep, t) as a:
            res = await a.utils.job.submitTask("running", {"preparedData": i}, False, [])
            assert res == {"success": True}
            assert (await a.utils.setAutomationVariables({"waiting": True, "stage": "ready"}))["success"]
    # a task of another job is never handed out
    other_job = await automation_job(dep, owner, automation_id)
    (stray,) = await running_tasks(dep, owner, other_job, 1)
    async with agent_for(dep, stray) as a:
        assert (await a.utils.setAutomationVariables({"waiting": True}))["success"]
    agents = [Agent(api, t.agent_token) for t in callers]
    try:
        results = await asyncio.gather(*(a.utils.job.useAnotherTask() for a in agents))
    finally:
        for a in agents:
            await a.close()
    got = [r for r in results if r is not None]
    assert len(got) == 5 and results.count(None) == 15
    assert sorted(r["job_task_id"] for r in got) == sorted(t.job_task_id for t in waiting)
    by_id = {t.job_task_id: i for i, t in enumerate(waiting)}
    for r in got:
        assert set(r) == {"job_task_id", "job_proof"}
        assert orjson.loads(r["job_proof"]) == {"preparedData": by_id[r["job_task_id"]]}
    # handed out means no longer waiting; a waiting task never gets itself
    rows = await dep.pool.fetch("SELECT automation_variables FROM job_tasks WHERE id = ANY($1::uuid[])",
                                [uuid.UUID(t.job_task_id) for t in waiting])
    assert all(orjson.loads(r["automation_variables"])["waiting"] is False for r in rows)
    async with agent_for(dep, callers[0]) as a:
        assert await a.utils.job.useAnotherTask() is None
    async with agent_for(dep, waiting[0]) as a:
        assert (await a.utils.setAutomationVariables({"waiting": True}))["success"]
        assert await a.utils.job.useAnotherTask() is None
