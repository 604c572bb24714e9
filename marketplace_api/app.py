"""The aiohttp application: middleware (errors, body limits, auth), routes, OpenAPI.

Route modules each expose ``setup(app)``; the app carries ``app["node"]`` (pool, rms, proxy, ...).
No handler lets an exception reach the client as a traceback: ``ApiError`` becomes the seed's JSON
shape, malformed or oversized bodies become 400, anything unexpected becomes a JSON 500.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from .errors import ApiError

log = logging.getLogger(__name__)
NODE = web.AppKey("node", Any)
NO_ROUTE = "no such route"


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler):  # noqa: ANN001, ANN201
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.body, exc.status)
    except web.HTTPRequestEntityTooLarge:
        return json_response({"success": False, "error": "request body too large"}, 400)
    except web.HTTPNotFound:
        return json_response({"success": False, "error": NO_ROUTE}, 404)
    except web.HTTPMethodNotAllowed:
        return json_response({"success": False, "error": "method not allowed"}, 405)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response({"success": False, "error": exc.reason}, exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response({"success": False, "message": "Internal Server Error"}, 500)


async def read_json(request: web.Request, required: bool = True) -> dict:
    """The JSON object body, or ApiError(400). Bodies over MAX_BODY_BYTES are refused by aiohttp."""
    if not request.can_read_body:
        if required:
            raise ApiError(400, "request body must be a JSON object")
        return {}
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(400, "request body too large") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def require_user(request: web.Request) -> str:
    """The user id of a valid user API token, else 401. Agent tokens are refused here."""
    from proxyorch.accounts import user_for_token

    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "Missing or invalid API token")
    user_id = await user_for_token(request.app[NODE].pool, token)
    if user_id is None:
        raise ApiError(401, "Missing or invalid API token")
    return user_id


def require_admin(request: web.Request) -> None:
    import hmac

    given = request.headers.get("X-Admin-Token", "")
    expected = request.app[NODE].admin_token
    if not given or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "Missing or invalid admin API token")


async def healthz(request: web.Request) -> web.Response:
    """Liveness and the state of each backing store."""
    import asyncio

    node = request.app[NODE]
    stores: dict[str, str] = {}
    try:
        await asyncio.wait_for(node.pool.fetchval("SELECT 1"), 2)
        stores["postgres"] = "ok"
    except Exception as exc:
        stores["postgres"] = f"down: {type(exc).__name__}"
    bus = node.bus
    connected = getattr(bus, "connected", None)
    stores["bus"] = f"{type(bus).__name__}: {'ok' if connected is None or connected.is_set() else 'reconnecting'}"
    if node.request_log is not None:
        st = node.request_log.stats
        stores["clickhouse"] = "ok" if node.request_log.healthy else "failing (rows kept in memory/spool)"
        stores["request_log_backlog_rows"] = str(st.get("queue_len", 0))
        stores["request_log_spool_bytes"] = str(st.get("spool_bytes", 0))
    ok = stores["postgres"] == "ok"
    return json_response({"ok": ok, "node": node.settings.node_name, "stores": stores}, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    node = request.app[NODE]
    m = node.proxy.metrics
    lines = [
        f"proxyorch_sessions_total {m.sessions_total}",
        f"proxyorch_sessions_established_total {m.sessions_established}",
        f"proxyorch_sessions_blocked_total {m.sessions_blocked}",
        f"proxyorch_sessions_failed_total {m.sessions_failed}",
        f"proxyorch_auth_failures_total {m.auth_failures}",
        f"proxyorch_auth_rate_limited_total {m.auth_rate_limited}",
        f"proxyorch_bytes_in_total {m.bytes_in}",
        f"proxyorch_bytes_out_total {m.bytes_out}",
        f"proxyorch_sessions_active {len(node.proxy.sessions)}",
        f"proxyorch_sessions_handshaking {len(node.proxy.handshaking)}",
        f"proxyorch_tunnels {len(node.tunnels.connections)}",
        f"proxyorch_devices_online {len(node.tunnels.registry.device_ids())}",
        f"proxyorch_tunnel_buffered_bytes {sum(t.buffered_bytes for t in node.tunnels.connections)}",
        f"proxyorch_client_buffered_bytes {node.proxy.client_buffered_bytes()}",
        f"proxyorch_auth_cache_hits_total {node.proxy.auth_cache.hits}",
        f"proxyorch_auth_cache_misses_total {node.proxy.auth_cache.misses}",
        f"proxyorch_auth_cache_stale_served_total {node.proxy.auth_cache.stale_served}",
        f"proxyorch_auth_store_errors_total {node.proxy.auth_cache.store_errors}",
    ]
    rtts = sorted(t.rtt for t in node.tunnels.connections if t.device_id and t.rtt_samples)
    if rtts:  # aggregated: /metrics is unauthenticated, so no per-device labels
        lines.append(f"proxyorch_tunnel_rtt_seconds_min {rtts[0]:.6f}")
        lines.append(f"proxyorch_tunnel_rtt_seconds_median {rtts[len(rtts) // 2]:.6f}")
        lines.append(f"proxyorch_tunnel_rtt_seconds_max {rtts[-1]:.6f}")
    if node.request_log is not None:
        for key, value in node.request_log.stats.items():
            if isinstance(value, int | float):
                lines.append(f"proxyorch_request_log_{key} {value}")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def create_app(node: Any) -> web.Application:
    """The whole API of one node."""
    from . import openapi, routes_logs, routes_proxy

    app = web.Application(client_max_size=node.settings.max_body_bytes, middlewares=[error_middleware])
    app[NODE] = node
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    routes_proxy.setup(app)
    routes_logs.setup(app)
    from . import dashboard, routes_live
    routes_live.setup(app)
    dashboard.setup(app)
    try:
        from . import routes_marketplace
    except ImportError:
        routes_marketplace = None  # type: ignore[assignment]
    if routes_marketplace is not None:
        routes_marketplace.setup(app)
    from . import routes_taskmarket
    routes_taskmarket.setup(app)
    from . import routes_escrow
    routes_escrow.setup(app)
    from . import internal
    internal.setup(app)
    openapi.setup(app)
    return app
