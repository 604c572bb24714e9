"""The aiohttp application of one node: middlewares, typed resources, every route module, OpenAPI.

How a route module is added (one line in ``ROUTE_MODULES`` below, nothing else here):

- the module lives in ``marketplace_api/`` and exposes either ``routes: web.RouteTableDef`` or
  ``def setup(app: web.Application) -> None`` (which adds routes and, if it needs them,
  ``app.cleanup_ctx`` entries for background loops — keep tasks owned and cancelled there);
- handlers reach shared resources only through the typed keys of ``context`` (``POOL``,
  ``SETTINGS``, ``RMS``, ``TUNNELS``, ``DEVICE_REGISTRY``, ``AUTH_CACHE``,
  ``REQUEST_LOG_READER``, ...), parse bodies with ``bodies.read_json``, authenticate with
  ``auth.require_user`` / ``auth.require_admin``, and raise ``errors.ApiError`` for every refusal;
- route modules never import this module (it imports them);
- every route appears in ``/api/v2/openapi.json`` automatically; a list route declares its
  ``limit`` maximum with ``openapi.list_route(maximum)``.

Failures are shaped by ``middleware`` (one middleware per family: unexpected → JSON 500, aiohttp
HTTP errors, ApiError, PostgreSQL data errors → 400) and the limits (rate, body time) live there too.
A broken route module is an import error at start-up, never a silently missing surface.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from aiohttp import web

# Re-exported for route modules written before auth/bodies/context existed: import them from
# there. They come before the route modules so such a module still imports during this one.
from .auth import bearer_token, require_admin, require_user  # noqa: F401
from .bodies import json_response, read_json  # noqa: F401
from .context import NODE, install  # noqa: F401 - NODE: deprecated, use the typed keys of .context
from .middleware import NO_ROUTE, middlewares  # noqa: F401

# isort: split
from . import (
    dashboard,
    internal,
    openapi,
    routes_agent,
    routes_escrow,
    routes_health,
    routes_limits,
    routes_live,
    routes_logs,
    routes_marketplace,
    routes_proxy,
    routes_rotation,
    routes_taskmarket,
)

ROUTE_MODULES: tuple[ModuleType, ...] = (
    routes_health,
    routes_proxy,
    routes_logs,
    routes_marketplace,
    routes_agent,
    routes_live,        # live sessions, domains, presence (dashboard views)
    dashboard,          # the web page at /
    routes_taskmarket,  # seed 003 at /v1
    routes_escrow,      # seed 002 at /jobs, /owner, /tester
    routes_rotation,    # IP rotation of devices
    routes_limits,      # per-connection limits, usage, access modes
    internal,           # node-to-node /internal/ (X-Cluster-Secret)
    openapi,  # last: documents every route added before it
)


def register(app: web.Application, module: ModuleType) -> None:
    """Add one route module: its ``routes`` table, else its ``setup(app)``."""
    routes = getattr(module, "routes", None)
    if isinstance(routes, web.RouteTableDef):
        app.add_routes(routes)
    else:
        module.setup(app)


def create_app(node: Any) -> web.Application:
    """The whole API of one started node."""
    settings = node.settings
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares(settings))
    install(app, node)
    for module in ROUTE_MODULES:
        register(app, module)
    return app
