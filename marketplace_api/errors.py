"""One error type for every route; the middleware renders it in the route's seed shape."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """Raise from a handler: ``status`` and a JSON ``body`` exactly as the seed shows it.

    The default body is ``{"success": false, "error": message}``; pass ``body`` for routes whose
    seed shows another shape (``{"error": ...}``, ``{"success": false, "message": ...}``).
    """

    def __init__(self, status: int, message: str, body: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body if body is not None else {"success": False, "error": message}


def plain(status: int, message: str) -> ApiError:
    """``{"error": message}`` (bucket and task routes)."""
    return ApiError(status, message, {"error": message})


def with_message(status: int, message: str) -> ApiError:
    """``{"success": false, "message": message}``."""
    return ApiError(status, message, {"success": False, "message": message})


def guard_data_errors(handler: Handler) -> Handler:
    """Input PostgreSQL cannot store (NUL characters, out-of-range values) is a 400, never a 500."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncpg.DataError as exc:
            raise ApiError(400, f"invalid input: {exc.__class__.__name__}") from None

    return wrapper
