"""Jobs: create, list, my jobs, details, status, uniqueness; automations and their schemas."""

from __future__ import annotations

import uuid

import pytest
from marketplace_fixtures import JOB, funded_user, make_automation, make_job

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCHEMAS = {
    "automation_parameters_schema": {"fields": [{"name": "maxRetries", "type": "number", "required": False,
                                                 "min": 1, "max": 10}]},
    "job_variables_schema": {"fields": [{"name": "email", "type": "string", "required": True},
                                        {"name": "password", "type": "string", "required": True}]},
    "bucket_schema": {"fields": [{"name": "sessionToken", "type": "string", "required": False}]},
}


async def test_submit_job_creates_it_and_escrows_the_budget(deployment):
    user_id, token = await funded_user(deployment, "employer", 10)
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token, json={
        **JOB, "Target_Workers": ["us", "worldwide"], "few_times": True, "featured": True})
    assert status == 201
    assert body["success"] is True and body["message"] == "Job created successfully"
    job_id = body["job_id"]
    status, bal = await deployment.call("GET", "/api/v2/user/balance", token)
    assert status == 200 and bal == {"balance": 9.82, "active_balance": 9.82, "pending_earnings": 0}
    status, job = await deployment.call("GET", "/api/v2/jobs/details", token, params={"job_id": job_id})
    assert status == 200
    assert job["_id"] == job["job_id"] == job_id
    assert job["job_type"] == "job" and job["payment_type"] == "action"
    assert job["title"] == JOB["title"] and job["category"] == ["Google"]
    assert job["Target_Workers"] == ["US", "worldwide"]
    assert job["few_times"] is True and job["premium"] is False and job["featured"] is True
    assert job["duration"] == "3" and job["positions"] == "3"
    assert job["job_price"] == 0.06 and job["price"] == "0.18" and job["status"] == "active"
    assert job["files"] == [] and job["added"].endswith("Z")
    assert job["user"]["_id"] == user_id and job["user"]["name"] == "employer"
    for key in ("totla_tasks_count", "tasks_done_count", "tasks_confirmed_count", "tasks_running_count",
                "tasks_pending_count"):
        assert job[key] == 0
    assert job["automation_id"] is None
    assert job["automation_parameters_schema"] is None and job["job_variables_schema"] is None
    assert job["bucket_schema"] is None


async def test_submit_job_validation_lists_every_error(deployment):
    _, token = await funded_user(deployment)
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token, json={"title": 5, "positions": 0})
    assert status == 400 and body["success"] is False
    errors = body["errors"]
    for fragment in ("title must be a string", "description is required", "proof is required",
                     "category is required", "duration is required", "positions must be", "job_price is required"):
        assert any(fragment in e for e in errors), (fragment, errors)


async def test_submit_job_malformed_and_oversized_bodies_are_400(deployment):
    _, token = await funded_user(deployment)
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token, data=b"{not json",
                                         headers={"Content-Type": "application/json"})
    assert status == 400 and body["success"] is False
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token,
                                         json={**JOB, "description": "x" * (2 * 1024 * 1024)})
    assert status == 400
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token, json=[1, 2])
    assert status == 400


async def test_submit_job_needs_funds_and_auth(deployment):
    _, token = await funded_user(deployment, amount=0)
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token, json=JOB)
    assert status == 400 and "Insufficient balance" in body["errors"][0]
    status, _ = await deployment.call("POST", "/api/v2/jobs/submit", None, json=JOB)
    assert status == 401
    status, _ = await deployment.call("POST", "/api/v2/jobs/submit", "bogus", json=JOB)
    assert status == 401


async def test_details_include_automation_schemas(deployment):
    automation_id = await make_automation(deployment, **SCHEMAS)
    _, token = await funded_user(deployment)
    job_id = await make_job(deployment, token, job_type="devices_automation", automation_id=automation_id,
                            automation_parameters={"maxRetries": 3})
    status, job = await deployment.call("GET", "/api/v2/jobs/details", token, params={"job_id": job_id})
    assert status == 200
    assert job["job_type"] == "devices_automation" and job["automation_id"] == automation_id
    assert job["automation_parameters_schema"] == SCHEMAS["automation_parameters_schema"]
    assert job["job_variables_schema"] == SCHEMAS["job_variables_schema"]
    assert job["bucket_schema"] == SCHEMAS["bucket_schema"]


