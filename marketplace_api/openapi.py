"""``GET /api/v2/openapi.json``: an OpenAPI 3.1 document generated from the routes actually served."""

from __future__ import annotations

import re

from aiohttp import web

from .bodies import json_response
from .paging import list_limit

_PARAM = re.compile(r"\{(\w+)\}")
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "description": "Replays the first answer of this caller's request with this key instead of"
                                  " acting again (retry after a 503 or a lost answer)",
                   "schema": {"type": "string", "minLength": 1, "maxLength": 255}}


def build_document(app: web.Application) -> dict:
    paths: dict[str, dict] = {}
    schemas: dict[str, dict] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not path or route.method in ("HEAD", "OPTIONS", "*"):
            continue
        handler = route.handler
        doc = (handler.__doc__ or handler.__name__.replace("_", " ")).strip().splitlines()[0]
        op: dict = {"summary": doc, "operationId": f"{route.method.lower()}_{handler.__name__}",
                    "responses": {"200": {"description": "OK"}, "400": {"description": "Bad request"},
                                  "401": {"description": "Unauthorized"}}}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in _PARAM.findall(path)]
        cap = list_limit(handler)
        if cap is not None:  # every list route is capped; the cap is part of its contract
            op["x-list-limit"] = {"in": cap.where, "default": cap.default, "maximum": cap.maximum}
            op["description"] = f"A list route: at most {cap.maximum} items per call (`limit`, {cap.where})."
            if cap.where == "query":
                params.append({"name": "limit", "in": "query", "required": False,
                               "schema": {"type": "integer", "minimum": 1, "maximum": cap.maximum,
                                          "default": cap.default}})
        if params:
            op["parameters"] = params
        extra = getattr(handler, "openapi", None) or {}  # {"operation": {...}, "schemas": {...}}
        op.update(extra.get("operation", {}))
        op["responses"] = {**op["responses"], "503": {"description": "Data store unavailable: retry after Retry-After"}}
        if getattr(handler, "idempotent", False):
            op["parameters"] = [*op.get("parameters", []), IDEMPOTENCY_KEY]
        schemas.update(extra.get("schemas", {}))
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "proxyorch API", "version": "2"},
        "components": {"schemas": dict(sorted(schemas.items())), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "admin": {"type": "apiKey", "in": "header", "name": "X-Admin-Token"}}},
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
    }


def setup(app: web.Application) -> None:
    async def openapi(request: web.Request) -> web.Response:
        return json_response(build_document(request.app))

    app.router.add_get("/api/v2/openapi.json", openapi)
