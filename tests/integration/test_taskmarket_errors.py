"""Every 4xx of /v1 in the seed's shape ``{"ok": false, "error": {"code", "message"}}`` (never a 500,
never the /api/v2 shape), agent keys versus user tokens, tenant isolation of every /v1 route, the
live trace stream across two nodes, and the surface's OpenAPI entries."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from conftest import NodeProcess
from taskmarket_fixtures import GOOD, SSE, agent, bid, claimed_task, key, post_task, poster

pytestmark = pytest.mark.asyncio(loop_scope="session")
CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 409: "CONFLICT",
         413: "BAD_REQUEST", 422: "UNPROCESSABLE", 405: "METHOD_NOT_ALLOWED"}


def shaped(status: int, body, expected: int, code: str | None = None) -> None:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and body["ok"] is False and set(body) == {"ok", "error"}, body
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    assert body["error"]["code"] == (code or CODES[expected]), body


async def test_agent_keys_are_hashed_shown_once_revocable_and_not_user_tokens(deployment):
    dep = deployment
    user_id, user_tok = await dep.user("key-owner")
    a = await agent(dep, user_tok)
    assert a["apiKey"].startswith("ak_") and set(a) >= {"id", "name", "apiKey"}
    stored = await dep.pool.fetchrow("SELECT * FROM tm_agents WHERE id = $1", uuid.UUID(a["id"]))
    assert a["apiKey"].encode() not in bytes(stored["key_hash"]) and a["apiKey"] not in str(dict(stored))
    status, _ = await dep.call("GET", "/v1/tasks/available", a["apiKey"])
    assert status == 200
    # A user token is not an agent key, and an agent key is not a user token.
    shaped(*await dep.call("GET", "/v1/tasks/available", user_tok), 401)
    shaped(*await dep.call("POST", "/v1/tasks", a["apiKey"], json={}), 401)
    shaped(*await dep.call("POST", "/v1/agents", a["apiKey"], json={"name": "x"}), 401)
    assert (await dep.call("GET", "/api/v2/user/balance", a["apiKey"]))[0] == 401
    shaped(*await dep.call("GET", "/v1/tasks/available", None), 401)
    shaped(*await dep.call("GET", "/v1/tasks/available", "ak_forged"), 401)
    # Someone else cannot revoke it; its owner can, then it is 401.
    _, other_tok = await dep.user("other")
    shaped(*await dep.call("DELETE", f"/v1/agents/{a['id']}", other_tok), 404)
    status, _ = await dep.call("DELETE", f"/v1/agents/{a['id']}", user_tok)
    assert status == 204
    shaped(*await dep.call("GET", "/v1/tasks/available", a["apiKey"]), 401)
    shaped(*await dep.call("DELETE", f"/v1/agents/{a['id']}", user_tok), 404)
    shaped(*await dep.call("DELETE", "/v1/agents/not-a-uuid", user_tok), 404)
    shaped(*await dep.call("POST", "/v1/agents", user_tok, json={"name": 5}), 400)
    shaped(*await dep.call("POST", "/v1/agents", user_tok, json={}), 400)


async def test_bad_input_is_400_in_the_seed_shape(deployment):
    dep = deployment
    _, tok = await poster(dep, 100)
    ak = (await agent(dep))["apiKey"]
    task = await post_task(dep, tok, price="10.00")
    tid = task["id"]
    for params in ({"limit": "0"}, {"limit": "101"}, {"limit": "abc"}, {"limit": "-1"}, {"cursor": "!!!"},
                   {"cursor": "eyJpZCI6Ii4uLiJ9"}, {"cursor": "e30"}):
        shaped(*await dep.call("GET", "/v1/tasks/available", ak, params=params), 400)
    # A cursor of one category is not a cursor of another.
    for _ in range(2):
        await post_task(dep, tok, category="cursorcat", price="1.00")
    status, page = await dep.call("GET", "/v1/tasks/available", ak, params={"category": "cursorcat", "limit": "1"})
    cursor = page["data"]["pagination"]["next_cursor"]
    assert cursor
    shaped(*await dep.call("GET", "/v1/tasks/available", ak, params={"category": "coding", "cursor": cursor}), 400)
    # A forged cursor (payload changed, or made up without the server's key) is 400.
    import base64

    payload, _, tag = cursor.partition(".")
    forged = base64.urlsafe_b64encode(b'{"v":1,"s":1,"c":"cursorcat"}').decode().rstrip("=")
    mac = bytearray(base64.urlsafe_b64decode(tag + "=" * (-len(tag) % 4)))
    mac[-1] ^= 0x01  # one bit of the tag changed (a fixed "AA" suffix equals the real tag 1 time in 256)
    flipped = base64.urlsafe_b64encode(bytes(mac)).decode().rstrip("=")
    for bad_cursor in (f"{forged}.{tag}", forged, f"{payload}.{flipped}", payload):
        shaped(*await dep.call("GET", "/v1/tasks/available", ak,
                               params={"category": "cursorcat", "cursor": bad_cursor}), 400)
    # Past its deadline a task is no longer discoverable and takes no bids.
    soon = await post_task(dep, tok, category="deadlinecat", price="1.00", deadline="2100-01-01T00:00:00Z")
    await dep.pool.execute("UPDATE tm_tasks SET deadline = now() - interval '1 second' WHERE id = $1",
                           uuid.UUID(soon["id"]))
    status, listed = await dep.call("GET", "/v1/tasks/available", ak, params={"category": "deadlinecat"})
    assert status == 200 and listed["data"]["items"] == []
    shaped(*await dep.call("POST", f"/v1/tasks/{soon['id']}/bids", ak, json={"proposedPrice": 1}, headers=key()), 409)
    status, empty = await dep.call("GET", "/v1/tasks/available", ak, params={"category": "no-such-category"})
    assert status == 200 and empty["data"]["items"] == [] and empty["data"]["pagination"]["has_more"] is False
    bids_url = f"/v1/tasks/{tid}/bids"
    for body in ({"proposedPrice": "12.50"}, {"proposedPrice": 0}, {"proposedPrice": -1}, {"proposedPrice": 1.234},
                 {"proposedPrice": 10.01}, {"proposedPrice": True}, {"coverLetter": "no price"},
                 {"proposedPrice": 5, "coverLetter": 7}, {"proposedPrice": 1e400}):
        shaped(*await dep.call("POST", bids_url, ak, json=body, headers=key()), 400)
    for data in (b"{not json", b"[1, 2]", b"", b"null", b'"x"'):
        shaped(*await dep.call("POST", bids_url, ak, data=data, headers={"Content-Type": "application/json"}), 400)
    shaped(*await dep.call("POST", bids_url, ak, data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                           headers={"Content-Type": "application/json"}), 413)
    for body in ({"title": "t", "description": "d", "category": "coding"}, {"title": "", "description": "d",
                 "category": "coding", "price": 1}, {"title": "t", "description": "d", "category": "c o d",
                 "price": 1}, {"title": "t", "description": "d", "category": "coding", "price": "1.001"},
                 {"title": "t", "description": "d", "category": "coding", "price": "NaN"},
                 {"title": "t", "description": "d", "category": "coding", "price": -5},
                 {"title": ["t"], "description": "d", "category": "coding", "price": 1},
                 {"title": "t\u0000", "description": "d", "category": "coding", "price": 1},
                 {"title": "t", "description": "d", "category": "coding", "price": 1, "deadline": "tomorrow"},
                 {"title": "t", "description": "d", "category": "coding", "price": 1,
                  "deadline": "2001-01-01T00:00:00Z"}):
        shaped(*await dep.call("POST", "/v1/tasks", tok, json=body, headers=key()), 400)
    claimed, worker, (_, ptok) = await claimed_task(dep)
    wk = worker["apiKey"]
    for path, body in (("deliver", {}), ("deliver", {"content": 5}), ("resubmit", {"content": ""}),
                       ("progress", {"message": "no event"}), ("progress", {"event": "e", "metadata": [1]}),
                       ("progress", {"event": "e", "visibility": "everyone"})):
        shaped(*await dep.call("POST", f"/v1/tasks/{claimed['id']}/{path}", wk, json=body, headers=key()), 400)
    shaped(*await dep.call("POST", f"/v1/tasks/{claimed['id']}/review", ptok, json={"decision": "maybe"},
                           headers=key()), 400)
    # Unknown /v1 routes and methods keep the /v1 shape; /api/v2 keeps its own.
    shaped(*await dep.call("GET", "/v1/nope", ak), 404)
    shaped(*await dep.call("PUT", "/v1/tasks/available", ak), 405)
    status, v2 = await dep.call("GET", "/api/v2/nope", tok)
    assert status == 404 and v2.get("success") is False


async def test_403_404_409_for_the_wrong_agent_task_or_status(deployment):
    dep = deployment
    task, worker, (_, ptok) = await claimed_task(dep)
    tid = task["id"]
    stranger = (await agent(dep))["apiKey"]
    for path, body in (("deliver", {"content": GOOD}), ("resubmit", {"content": GOOD}),
                       ("progress", {"event": "e"})):
        shaped(*await dep.call("POST", f"/v1/tasks/{tid}/{path}", stranger, json=body, headers=key()), 403)
    shaped(*await dep.call("GET", f"/v1/tasks/{tid}/traces", stranger), 403)
    wk = worker["apiKey"]
    shaped(*await dep.call("POST", f"/v1/tasks/{tid}/resubmit", wk, json={"content": GOOD}, headers=key()), 409)
    for missing in (str(uuid.uuid4()), "not-a-uuid"):
        shaped(*await dep.call("POST", f"/v1/tasks/{missing}/bids", wk, json={"proposedPrice": 1}, headers=key()), 404)
        shaped(*await dep.call("POST", f"/v1/tasks/{missing}/deliver", wk, json={"content": GOOD}), 404)
        shaped(*await dep.call("GET", f"/v1/tasks/{missing}/traces", wk), 404)
        shaped(*await dep.call("GET", f"/v1/tasks/{missing}", ptok), 404)
        shaped(*await dep.call("POST", f"/v1/tasks/{tid}/bids/{missing}/accept", ptok, headers=key()), 404)
    # An agent cannot bid on its owner's own task.
    owner_id, owner_tok = await poster(dep, 20)
    own = await post_task(dep, owner_tok, price="5.00")
    own_agent = await agent(dep, owner_tok)
    shaped(*await dep.call("POST", f"/v1/tasks/{own['id']}/bids", own_agent["apiKey"], json={"proposedPrice": 1},
                           headers=key()), 403)
    # Accepting or rejecting a bid of a claimed task is 409.
    status, bids = await dep.call("GET", f"/v1/tasks/{tid}/bids", ptok)
    bid_id = bids["data"]["items"][0]["id"]
    shaped(*await dep.call("POST", f"/v1/tasks/{tid}/bids/{bid_id}/accept", ptok, headers=key()), 409)
    shaped(*await dep.call("POST", f"/v1/tasks/{tid}/bids/{bid_id}/reject", ptok, headers=key()), 409)
    shaped(*await dep.call("POST", f"/v1/tasks/{tid}/cancel", ptok, headers=key()), 409)


async def test_tenants_cannot_act_on_or_read_what_is_not_theirs(deployment):
    dep = deployment
    task, worker, (a_id, a_tok) = await claimed_task(dep)
    tid = task["id"]
    await dep.call("POST", f"/v1/tasks/{tid}/progress", worker["apiKey"], json={"event": "secret-step"},
                   headers=key())
    open_task = await post_task(dep, a_tok, price="3.00", description="A's private brief")
    b_id, b_tok = await poster(dep, 20)
    b_agent = await agent(dep, b_tok)
    pending = await bid(dep, b_agent["apiKey"], open_task["id"], 2)
    before = [dict(r) for r in await dep.pool.fetch(
        "SELECT id, status, escrow, accepted_bid_id FROM tm_tasks WHERE poster_id = $1 ORDER BY id", uuid.UUID(a_id))]
    ledger_before = await dep.pool.fetchval("SELECT count(*) FROM ledger_entries")
    # Poster B on A's tasks: every read and action is 404, nothing changes.
    for method, path in (("GET", f"/v1/tasks/{tid}"), ("GET", f"/v1/tasks/{tid}/bids"),
                         ("GET", f"/v1/tasks/{tid}/traces"), ("POST", f"/v1/tasks/{tid}/review"),
                         ("POST", f"/v1/tasks/{open_task['id']}/cancel"),
                         ("POST", f"/v1/tasks/{open_task['id']}/bids/{pending['id']}/accept"),
                         ("POST", f"/v1/tasks/{open_task['id']}/bids/{pending['id']}/reject")):
        status, body = await dep.call(method, path, b_tok, json={"decision": "accept"}, headers=key())
        shaped(status, body, 404)
    shaped(*await dep.call("DELETE", f"/v1/agents/{worker['id']}", b_tok), 404)
    # B's agent on A's claimed task: 403 on every agent route, no reads.
    for path, body in (("deliver", {"content": GOOD}), ("resubmit", {"content": GOOD}), ("progress", {"event": "x"})):
        shaped(*await dep.call("POST", f"/v1/tasks/{tid}/{path}", b_agent["apiKey"], json=body, headers=key()), 403)
    status, body = await dep.call("GET", f"/v1/tasks/{tid}/traces", b_agent["apiKey"])
    shaped(status, body, 403)
    assert "secret-step" not in str(body)
    async with SSE(f"{dep.node.api}/v1/tasks/{tid}/traces/stream", b_agent["apiKey"]) as s:
        shaped(s.status, s.error_body, 403)
    async with SSE(f"{dep.node.api}/v1/tasks/{tid}/traces/stream", b_tok) as s:
        shaped(s.status, s.error_body, 404)
    after = [dict(r) for r in await dep.pool.fetch(
        "SELECT id, status, escrow, accepted_bid_id FROM tm_tasks WHERE poster_id = $1 ORDER BY id", uuid.UUID(a_id))]
    assert after == before and await dep.pool.fetchval("SELECT count(*) FROM ledger_entries") == ledger_before
    # B's listing of bids on its own tasks never shows A's bids; the agent still works for A.
    status, _ = await dep.call("GET", "/v1/tasks/available", worker["apiKey"])
    assert status == 200


async def test_stream_needs_a_bearer_header_and_a_valid_last_event_id(deployment):
    dep = deployment
    task, worker, (_, ptok) = await claimed_task(dep)
    url = f"{dep.node.api}/v1/tasks/{task['id']}/traces/stream"
    async with SSE(url, None) as s:
        shaped(s.status, s.error_body, 401)
    async with SSE(url + f"?token={ptok}", None) as s:
        shaped(s.status, s.error_body, 400)
    async with SSE(url + f"?token={ptok}", ptok) as s:
        shaped(s.status, s.error_body, 400)
    async with SSE(url, ptok, last_event_id="garbage") as s:
        shaped(s.status, s.error_body, 404, "NOT_FOUND")
    async with SSE(url, ptok, last_event_id=str(uuid.uuid4())) as s:
        shaped(s.status, s.error_body, 400)
    async with SSE(f"{dep.node.api}/v1/tasks/{uuid.uuid4()}/traces/stream", ptok) as s:
        shaped(s.status, s.error_body, 404)


async def test_live_traces_cross_nodes(deployment, tmp_path):
    """A watcher on node 2 sees a trace the agent posts on node 1 (PostgreSQL LISTEN/NOTIFY)."""
    dep = deployment
    task, worker, (_, ptok) = await claimed_task(dep)
    node2 = await NodeProcess(dep.node.database_url, tmp_path / "node2").start()
    try:
        async with SSE(f"{node2.api}/v1/tasks/{task['id']}/traces/stream", ptok) as watcher:
            assert watcher.status == 200
            delays = []
            for i in range(3):
                t0 = time.monotonic()
                status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/progress", worker["apiKey"],
                                              json={"event": "step", "message": str(i)}, headers=key())
                assert status == 201
                ev_id, data = await watcher.next(timeout=10)
                delays.append(time.monotonic() - t0)
                assert ev_id == body["data"]["id"] and data["message"] == str(i)
            # Far under the 5 s polling safety net: the notification carried it.
            assert min(delays) < 1.0, delays
            # Stopping a node with a stream open ends the stream; shutdown does not wait for it.
            t0 = time.monotonic()
            assert await node2.stop(timeout=30) == 0
            assert time.monotonic() - t0 < 15
            await asyncio.wait_for(watcher.task, 10)
    finally:
        await node2.stop()


async def test_openapi_lists_the_v1_surface(deployment):
    status, doc = await deployment.call("GET", "/api/v2/openapi.json")
    assert status == 200
    expected = {("post", "/v1/agents"), ("delete", "/v1/agents/{id}"), ("get", "/v1/tasks/available"),
                ("post", "/v1/tasks/{taskId}/bids"), ("post", "/v1/tasks/{taskId}/deliver"),
                ("post", "/v1/tasks/{taskId}/resubmit"), ("post", "/v1/tasks/{taskId}/progress"),
                ("get", "/v1/tasks/{taskId}/traces"), ("post", "/v1/tasks"), ("get", "/v1/tasks/{id}"),
                ("get", "/v1/tasks/{id}/bids"), ("post", "/v1/tasks/{id}/bids/{bidId}/accept"),
                ("post", "/v1/tasks/{id}/bids/{bidId}/reject"), ("post", "/v1/tasks/{id}/review"),
                ("post", "/v1/tasks/{id}/cancel"), ("get", "/v1/tasks/{id}/traces/stream")}
    listed = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert expected <= listed, expected - listed
    assert doc["paths"]["/v1/tasks/{taskId}/deliver"]["post"]["summary"].startswith("Deliver work")
