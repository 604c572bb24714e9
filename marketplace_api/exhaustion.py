"""The node out of descriptors (or kernel memory): routes that need a file answer 503 + Retry-After."""

from __future__ import annotations

import errno

import orjson
from aiohttp import web

EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RETRY_AFTER_S = 5


def is_exhausted(exc: BaseException) -> bool:
    """An OSError that means "out of descriptors or kernel memory", not a missing or bad file."""
    return isinstance(exc, OSError) and exc.errno in EXHAUSTED


def unavailable(body: dict | None = None) -> web.Response:
    """503 in the API's error shape, with Retry-After."""
    body = body or {"success": False, "message": "server temporarily out of resources, retry later"}
    return web.Response(body=orjson.dumps(body), status=503, content_type="application/json",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
