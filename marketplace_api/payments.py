"""Payments: withdrawals, withdrawal history, balance; admin deposits.

``active_balance`` is the spendable sum of the user's ledger rows. ``balance`` adds the amounts of
withdrawals still ``pending`` payout (debited from the ledger, but still the user's until paid).
``pending_earnings`` is what the user's submitted, not yet reviewed, tasks would pay.
"""

from __future__ import annotations

import re
import secrets
import uuid
from decimal import Decimal

from aiohttp import web

from . import idempotency, ledger
from .api_idempotency import ADMIN, USER_PLAIN
from .api_idempotency import user as idempotent_user
from .auth import require_admin, require_user
from .bodies import json_response, read_json
from .common import iso, money, pages, parse_int, parse_money, parse_uuid, pool_of
from .errors import ApiError, plain
from .paging import list_route

WALLETS = [re.compile(p) for p in (
    r"^0x[0-9a-fA-F]{40}$",                     # EVM (ETH, BSC, Polygon …)
    r"^T[1-9A-HJ-NP-Za-km-z]{33}$",             # TRON
    r"^(bc1|tb1)[02-9ac-hj-np-z]{11,71}$",      # bech32 Bitcoin
    r"^[13][1-9A-HJ-NP-Za-km-z]{25,34}$",       # legacy Bitcoin
)]


def valid_wallet(address: object) -> bool:
    return isinstance(address, str) and any(p.match(address) for p in WALLETS)


async def _figures(conn, user_id: str) -> dict:  # noqa: ANN001
    active = await ledger.balance(conn, user_id)
    held = Decimal(await conn.fetchval(
        "SELECT COALESCE(SUM(amount), 0) FROM withdrawals WHERE user_id = $1 AND status = 'pending'", user_id))
    pending = Decimal(await conn.fetchval(
        """SELECT COALESCE(SUM(j.job_price), 0) FROM job_tasks t JOIN jobs j ON j.id = t.job_id
           WHERE t.worker_id = $1 AND t.status IN ('pending', 'processing', 'running')""", user_id))
    return {"balance": active + held, "active_balance": active, "pending_earnings": pending}


async def balance(request: web.Request) -> web.Response:
    """The caller's balance, active (spendable) balance and pending earnings."""
    user = await require_user(request)
    figures = await _figures(pool_of(request), user)
    return json_response({k: money(v) for k, v in figures.items()})


@USER_PLAIN
async def withdraw(request: web.Request) -> web.Response:
    """Withdraw from the active balance to a wallet address (honours ``Idempotency-Key``)."""
    user = await idempotent_user(request)
    try:
        body = await read_json(request)
    except ApiError as exc:
        raise plain(400, exc.message) from None
    amount = parse_money(body.get("amount"))
    if amount is None or amount <= 0:
        raise plain(400, "amount must be a positive number with at most 6 decimals")
    if amount < ledger.MIN_PAYOUT:
        raise plain(400, f"Amount is below the minimum payout of {money(ledger.MIN_PAYOUT)}")
    wallet = body.get("wallet_address")
    if not wallet:
        raise plain(400, "wallet_address is required")
    if not valid_wallet(wallet):
        raise plain(400, "Invalid wallet address")
    withdrawal_id = str(uuid.uuid4())
    async with idempotency.transaction(request) as conn:
        try:
            await ledger.debit(conn, user, amount, "withdrawal", withdrawal_id=withdrawal_id)
        except ledger.InsufficientFunds:
            raise plain(400, "Insufficient balance") from None
        await conn.execute(
            "INSERT INTO withdrawals(id, reference_id, user_id, amount, wallet_address) VALUES ($1, $2, $3, $4, $5)",
            withdrawal_id, str(secrets.randbelow(90_000_000) + 10_000_000), user, amount, wallet)
        await conn.execute("UPDATE users SET wallet_address = $2 WHERE id = $1", user, wallet)
    return json_response({"msg": "withdraw done", "withdrawal_id": withdrawal_id})


def _transaction(w, user_id: str) -> dict:  # noqa: ANN001
    wid = str(w["id"])
    return {
        "_id": wid, "reference_id": w["reference_id"], "user_id": user_id, "recipient_id": None,
        "crypto_uuid": None, "payment_type": "Withdrawal", "payment_method": w["payment_method"],
        "payment_details": "", "transaction_fee": str(money(w["fee"])), "currency": w["currency"],
        "amount": str(money(-w["amount"])), "wallet_address": w["wallet_address"], "status": w["status"],
        "reason": w["reason"], "created": iso(w["created"]), "updated": iso(w["updated"]),
        "process_date": iso(w["process_date"]), "transaction_id": wid,
        "transaction_proof": w["transaction_proof"], "__v": 0,
    }


@list_route(100, 10)
async def withdrawals(request: web.Request) -> web.Response:
    """The caller's withdrawals, newest first, with totals."""
    user = await require_user(request)
    bad = lambda m: plain(400, m)  # noqa: E731
    page = parse_int(request.query.get("page"), "page", 1, 1, 1_000_000, bad)
    limit = parse_int(request.query.get("limit"), "limit", 10, 1, 100, bad)
    pool = pool_of(request)
    total = await pool.fetchval("SELECT count(*) FROM withdrawals WHERE user_id = $1", user)
    if not total:
        raise plain(404, "No transactions found")
    rows = await pool.fetch("SELECT * FROM withdrawals WHERE user_id = $1 ORDER BY created DESC, id"
                            " LIMIT $2 OFFSET $3", user, limit, (page - 1) * limit)
    sums = await pool.fetchrow(
        """SELECT COALESCE(SUM(amount) FILTER (WHERE kind = 'withdrawal'), 0) AS withdrawn,
                  COALESCE(SUM(amount) FILTER (WHERE kind = 'deposit'), 0) AS deposited
           FROM ledger_entries WHERE user_id = $1""", user)
    figures = await _figures(pool, user)
    return json_response({"total_count": total, "transactions": [_transaction(r, user) for r in rows],
                          "page": page, "pages": pages(total, limit), "balance": money(figures["balance"]),
                          "total_withdraw": money(sums["withdrawn"]), "total_deposit": money(sums["deposited"])})


@ADMIN
async def admin_deposit(request: web.Request) -> web.Response:
    """Admin: credit a user's balance (a deposit ledger row; honours ``Idempotency-Key``)."""
    require_admin(request)
    body = await read_json(request)
    user = parse_uuid(body.get("user_id"))
    amount = parse_money(body.get("amount"))
    if user is None or amount is None or amount <= 0:
        raise ApiError(400, "user_id and a positive amount are required")
    async with idempotency.transaction(request) as conn:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user):
            raise ApiError(404, "User not found")
        memo = body.get("memo") if isinstance(body.get("memo"), str) else None
        await ledger.post(conn, user, amount, "deposit", memo=memo)
        new_balance = await ledger.balance(conn, user)
    return json_response({"success": True, "user_id": user, "active_balance": money(new_balance)})
