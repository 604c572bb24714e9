"""Job buckets (share permissions, bucket_schema), device buckets (shallow merge), temporary files."""

from __future__ import annotations

import asyncio
import os
import uuid

import aiohttp
import pytest
from marketplace_fixtures import funded_user, make_automation, make_job

from marketplace_api.files import sweep_expired

pytestmark = pytest.mark.asyncio(loop_scope="session")
BUCKET = {"bucket_schema": {"fields": [{"name": "sessionToken", "type": "string", "required": False, "max": 20}]}}


async def test_job_buckets_crud_permissions_and_schema(deployment):
    owner_id, owner = await funded_user(deployment)
    viewer_id, viewer = await funded_user(deployment, amount=0)
    editor_id, editor = await funded_user(deployment, amount=0)
    _, stranger = await funded_user(deployment, amount=0)
    device = await deployment.device(owner)
    did = device["remote_device_id"]
    automation_id = await make_automation(deployment, **BUCKET)
    job_id = await make_job(deployment, owner, job_type="devices_automation", automation_id=automation_id,
                            shared_view=[viewer_id], shared_edit=[editor_id])
    base = f"/api/v2/jobs/{job_id}/buckets"
    call = deployment.call
    assert await call("GET", f"{base}/{did}", owner) == (404, {"error": "Bucket not found"})
    data = {"sessionToken": "abc123", "loggedIn": True}
    status, body = await call("PUT", f"{base}/{did}", owner, json={"data": data})
    assert status == 200 and body["bucket"]["data"] == data and body["bucket"]["remote_device_id"] == did
    status, body = await call("PUT", f"{base}/{did}", editor, json={"data": {"sessionToken": "xyz"}})
    assert status == 200 and body["bucket"]["data"] == {"sessionToken": "xyz"}  # replaced, not merged
    status, body = await call("GET", f"{base}/{did}", viewer)
    assert status == 200
    bucket = body["bucket"]
    assert set(bucket) == {"_id", "job_id", "remote_device_id", "data", "updated_at"} and bucket["job_id"] == job_id
    status, body = await call("GET", base, viewer)
    assert status == 200 and body["total"] == 1 and body["page"] == 1 and body["pages"] == 1
    assert body["buckets"][0]["device_name"] == device["name"]
    assert await call("PUT", f"{base}/{did}", viewer, json={"data": {}}) == (404, {"error": "Job not found"})
    assert await call("GET", base, stranger) == (404, {"error": "Job not found"})
    assert await call("GET", f"{base}/{did}", stranger) == (404, {"error": "Job not found"})
    assert await call("DELETE", base, viewer) == (404, {"error": "Job not found"})
    status, body = await call("PUT", f"{base}/{did}", owner, json={"data": {"sessionToken": 5}})
    assert status == 400 and body["error"] == "Invalid bucket data" and body["details"] == [
        "sessionToken: must be of type string"]
    assert await call("PUT", f"{base}/{did}", owner, json={"data": [1]}) == (400, {"error": "Invalid bucket data"})
    assert await call("PUT", f"{base}/{did}", owner, json={}) == (400, {"error": "Invalid bucket data"})
    assert (await call("PUT", f"{base}/{uuid.uuid4()}", owner, json={"data": {}}))[0] == 404
    assert await call("DELETE", f"{base}/{did}", editor) == (200, {"success": True})
    assert await call("DELETE", f"{base}/{did}", editor) == (404, {"error": "Bucket not found"})
    await call("PUT", f"{base}/{did}", owner, json={"data": {}})
    assert await call("DELETE", base, owner) == (200, {"success": True, "deleted": 1})
    assert (await call("GET", f"/api/v2/jobs/{uuid.uuid4()}/buckets", owner))[0] == 404
    assert (await call("GET", base, owner, params={"limit": "500"}))[0] == 200  # capped at 100


