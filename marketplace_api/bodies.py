"""JSON in and out: responses, and request bodies parsed with the API's limits.

Limits every JSON body meets: at most ``MAX_BODY_BYTES`` (413 beyond; routes carrying files pass
their own larger limit to :func:`read_json_limited` in ``storage``), nesting at most
``MAX_JSON_DEPTH`` levels (400 beyond), and a JSON object at the top (400 otherwise). The time a
body may take to arrive is the middleware's job (``API_BODY_TIMEOUT_S``, 408).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .errors import ApiError

MAX_JSON_DEPTH = 64


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """``data`` serialised with orjson as an ``application/json`` response."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)


def too_large() -> ApiError:
    return ApiError(413, "request body too large")


UNDECODABLE = "request body could not be decoded"


def end_undecodable_body(request: web.Request) -> None:
    """After ``web.RequestPayloadError`` (a ``Content-Encoding`` stream of garbage): end the body here.

    aiohttp would otherwise drain it again after the answer and log the same error as unhandled. The
    caller answers 400 and closes the connection (the rest of the stream cannot be framed)."""
    request.content.feed_eof()


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when arrays/objects in ``value`` nest deeper than ``limit`` levels (iterative walk)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json_object(raw: bytes) -> dict:
    """A JSON object from ``raw``, or ApiError(400): not JSON, nested too deep, or not an object."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
    if json_depth_exceeds(body):
        raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


async def read_json(request: web.Request, required: bool = True) -> dict:
    """The JSON object body, or ApiError (400 malformed, 413 over MAX_BODY_BYTES)."""
    if not request.body_exists:  # (not can_read_body: an Idempotency-Key layer may have read it)
        if required:
            raise ApiError(400, "request body must be a JSON object")
        return {}
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large() from None
    return parse_json_object(raw)
