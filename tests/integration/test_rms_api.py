"""The proxy-connection API (RMS surface): every route, its documented errors, malformed input, tenants."""

from __future__ import annotations

import uuid

import pytest
import pytest_asyncio

pytestmark = pytest.mark.asyncio(loop_scope="session")
BASE = "/api/v2/proxy/connections"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tenants(deployment):
    a_id, a = await deployment.user("tenant-a")
    b_id, b = await deployment.user("tenant-b")
    dev_a = await deployment.device(a)
    dev_a2 = await deployment.device(a)
    dev_b = await deployment.device(b)
    conn_a = await deployment.connection(a, dev_a["remote_device_id"], "client-A")
    return {"a": a, "b": b, "a_id": a_id, "b_id": b_id, "dev_a": dev_a, "dev_a2": dev_a2, "dev_b": dev_b,
            "conn_a": conn_a, "dep": deployment}


async def test_create_returns_uuid_and_16_char_password_in_seed_shape(tenants):
    dep = tenants["dep"]
    status, body = await dep.call("POST", BASE, tenants["a"], json={"device_id": tenants["dev_a"]["remote_device_id"],
                                                                   "name": "x"})
    assert status == 200 and body["success"] is True
    c = body["connection"]
    assert set(c) == {"connectionId", "password", "ownerUserId", "name", "createdAt", "deviceId"}
    uuid.UUID(c["connectionId"])
    assert len(c["password"]) == 16 and c["password"].isalnum()
    assert c["ownerUserId"] == tenants["a_id"] and c["deviceId"] == tenants["dev_a"]["remote_device_id"]
    assert c["createdAt"].endswith("Z")


async def test_store_holds_only_a_hash_and_rms_only_ciphertext(tenants):
    dep = tenants["dep"]
    c = tenants["conn_a"]
    row = await dep.pool.fetchrow("SELECT c.password_hash, r.password_encrypted FROM proxy_credentials c "
                                  "JOIN rms_connections r USING (connection_id) WHERE connection_id = $1",
                                  uuid.UUID(c["connectionId"]))
    assert c["password"].encode() not in bytes(row["password_hash"])
    assert c["password"].encode() not in bytes(row["password_encrypted"])
    assert len(bytes(row["password_hash"])) == 32


@pytest.mark.parametrize("body,status", [
    ({}, 400), ({"device_id": ""}, 400), ({"device_id": 5}, 400), ({"device_id": "not-a-uuid"}, 400),
    ({"device_id": str(uuid.uuid4())}, 404), ({"device_id": None}, 400),
])
async def test_create_validation(tenants, body, status):
    got, data = await tenants["dep"].call("POST", BASE, tenants["a"], json=body)
    assert got == status and data["success"] is False and data["error"]


async def test_create_rejects_long_name_non_object_bodies_and_bad_json(tenants):
    dep, a = tenants["dep"], tenants["a"]
    dev = tenants["dev_a"]["remote_device_id"]
    assert (await dep.call("POST", BASE, a, json={"device_id": dev, "name": "n" * 101}))[0] == 400
    assert (await dep.call("POST", BASE, a, json=[1, 2]))[0] == 400
    status, body = await dep.call("POST", BASE, a, data=b"{nope", headers={"Content-Type": "application/json"})
    assert status == 400 and body["success"] is False


async def test_body_over_max_body_bytes_is_413_not_500(tenants):
    dep = tenants["dep"]
    status, body = await dep.call("POST", BASE, tenants["a"], data=b"x" * (2 * 1024 * 1024),
                                  headers={"Content-Type": "application/json"})
    assert status == 413 and body == {"success": False, "error": "request body too large"}


async def test_create_on_someone_elses_device_is_404(tenants):
    status, body = await tenants["dep"].call("POST", BASE, tenants["b"],
                                             json={"device_id": tenants["dev_a"]["remote_device_id"]})
    assert status == 404


async def test_missing_or_bad_token_is_401(tenants):
    dep = tenants["dep"]
    assert (await dep.call("GET", BASE))[0] == 401
    assert (await dep.call("GET", BASE, "nope"))[0] == 401
    assert (await dep.call("GET", BASE, headers={"Authorization": "Basic abc"}))[0] == 401


