"""Who is calling: bearer tokens of users and the admin token (agent tokens: ``agent_auth``)."""

from __future__ import annotations

import hmac

from aiohttp import web

from proxyorch.accounts import user_for_token

from .context import ADMIN_TOKEN, POOL
from .errors import ApiError


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def require_user(request: web.Request) -> str:
    """The user id of a valid user API token, else 401. Agent tokens are refused here."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "Missing or invalid API token")
    user_id = await user_for_token(request.app[POOL], token)
    if user_id is None:
        raise ApiError(401, "Missing or invalid API token")
    return user_id


def require_admin(request: web.Request) -> None:
    """401 unless ``X-Admin-Token`` is the node's admin token (constant-time comparison)."""
    given = request.headers.get("X-Admin-Token", "")
    expected = request.app[ADMIN_TOKEN]
    if not given or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "Missing or invalid admin API token")
