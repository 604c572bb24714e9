"""One sweep over every route of the API with a second user's token against the first user's objects.

A foreign caller must never read, change or delete another tenant's objects: every non-public route
answers an error (401/403/404/400) or, for listings, a 2xx that contains nothing of the first user;
and at the end every object of the first user is exactly as it was.
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

PUBLIC = {("GET", "/api/v2/openapi.json"), ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/api/v2/jobs"),
          ("GET", "/api/v2/files/proof/{filename}"), ("GET", "/")}  # "/": the static dashboard page
# Routes where the caller acts on its own account (creating its own objects is not a leak).
SELF_SERVICE = {("POST", "/api/v2/devices/register"), ("POST", "/api/v2/jobs/submit"),
                ("POST", "/api/v2/files/upload"), ("POST", "/api/v2/payments/withdraw")}


async def snapshot(dep, a: dict) -> dict:
    pool = dep.pool
    return {
        "conn": dict(await pool.fetchrow("SELECT password_hash, device_id FROM proxy_credentials WHERE connection_id=$1",
                                         uuid.UUID(a["conn"]["connectionId"]))),
        "blacklist": [dict(r) for r in await pool.fetch("SELECT scope, scope_id, entry FROM blacklist_entries "
                                                        "ORDER BY scope, entry")],
        "job": dict(await pool.fetchrow("SELECT * FROM jobs WHERE id::text = $1", a["job_id"])),
        "buckets": [dict(r) for r in await pool.fetch("SELECT * FROM job_buckets ORDER BY 1")],
        "device_buckets": [dict(r) for r in await pool.fetch("SELECT * FROM device_buckets ORDER BY 1")],
        "planned": [dict(r) for r in await pool.fetch("SELECT * FROM planned_tasks ORDER BY id")],
        "ledger": await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = $1", uuid.UUID(a["user_id"])),
    }


def fill(path: str, a: dict) -> str:
    return (path.replace("{connection_id}", a["conn"]["connectionId"])
            .replace("{device_id}", a["device"]["remote_device_id"])
            .replace("{job_id}", a["job_id"]).replace("{filename}", a["file"])
            .replace("{id}", a["job_id"]).replace("{taskId}", a["job_id"]).replace("{bidId}", a["job_id"]))


async def test_second_user_cannot_touch_first_users_objects(deployment):
    dep = deployment
    from marketplace_fixtures import funded_user, make_job

    a_id, a_tok = await funded_user(dep, "owner-a", 50)
    _b_id, b_tok = await funded_user(dep, "intruder-b", 50)
    device = await dep.device(a_tok)
    conn = await dep.connection(a_tok, device["remote_device_id"])
    await dep.call("POST", f"/api/v2/proxy/connections/{conn['connectionId']}/blacklist", a_tok,
                   json={"domains": ["a-only.test"]})
    job_id = await make_job(dep, a_tok)
    await dep.call("PUT", f"/api/v2/jobs/{job_id}/buckets/{device['remote_device_id']}", a_tok, json={"data": {"k": 1}})
    await dep.call("POST", "/api/v2/device-bucket/merge", a_tok,
                   json={"remote_device_id": device["remote_device_id"], "data": {"k": 1}})
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("file", b"secret file of A", filename="a.txt", content_type="text/plain")
    status, up = await dep.call("POST", "/api/v2/files/upload", a_tok, data=form)
    assert status in (200, 201), up
    file_name = (up.get("filename") or up.get("file", {}).get("filename") or up.get("url", "").rsplit("/", 1)[-1])
    a = {"user_id": a_id, "device": device, "conn": conn, "job_id": job_id, "file": file_name}
    before = await snapshot(dep, a)
    secrets = [conn["password"], device["device_token"], a_tok, "a-only.test", "secret file of A"]

    ids = {"job_id": job_id, "task_id": job_id, "device_id": device["remote_device_id"],
           "remote_device_id": device["remote_device_id"], "connection_id": conn["connectionId"],
           "planned_task_ids": [job_id], "task_ids": [job_id], "JobTasks_Ids": [job_id],
           "domains": ["a-only.test"], "status": "inactive", "data": {"k": 2}, "command": "start", "code": "x"}
    status, doc = await dep.call("GET", "/api/v2/openapi.json")
    routes = sorted((m.upper(), p) for p, ops in doc["paths"].items() for m in ops)
    assert len(routes) > 30
    checked = 0
    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        url = fill(path, a)
        params = {"job_id": job_id, "task_id": job_id, "deviceId": device["remote_device_id"],
                  "connectionId": conn["connectionId"], "from": "2020-01-01T00:00:00Z",
                  "to": "2100-01-01T00:00:00Z"} if method == "GET" else None
        status, body = await dep.call(method, url, b_tok, params=params,
                                      json=None if method == "GET" else ids)
        text = str(body)
        for s in secrets:
            assert s not in text, (method, path, "leaked", s)
        if (method, path) not in SELF_SERVICE and status < 300:
            # a 2xx is only acceptable when it reveals nothing of A (a listing of B's own things)
            assert a["conn"]["connectionId"] not in text and device["remote_device_id"] not in text, (method, path)
        checked += 1
    after = await snapshot(dep, a)
    assert after == before
    assert checked > 30
    # The same walk with no token at all: everything non-public is 401.
    for method, path in routes:
        if (method, path) in PUBLIC or path.startswith("/api/v2/files/temp"):
            continue
        status, _ = await dep.call(method, fill(path, a), None, json={})
        assert status in (400, 401), (method, path, status)
    # And with the admin-only routes: a user token is not an admin token.
    for method, path in routes:
        if "/admin/" in path:
            status, _ = await dep.call(method, path, b_tok, json={})
            assert status == 401, (method, path)
