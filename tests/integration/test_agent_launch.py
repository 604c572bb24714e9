"""launchAutomation reaches a real device-agent process over its tunnel (the runner saves the code);
an offline device, a foreign device and bad input get a clear ``{success: false, error}``. Task
assignments are delivered over the tunnel too, also to a device that comes online later."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from marketplace_fixtures import funded_user, make_automation, make_job

from marketplace_api.sdk import Agent, UserClient

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def wait_file(path, timeout: float = 20):  # noqa: ANN001, ANN201
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return path
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{path} never appeared")


async def test_launch_automation_over_the_tunnel(deployment):
    dep = deployment
    _, owner = await dep.user("launcher")
    _, stranger = await dep.user("stranger")
    device = await dep.device(owner)
    device_id = device["remote_device_id"]
    agent_proc = await dep.agent(device)
    folder = dep.node.data_dir / "automations"
    code = "console.log('hello from the node');\n// " + uuid.uuid4().hex
    async with UserClient(dep.node.api, owner) as client, UserClient(dep.node.api, stranger) as other:
        res = await client.launchAutomation(device_id, "start", code)
        assert res["success"] is True and res["result"] is True, res
        automation_id = res["automationId"]
        assert (folder / f"{automation_id}.js").read_text() == code  # what the runner received, byte for byte
        # a caller-chosen id, then stop it
        res = await client.launchAutomation(device_id, "start", "1 + 1", automationId="my-bot")
        assert res["automationId"] == "my-bot" and (folder / "my-bot.js").read_text() == "1 + 1"
        res = await client.launchAutomation(device_id, "stop", automationId="my-bot")
        assert res["success"] is True and res["deviceResult"] == "stopped"
        # refusals
        status, body = await dep.call("POST", "/api/v2/devices/launchAutomation", owner,
                                      json={"device_id": device_id, "command": "start", "code": "x"})
        assert status == 200 and set(body) == {"automationId", "result", "deviceResult"}
        for payload, needle in (({"command": "start", "code": "x"}, "device_id"),
                                ({"device_id": "nope", "command": "start", "code": "x"}, "device_id"),
                                ({"device_id": device_id, "command": "reboot", "code": "x"}, "command"),
                                ({"device_id": device_id, "command": "start"}, "code"),
                                ({"device_id": device_id, "command": "stop"}, "automationId")):
            status, body = await dep.call("POST", "/api/v2/devices/launchAutomation", owner, json=payload)
            assert status == 400 and body["success"] is False and needle in body["error"], (payload, body)
        assert await other.launchAutomation(device_id, "start", "x") == {"success": False,
                                                                         "error": "Device not found"}
        assert (await dep.call("POST", "/api/v2/devices/launchAutomation", json={}))[0] == 401
        # offline
        agent_proc.kill(15)
        await dep.wait_online(device_id, online=False)
        status, body = await dep.call("POST", "/api/v2/devices/launchAutomation", owner,
                                      json={"device_id": device_id, "command": "start", "code": "x"})
        assert status == 400 and body["success"] is False and "offline" in body["error"]


async def test_task_assigned_reaches_a_device_that_comes_online_later(deployment):
    dep = deployment
    _, owner = await funded_user(dep, "late-device")
    device = await dep.device(owner)
    automation_id = await make_automation(dep)
    job_id = await make_job(dep, owner, job_type="devices_automation", automation_id=automation_id)
    # the device is marked online without a tunnel: assigned, but not deliverable yet
    await dep.pool.execute("UPDATE devices SET online = true WHERE remote_device_id = $1",
                           uuid.UUID(device["remote_device_id"]))
    status, body = await dep.call("POST", "/api/v2/tasks/planned", owner, json={
        "job_id": job_id, "inputs": ['{"q": 1}'], "remote_device_id": device["remote_device_id"],
        "run_immediately": True})
    assert status == 200 and body["assignment_results"][0]["assigned"] is True, body
    task_id = str(await dep.pool.fetchval("SELECT id FROM job_tasks WHERE job_id = $1", uuid.UUID(job_id)))
    delivered = "SELECT delivered_at FROM job_tasks WHERE id = $1"
    assert await dep.pool.fetchval(delivered, uuid.UUID(task_id)) is None
    # the real agent connects: the sweep delivers the assignment with a working token
    await dep.agent(device)
    path = await wait_file(dep.node.data_dir / "automations" / "tasks" / f"{task_id}.json")
    record = json.loads(path.read_text())
    assert record["job_proof"] == '{"q": 1}' and record["timeout"] == 3600
    async with Agent.from_assignment(path, dep.node.api) as agent:
        task = await agent.utils.job.getCurrentTask()
        assert task["success"] is True and task["job_proof"] == {"q": 1} and task["parent_task_id"] == task_id
    assert await dep.pool.fetchval(delivered, uuid.UUID(task_id)) is not None
