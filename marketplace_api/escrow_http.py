"""HTTP plumbing of the escrow surface (seed 002): its error shape, body reading, auth, cursors.

Every error on these routes is ``{"ok": false, "error": {"code", "message"}}`` (plus ``details``
for per-field validation errors). :func:`error_middleware` applies that shape to the surface's
paths only, so the ``/api/v2`` routes keep theirs.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from . import store_errors
from .auth import bearer_token
from .bodies import UNDECODABLE, end_undecodable_body, json_response
from .context import ADMIN_TOKEN, POOL

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PREFIXES = ("/jobs", "/owner/", "/tester/", "/api/v2/admin/disputes/")
CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
         409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE", 500: "INTERNAL"}


class EscrowError(Exception):
    """An error answer of this surface: HTTP ``status``, a stable ``code`` and a human ``message``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "ERROR")
        self.message = message
        self.details = details

    def body(self) -> dict:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err["details"] = self.details
        return {"ok": False, "error": err}


def bad(message: str, details: list[dict[str, str]] | None = None) -> EscrowError:
    return EscrowError(400, message, details=details)


def not_found(what: str = "job") -> EscrowError:
    return EscrowError(404, f"{what} not found")


def conflict(message: str) -> EscrowError:
    return EscrowError(409, message)


def in_scope(path: str) -> bool:
    return path == "/jobs" or path.startswith(PREFIXES)


@web.middleware
async def error_middleware(request: web.Request, handler):  # noqa: ANN001, ANN201
    """Renders every error of the escrow paths in this surface's shape; other paths pass through."""
    if not in_scope(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except EscrowError as exc:
        return json_response(exc.body(), exc.status)
    except asyncpg.DataError as exc:  # input PostgreSQL cannot store: a 400, never a 500
        return json_response(bad(f"invalid input ({type(exc).__name__})").body(), 400)
    except web.HTTPRequestEntityTooLarge:
        return json_response(bad("request body too large").body(), 400)
    except web.RequestPayloadError:
        end_undecodable_body(request)
        response = json_response(bad(UNDECODABLE).body(), 400)
        response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status, exc.reason)
        return json_response(EscrowError(exc.status, message).body(), exc.status)
    except Exception as exc:
        if store_errors.is_store_unavailable(exc):
            return store_errors.response(store_errors.ESCROW_BODY, request, exc)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(EscrowError(500, "internal error").body(), 500)


async def read_body(request: web.Request, required: bool = True) -> dict:
    """The JSON object body, or a 400 in this surface's shape."""
    if not request.body_exists:  # (not can_read_body: an Idempotency-Key layer may have read it)
        if required:
            raise bad("request body must be a JSON object")
        return {}
    raw = await request.read()
    if not raw.strip() and not required:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    return body


async def require_user(request: web.Request) -> str:
    """The user id of a valid user token (Bearer), else 401; looked up once per request (so an
    ``Idempotency-Key`` handler takes no second pool connection)."""
    from proxyorch.accounts import user_for_token

    cached = request.get("escrow.user")
    if cached is not None:
        return cached
    token = bearer_token(request)
    user_id = await user_for_token(request.app[POOL], token) if token else None
    if user_id is None:
        raise EscrowError(401, "missing or invalid API token")
    request["escrow.user"] = user_id
    return user_id


def require_admin(request: web.Request) -> None:
    import hmac

    given = request.headers.get("X-Admin-Token", "")
    expected = request.app[ADMIN_TOKEN]
    if not given or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise EscrowError(401, "missing or invalid admin token")


def path_uuid(request: web.Request, name: str = "id", what: str = "job") -> str:
    """A path id as a canonical UUID; anything else is a 404 (it cannot name an object)."""
    import uuid

    try:
        return str(uuid.UUID(request.match_info[name]))
    except ValueError:
        raise not_found(what) from None


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- cursors: opaque, keyset on a monotonically assigned sequence number ------------------------------
def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"c1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(value: str | None) -> int | None:
    """The sequence number a cursor stands for; None for no cursor; 400 for a malformed one."""
    if value is None or value == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        tag, _, number = raw.partition(":")
        seq = int(number)
        if tag != "c1" or seq < 0 or str(seq) != number:
            raise ValueError
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad("cursor is not valid") from None
    return seq


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None or raw == "":
        return 20
    try:
        limit = int(raw)
    except ValueError:
        raise bad("limit must be an integer between 1 and 50") from None
    if not 1 <= limit <= 50:
        raise bad("limit must be an integer between 1 and 50")
    return limit
