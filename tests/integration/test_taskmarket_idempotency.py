"""Idempotency-Key on every POST of /v1 (marketplace_api/idempotency.py) against a real node and
PostgreSQL: a replay gives the first answer byte for byte with no second effect, a changed body is
422, 20 concurrent requests with one key take effect once, callers are independent, a key replays on
another node, failed requests do not bind a key, and an expired key runs afresh."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
from conftest import NodeProcess
from taskmarket_fixtures import GOOD, POOR, agent, balance, bid, post_task, poster

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def raw(dep, method: str, path: str, token: str, idem: str | None, json=None, base: str | None = None):
    headers = {"Authorization": f"Bearer {token}"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    async with dep.http.request(method, (base or dep.node.api) + path, headers=headers, json=json) as r:
        return r.status, await r.read()


async def twice(dep, path: str, token: str, json=None, status: int = 201) -> bytes:
    """POST twice with one key: the same status and the same bytes."""
    k = str(uuid.uuid4())
    first = await raw(dep, "POST", path, token, k, json)
    second = await raw(dep, "POST", path, token, k, json)
    assert first[0] == status, first
    assert second == first
    return first[1]


async def count(dep, sql: str, *args) -> int:
    return await dep.pool.fetchval(sql, *args)


async def test_every_post_replays_its_first_answer_with_one_effect(deployment):
    dep = deployment
    poster_id, tok = await poster(dep, 100)
    user_id, user_tok = await dep.user("agent-owner")
    await twice(dep, "/v1/agents", user_tok, {"name": "bot"})
    assert await count(dep, "SELECT count(*) FROM tm_agents WHERE user_id = $1", uuid.UUID(user_id)) == 1
    ak = (await agent(dep, user_tok))["apiKey"]

    await twice(dep, "/v1/tasks", tok, {"title": "t", "description": "Write a poem", "category": "writing",
                                        "price": "10.00"})
    assert await count(dep, "SELECT count(*) FROM tm_tasks WHERE poster_id = $1", uuid.UUID(poster_id)) == 1
    assert await balance(dep, poster_id) == Decimal("90")
    task = await post_task(dep, tok)
    cancel_me = await post_task(dep, tok, price="1.00")

    await twice(dep, f"/v1/tasks/{task['id']}/bids", ak, {"proposedPrice": 15, "coverLetter": "me"})
    assert await count(dep, "SELECT count(*) FROM tm_bids WHERE task_id = $1", uuid.UUID(task["id"])) == 1
    other = await agent(dep)
    other_bid = await bid(dep, other["apiKey"], task["id"], 14)
    await twice(dep, f"/v1/tasks/{task['id']}/bids/{other_bid['id']}/reject", tok, status=200)
    our_bid = await dep.pool.fetchval("SELECT id FROM tm_bids WHERE task_id = $1 AND status = 'pending'",
                                      uuid.UUID(task["id"]))
    await twice(dep, f"/v1/tasks/{task['id']}/bids/{our_bid}/accept", tok, status=200)
    refunds = await count(dep, "SELECT count(*) FROM ledger_entries WHERE memo = $1",
                          f"tm:{task['id']} escrow above the accepted bid")
    assert refunds == 1 and await balance(dep, poster_id) == Decimal("90") - 15 - 1

    await twice(dep, f"/v1/tasks/{task['id']}/progress", ak, {"event": "step", "message": "m", "metadata": {"a": 1}})
    assert await count(dep, "SELECT count(*) FROM tm_traces WHERE task_id = $1", uuid.UUID(task["id"])) == 1
    await twice(dep, f"/v1/tasks/{task['id']}/deliver", ak, {"content": POOR})
    await twice(dep, f"/v1/tasks/{task['id']}/resubmit", ak, {"content": GOOD})
    assert await count(dep, "SELECT count(*) FROM tm_deliveries WHERE task_id = $1", uuid.UUID(task["id"])) == 2
    owner_before = await balance(dep, user_id)
    await twice(dep, f"/v1/tasks/{task['id']}/review", tok, {"decision": "accept"}, status=200)
    assert await balance(dep, user_id) - owner_before == Decimal("15")
    await twice(dep, f"/v1/tasks/{cancel_me['id']}/cancel", tok, status=200)
    assert await count(dep, "SELECT count(*) FROM ledger_entries WHERE memo = $1",
                       f"tm:{cancel_me['id']} task cancelled") == 1


async def test_same_key_with_another_body_is_422_and_other_callers_are_independent(deployment):
    dep = deployment
    a_id, a_tok = await poster(dep, 50)
    b_id, b_tok = await poster(dep, 50)
    k = str(uuid.uuid4())
    body = {"title": "t", "description": "d", "category": "coding", "price": "5.00"}
    s1, first = await raw(dep, "POST", "/v1/tasks", a_tok, k, body)
    assert s1 == 201
    # Key order and spacing do not make another request.
    s2, again = await raw(dep, "POST", "/v1/tasks", a_tok, k, dict(reversed(list(body.items()))))
    assert (s2, again) == (s1, first)
    status, changed = await raw(dep, "POST", "/v1/tasks", a_tok, k, {**body, "price": "6.00"})
    assert status == 422
    import orjson

    assert orjson.loads(changed)["error"]["code"] == "UNPROCESSABLE"
    assert await balance(dep, a_id) == Decimal("45")
    # Another route with the same key is another request too.
    status, _ = await raw(dep, "POST", "/v1/agents", a_tok, k, {"name": "x"})
    assert status == 422
    # Another caller's use of the key is its own.
    s3, other = await raw(dep, "POST", "/v1/tasks", b_tok, k, body)
    assert s3 == 201 and other != first
    assert await balance(dep, b_id) == Decimal("45")


async def test_twenty_concurrent_requests_with_one_key_take_effect_once(deployment):
    dep = deployment
    poster_id, tok = await poster(dep, 100)
    k = str(uuid.uuid4())
    body = {"title": "t", "description": "d", "category": "coding", "price": "7.77"}
    results = await asyncio.gather(*(raw(dep, "POST", "/v1/tasks", tok, k, body) for _ in range(20)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {201, 409}, statuses
    created = {b for s, b in results if s == 201}
    assert len(created) == 1  # every 201 is the same answer
    assert await count(dep, "SELECT count(*) FROM tm_tasks WHERE poster_id = $1", uuid.UUID(poster_id)) == 1
    assert await balance(dep, poster_id) == Decimal("92.23")
    # Concurrent bids of one agent with one key: one bid.
    task = await post_task(dep, tok)
    ak = (await agent(dep))["apiKey"]
    k = str(uuid.uuid4())
    results = await asyncio.gather(*(raw(dep, "POST", f"/v1/tasks/{task['id']}/bids", ak, k,
                                         {"proposedPrice": 3, "coverLetter": "x"}) for _ in range(20)))
    assert {s for s, _ in results} <= {201, 409} and len({b for s, b in results if s == 201}) == 1
    assert await count(dep, "SELECT count(*) FROM tm_bids WHERE task_id = $1", uuid.UUID(task["id"])) == 1


async def test_failed_request_does_not_bind_the_key_and_expired_keys_run_afresh(deployment):
    dep = deployment
    poster_id, tok = await poster(dep, 20)
    k = str(uuid.uuid4())
    body = {"title": "t", "description": "d", "category": "coding", "price": "25.00"}
    status, _ = await raw(dep, "POST", "/v1/tasks", tok, k, body)
    assert status == 400  # insufficient funds: nothing happened, nothing stored
    status, _ = await raw(dep, "POST", "/v1/tasks", tok, k, {**body, "price": "5.00"})
    assert status == 201
    await dep.pool.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
                           " WHERE caller = $1 AND key = $2", f"user:{poster_id}", k)
    status, _ = await raw(dep, "POST", "/v1/tasks", tok, k, {**body, "price": "5.00"})
    assert status == 201  # past IDEMPOTENCY_TTL_S (24 h) the key is new again
    assert await balance(dep, poster_id) == Decimal("10")
    for bad_key in ("", "x" * 256, "caf\u00e9", "a b"):
        status, data = await raw(dep, "POST", "/v1/tasks", tok, bad_key, body)
        assert status == 400, (bad_key, data)


async def test_key_replays_on_another_node(deployment, tmp_path):
    dep = deployment
    poster_id, tok = await poster(dep, 20)
    node2 = await NodeProcess(dep.node.database_url, tmp_path / "node2").start()
    try:
        k = str(uuid.uuid4())
        body = {"title": "t", "description": "d", "category": "coding", "price": "4.00"}
        first = await raw(dep, "POST", "/v1/tasks", tok, k, body)
        second = await raw(dep, "POST", "/v1/tasks", tok, k, body, base=node2.api)
        assert first[0] == 201 and second == first
        assert await balance(dep, poster_id) == Decimal("16")
    finally:
        await node2.stop()


async def test_fingerprint_is_canonical_json_and_sees_method_path_and_query():
    from marketplace_api.idempotency import request_fingerprint, valid_key

    fp = request_fingerprint("POST", "/v1/tasks", b'{"a": 1, "b": [1, 2]}')
    assert fp == request_fingerprint("POST", "/v1/tasks", b'{"b":[1,2],"a":1}')
    assert fp != request_fingerprint("POST", "/v1/tasks", b'{"a": 2, "b": [1, 2]}')
    assert fp != request_fingerprint("POST", "/v1/tasks?x=1", b'{"a": 1, "b": [1, 2]}')
    assert fp != request_fingerprint("PUT", "/v1/tasks", b'{"a": 1, "b": [1, 2]}')
    assert request_fingerprint("POST", "/p", b"not json") != request_fingerprint("POST", "/p", b"not  json")
    assert valid_key("a" * 255) and not valid_key("a" * 256) and not valid_key("") and not valid_key("\u00e9")
