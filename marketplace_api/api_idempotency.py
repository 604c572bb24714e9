"""``Idempotency-Key`` on the /api/v2 money-moving routes, through the one shared :mod:`.idempotency`.

``USER_PLAIN`` (withdraw, applicant review: ``{"error": ...}``), ``USER_MESSAGE`` (job posting:
``{"success": false, "message": ...}``) and ``ADMIN`` (deposits: ``{"success": false, "error": ...}``)
wrap handlers; a handler wrapped with a user policy takes its caller from :func:`user` so that no
second pool connection is taken while the key's transaction holds one.
"""

from __future__ import annotations

from aiohttp import web

from . import idempotency
from .auth import require_admin, require_user
from .errors import ApiError, plain, with_message

_USER = "api_idempotency.user"


async def user(request: web.Request) -> str:
    """The caller's user id (401 without a valid user token), looked up once per request."""
    cached = request.get(_USER)
    if cached is None:
        cached = request[_USER] = await require_user(request)
    return cached


async def _user_caller(request: web.Request) -> str:
    return "user:" + await user(request)


async def _admin_caller(request: web.Request) -> str:
    require_admin(request)
    return "admin"


USER_PLAIN = idempotency.Policy(_user_caller, lambda status, _code, message: plain(status, message))
USER_MESSAGE = idempotency.Policy(_user_caller, lambda status, _code, message: with_message(status, message))
ADMIN = idempotency.Policy(_admin_caller, lambda status, _code, message: ApiError(status, message))
