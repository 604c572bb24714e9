"""The API's middlewares, outermost first; each handles one family of failures or one limit.

- ``unexpected_errors``: anything unhandled is logged and answered with a JSON 500 (never a traceback);
- ``http_errors``: aiohttp's own ``HTTPException`` s (unknown route 404, 405, 413, ...) as JSON;
- ``api_errors``: :class:`ApiError` raised by a handler, in the body shape it carries;
- ``rate_limits``: ``API_RATE_PER_IP`` / ``API_RATE_PER_TOKEN`` (429 + ``Retry-After``;
  ``/healthz`` and ``/metrics`` exempt);
- ``body_deadline``: a body not complete ``API_BODY_TIMEOUT_S`` after the headers → 408 and the
  connection closes;
- ``data_errors``: values PostgreSQL refuses (NUL characters, out-of-range numbers) and bodies that
  do not decode (a bad ``Content-Encoding`` stream) → 400, for every route (the one data-error guard).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from proxyorch.config import Settings

from . import store_errors
from .bodies import UNDECODABLE, end_undecodable_body, json_response
from .errors import ApiError, surface_error
from .exhaustion import is_exhausted, unavailable
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NO_ROUTE = "no such route"
RATE_EXEMPT = frozenset({"/healthz", "/metrics"})


@web.middleware
async def unexpected_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (web.HTTPException, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response({"success": False, "message": "Internal Server Error"}, 500)


_OK_SHAPED = ("/v1/", "/jobs", "/owner/", "/tester/", "/api/v2/admin/disputes/")


@web.middleware
async def store_outages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """PostgreSQL away (connection refused, shutting down, connection lost): 503 + Retry-After in the
    surface's shape, never a 500 (a client retrying with its Idempotency-Key never pays twice)."""
    try:
        return await handler(request)
    except (web.HTTPException, asyncio.CancelledError, ApiError):
        raise
    except Exception as exc:
        if is_exhausted(exc):  # out of descriptors (EMFILE) or kernel memory: retry shortly
            return unavailable(surface_error(request.path, 503, "server temporarily out of resources, "
                                             "retry later").body)
        if not store_errors.is_store_unavailable(exc):
            raise
        body = store_errors.ESCROW_BODY if request.path.startswith(_OK_SHAPED) else store_errors.API_V2_BODY
        return store_errors.response(body, request, exc)


_HTTP_MESSAGES = {404: NO_ROUTE, 405: "method not allowed", 413: "request body too large"}


@web.middleware
async def http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        err = surface_error(request.path, exc.status, message, {"success": False, "error": message})
        return json_response(err.body, err.status)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = json_response(exc.body, exc.status, exc.headers)
        if exc.close_connection:
            response.force_close()
        return response


@web.middleware
async def data_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncpg.DataError as exc:
        raise ApiError(400, f"invalid input: {exc.__class__.__name__}") from None
    except web.RequestPayloadError:  # a body that does not decode (Content-Encoding deflate/gzip of garbage)
        end_undecodable_body(request)
        err = ApiError(400, UNDECODABLE)
        err.close_connection = True
        raise err from None


def _token_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization") or request.headers.get("X-Admin-Token")
    if not header:
        return None
    return hashlib.blake2b(header.strip().encode(), digest_size=16).hexdigest()


def rate_limits(settings: Settings, clock: Callable[[], float]) -> Callable:
    """The rate-limit middleware for ``settings`` (per address first, then per token)."""
    per_ip = RateLimiter(settings.api_rate_per_ip.per_second, settings.api_rate_per_ip.burst) \
        if settings.api_rate_per_ip.enabled else None
    per_token = RateLimiter(settings.api_rate_per_token.per_second, settings.api_rate_per_token.burst) \
        if settings.api_rate_per_token.enabled else None

    def refuse(request: web.Request, wait: float, what: str) -> ApiError:
        err = surface_error(request.path, 429, f"too many requests {what}; retry later")
        err.headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        return err

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in RATE_EXEMPT:
            now = clock()
            if per_ip is not None:
                wait = per_ip.acquire(request.remote or "", now)
                if wait:
                    raise refuse(request, wait, "from this address")
            key = _token_key(request) if per_token is not None else None
            if key is not None:
                wait = per_token.acquire(key, now)  # type: ignore[union-attr]
                if wait:
                    raise refuse(request, wait, "with this token")
        return await handler(request)

    return limit


def body_deadline(timeout_s: float) -> Callable:
    """The body-timeout middleware: the handler is cancelled and 408 sent if the body is still
    incomplete ``timeout_s`` after the request reached the app."""

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists or request.content.is_eof() or timeout_s <= 0:
            return await handler(request)
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def expire() -> None:
            nonlocal fired
            if not request.content.is_eof():
                fired = True
                task.cancel()

        timer = asyncio.get_running_loop().call_later(timeout_s, expire)
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if not fired:
                raise
            task.uncancel()
            err = surface_error(request.path, 408, f"request body not received within {timeout_s:g} s")
            err.close_connection = True
            raise err from None
        finally:
            timer.cancel()

    return deadline


def middlewares(settings: Settings) -> list:
    """Every middleware of the app, outermost first."""
    return [unexpected_errors, store_outages, http_errors, api_errors, rate_limits(settings, time.monotonic),
            body_deadline(settings.api_body_timeout_s), data_errors]
