"""List routes: every one is capped, and its cap is declared where the route is (and documented).

Decorate a list handler with :func:`list_route` (``maximum``, ``default``, where ``limit`` is read
from); ``openapi`` documents the ``limit`` parameter with that maximum. Routes that had no paging
take ``limit`` / ``offset`` query parameters through :func:`limit_offset`, with the default equal to
the maximum so that existing clients below the cap see no change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from .errors import ApiError

H = TypeVar("H", bound=Callable)
MAX_OFFSET = 10**9


@dataclass(frozen=True)
class ListLimit:
    """The ``limit`` of one list route: its default and maximum, and where it is read from."""

    maximum: int
    default: int
    where: str = "query"    # "query" or "body"


def list_route(maximum: int, default: int | None = None, where: str = "query") -> Callable[[H], H]:
    """Declare a handler a list route capped at ``maximum`` items per call."""
    limit = ListLimit(maximum, maximum if default is None else default, where)

    def mark(handler: H) -> H:
        handler.list_limit = limit  # type: ignore[attr-defined]
        return handler

    return mark


def list_limit(handler: Callable) -> ListLimit | None:
    return getattr(handler, "list_limit", None)


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be an integer between {lo} and {hi}")
    return value


def limit_offset(request: web.Request, handler: Callable) -> tuple[int, int]:
    """``limit`` (1..maximum of ``handler``'s :func:`list_route`) and ``offset`` (>= 0) of the query."""
    cap = list_limit(handler)
    assert cap is not None, f"{handler.__name__} is not a list_route"
    return (_int_param(request, "limit", cap.default, 1, cap.maximum),
            _int_param(request, "offset", 0, 0, MAX_OFFSET))
