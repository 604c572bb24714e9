"""Node-to-node endpoints under ``/internal/`` (a sub-application on ``API_PORT``).

Every request needs ``X-Cluster-Secret`` equal to this node's ``CLUSTER_SECRET`` (constant-time
compare); without it, with a wrong one, or on a node without a secret, every path under
``/internal/`` answers 401 in the API's JSON shape, unknown paths included. The OpenAPI document
lists these operations tagged ``internal``, with the required header.

Log store (this node owns it when ``LOG_STORE_URL`` is empty):
- ``POST /internal/log/insert`` ``{"table", "token", "columns", "rows"}``: one request-log batch; a
  second insert with the same dedup token is a no-op, so a sender may retry until it gets 200.
- ``POST /internal/log/query`` ``{"kind": "logs"|"bandwidth"|"domains", "args": {...}}``: the
  read queries of ``proxy/request_log``; the *calling* node has already scoped ``deviceIds`` to
  its tenant (tenant checks stay where PostgreSQL and the caller's token are).

Sessions (every node):
- ``POST /internal/sessions`` ``{"connectionIds": [...] | null, "deviceIds": [...] | null}``: this
  node's open sessions of those connections or devices (``null`` for both: all), rows as in
  ``GET /api/v2/proxy/sessions``. The calling node chose the ids for its caller and filters again.

Rotation (every node):
- ``POST /internal/rotate`` ``{"deviceId"}``: rotate the IP of a device whose tunnel this node holds
  (:mod:`proxyorch.rotation_forward`); 200 ``{"status", "body", "retryAfter"}`` carrying the answer
  ``POST /api/v2/devices/{id}/rotate-ip`` gives here. The calling node has checked the tenant.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import Any

from aiohttp import web

from proxyorch.internal_client import CLUSTER_SECRET_HEADER as SECRET_HEADER
from proxyorch.rotation import RotationError
from proxyorch.rotation_forward import answer

from .bodies import json_response, read_json
from .context import PROXY, REQUEST_LOG_READER, ROTATIONS, SETTINGS
from .errors import ApiError

_DOC = {"tags": ["internal"], "description": "Node-to-node only: 401 without the cluster secret.",
        "parameters": [{"name": SECRET_HEADER, "in": "header", "required": True, "schema": {"type": "string"}}]}


@web.middleware
async def require_cluster_secret(request: web.Request, handler):  # noqa: ANN001, ANN201
    expected = request.config_dict[SETTINGS].cluster_secret
    given = request.headers.get(SECRET_HEADER, "")
    if not expected or not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, f"Missing or invalid {SECRET_HEADER}")
    return await handler(request)


def _owned_store(request: web.Request) -> Any:
    if request.config_dict[SETTINGS].log_store_url:
        raise ApiError(409, "this node does not own the log store (it has LOG_STORE_URL)")
    ch = request.config_dict[REQUEST_LOG_READER]
    if ch is None:
        raise ApiError(503, "request log is disabled on this node (REQUEST_LOG=0)")
    return ch


async def ping(request: web.Request) -> web.Response:
    """Internal: this node's name (checks the cluster secret)."""
    return json_response({"success": True, "node": request.config_dict[SETTINGS].node_name})


async def log_insert(request: web.Request) -> web.Response:
    """Internal: insert one request-log batch (exactly once per dedup token)."""
    from proxy.request_log.remote import decode_batch

    ch = _owned_store(request)
    try:
        table, token, columns, rows = decode_batch(await read_json(request))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    try:
        await asyncio.to_thread(ch.insert_rows, table, rows, columns, token)
    except Exception as exc:
        raise ApiError(503, f"log store insert failed: {type(exc).__name__}") from None
    return json_response({"success": True, "rows": len(rows)})


async def log_query(request: web.Request) -> web.Response:
    """Internal: run one read query of the request log for another node."""
    from proxy.request_log.remote import run_query

    ch = _owned_store(request)
    body = await read_json(request)
    try:
        result = await asyncio.to_thread(run_query, ch, body.get("kind"), body.get("args"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except Exception as exc:
        raise ApiError(502, f"log store unavailable: {type(exc).__name__}") from None
    return json_response({"success": True, "result": result})


def _id_list(body: dict, key: str) -> set[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= 64 for v in value):
        raise ApiError(400, f"`{key}` must be null or a list of ids")
    return set(value)


async def sessions(request: web.Request) -> web.Response:
    """Internal: this node's open sessions of some connections or devices (the caller filters by tenant)."""
    body = await read_json(request)
    conns, devices = _id_list(body, "connectionIds"), _id_list(body, "deviceIds")
    node = request.config_dict[SETTINGS].node_name
    rows = request.config_dict[PROXY].sessions.snapshot(time.monotonic(), node, connection_ids=conns,
                                                        device_ids=devices)
    return json_response({"success": True, "node": node, "sessions": rows})


async def rotate(request: web.Request) -> web.Response:
    """Internal: rotate a device held here for another node; the public route's status and body."""
    body = await read_json(request)
    try:
        device_id = str(uuid.UUID(str(body.get("deviceId"))))
    except ValueError:
        raise ApiError(400, "`deviceId` must be a UUID") from None
    try:
        result = await request.config_dict[ROTATIONS].rotate(device_id, "api", forwarded=True)
    except RotationError as exc:
        return json_response(answer(None, exc))
    return json_response(answer(result, None))


async def unknown(_request: web.Request) -> web.Response:
    raise ApiError(404, "no such route")


for _handler in (ping, log_insert, log_query, sessions, rotate):
    _handler.openapi = {"operation": _DOC}  # type: ignore[attr-defined]


def setup(app: web.Application) -> None:
    sub = web.Application(middlewares=[require_cluster_secret])
    sub.router.add_get("/ping", ping)
    sub.router.add_post("/log/insert", log_insert)
    sub.router.add_post("/log/query", log_query)
    sub.router.add_post("/sessions", sessions)
    sub.router.add_post("/rotate", rotate)
    sub.router.add_route("*", "/{tail:.*}", unknown)
    app.add_subapp("/internal/", sub)
