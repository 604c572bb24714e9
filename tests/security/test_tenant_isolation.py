"""One sweep over every route of the API with a second user's token against the first user's objects,
and one with no token and with bad tokens.

A foreign caller must never read, change or delete another tenant's objects: every non-public route
answers an error (401/403/404/400) or, for listings, a 2xx that contains nothing of the first user;
and at the end every object of the first user is exactly as it was.

The route list is the served OpenAPI document, which is generated from the app's router: a route
anybody registers (the seed 002 surface at /jobs, /owner, /tester, seed 003 at /v1, ...) is swept
without editing this file. Only the routes in PUBLIC answer without credentials.
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The documented public routes (shared/API-ROUTES.md "no auth"): service endpoints, the dashboard's
# static files at / and the proof files whose URLs are embedded in task proofs (seed 001, data-dump
# mode: "its public URL is embedded into the JSON job_proof"). Everything else authenticates first.
PUBLIC = {("GET", "/api/v2/openapi.json"), ("GET", "/healthz"), ("GET", "/metrics"),
          ("GET", "/api/v2/files/proof/{filename}")}
DASHBOARD_PREFIXES = ("/static/", "/dashboard/", "/assets/")


def is_public(method: str, path: str) -> bool:
    return ((method, path) in PUBLIC or (method in ("GET", "HEAD") and path == "/")
            or (method in ("GET", "HEAD") and path.startswith(DASHBOARD_PREFIXES)))


def placeholder(path: str) -> str:
    """The path with every {param} filled by a well-formed but unknown value."""
    import re

    return re.sub(r"\{[^}]+\}", "00000000-0000-4000-8000-000000000000", path)
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
        if is_public(method, path):
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
    # And with the admin-only routes: a user token is not an admin token.
    for method, path in routes:
        if "/admin/" in path:
            status, _ = await dep.call(method, path, b_tok, json={})
            assert status == 401, (method, path)


BAD_CREDENTIALS = {
    "no token": {},
    "malformed header": {"Authorization": "Bearer"},
    "unknown bearer token": {"Authorization": "Bearer po_" + "x" * 43},
    "unknown agent token": {"Authorization": "Bearer agt_" + "x" * 43},
    "basic instead of bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
    "unknown admin token": {"X-Admin-Token": "not-the-admin-token"},
}
# Bodies that fail every route's validation: an empty object, a wrong-typed one and no body at all.
# Answering 400 to any of them without credentials means the route validated before it authenticated.
BAD_BODIES = [{"json": {}}, {"json": {"job_id": 1, "device_id": [], "domains": "x", "amount": "lots"}},
              {"data": b"not json", "headers": {"Content-Type": "application/json"}}, {}]


async def test_every_route_authenticates_before_it_validates(deployment):
    """Without a token, or with a bad one, every non-public route answers 401 in JSON, whatever the body."""
    dep = deployment
    status, doc = await dep.call("GET", "/api/v2/openapi.json")
    assert status == 200
    routes = sorted((m.upper(), p) for p, ops in doc["paths"].items() for m in ops)
    swept = [(m, p) for m, p in routes if not is_public(m, p)]
    assert len(swept) > 50, swept
    wrong = []
    for method, path in swept:
        url = placeholder(path)
        for label, headers in BAD_CREDENTIALS.items():
            for body in (BAD_BODIES if label == "no token" else BAD_BODIES[:1]):
                extra = dict(body)
                hdrs = {**headers, **extra.pop("headers", {})}
                params = {"job_id": "not-a-uuid", "limit": "-1"} if method == "GET" else None
                async with dep.http.request(method, dep.node.api + url, headers=hdrs, params=params,
                                            **extra) as r:
                    text = await r.text()
                    ctype = r.headers.get("Content-Type", "")
                if r.status != 401 or "json" not in ctype:
                    wrong.append((method, path, label, str(body)[:40], r.status, text[:120]))
    assert not wrong, "\n".join(map(str, wrong))


async def test_public_routes_answer_without_a_token(deployment):
    """The documented public routes really are public (so PUBLIC is not a list of holes)."""
    for method, path in sorted(PUBLIC):
        if "{" in path:
            continue
        status, _ = await deployment.call(method, path)
        assert status == 200, (method, path, status)
