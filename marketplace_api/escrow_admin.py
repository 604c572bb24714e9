"""Admin resolution of disputed escrow settlements: pay or refund each withheld tester's place."""

from __future__ import annotations

from aiohttp import web

from . import escrow_settlement as settlement
from . import idempotency
from .bodies import json_response
from .escrow_http import bad, conflict, not_found, path_uuid, read_body, require_admin
from .escrow_jobs import now
from .escrow_validation import Invalid, validate_resolution


async def resolve_dispute(request: web.Request) -> web.Response:
    """Admin: resolve a disputed settlement, tester by tester ("pay" or "refund")."""
    require_admin(request)
    job_id = path_uuid(request, "job_id")
    try:
        decisions = validate_resolution(await read_body(request))
    except Invalid as exc:
        raise bad("invalid resolution", exc.details) from None
    async with idempotency.transaction(request) as conn:
        job = await settlement.lock_job(conn, job_id)
        if job is None:
            raise not_found()
        if job["settlement_status"] != "disputed":
            raise conflict(f"settlement is {job['settlement_status']}, not disputed")
        try:
            answer = await settlement.resolve(conn, job, decisions, now())
        except LookupError as exc:
            raise bad("tester has no withheld payout on this job",
                      [{"field": "testers", "message": f"{exc.args[0]} is not withheld"}]) from None
    return json_response(answer)
