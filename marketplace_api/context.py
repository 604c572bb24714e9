"""Typed application keys: every shared resource a route may reach, one key each.

A handler reads exactly what it needs, e.g. ``request.app[POOL]`` or ``request.app[SETTINGS]``;
:func:`install` fills every key from the node once, when the app is built. Nothing else in the
node is reachable from a route. ``NODE`` is kept only for route modules written before these keys
(read-only, deprecated: use the typed keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from device_tunnel.registry import DeviceRegistry
    from device_tunnel.server import TunnelServer
    from proxy.auth_cache.cache import AuthCache
    from proxy.request_log.clickhouse import ClickHouse
    from proxy.request_log.remote import LocalLogReader, RemoteLogReader
    from proxy.request_log.writer import RequestLogWriter
    from proxy.server import ProxyServer
    from proxyorch.bus import InvalidationBus
    from proxyorch.config import Settings
    from rms.service import Rms

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool")
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
ADMIN_TOKEN: web.AppKey[str] = web.AppKey("admin_token")
RMS: web.AppKey[Rms] = web.AppKey("rms")
BUS: web.AppKey[InvalidationBus] = web.AppKey("bus")
AUTH_CACHE: web.AppKey[AuthCache] = web.AppKey("auth_cache")
PROXY: web.AppKey[ProxyServer] = web.AppKey("proxy")
TUNNELS: web.AppKey[TunnelServer] = web.AppKey("tunnels")
DEVICE_REGISTRY: web.AppKey[DeviceRegistry] = web.AppKey("device_registry")
REQUEST_LOG_READER: web.AppKey[ClickHouse | None] = web.AppKey("request_log_reader")  # the store this node owns
# The read queries of the request log, on this node's store or the owner's at LOG_STORE_URL.
LOG_STORE: web.AppKey[LocalLogReader | RemoteLogReader | None] = web.AppKey("log_store")
REQUEST_LOG_WRITER: web.AppKey[RequestLogWriter | None] = web.AppKey("request_log_writer")
TUNNEL_FINGERPRINT: web.AppKey[str | None] = web.AppKey("tunnel_fingerprint")  # None: plaintext tunnel
CLUSTER: web.AppKey[Any] = web.AppKey("cluster")  # proxyorch.cluster.ClusterRouting (presence, relay)
ROTATIONS: web.AppKey[Any] = web.AppKey("rotations")  # proxyorch.rotation.RotationManager
NODE: web.AppKey[Any] = web.AppKey("node")  # deprecated: the whole node, for older route modules


def install(app: web.Application, node: Any) -> None:
    """Fill every key from a started :class:`proxyorch.node.Node` (or anything shaped like it)."""
    app[POOL] = node.pool
    app[SETTINGS] = node.settings
    app[ADMIN_TOKEN] = node.admin_token
    app[RMS] = node.rms
    app[BUS] = node.bus
    app[PROXY] = node.proxy
    app[AUTH_CACHE] = node.proxy.auth_cache
    app[TUNNELS] = node.tunnels
    app[DEVICE_REGISTRY] = node.tunnels.registry
    app[REQUEST_LOG_READER] = node.clickhouse
    app[LOG_STORE] = node.log_reader
    app[REQUEST_LOG_WRITER] = node.request_log
    app[TUNNEL_FINGERPRINT] = getattr(node, "tunnel_fingerprint", None)
    app[ROTATIONS] = getattr(node, "rotations", None)
    app[CLUSTER] = getattr(node, "cluster", None)
    app[NODE] = node


def pool_of(request: web.Request) -> asyncpg.Pool:
    """The PostgreSQL pool of the app serving ``request``."""
    return request.app[POOL]