async def test_list_shows_own_and_routed_through_own_devices_only(tenants):
    dep, a, b = tenants["dep"], tenants["a"], tenants["b"]
    # B owns a connection routed through B's device; A's list must not show it, B's must.
    conn_b = await dep.connection(b, tenants["dev_b"]["remote_device_id"], "client-B")
    _s, la = await dep.call("GET", BASE, a)
    _s, lb = await dep.call("GET", BASE, b)
    ids_a = {c["connectionId"] for c in la["connections"]}
    ids_b = {c["connectionId"] for c in lb["connections"]}
    assert tenants["conn_a"]["connectionId"] in ids_a and conn_b["connectionId"] not in ids_a
    assert conn_b["connectionId"] in ids_b and tenants["conn_a"]["connectionId"] not in ids_b
    assert all(c["password"] and len(c["password"]) == 16 for c in lb["connections"])


async def test_connection_of_another_user_routed_through_my_device_is_listed(tenants):
    """A connection owned by B but pointing at A's device shows up for A (the device owner)."""
    dep = tenants["dep"]
    from rms.service import Rms  # create as B on A's device through RMS itself (API would refuse)

    rms = Rms(dep.pool, _box(dep))
    conn = await rms.create(tenants["b_id"], tenants["dev_a"]["remote_device_id"], "guest", check_owner=False)
    _s, la = await dep.call("GET", BASE, tenants["a"])
    assert conn["connectionId"] in {c["connectionId"] for c in la["connections"]}
    # A (device owner) may dissociate it; A may not rotate its password (not the owner).
    s, _ = await dep.call("POST", f"{BASE}/{conn['connectionId']}/password", tenants["a"])
    assert s == 403
    s, _ = await dep.call("DELETE", f"{BASE}/{conn['connectionId']}/device", tenants["a"])
    assert s == 200


def _box(dep):
    from rms.crypto import PasswordBox, load_or_create_key

    return PasswordBox(load_or_create_key("", str(dep.node.data_dir)))


async def test_rotate_keeps_id_and_changes_password(tenants):
    dep, a = tenants["dep"], tenants["a"]
    c = await dep.connection(a, tenants["dev_a"]["remote_device_id"])
    s, body = await dep.call("POST", f"{BASE}/{c['connectionId']}/password", a)
    assert s == 200 and body["success"] and len(body["password"]) == 16 and body["password"] != c["password"]
    _s, listed = await dep.call("GET", BASE, a)
    again = {x["connectionId"]: x for x in listed["connections"]}[c["connectionId"]]
    assert again["password"] == body["password"]


async def test_swap_device_rules(tenants):
    dep, a, b = tenants["dep"], tenants["a"], tenants["b"]
    cid = tenants["conn_a"]["connectionId"]
    ok, body = await dep.call("PUT", f"{BASE}/{cid}/device", a, json={"device_id": tenants["dev_a2"]["remote_device_id"]})
    assert ok == 200 and body["success"]
    # target device not owned -> 403; source not owned -> 403; unknown -> 404; malformed -> 400
    assert (await dep.call("PUT", f"{BASE}/{cid}/device", a, json={"device_id": tenants["dev_b"]["remote_device_id"]}))[0] == 403
    assert (await dep.call("PUT", f"{BASE}/{cid}/device", b, json={"device_id": tenants["dev_b"]["remote_device_id"]}))[0] == 403
    assert (await dep.call("PUT", f"{BASE}/{uuid.uuid4()}/device", a, json={"device_id": tenants["dev_a"]["remote_device_id"]}))[0] == 404
    assert (await dep.call("PUT", f"{BASE}/not-a-uuid/device", a, json={"device_id": tenants["dev_a"]["remote_device_id"]}))[0] == 400
    assert (await dep.call("PUT", f"{BASE}/{cid}/device", a, json={}))[0] == 400
    assert (await dep.call("PUT", f"{BASE}/{cid}/device", a, json={"device_id": ["x"]}))[0] == 400


