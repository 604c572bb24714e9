"""The /v1 surface's shared parts: its error shape and middleware, callers (agent keys, user tokens),
body and number parsing, the Idempotency-Key policy.

Every failure on /v1 is ``{"ok": false, "error": {"code", "message"}}`` with the seed's codes; the
middleware (scoped to paths under /v1/) turns unknown routes, oversized bodies, database data errors
and anything unexpected into that shape, so /api/v2 keeps its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from proxyorch.tokens import hash_token

from . import idempotency, store_errors
from .auth import bearer_token
from .bodies import UNDECODABLE, end_undecodable_body, json_response
from .context import POOL
from .errors import ApiError

log = logging.getLogger(__name__)
PREFIX = "/v1/"
AGENT_KEY_PREFIX = "ak_"
CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
         409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE", 422: "UNPROCESSABLE"}
MAX_PRICE = Decimal("1000000000")
CENT = Decimal("0.01")


def v1_error(status: int, code: str | None, message: str) -> ApiError:
    """An ApiError rendered as ``{"ok": false, "error": {"code", "message"}}``."""
    return ApiError(status, message, {"ok": False, "error": {"code": code or CODES.get(status, "ERROR"),
                                                             "message": message}})


def bad(message: str) -> ApiError:
    return v1_error(400, "BAD_REQUEST", message)


def not_found(what: str = "Task") -> ApiError:
    return v1_error(404, "NOT_FOUND", f"{what} does not exist")


def forbidden(message: str) -> ApiError:
    return v1_error(403, "FORBIDDEN", message)


def conflict(message: str) -> ApiError:
    return v1_error(409, "CONFLICT", message)


def ok(data: Any, status: int = 200) -> web.Response:
    return json_response({"ok": True, "data": data}, status)


@web.middleware
async def v1_errors(request: web.Request, handler):  # noqa: ANN001, ANN201
    """Inner middleware: only /v1 paths; ApiError passes through to the app's error middleware."""
    if not request.path.startswith(PREFIX) and request.path != "/v1":
        return await handler(request)
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPRequestEntityTooLarge:
        raise v1_error(413, "BAD_REQUEST", "request body too large") from None
    except web.HTTPNotFound:
        raise v1_error(404, "NOT_FOUND", "no such route") from None
    except web.HTTPMethodNotAllowed:
        raise v1_error(405, "METHOD_NOT_ALLOWED", "method not allowed") from None
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        raise v1_error(exc.status, None, exc.reason) from None
    except asyncpg.DataError as exc:
        raise bad(f"invalid input: {exc.__class__.__name__}") from None
    except web.RequestPayloadError:
        end_undecodable_body(request)
        err = bad(UNDECODABLE)
        err.close_connection = True
        raise err from None
    except Exception as exc:
        if store_errors.is_store_unavailable(exc):
            return store_errors.response(store_errors.V1_BODY, request, exc)
        log.exception("unhandled error on %s %s", request.method, request.path)
        raise v1_error(500, "INTERNAL", "internal error") from None


# -- callers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Agent:
    id: str
    user_id: str
    name: str


def pool_of(request: web.Request) -> asyncpg.Pool:
    return request.app[POOL]


async def require_agent(request: web.Request) -> Agent:
    """The agent of a valid, unrevoked ``ak_`` key, else 401. User tokens are not agent keys."""
    cached = request.get("tm.agent")
    if cached is not None:
        return cached
    token = bearer_token(request)
    if token is None or not token.startswith(AGENT_KEY_PREFIX):
        raise v1_error(401, "UNAUTHORIZED", "Missing or invalid API key")
    row = await pool_of(request).fetchrow("SELECT id, user_id, name FROM tm_agents WHERE key_hash = $1"
                                          " AND revoked_at IS NULL", hash_token(token))
    if row is None:
        raise v1_error(401, "UNAUTHORIZED", "Missing or invalid API key")
    agent = Agent(str(row["id"]), str(row["user_id"]), row["name"])
    request["tm.agent"] = agent
    return agent


async def require_poster(request: web.Request) -> str:
    """The user id of a valid user token, else 401. Agent keys are not user tokens."""
    cached = request.get("tm.user")
    if cached is not None:
        return cached
    from proxyorch.accounts import user_for_token

    token = bearer_token(request)
    user_id = None
    if token is not None and not token.startswith(AGENT_KEY_PREFIX):
        user_id = await user_for_token(pool_of(request), token)
    if user_id is None:
        raise v1_error(401, "UNAUTHORIZED", "Missing or invalid API token")
    request["tm.user"] = user_id
    return user_id


async def require_any(request: web.Request) -> Agent | str:
    """An agent (``ak_`` key) or a user id (user token)."""
    token = bearer_token(request) or ""
    if token.startswith(AGENT_KEY_PREFIX):
        return await require_agent(request)
    return await require_poster(request)


async def agent_caller(request: web.Request) -> str:
    return "agent:" + (await require_agent(request)).id


async def user_caller(request: web.Request) -> str:
    return "user:" + await require_poster(request)


AGENT_IDEM = idempotency.Policy(agent_caller, v1_error)
USER_IDEM = idempotency.Policy(user_caller, v1_error)


# -- input ---------------------------------------------------------------------------------------
async def read_body(request: web.Request) -> dict:
    """The JSON object body, else 400 (413 over MAX_BODY_BYTES)."""
    raw = await request.read()  # cached: the Idempotency-Key layer may have read it already
    if not raw.strip():
        raise bad("request body must be a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    return body


def text_field(body: dict, name: str, *, required: bool = True, max_len: int = 10000, default: str = "") -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"{name} is required")
        return default
    if not isinstance(value, str):
        raise bad(f"{name} must be a string")
    value = value.strip()
    if required and not value:
        raise bad(f"{name} must not be empty")
    if len(value) > max_len:
        raise bad(f"{name} must be at most {max_len} characters")
    if "\x00" in value:
        raise bad(f"{name} must not contain NUL characters")
    return value


def price_field(value: Any, name: str, *, allow_string: bool) -> Decimal:
    """A price > 0 with at most 2 decimals, exact."""
    if isinstance(value, bool) or not isinstance(value, int | float | str) or (
            isinstance(value, str) and not allow_string):
        raise bad(f"{name} must be a number" + (" or a decimal string" if allow_string else ""))
    try:
        dec = Decimal(str(value).strip())
    except InvalidOperation:
        raise bad(f"{name} must be a decimal number") from None
    if not dec.is_finite() or dec <= 0 or dec > MAX_PRICE:
        raise bad(f"{name} must be greater than 0 and at most {MAX_PRICE}")
    if dec != dec.quantize(CENT):
        raise bad(f"{name} must have at most 2 decimals")
    return dec.quantize(CENT)


def price_str(value: Decimal) -> str:
    return str(Decimal(value).quantize(CENT))


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_id(value: str, what: str = "Task") -> str:
    """A path id that is not a UUID cannot exist: 404."""
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise not_found(what) from None