async def test_automation_parameters_are_validated_against_the_schema(deployment):
    automation_id = await make_automation(deployment, **SCHEMAS)
    _, token = await funded_user(deployment)
    base = {**JOB, "job_type": "devices_automation", "automation_id": automation_id}
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token,
                                         json={**base, "automation_parameters": {"maxRetries": 11}})
    assert status == 400 and body["errors"] == ["automation_parameters.maxRetries: must be at most 10"]
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token,
                                         json={**base, "automation_parameters": {"maxRetries": "x"}})
    assert status == 400 and body["errors"] == ["automation_parameters.maxRetries: must be of type number"]
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token,
                                         json={**JOB, "job_type": "devices_automation"})
    assert status == 400 and "automation_id is required for devices_automation jobs" in body["errors"]
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token,
                                         json={**JOB, "automation_id": str(uuid.uuid4())})
    assert status == 400


async def test_admin_automation_route_requires_admin_and_valid_schemas(deployment):
    status, _ = await deployment.call("POST", "/api/v2/admin/automations", json={"name": "x"})
    assert status == 401
    status, body = await deployment.call("POST", "/api/v2/admin/automations", admin=True, json={
        "name": "x", "bucket_schema": {"fields": [{"name": "a", "type": "blob"}]}})
    assert status == 400 and "bucket_schema.fields[0].type" in body["error"]
    status, body = await deployment.call("GET", "/api/v2/admin/automations", admin=True)
    assert status == 200 and body["success"] is True


async def test_details_errors_and_isolation(deployment):
    _, owner = await funded_user(deployment)
    _, other = await funded_user(deployment)
    job_id = await make_job(deployment, owner)
    assert await deployment.call("GET", "/api/v2/jobs/details", owner, params={"job_id": "nope"}) == (
        400, {"error": "Invalid job_id"})
    assert await deployment.call("GET", "/api/v2/jobs/details", owner, params={"job_id": str(uuid.uuid4())}) == (
        404, {"error": "Job not found"})
    status, job = await deployment.call("GET", "/api/v2/jobs/details", other, params={"job_id": job_id})
    assert status == 200 and "vcode" not in job  # active jobs are public, private fields are not
    status, _ = await deployment.call("PUT", "/api/v2/jobs/update-status", owner,
                                      json={"job_id": job_id, "status": "inactive"})
    assert status == 204
    assert await deployment.call("GET", "/api/v2/jobs/details", other, params={"job_id": job_id}) == (
        404, {"error": "Job not found"})
    status, _ = await deployment.call("GET", "/api/v2/jobs/details", owner, params={"job_id": job_id})
    assert status == 200


async def test_update_status_codes(deployment):
    _, owner = await funded_user(deployment)
    _, other = await funded_user(deployment)
    job_id = await make_job(deployment, owner)
    call = deployment.call
    assert (await call("PUT", "/api/v2/jobs/update-status", owner, json={"job_id": job_id, "status": "done"}))[0] == 400
    assert (await call("PUT", "/api/v2/jobs/update-status", owner, json={"status": "active"}))[0] == 400
    assert (await call("PUT", "/api/v2/jobs/update-status", owner,
                       json={"job_id": str(uuid.uuid4()), "status": "active"}))[0] == 404
    assert (await call("PUT", "/api/v2/jobs/update-status", other, json={"job_id": job_id, "status": "inactive"})) == (
        401, {"error": "Unauthorized action"})
    assert (await call("PUT", "/api/v2/jobs/update-status", None, json={"job_id": job_id, "status": "active"}))[0] == 401


async def test_public_list_filters_and_sorts(deployment):
    _, token = await funded_user(deployment, amount=1000)
    tag = uuid.uuid4().hex[:8]
    cheap = await make_job(deployment, token, title=f"{tag} cheap", job_price=0.05, category="Cat" + tag)
    dear = await make_job(deployment, token, title=f"{tag} dear", job_price=2, premium=True,
                          Target_Workers=["BR"])
    feat = await make_job(deployment, token, title=f"{tag} featured", job_price=1, featured=True)
    call = deployment.call

    async def ids(**params: str) -> list[str]:
        status, body = await call("GET", "/api/v2/jobs", token, params={"searchTerm": tag, **params})
        assert status == 200, body
        assert body["total"] == len(body["jobs"]) and body["page"] == 1
        return [j["job_id"] for j in body["jobs"]]

    assert await ids(SortBY="job_price", orientation="asc") == [cheap, feat, dear]
    assert await ids(SortBY="job_price", orientation="desc") == [dear, feat, cheap]
    assert await ids(min_price="1", SortBY="job_price", orientation="asc") == [feat, dear]
    assert await ids(Premium="true") == [dear]
    assert await ids(Featured="true") == [feat]
    assert await ids(job_category="cat" + tag) == [cheap]
    assert set(await ids(location="US")) == {cheap, feat}
    assert (await ids())[0] == feat  # featured first by default
    status, body = await call("GET", "/api/v2/jobs", token, params={"searchTerm": tag, "limit": "2", "page": "2"})
    assert status == 200 and len(body["jobs"]) == 1 and body["total"] == 3 and body["pages"] == 2
    for bad in ({"SortBY": "nope"}, {"orientation": "up"}, {"min_price": "abc"}, {"page": "0"},
                {"limit": "x"}, {"Featured": "maybe"}):
        status, body = await call("GET", "/api/v2/jobs", token, params=bad)
        assert status == 400 and body["success"] is False, bad
    await call("PUT", "/api/v2/jobs/update-status", token, json={"job_id": cheap, "status": "inactive"})
    assert cheap not in await ids()