async def test_dissociate_leaves_credential_without_device(tenants):
    dep, a = tenants["dep"], tenants["a"]
    c = await dep.connection(a, tenants["dev_a"]["remote_device_id"])
    s, _ = await dep.call("DELETE", f"{BASE}/{c['connectionId']}/device", a)
    assert s == 200
    _s, listed = await dep.call("GET", BASE, a)
    # Its device is gone, so it is listed because A owns it, with deviceId null.
    entry = {x["connectionId"]: x for x in listed["connections"]}[c["connectionId"]]
    assert entry["deviceId"] is None
    assert (await dep.call("DELETE", f"{BASE}/{c['connectionId']}/device", tenants["b"]))[0] == 403


async def test_delete_rules(tenants):
    dep, a, b = tenants["dep"], tenants["a"], tenants["b"]
    c = await dep.connection(a, tenants["dev_a"]["remote_device_id"])
    assert (await dep.call("DELETE", f"{BASE}/{c['connectionId']}", b))[0] == 403
    assert (await dep.call("DELETE", f"{BASE}/{uuid.uuid4()}", a))[0] == 404
    assert (await dep.call("DELETE", f"{BASE}/zzz", a))[0] == 400
    assert (await dep.call("DELETE", f"{BASE}/{c['connectionId']}", a))[0] == 200
    assert (await dep.call("DELETE", f"{BASE}/{c['connectionId']}", a))[0] == 404


async def test_connection_blacklist_routes(tenants):
    dep, a, b = tenants["dep"], tenants["a"], tenants["b"]
    cid = tenants["conn_a"]["connectionId"]
    path = f"{BASE}/{cid}/blacklist"
    s, body = await dep.call("POST", path, a, json={"domains": ["Example.COM.", "tracker.io"]})
    assert s == 200 and body == {"success": True, "domains": ["example.com", "tracker.io"]}
    s, body = await dep.call("GET", path, a)
    assert body["domains"] == ["example.com", "tracker.io"]
    s, body = await dep.call("DELETE", path, a, json={"domains": ["tracker.io"]})
    assert body["domains"] == ["example.com"]
    for bad in ({}, {"domains": []}, {"domains": "x.com"}, {"domains": [1]}, {"domains": ["a b"]}):
        assert (await dep.call("POST", path, a, json=bad))[0] == 400
    for method in ("GET", "POST", "DELETE"):
        assert (await dep.call(method, path, b, json={"domains": ["x.com"]}))[0] == 403
    assert (await dep.call("GET", f"{BASE}/{uuid.uuid4()}/blacklist", a))[0] == 404


async def test_device_blacklist_is_owner_only(tenants):
    dep, a, b = tenants["dep"], tenants["a"], tenants["b"]
    path = f"/api/v2/devices/{tenants['dev_a']['remote_device_id']}/blacklist"
    s, body = await dep.call("POST", path, a, json={"domains": ["10.0.0.0/8", "ads.example"]})
    assert s == 200 and body["domains"] == ["10.0.0.0/8", "ads.example"]
    for method in ("GET", "POST", "DELETE"):
        assert (await dep.call(method, path, b, json={"domains": ["x.com"]}))[0] == 403
    assert (await dep.call("GET", f"/api/v2/devices/{uuid.uuid4()}/blacklist", a))[0] == 404
    s, body = await dep.call("DELETE", path, a, json={"domains": ["10.0.0.0/8", "ads.example"]})
    assert body["domains"] == []


async def test_global_blacklist_needs_admin_token(tenants):
    dep = tenants["dep"]
    assert (await dep.call("GET", "/api/v2/admin/blacklist", tenants["a"]))[0] == 401
    assert (await dep.call("GET", "/api/v2/admin/blacklist", headers={"X-Admin-Token": "wrong"}))[0] == 401
    s, body = await dep.call("POST", "/api/v2/admin/blacklist", admin=True, json={"domains": ["global-bad.test"]})
    assert s == 200 and "global-bad.test" in body["domains"]
    s, body = await dep.call("DELETE", "/api/v2/admin/blacklist", admin=True, json={"domains": ["global-bad.test"]})
    assert "global-bad.test" not in body["domains"]