async def test_device_bucket_merge_and_read(deployment):
    _, owner = await funded_user(deployment, amount=0)
    _, stranger = await funded_user(deployment, amount=0)
    device = await deployment.device(owner)
    did = device["remote_device_id"]
    call = deployment.call
    assert await call("POST", "/api/v2/device-bucket/read", owner, json={"remote_device_id": did}) == (
        200, {"deviceBucket": {}})
    status, body = await call("POST", "/api/v2/device-bucket/merge", owner,
                              json={"remote_device_id": did, "data": {"accountToken": "xyz", "n": 1}})
    assert (status, body) == (200, {"success": True, "deviceBucket": {"accountToken": "xyz", "n": 1}})
    status, body = await call("POST", "/api/v2/device-bucket/merge", owner,
                              json={"remote_device_id": did, "data": {"username": "u@example.com", "n": 2}})
    assert body["deviceBucket"] == {"accountToken": "xyz", "username": "u@example.com", "n": 2}
    assert await call("POST", "/api/v2/device-bucket/read", owner, json={}) == (
        400, {"error": "Device bucket requires a device context (remote_device_id)"})
    for bad in (None, [1], "x"):
        assert await call("POST", "/api/v2/device-bucket/merge", owner, json={"remote_device_id": did, "data": bad}) == (
            400, {"error": "Invalid data. Must be a non-null object."})
    assert (await call("POST", "/api/v2/device-bucket/read", stranger, json={"remote_device_id": did}))[0] == 404
    assert (await call("POST", "/api/v2/device-bucket/merge", stranger,
                       json={"remote_device_id": did, "data": {"x": 1}}))[0] == 404
    assert (await call("POST", "/api/v2/device-bucket/read", None, json={"remote_device_id": did}))[0] == 401


async def _upload(dep, token: str, payload, filename: str = "example.pdf") -> tuple[int, dict]:
    form = aiohttp.FormData()
    form.add_field("file", payload, filename=filename, content_type="application/pdf")
    return await dep.call("POST", "/api/v2/files/upload", token, data=form)


async def test_temp_file_upload_fetch_isolation_and_expiry(deployment):
    _, owner = await funded_user(deployment, amount=0)
    _, stranger = await funded_user(deployment, amount=0)
    content = os.urandom(3 * 1024 * 1024)  # larger than the 1 MiB JSON body limit
    status, body = await _upload(deployment, owner, content)
    assert status == 200, body
    assert body["success"] is True and body["message"] == "File uploaded successfully"
    data = body["data"]
    assert data["originalName"] == "example.pdf" and data["size"] == len(content)
    assert data["filename"].endswith("_example.pdf") and data["expiresAt"].endswith("Z")
    assert data["url"].endswith(f"/api/v2/files/temp/{data['filename']}")
    headers = {"Authorization": f"Bearer {owner}"}
    async with deployment.http.get(data["url"], headers=headers) as r:
        assert r.status == 200 and await r.read() == content
    path = f"/api/v2/files/temp/{data['filename']}"
    assert await deployment.call("GET", path, stranger) == (404, {"success": False,
                                                                  "message": "File not found or expired"})
    assert (await deployment.call("GET", path, None))[0] == 401
    # expiry: the row says expired → 404 at once, and the sweeper removes the file
    await deployment.pool.execute("UPDATE temp_files SET expires_at = now() - interval '1 second'"
                                  " WHERE filename = $1", data["filename"])
    assert (await deployment.call("GET", path, owner))[0] == 404
    stored = deployment.node.data_dir / "files" / "temp" / data["filename"]
    assert stored.exists()
    await sweep_expired(deployment.pool, stored.parent)
    assert not stored.exists()


async def test_temp_file_errors(deployment):
    _, owner = await funded_user(deployment, amount=0)
    form = aiohttp.FormData()
    form.add_field("other", "value")
    assert await deployment.call("POST", "/api/v2/files/upload", owner, data=form) == (
        400, {"success": False, "message": "No file uploaded"})
    assert (await deployment.call("POST", "/api/v2/files/upload", owner, json={"a": 1}))[0] == 400
    assert (await deployment.call("POST", "/api/v2/files/upload", None, data=form))[0] == 401


async def test_temp_file_over_50_mb_is_refused_while_streaming(deployment):
    _, owner = await funded_user(deployment, amount=0)

    async def chunks():
        block = b"\0" * (1024 * 1024)
        for _ in range(51):
            yield block
            await asyncio.sleep(0)

    form = aiohttp.FormData()
    form.add_field("file", chunks(), filename="big.bin", content_type="application/octet-stream")
    status, body = await deployment.call("POST", "/api/v2/files/upload", owner, data=form)
    assert status == 400 and body == {"success": False, "message": "File too large (maximum 50 MB)"}
    temp = deployment.node.data_dir / "files" / "temp"
    assert not any(p.name.endswith("_big.bin") for p in temp.iterdir())
