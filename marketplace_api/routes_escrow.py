"""Registers the escrow surface (seed 002) at the seed's own paths, its error middleware, its OpenAPI
entries, and the sweep (a background task owned by the app: started on startup, cancelled on cleanup).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import web

from . import escrow_admin, escrow_jobs, escrow_tester, idempotency
from .context import POOL, SETTINGS
from .escrow_http import EscrowError, Handler, error_middleware, require_admin, require_user
from .escrow_openapi import SCHEMAS, operation
from .escrow_sweep import sweeper

ID = "{id:[^/]+}"  # any segment reaches the handler: auth first (401), then a malformed id is a 404
# Money-moving POSTs: they honour ``Idempotency-Key`` through the shared ``idempotency`` module.
MONEY_MOVING = ("create_job", "resize_job", "settle_job", "approve_job", "dispute_job", "resolve_dispute")


async def _user_caller(request: web.Request) -> str:
    return "user:" + await require_user(request)


async def _admin_caller(request: web.Request) -> str:
    require_admin(request)
    return "admin"


def _error(status: int, code: str, message: str) -> EscrowError:
    return EscrowError(status, message, code)


_USER_IDEM = idempotency.Policy(_user_caller, _error)
_ADMIN_IDEM = idempotency.Policy(_admin_caller, _error)


def _money(handler: Handler, admin: bool = False) -> Handler:
    """``handler`` honouring ``Idempotency-Key`` (its writes go through ``idempotency.transaction``)."""
    return (_ADMIN_IDEM if admin else _USER_IDEM)(handler)


def _documented(handler: Handler, admin: bool = False) -> Handler:
    op = operation(handler.__name__)
    if admin:
        op["security"] = [{"admin": []}]
    handler.openapi = {"operation": op, "schemas": SCHEMAS}  # type: ignore[attr-defined]
    return _money(handler, admin) if handler.__name__ in MONEY_MOVING else handler


async def _sweep_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    task = asyncio.create_task(sweeper(app[POOL], s.market_sweep_s, s.settlement_deadline_s,
                                       lambda: datetime.now(UTC)))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    app.middlewares.append(error_middleware)
    idempotency.setup(app)
    add = app.router.add_route
    j, t = escrow_jobs, escrow_tester
    for method, path, handler in (
            ("POST", "/jobs", j.create_job), ("GET", "/jobs", j.list_jobs), ("GET", "/jobs/{id}", j.get_job),
            ("POST", "/owner/jobs/{id}/pause", j.pause_job), ("POST", "/owner/jobs/{id}/resume", j.resume_job),
            ("POST", "/owner/jobs/{id}/stop", j.stop_job), ("POST", "/owner/jobs/{id}/settle", j.settle_job),
            ("POST", "/owner/jobs/{id}/approve", j.approve_job), ("POST", "/owner/jobs/{id}/dispute", j.dispute_job),
            ("POST", "/owner/jobs/{id}/resize", j.resize_job),
            ("GET", "/tester/jobs", t.open_jobs), ("POST", "/tester/jobs/{id}/assignments", t.take_place),
            ("POST", "/tester/assignments/{id}/submit", t.submit_assignment),
            ("POST", "/tester/assignments/{id}/abandon", t.abandon_assignment),
            ("PUT", "/tester/profile", t.put_profile)):
        add(method, path.replace("{id}", ID), _documented(handler))
    add("POST", "/api/v2/admin/disputes/{job_id:[^/]+}/resolve", _documented(escrow_admin.resolve_dispute, admin=True))
    app.cleanup_ctx.append(_sweep_ctx)
