"""Limits, usage and access mode of a proxy connection (issue 16).

``PUT/GET /api/v2/proxy/connections/{id}/limits``, ``GET …/usage``, ``PUT/GET …/access``. The
owner of the connection may write; the owner and the owner of the device it is routed through may
read. Logic and validation are in :mod:`rms.limits`.
"""

from __future__ import annotations

from aiohttp import web

from rms.limits import ConnectionLimits
from rms.service import RmsError

from .auth import require_user
from .bodies import json_response, read_json
from .context import PROXY, RMS
from .errors import ApiError


def limits_of(request: web.Request) -> ConnectionLimits:
    return ConnectionLimits(request.app[RMS])


def live_book(request: web.Request):  # noqa: ANN201
    """This node's :class:`proxy.limits.LimitBook` (unflushed bytes, open sessions), or None."""
    proxy = request.app.get(PROXY)
    return getattr(proxy, "limits", None)


async def _call(request: web.Request, what: str) -> web.Response:
    user = await require_user(request)
    cid = request.match_info["connection_id"]
    lim = limits_of(request)
    try:
        if request.method == "PUT":
            body = await read_json(request)
            result = await (lim.put_limits if what == "limits" else lim.put_access)(user, cid, body)
        elif what == "limits":
            result = await lim.get_limits(user, cid)
        elif what == "access":
            result = await lim.get_access(user, cid)
        else:
            book = live_book(request)
            from rms.service import parse_uuid

            unflushed, active = book.live_usage(parse_uuid(cid, "connection_id")) if book is not None else (0, 0)
            result = await lim.get_usage(user, cid, unflushed, active)
    except RmsError as exc:
        raise ApiError(exc.status, exc.message) from None
    return json_response(result)


async def connection_limits(request: web.Request) -> web.Response:
    return await _call(request, "limits")


async def connection_access(request: web.Request) -> web.Response:
    return await _call(request, "access")


async def connection_usage(request: web.Request) -> web.Response:
    return await _call(request, "usage")


async def add_summaries(request: web.Request, items: list[dict], key: str) -> None:
    """Put ``limits``, ``access`` and ``usage`` into each listed connection (``key``: its id field)."""
    summaries = await limits_of(request).summaries([i[key] for i in items], live_book(request))
    for item in items:
        item.update(summaries.get(item[key], {}))


def setup(app: web.Application) -> None:
    r = app.router
    base = "/api/v2/proxy/connections/{connection_id}"
    for method in ("GET", "PUT"):
        r.add_route(method, base + "/limits", connection_limits)
        r.add_route(method, base + "/access", connection_access)
    r.add_get(base + "/usage", connection_usage)
