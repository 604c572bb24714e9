"""Payments: withdrawals (validation, concurrency), history with totals, balance figures."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
from marketplace_fixtures import funded_user

pytestmark = pytest.mark.asyncio(loop_scope="session")
WALLET = "0x" + "ab" * 20


async def test_withdraw_and_history(deployment):
    user_id, token = await funded_user(deployment, amount=12.5)
    status, body = await deployment.call("POST", "/api/v2/payments/withdraw", token,
                                         json={"amount": 10, "wallet_address": WALLET})
    assert (status, body["msg"]) == (200, "withdraw done")
    status, bal = await deployment.call("GET", "/api/v2/user/balance", token)
    assert bal == {"balance": 12.5, "active_balance": 2.5, "pending_earnings": 0}
    status, hist = await deployment.call("GET", "/api/v2/payments/withdrawals", token, params={"page": "1"})
    assert status == 200
    assert hist["total_count"] == 1 and hist["page"] == 1 and hist["balance"] == 12.5
    assert hist["total_withdraw"] == -10 and hist["total_deposit"] == 12.5
    tx = hist["transactions"][0]
    assert tx["_id"] == tx["transaction_id"] and tx["user_id"] == user_id
    assert tx["payment_type"] == "Withdrawal" and tx["amount"] == "-10" and tx["transaction_fee"] == "0"
    assert tx["currency"] == "USD" and tx["wallet_address"] == WALLET and tx["status"] == "pending"
    assert tx["recipient_id"] is None and tx["crypto_uuid"] is None and tx["reason"] is None
    assert tx["created"].endswith("Z") and tx["__v"] == 0 and len(tx["reference_id"]) == 8


async def test_withdraw_errors(deployment):
    _, token = await funded_user(deployment, amount=5)
    call = deployment.call
    cases = [({"amount": 50, "wallet_address": WALLET}, "Insufficient balance"),
             ({"amount": 0.5, "wallet_address": WALLET}, "minimum payout"),
             ({"amount": 2, "wallet_address": "0x1234567890abcdef"}, "Invalid wallet address"),
             ({"amount": 2}, "wallet_address is required"),
             ({"amount": "abc", "wallet_address": WALLET}, "amount"),
             ({"amount": -3, "wallet_address": WALLET}, "amount"),
             ({"amount": 1.0000001, "wallet_address": WALLET}, "amount")]
    for payload, fragment in cases:
        status, body = await call("POST", "/api/v2/payments/withdraw", token, json=payload)
        assert status == 400 and fragment in body["error"], (payload, body)
    status, body = await call("POST", "/api/v2/payments/withdraw", token, data=b"{{",
                              headers={"Content-Type": "application/json"})
    assert status == 400
    assert (await call("POST", "/api/v2/payments/withdraw", None, json={"amount": 2}))[0] == 401
    _, empty = await funded_user(deployment, amount=0)
    assert await call("GET", "/api/v2/payments/withdrawals", empty) == (404, {"error": "No transactions found"})
    assert (await call("GET", "/api/v2/payments/withdrawals", empty, params={"limit": "0"}))[0] == 400
    assert (await call("GET", "/api/v2/user/balance", None))[0] == 401


async def test_twenty_concurrent_withdrawals_never_overdraw(deployment):
    user_id, token = await funded_user(deployment, amount=7)
    results = await asyncio.gather(*(
        deployment.call("POST", "/api/v2/payments/withdraw", token, json={"amount": 1.5, "wallet_address": WALLET})
        for _ in range(20)))
    ok = [r for r in results if r[0] == 200]
    assert len(ok) == 4  # 4 × 1.5 = 6 ≤ 7 < 7.5
    assert all(r == (400, {"error": "Insufficient balance"}) for r in results if r[0] != 200)
    total = await deployment.pool.fetchval("SELECT sum(amount) FROM ledger_entries WHERE user_id = $1",
                                           uuid.UUID(user_id))
    assert total == Decimal("1.000000")
    status, bal = await deployment.call("GET", "/api/v2/user/balance", token)
    assert bal["active_balance"] == 1 and bal["balance"] == 7
    count = await deployment.pool.fetchval("SELECT count(*) FROM withdrawals WHERE user_id = $1", uuid.UUID(user_id))
    assert count == 4


async def test_withdrawals_are_per_user(deployment):
    _, a = await funded_user(deployment, amount=5)
    _, b = await funded_user(deployment, amount=5)
    await deployment.call("POST", "/api/v2/payments/withdraw", a, json={"amount": 2, "wallet_address": WALLET})
    assert (await deployment.call("GET", "/api/v2/payments/withdrawals", b))[0] == 404
    assert (await deployment.call("GET", "/api/v2/user/balance", b))[1]["active_balance"] == 5


async def test_admin_deposit_requires_admin(deployment):
    user_id, _ = await deployment.user()
    assert (await deployment.call("POST", "/api/v2/admin/deposits", json={"user_id": user_id, "amount": 5}))[0] == 401
    assert (await deployment.call("POST", "/api/v2/admin/deposits", admin=True,
                                  json={"user_id": str(uuid.uuid4()), "amount": 5}))[0] == 404
    assert (await deployment.call("POST", "/api/v2/admin/deposits", admin=True,
                                  json={"user_id": user_id, "amount": -5}))[0] == 400