async def test_my_jobs_lists_only_mine(deployment):
    _, mine = await funded_user(deployment, amount=100)
    _, theirs = await funded_user(deployment, amount=100)
    tag = uuid.uuid4().hex[:8]
    a = await make_job(deployment, mine, title=f"{tag} A")
    b = await make_job(deployment, mine, title=f"{tag} B")
    await make_job(deployment, theirs, title=f"{tag} C")
    status, body = await deployment.call("POST", "/api/v2/jobs/myjobs", mine, json={"Query": tag})
    assert status == 200 and [j["job_id"] for j in body["jobs"]] == [a, b]
    status, body = await deployment.call("POST", "/api/v2/jobs/myjobs", mine,
                                         json={"Query": tag, "SortBY": "title", "orientation": "desc"})
    assert [j["job_id"] for j in body["jobs"]] == [b, a]
    status, body = await deployment.call("POST", "/api/v2/jobs/myjobs", mine, json={"job_id": a})
    assert [j["job_id"] for j in body["jobs"]] == [a]
    status, body = await deployment.call("POST", "/api/v2/jobs/myjobs", theirs, json={"job_id": a})
    assert status == 200 and body["jobs"] == [] and body["total"] == 0
    status, body = await deployment.call("POST", "/api/v2/jobs/myjobs", mine, json={"status": "weird"})
    assert status == 400
    status, body = await deployment.call("POST", "/api/v2/jobs/myjobs", mine, json={"status": "active",
                                                                                    "limit": 1, "Query": tag})
    assert status == 200 and len(body["jobs"]) == 1 and body["total"] == 2


async def test_check_uniqueness_word_vs_charactor(deployment):
    _, employer = await funded_user(deployment)
    _, worker = await funded_user(deployment, amount=0)
    job_id = await make_job(deployment, employer)
    status, body = await deployment.call("POST", "/api/v2/tasks/submit", worker,
                                         json={"job_id": job_id, "job_proof": "developer.jane@example.com"})
    assert status == 201, body
    call = deployment.call
    check = "/api/v2/jobs/check-uniquenes"
    assert (await call("POST", check, employer, json={"search": "developer", "option": "word"}))[1]["unique"] is False
    assert (await call("POST", check, employer, json={"search": "develop", "option": "word"}))[1]["unique"] is True
    assert (await call("POST", check, employer, json={"search": "develop", "option": "charactor"}))[1]["unique"] is False
    assert (await call("POST", check, employer, json={"search": "jane@example.com"}))[1]["unique"] is False
    # another tenant does not see these proofs
    _, stranger = await funded_user(deployment, amount=0)
    assert (await call("POST", check, stranger, json={"search": "developer"}))[1]["unique"] is True
    assert (await call("POST", check, employer, json={"search": ""}))[0] == 400
    assert (await call("POST", check, employer, json={"search": "x", "option": "regex"})) == (
        400, {"error": "Invalid option: use 'word' or 'charactor'"})


async def test_unstorable_input_is_400_not_500(deployment):
    _, token = await funded_user(deployment)
    status, body = await deployment.call("POST", "/api/v2/jobs/submit", token, json={**JOB, "title": "a\u0000b"})
    assert status == 400 and body["success"] is False
    status, _ = await deployment.call("GET", "/api/v2/jobs", token, params={"searchTerm": "a\u0000b"})
    assert status == 400


async def test_openapi_lists_marketplace_routes_with_summaries(deployment):
    status, doc = await deployment.call("GET", "/api/v2/openapi.json")
    assert status == 200
    assert doc["paths"]["/api/v2/jobs/submit"]["post"]["summary"].startswith("Create a job posting")
    for path in ("/api/v2/jobs/applicants", "/api/v2/tasks/planned", "/api/v2/payments/withdraw",
                 "/api/v2/jobs/{job_id}/buckets/{device_id}", "/api/v2/files/upload", "/api/v2/admin/automations"):
        assert path in doc["paths"], path
