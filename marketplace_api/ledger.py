"""The money ledger: every movement is one ``ledger_entries`` row; balances are sums of rows.

Debits lock the user's ``users`` row first (``SELECT … FOR UPDATE``), then read the sum and insert:
two concurrent debits of one user serialise on that lock, so a balance never goes negative.
Credits need no lock (they cannot overdraw). Call these inside a transaction.
"""

from __future__ import annotations

from decimal import Decimal

import asyncpg

REFERRAL_RATE = Decimal("0.10")  # share of a confirmed task's price paid to the worker's referrer
MIN_PAYOUT = Decimal("1")


class InsufficientFunds(Exception):
    def __init__(self, available: Decimal, needed: Decimal) -> None:
        super().__init__(f"insufficient balance: {available} < {needed}")
        self.available = available
        self.needed = needed


async def balance(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> Decimal:
    """Spendable balance: the sum of the user's ledger rows."""
    value = await conn.fetchval("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE user_id = $1", user_id)
    return Decimal(value)


async def post(conn: asyncpg.Connection, user_id: str, amount: Decimal, kind: str, *, job_id: str | None = None,
               job_task_id: str | None = None, withdrawal_id: str | None = None, memo: str | None = None,
               escrow_job_id: str | None = None, escrow_assignment_id: str | None = None) -> None:
    """Insert one ledger row (positive = credit, negative = debit) without a balance check."""
    await conn.execute(
        "INSERT INTO ledger_entries(user_id, amount, kind, job_id, job_task_id, withdrawal_id, memo,"
        " escrow_job_id, escrow_assignment_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        user_id, amount, kind, job_id, job_task_id, withdrawal_id, memo, escrow_job_id, escrow_assignment_id)


async def debit(conn: asyncpg.Connection, user_id: str, amount: Decimal, kind: str, **refs: str | None) -> Decimal:
    """Take ``amount`` (> 0) from the user, or raise InsufficientFunds; returns the new balance."""
    await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
    available = await balance(conn, user_id)
    if available < amount:
        raise InsufficientFunds(available, amount)
    await post(conn, user_id, -amount, kind, **refs)
    return available - amount


async def pay_task(conn: asyncpg.Connection, task: asyncpg.Record, price: Decimal) -> None:
    """Credit a confirmed task's worker and, when the worker was referred, the referrer's bonus.

    The unique index ``ledger_task_once`` makes a second payment of the same task impossible.
    """
    job_id, task_id, worker = str(task["job_id"]), str(task["id"]), str(task["worker_id"])
    await post(conn, worker, price, "task_earning", job_id=job_id, job_task_id=task_id)
    referrer = await conn.fetchval("SELECT referrer_id FROM users WHERE id = $1", worker)
    bonus = (price * REFERRAL_RATE).quantize(Decimal("0.000001"))
    if referrer is not None and bonus > 0:
        await post(conn, str(referrer), bonus, "referral_bonus", job_id=job_id, job_task_id=task_id,
                   memo=f"referral bonus for task {task_id}")
