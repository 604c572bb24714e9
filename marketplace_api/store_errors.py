"""PostgreSQL unavailable (stopped, restarting, unreachable): a ``503`` with ``Retry-After``, never a 500.

:func:`is_store_unavailable` tells a store outage from a bug by the exception (and its cause/context
chain): asyncpg's connection-class errors (SQLSTATE class 08), operator intervention (57P01 admin
shutdown, 57P02 crash shutdown, 57P03 "the database system is starting up / shutting down"), too many
connections (53300), asyncpg's "connection is closed" interface errors and broken protocol state, and socket errors
(``ConnectionRefusedError``, a missing Unix socket, timeouts) raised from inside asyncpg's own code
(pool acquisition, connect). A socket error of other code (a file, ClickHouse) is not a store outage.

Each surface renders the answer in its own shape through :func:`response`:
``API_V2_BODY`` (/api/v2), ``ESCROW_BODY`` (the seed-002 paths), ``V1_BODY`` (/v1).

An error raised after ``COMMIT`` was sent but before its reply arrived is also a 503: the change may
or may not have been made. A client that retries with the same ``Idempotency-Key`` gets the stored
answer if it was (the key row commits in the effect's transaction), or a fresh run if it was not.
"""

from __future__ import annotations

import logging

import asyncpg
import orjson
from aiohttp import web

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
MESSAGE = "the data store is unavailable; retry after a moment"
CODE = "STORE_UNAVAILABLE"
API_V2_BODY = {"success": False, "message": MESSAGE, "error": MESSAGE}
ESCROW_BODY = {"ok": False, "error": {"code": CODE, "message": MESSAGE}}
V1_BODY = ESCROW_BODY  # the /v1 surface shares the {"ok": false, "error": {code, message}} shape

_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,   # class 08: connection does not exist / failure / rejected / unknown
    asyncpg.AdminShutdownError,        # 57P01 terminating connection due to administrator command
    asyncpg.CrashShutdownError,        # 57P02
    asyncpg.CannotConnectNowError,     # 57P03 the database system is starting up / shutting down
    asyncpg.TooManyConnectionsError,   # 53300
    # asyncpg's protocol state broken, e.g. "cannot switch to state 15; another operation (2) is in
    # progress": the server's FATAL (shutdown) reached an idle pooled connection, which is now unusable.
    asyncpg.exceptions._base.InternalClientError,
)
_CLOSED_MARKERS = ("connection is closed", "pool is closing", "pool is closed", "connection was closed")


def _from_asyncpg(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("asyncpg"):
            return True
        tb = tb.tb_next
    return False


def _one(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return any(m in str(exc) for m in _CLOSED_MARKERS)
    if isinstance(exc, OSError):  # refused, no such socket, reset, timeout (TimeoutError is an OSError)
        return _from_asyncpg(exc)
    return False


def is_store_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from or during) means PostgreSQL is away."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if _one(e):
            return True
        stack += [e.__cause__, e.__context__]
    return False


def response(body: dict, request: web.Request | None = None, exc: BaseException | None = None) -> web.Response:
    """The 503 answer with ``Retry-After`` and ``body`` (one of the ``*_BODY`` shapes); logs one warning line."""
    if request is not None:
        log.warning("store unavailable on %s %s: %r", request.method, request.path, exc)
    return web.Response(body=orjson.dumps(body), status=503, content_type="application/json",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
