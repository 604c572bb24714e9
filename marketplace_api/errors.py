"""One error type for every route; the middleware renders it in the route's seed shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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
        self.headers: dict[str, str] | None = None   # extra response headers (e.g. Retry-After)
        self.close_connection = False                # close the connection after answering


def plain(status: int, message: str) -> ApiError:
    """``{"error": message}`` (bucket and task routes)."""
    return ApiError(status, message, {"error": message})


def with_message(status: int, message: str) -> ApiError:
    """``{"success": false, "message": message}``."""
    return ApiError(status, message, {"success": False, "message": message})


def guard_data_errors(handler: Handler) -> Handler:
    """Deprecated no-op: the ``data_errors`` middleware guards every route (kept for older modules)."""
    return handler


# -- error bodies of errors raised outside a handler (429, 408, 413, 404, ...) per API surface -----------
SurfaceShape = Callable[[int, str], dict]


def _default_shape(status: int, message: str) -> dict:
    # /api/v2 routes show {"success": false, "error": m}, {"error": m} or {"success": false, "message": m}.
    return {"success": False, "error": message, "message": message}


_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
          408: "REQUEST_TIMEOUT", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE", 429: "RATE_LIMITED",
          500: "INTERNAL_ERROR", 503: "UNAVAILABLE"}


def _v1_shape(status: int, message: str) -> dict:
    """Seed 003: ``{"ok": false, "error": {"code": ..., "message": ...}}``."""
    return {"ok": False, "error": {"code": _CODES.get(status, "ERROR"), "message": message}}


# /v1 (seed 003) and the escrow surface (seed 002: /jobs, /owner/, /tester/, admin disputes) share one shape.
_SURFACES: list[tuple[str, SurfaceShape]] = sorted(
    [("/v1/", _v1_shape), ("/jobs", _v1_shape), ("/owner/", _v1_shape), ("/tester/", _v1_shape),
     ("/api/v2/admin/disputes/", _v1_shape)], key=lambda item: -len(item[0]))


def register_surface(prefix: str, shape: SurfaceShape) -> None:
    """Errors raised by the app itself (rate limit, body timeout, size, unknown route) on paths under
    ``prefix`` get ``shape(status, message)`` as their body. Longest prefix wins."""
    _SURFACES.append((prefix, shape))
    _SURFACES.sort(key=lambda item: -len(item[0]))


def surface_error(path: str, status: int, message: str, default: dict | None = None) -> ApiError:
    """An ApiError whose body has the error shape of the surface ``path`` belongs to (``default``,
    else ``{"success": false, "error": m, "message": m}``, outside every registered surface)."""
    for prefix, shape in _SURFACES:
        if path.startswith(prefix):
            return ApiError(status, message, shape(status, message))
    return ApiError(status, message, default if default is not None else _default_shape(status, message))