async def test_admin_proxies_lists_every_connection_with_device_metadata(tenants):
    dep = tenants["dep"]
    assert (await dep.call("GET", "/api/v2/admin/proxies", tenants["a"]))[0] == 401
    s, body = await dep.call("GET", "/api/v2/admin/proxies", admin=True)
    assert s == 200 and body["total"] == len(body["proxies"]) >= 1
    entry = {p["connection_id"]: p for p in body["proxies"]}[tenants["conn_a"]["connectionId"]]
    assert set(entry) == {"connection_id", "name", "password", "created_at", "bytes_last_24h", "bytes_lifetime",
                          "device"}
    assert set(entry["device"]) == {"remote_device_id", "user_id", "name", "brand", "model", "country", "online",
                                    "is_rented", "is_onMarket"}
    assert isinstance(entry["bytes_last_24h"], int) and isinstance(entry["bytes_lifetime"], int)


async def test_devices_list_and_register(tenants):
    dep, a, b = tenants["dep"], tenants["a"], tenants["b"]
    s, devices = await dep.call("GET", "/api/v2/devices", a)
    assert s == 200
    ids = {d["remote_device_id"] for d in devices}
    assert tenants["dev_a"]["remote_device_id"] in ids and tenants["dev_b"]["remote_device_id"] not in ids
    keys = {"remote_device_id", "added", "automations", "brand", "country", "isEmulator", "model", "name",
            "networkType", "numberOfCores", "online", "processor", "ramMb", "sdkVersion", "version"}
    assert set(devices[0]) == keys
    s, reg = await dep.call("POST", "/api/v2/devices/register", a, json={"name": "Unique Device Name"})
    assert s == 200 and reg["name"] == "Unique Device Name" and reg["device_token"]
    assert (await dep.call("POST", "/api/v2/devices/register", b, json={"name": "Unique Device Name"}))[0] == 409
    assert (await dep.call("POST", "/api/v2/devices/register", b, json={"name": 5}))[0] == 400
    words = (await dep.device(a))["name"].split()
    assert len(words) >= 2 and all(w[0].isupper() for w in words[:2])


async def test_market_lists_online_action_devices(tenants):
    dep = tenants["dep"]
    dev = tenants["dev_b"]["remote_device_id"]
    await dep.pool.execute("UPDATE devices SET is_on_market = true, payment_type = 'action', online = true, "
                           "country = 'BR' WHERE remote_device_id = $1", uuid.UUID(dev))
    s, market = await dep.call("GET", "/api/v2/devices/market", tenants["a"], params={"country": "BR"})
    assert s == 200
    assert {"name": tenants["dev_b"]["name"], "country": "BR", "isAvailable": True} in market
    assert (await dep.call("GET", "/api/v2/devices/market", tenants["a"], params={"sortDirection": "up"}))[0] == 400
    await dep.pool.execute("UPDATE devices SET online = false WHERE remote_device_id = $1", uuid.UUID(dev))


def _documented_routes() -> set[tuple[str, str]]:
    """(METHOD, path) pairs of shared/API-ROUTES.md, the product's route table."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[3] / "shared" / "API-ROUTES.md"
    if not doc.exists():
        return set()
    out = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"\|\s*([A-Z/, ]+?)\s*\|\s*`([^`?]+)", line)
        if m:
            for method in re.split(r"[/, ]+", m.group(1)):
                if method:
                    out.add((method, m.group(2)))
    return out


def _concrete(path: str) -> str:
    for name in ("connection_id", "device_id", "job_id"):
        path = path.replace("{" + name + "}", str(uuid.uuid4()))
    return path.replace("{filename}", "nope.txt")


async def test_openapi_lists_exactly_the_served_routes(tenants):
    dep = tenants["dep"]
    s, doc = await dep.call("GET", "/api/v2/openapi.json")
    assert s == 200 and doc["openapi"].startswith("3.")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert ("GET", "/api/v2/proxy/connections") in listed
    assert ("PUT", "/api/v2/proxy/connections/{connection_id}/device") in listed
    # Every listed route is served.
    for method, path in sorted(listed):
        status, body = await dep.call(method, _concrete(path), tenants["a"], json={})
        assert status != 405 and not (status == 404 and body.get("error") == "no such route"), (method, path)
    # Every documented route that is served is listed (a served route missing from the document fails).
    for method, path in sorted(_documented_routes() - listed):
        status, body = await dep.call(method, _concrete(path), tenants["a"], json={})
        assert status in (404, 405) and (status == 405 or body.get("error") == "no such route"), (method, path)
