"""``/healthz`` (liveness and the state of each store) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .bodies import json_response
from .context import AUTH_CACHE, BUS, POOL, PROXY, REQUEST_LOG_WRITER, SETTINGS, TUNNELS


async def healthz(request: web.Request) -> web.Response:
    """Liveness and the state of each backing store."""
    app = request.app
    stores: dict[str, str] = {}
    try:
        await asyncio.wait_for(app[POOL].fetchval("SELECT 1"), 2)
        stores["postgres"] = "ok"
    except Exception as exc:
        stores["postgres"] = f"down: {type(exc).__name__}"
    bus = app[BUS]
    connected = getattr(bus, "connected", None)
    stores["bus"] = f"{type(bus).__name__}: {'ok' if connected is None or connected.is_set() else 'reconnecting'}"
    writer = app[REQUEST_LOG_WRITER]
    if writer is not None:
        st = writer.stats
        stores["clickhouse"] = "ok" if writer.healthy else "failing (rows kept in memory/spool)"
        stores["request_log_backlog_rows"] = str(st.get("queue_len", 0))
        stores["request_log_spool_bytes"] = str(st.get("spool_bytes", 0))
    ok = stores["postgres"] == "ok"
    return json_response({"ok": ok, "node": app[SETTINGS].node_name, "stores": stores}, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    app = request.app
    proxy, tunnels, auth_cache = app[PROXY], app[TUNNELS], app[AUTH_CACHE]
    m = proxy.metrics
    lines = [
        f"proxyorch_sessions_total {m.sessions_total}",
        f"proxyorch_sessions_established_total {m.sessions_established}",
        f"proxyorch_sessions_blocked_total {m.sessions_blocked}",
        f"proxyorch_sessions_failed_total {m.sessions_failed}",
        f"proxyorch_auth_failures_total {m.auth_failures}",
        f"proxyorch_auth_rate_limited_total {m.auth_rate_limited}",
        f"proxyorch_bytes_in_total {m.bytes_in}",
        f"proxyorch_bytes_out_total {m.bytes_out}",
        f"proxyorch_sessions_active {len(proxy.sessions)}",
        f"proxyorch_sessions_handshaking {len(proxy.handshaking)}",
        f"proxyorch_tunnels {len(tunnels.connections)}",
        f"proxyorch_devices_online {len(tunnels.registry.device_ids())}",
        f"proxyorch_tunnel_buffered_bytes {sum(t.buffered_bytes for t in tunnels.connections)}",
        f"proxyorch_client_buffered_bytes {proxy.client_buffered_bytes()}",
        f"proxyorch_auth_cache_hits_total {auth_cache.hits}",
        f"proxyorch_auth_cache_misses_total {auth_cache.misses}",
        f"proxyorch_auth_cache_stale_served_total {auth_cache.stale_served}",
        f"proxyorch_auth_store_errors_total {auth_cache.store_errors}",
    ]
    rtts = sorted(t.rtt for t in tunnels.connections if t.device_id and t.rtt_samples)
    if rtts:  # aggregated: /metrics is unauthenticated, so no per-device labels
        lines.append(f"proxyorch_tunnel_rtt_seconds_min {rtts[0]:.6f}")
        lines.append(f"proxyorch_tunnel_rtt_seconds_median {rtts[len(rtts) // 2]:.6f}")
        lines.append(f"proxyorch_tunnel_rtt_seconds_max {rtts[-1]:.6f}")
    writer = app[REQUEST_LOG_WRITER]
    if writer is not None:
        for key, value in writer.stats.items():
            if isinstance(value, int | float):
                lines.append(f"proxyorch_request_log_{key} {value}")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
