"""The automation story end to end, through the SDK, against a real node, real PostgreSQL and real
device-agent processes: an employer posts an automation job and planned tasks; the device that gets
one receives its agent token over its tunnel; the automation calls getCurrentTask → addSubTasks →
getSubTasks → submitTaskToAnotherJob → submitTask; the employer confirms; balances move exactly."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import fresh_deployment

from marketplace_api.sdk import Agent, UserClient

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCHEMAS = {"job_variables_schema": {"fields": [{"name": "email", "type": "string", "required": True}]},
           "bucket_schema": {"fields": [{"name": "cookie", "type": "string"}]}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dep(pg_root, tmp_path_factory):
    d = await fresh_deployment(pg_root, tmp_path_factory.mktemp("story"), ASSIGN_RETRY_DELAY_S="0.3",
                               ASSIGN_SWEEP_INTERVAL_S="3600")
    yield d
    await d.close()
    await d.node.stop()


async def wait_assignment(dep, job_task_id: str, timeout: float = 20) -> Path:
    """The task_assigned record the device runner wrote (the agent's cwd is the node's data dir)."""
    path = dep.node.data_dir / "automations" / "tasks" / f"{job_task_id}.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return path
        await asyncio.sleep(0.05)
    raise TimeoutError(f"task_assigned for {job_task_id} never reached the device")


async def job_task_of(dep, planned_task_id: str) -> str:
    return str(await dep.pool.fetchval("SELECT job_task_id FROM planned_tasks WHERE id = $1",
                                       uuid.UUID(planned_task_id)))


async def test_automation_story(dep):
    api = dep.node.api
    employer_id, employer_token = await dep.user("employer")
    owner_id, owner_token = await dep.user("device-owner")
    status, body = await dep.call("POST", "/api/v2/admin/deposits", admin=True,
                                  json={"user_id": employer_id, "amount": 100})
    assert status == 200, body
    status, body = await dep.call("POST", "/api/v2/admin/automations", admin=True,
                                  json={"name": "lead-finder", "code": "console.log('run')", **SCHEMAS})
    assert status == 201, body
    automation_id = body["automation"]["automation_id"]

    async with UserClient(api, employer_token) as employer, UserClient(api, owner_token) as owner:
        # the device owner's two phones, rented to the employer (no rental route yet: set in the store)
        dev_a = (await owner.registerDevice())
        dev_b = (await owner.registerDevice())
        assert dev_a["success"] and dev_b["success"]
        await dep.pool.execute("UPDATE devices SET rented_by = $1, payment_type = 'action'"
                               " WHERE remote_device_id = ANY($2::uuid[])", uuid.UUID(employer_id),
                               [uuid.UUID(dev_a["remote_device_id"]), uuid.UUID(dev_b["remote_device_id"])])
        await dep.agent(dev_a)
        await dep.agent(dev_b)

        job = await employer.createJob(title="Find leads", category="Automation", description="Find leads.",
                                       proof="JSON", duration=3, positions=4, job_price=0.5,
                                       job_type="devices_automation", automation_id=automation_id)
        sink = await employer.createJob(title="Lead sink", category="Automation", description="Sink.",
                                        proof="JSON", duration=3, positions=10, job_price=0.1,
                                        job_type="devices_automation", automation_id=automation_id)
        assert job["success"] and sink["success"], (job, sink)
        job_id, sink_id = job["job_id"], sink["job_id"]
        assert (await employer.balance())["balance"] == 97  # 100 - 4 × 0.5 - 10 × 0.1 escrowed

        planned = await employer.submitPlannedTasks(job_id, [{"email": "boss@example.com"}],
                                                    run_immediately=True, device_name=dev_a["name"])
        assert planned["success"], planned
        planned_id = planned["inserted_ids"][0]["planned_task_id"]
        assert planned["assignment_results"] == [{"planned_task_id": planned_id, "assigned": True}]
        task_id = await job_task_of(dep, planned_id)

        # the device got its task and agent token over the tunnel
        record = json.loads((await wait_assignment(dep, task_id)).read_text())
        assert record["command"] == "task_assigned"
        assert record["remote_device_id"] == dev_a["remote_device_id"]
        assert record["job_id"] == job_id and record["agent_token"].startswith("agt_")
        assert record["code"] == "console.log('run')" and record["automation_id"] == automation_id

        async with Agent.from_assignment(dep.node.data_dir / "automations" / "tasks" / f"{task_id}.json",
                                         api) as agent:
            task = await agent.utils.job.getCurrentTask()
            assert task["success"] is True and task["parent_task_id"] == task_id
            assert task["job_proof"] == {"email": "boss@example.com"} and task["timeout"] == 3600

            # run_immediately defaults to true: the idle phone B takes it
            subs = await agent.utils.job.addSubTasks([{"email": "sub@example.com"}])
            assert subs["success"] is True, subs
            sub_planned = subs["inserted_ids"][0]["planned_task_id"]
            assert subs["inserted_ids"][0]["input"] == '{"email":"sub@example.com"}'
            assert subs["assignment_results"] == [{"planned_task_id": sub_planned, "assigned": True}]
            status_now = await agent.utils.job.getSubTasks([sub_planned])
            assert status_now["success"] is True
            sub = status_now["tasks"][sub_planned]
            assert sub["status"] == "running" and sub["parent_task_id"] == task_id and sub["timeout"] == 3600

            # the sub-task runs on the other phone, which got its own token
            sub_task_id = await job_task_of(dep, sub_planned)
            sub_path = await wait_assignment(dep, sub_task_id)
            assert json.loads(sub_path.read_text())["remote_device_id"] == dev_b["remote_device_id"]
            async with Agent.from_assignment(sub_path, api) as sub_agent:
                current = await sub_agent.utils.job.getCurrentTask()
                assert current["job_proof"] == {"email": "sub@example.com"}
                assert await sub_agent.utils.job.submitTask("success", {"verified": True}, True, []) == {
                    "success": True}
            done = await agent.utils.job.getSubTasks([sub_planned])
            assert done["tasks"][sub_planned]["status"] == "pending"
            assert done["tasks"][sub_planned]["job_proof"] == {"verified": True}

            dump = await agent.utils.job.submitTaskToAnotherJob(sink_id, {"email": "lead@example.com"})
            assert dump["success"] is True and dump["job_id"] == sink_id and uuid.UUID(dump["job_task_id"])

            shot = base64.b64encode(b"\x89PNG fake").decode()
            files = [{"name": "screenshot", "extension": "png", "base64Data": shot}]
            final = await agent.utils.job.submitTask("success", {"leads": 1}, True, files)
            assert final == {"success": True}
            again = await agent.utils.job.submitTask("success", {"leads": 2}, True, [])
            assert again["success"] is False and "finished" in again["error"]

        # the employer sees both tasks among the applicants and confirms them
        apps = await employer.getApplicants(job_id)
        by_id = {t["_id"]: t for t in apps["tasks"]}
        assert set(by_id) == {task_id, sub_task_id}
        assert by_id[task_id]["status"] == "pending" and by_id[sub_task_id]["status"] == "pending"
        proof = json.loads(by_id[task_id]["job_proof"])
        assert proof["leads"] == 1 and proof["screenshot"].endswith(".png")
        async with dep.http.get(proof["screenshot"]) as r:
            assert r.status == 200 and await r.read() == b"\x89PNG fake"
        assert by_id[sub_task_id]["parent_task_id"] == task_id
        sink_apps = await employer.getApplicants(sink_id)
        assert [t["_id"] for t in sink_apps["tasks"]] == [dump["job_task_id"]]
        assert json.loads(sink_apps["tasks"][0]["job_proof"]) == {"email": "lead@example.com"}

        confirmed = await employer.updateApplicants(job_id, [task_id, sub_task_id], "confirmed")
        assert confirmed["success"] is True and {t["status"] for t in confirmed["tasks"]} == {"confirmed"}
        assert (await employer.balance())["balance"] == 97
        assert (await owner.balance())["balance"] == 1  # 2 × 0.5, exactly
        rows = await dep.pool.fetch("SELECT user_id, amount, kind FROM ledger_entries ORDER BY id")
        mine = [Decimal(r["amount"]) for r in rows if str(r["user_id"]) == owner_id]
        assert sum(mine, Decimal(0)) == Decimal(1)
        employer_rows = [(r["kind"], Decimal(r["amount"])) for r in rows if str(r["user_id"]) == employer_id]
        assert sorted(employer_rows) == [
            ("deposit", Decimal(100)), ("job_escrow", Decimal("-2")), ("job_escrow", Decimal("-1"))]
