"""Every response example of seeds 000/001, key by key, against what the routes serve.

``tests/seed_examples.json`` holds the seed 001 examples (001 is the fuller version; each 000
example is a subset of its 001 twin), keyed "METHOD path", including the bodies the seed gives only
in its status tables. One scenario with real objects (two users, a device with a real agent, a
connection with traffic, manual and automation jobs, tasks, buckets, files, a withdrawal) makes
every route answer with content, so that lists are not empty and nested objects are compared too.
Served responses may carry more keys than the seed shows; they must carry every key it shows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from conftest import fresh_deployment
from marketplace_fixtures import funded_user, make_automation, make_job
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")
EXAMPLES: dict = json.loads((Path(__file__).parent.parent / "seed_examples.json").read_text())
WALLET = "0x" + "ab" * 20
SCHEMAS = {"automation_parameters_schema": {"fields": [{"name": "maxRetries", "type": "number", "required": False,
                                                        "min": 1, "max": 10}]},
           "job_variables_schema": {"fields": [{"name": "email", "type": "string", "required": True},
                                               {"name": "password", "type": "string", "required": True}]},
           "bucket_schema": {"fields": [{"name": "sessionToken", "type": "string", "required": False}]}}


def missing_keys(example: object, served: object, where: str = "$") -> list[str]:
    """Paths of the keys the example shows and the served value lacks (lists: every served item)."""
    if isinstance(example, dict):
        if not isinstance(served, dict):
            return [f"{where}: expected an object, got {type(served).__name__}"]
        out = []
        for key, value in example.items():
            if key not in served:
                out.append(f"{where}.{key}")
            elif served[key] is not None:
                out += missing_keys(value, served[key], f"{where}.{key}")
        return out
    if isinstance(example, list) and example and isinstance(example[0], dict | list):
        if not isinstance(served, list):
            return [f"{where}: expected an array, got {type(served).__name__}"]
        if not served:
            return [f"{where}: empty array, nothing to compare (the scenario must fill it)"]
        return [m for i, item in enumerate(served) for m in missing_keys(example[0], item, f"{where}[{i}]")]
    return []


async def test_missing_keys_finds_nested_and_list_item_keys():
    example = {"a": 1, "b": {"c": 2}, "rows": [{"x": 1, "y": 2}]}
    assert missing_keys(example, {"a": 1, "b": {"c": 3}, "rows": [{"x": 1, "y": 2, "z": 0}]}) == []
    assert missing_keys(example, {"b": {}, "rows": [{"x": 1, "y": 2}, {"x": 1}]}) == [
        "$.a", "$.b.c", "$.rows[1].y"]
    assert missing_keys(example, {"a": 1, "b": {"c": 1}, "rows": []}) == [
        "$.rows: empty array, nothing to compare (the scenario must fill it)"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dep(pg_root, tmp_path_factory):
    """A node of its own: the tests assign planned tasks themselves, nothing behind their backs."""
    d = await fresh_deployment(pg_root, tmp_path_factory.mktemp("shapes"), ASSIGN_RETRY_DELAY_S="0.1",
                               ASSIGN_SWEEP_INTERVAL_S="3600", BANDWIDTH_FLUSH_S="0.5")
    yield d
    await d.close()
    await d.node.stop()


async def until(probe, timeout: float = 30):  # noqa: ANN001, ANN201
    deadline = time.time() + timeout
    while True:
        value = await probe()
        if value or time.time() > deadline:
            return value
        await asyncio.sleep(0.2)


async def test_every_seed_example_key_is_served(dep, targets):
    call = dep.call
    served: dict[str, object] = {}

    async def record(key: str, method: str, path: str, token: str | None = None, expect: int = 200,
                     **kwargs: object) -> object:
        status, body = await call(method, path, token, **kwargs)
        assert status == expect, (key, status, body)
        served[key] = body
        return body

    owner_id, owner = await funded_user(dep, "owner", 100)
    _w1, worker = await funded_user(dep, "worker", 20)
    _w2, worker2 = await funded_user(dep, "worker-two", 0)

    # -- devices and proxy connections (a real agent, one session of traffic)
    device = await dep.device(owner)
    device_id = device["remote_device_id"]
    await dep.pool.execute("UPDATE devices SET is_on_market = true, payment_type = 'action', country = 'US',"
                           " phone_number = '+14155550123', phone_number_verified = true"
                           " WHERE remote_device_id = $1", uuid.UUID(device_id))
    await dep.agent(device, "--allow-private")
    conn = (await record("POST /api/v2/proxy/connections", "POST", "/api/v2/proxy/connections", owner,
                         json={"device_id": device_id, "name": "client-A"}))["connection"]
    cid = conn["connectionId"]
    reader, writer, _ = await socks5_open(dep.node.proxy_port, cid, conn["password"], "127.0.0.1", targets.echo_port)
    writer.write(b"seed shapes")
    assert await asyncio.wait_for(reader.readexactly(11), 10) == b"seed shapes"
    writer.close()
    await record("GET /api/v2/proxy/connections", "GET", "/api/v2/proxy/connections", owner)
    await call("POST", f"/api/v2/proxy/connections/{cid}/blacklist", owner, json={"domains": ["tracker.io"]})
    await record("GET /api/v2/proxy/connections/{connection_id}/blacklist", "GET",
                 f"/api/v2/proxy/connections/{cid}/blacklist", owner)
    window = {"from": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
              "to": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}

    async def logs() -> object:
        status, body = await call("GET", "/api/v2/proxy/logs", owner, params=window)
        return body if status == 200 and body.get("entries") else None

    async def bandwidth() -> object:
        status, body = await call("GET", "/api/v2/proxy/bandwidth", owner, params={**window, "groupBy": "hour"})
        return body if status == 200 and body.get("rows") else None

    served["GET /api/v2/proxy/logs"] = await until(logs)
    served["GET /api/v2/proxy/bandwidth"] = await until(bandwidth)
    await record("GET /api/v2/admin/proxies", "GET", "/api/v2/admin/proxies", admin=True)
    await record("POST /api/v2/proxy/connections/{connection_id}/password", "POST",
                 f"/api/v2/proxy/connections/{cid}/password", owner)
    await record("GET /api/v2/devices", "GET", "/api/v2/devices", owner)
    await record("GET /api/v2/devices/market", "GET", "/api/v2/devices/market", worker)
    await record("POST /api/v2/devices/launchAutomation", "POST", "/api/v2/devices/launchAutomation", owner,
                 json={"device_id": device_id, "command": "start", "code": "console.log('hello')"})

    # -- a manual job with job variables: apply, submit, details, review, reinitiate, delete
    job_id = await make_job(dep, owner, few_times=True, positions=5)
    variables = ['{"var1": "Custom variable value 1", "var2": "Custom variable value 2"}'] * 3
    await call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": variables})
    await record("GET /api/v2/tasks/planned", "GET", "/api/v2/tasks/planned", owner, params={"job_id": job_id})
    custom = await record("GET /api/v2/tasks/apply", "GET", "/api/v2/tasks/apply", worker, params={"job_id": job_id})
    task = await record("POST /api/v2/tasks/submit", "POST", "/api/v2/tasks/submit", worker, expect=201,
                        json={"job_id": job_id, "job_proof": "done", "custom_vars": custom})
    await record("POST /api/v2/tasks/details?task_id", "POST", f"/api/v2/tasks/details?task_id={task['job_task_id']}",
                 worker)
    custom2 = (await call("GET", "/api/v2/tasks/apply", worker2, params={"job_id": job_id}))[1]
    task2 = (await call("POST", "/api/v2/tasks/submit", worker2,
                        json={"job_id": job_id, "job_proof": "done too", "custom_vars": custom2}))[1]
    status, _ = await call("PUT", "/api/v2/jobs/applicants", owner, json={
        "JobTasks_Ids": [task["job_task_id"], task2["job_task_id"]], "status": "declined", "job_id": job_id})
    assert status in (200, 204)
    await record("POST /api/v2/tasks/reinitiate", "POST", "/api/v2/tasks/reinitiate", owner,
                 json={"task_id": task["job_task_id"]})
    await record("DELETE /api/v2/tasks/delete", "DELETE", "/api/v2/tasks/delete", owner,
                 json={"task_id": task2["job_task_id"]})
    spare = (await call("POST", "/api/v2/tasks/planned", owner, json={"job_id": job_id, "inputs": ['{"v": 9}']})
             )[1]["inserted_ids"][0]["planned_task_id"]
    await record("DELETE /api/v2/tasks/planned", "DELETE", "/api/v2/tasks/planned", owner,
                 json={"planned_task_ids": [spare]})

    # -- an automation job: details with schemas, run_immediately onto the live device, its agent token
    automation_id = await make_automation(dep, **SCHEMAS)
    auto_job = await make_job(dep, owner, job_type="devices_automation", automation_id=automation_id)
    await record("GET /api/v2/jobs/details", "GET", "/api/v2/jobs/details", owner, params={"job_id": auto_job})
    body = await record("POST /api/v2/tasks/planned", "POST", "/api/v2/tasks/planned", owner, json={
        "job_id": auto_job, "inputs": ['{"email": "a@example.com", "password": "pw"}'],
        "remote_device_id": device_id, "run_immediately": True})
    assert body["assignment_results"][0]["assigned"] is True, body
    task_files = dep.node.data_dir / "automations" / "tasks"

    async def delivered() -> list[Path]:
        return list(task_files.glob("*.json")) if task_files.exists() else []

    files = await until(delivered)
    assert files, "the assignment never reached the agent"
    agent_token = json.loads(files[0].read_text())["agent_token"]
    await record("GET /api/v2/devices/verified-phone-number", "GET", "/api/v2/devices/verified-phone-number",
                 agent_token)

    # -- buckets
    bucket_path = f"/api/v2/jobs/{job_id}/buckets"
    await call("PUT", f"{bucket_path}/{device_id}", owner, json={"data": {"sessionToken": "abc123", "loggedIn": True}})
    await record("GET /api/v2/jobs/{job_id}/buckets", "GET", bucket_path, owner)
    await record("GET /api/v2/jobs/{job_id}/buckets/{device_id}", "GET", f"{bucket_path}/{device_id}", owner)
    await record("DELETE /api/v2/jobs/{job_id}/buckets/{device_id}", "DELETE", f"{bucket_path}/{device_id}", owner)
    await call("PUT", f"{bucket_path}/{device_id}", owner, json={"data": {"sessionToken": "again"}})
    await record("DELETE /api/v2/jobs/{job_id}/buckets", "DELETE", bucket_path, owner)
    await record("POST /api/v2/device-bucket/merge", "POST", "/api/v2/device-bucket/merge", owner, json={
        "remote_device_id": device_id, "data": {"accountToken": "xyz", "username": "user@example.com"}})
    await record("POST /api/v2/device-bucket/read", "POST", "/api/v2/device-bucket/read", owner,
                 json={"remote_device_id": device_id})

    # -- files, money
    form = aiohttp.FormData()
    form.add_field("file", b"%PDF-1.4 example", filename="example.pdf", content_type="application/pdf")
    await record("POST /api/v2/files/upload", "POST", "/api/v2/files/upload", owner, data=form)
    await record("POST /api/v2/payments/withdraw", "POST", "/api/v2/payments/withdraw", worker,
                 json={"amount": 10, "wallet_address": WALLET})
    history = await record("GET /api/v2/payments/withdrawals", "GET", "/api/v2/payments/withdrawals", worker)
    assert history["transactions"][0]["transaction_proof"] is None  # no payout yet
    await dep.pool.execute("UPDATE withdrawals SET status = 'paid', transaction_proof = '2ca560b36dcdd7c8'"
                           " WHERE id = $1", uuid.UUID(history["transactions"][0]["_id"]))
    paid = (await call("GET", "/api/v2/payments/withdrawals", worker))[1]["transactions"][0]
    assert (paid["status"], paid["transaction_proof"]) == ("paid", "2ca560b36dcdd7c8")
    await record("GET /api/v2/user/balance", "GET", "/api/v2/user/balance", worker)

    assert set(served) == set(EXAMPLES), set(EXAMPLES) ^ set(served)  # every example was exercised
    # seed 000's job-details example is a plain job: the same keys, the three schemas null (seed 001)
    plain = (await call("GET", "/api/v2/jobs/details", owner, params={"job_id": job_id}))[1]
    served["GET /api/v2/jobs/details (plain job)"] = plain
    assert [plain[k] for k in SCHEMAS] == [None, None, None]
    examples = {**EXAMPLES, "GET /api/v2/jobs/details (plain job)": EXAMPLES["GET /api/v2/jobs/details"]}
    gaps = {key: m for key in examples if (m := missing_keys(examples[key], served[key]))}
    assert not gaps, json.dumps(gaps, indent=1)
    assert owner_id
