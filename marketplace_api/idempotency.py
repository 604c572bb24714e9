"""``Idempotency-Key`` for any aiohttp POST handler, stored in PostgreSQL (any node, survives restarts).

Use::

    from . import idempotency

    IDEM = idempotency.Policy(
        identify=caller_id,        # async (request) -> "user:<uuid>" | "agent:<uuid>"; raises your 401
        error=my_surface_error,    # (status, code, message) -> Exception your middleware renders
    )

    @IDEM
    async def create_thing(request):
        async with idempotency.transaction(request) as conn:   # the request's one transaction
            ...                                                  # every write goes through ``conn``
        return json_response(..., status=201)

Semantics: a key (1-255 printable ASCII characters, optional header) belongs to the caller that
``identify`` returns, so two callers never collide. The first request with a key runs the handler in a
transaction that also inserts the key's row; the handler's answer (status, content type, body) is
stored in that row and committed together with the handler's effects, so a key is either unused or
bound to its answer and its effects, never half. Within ``IDEMPOTENCY_TTL_S``:

- same caller, same key, same request (method, path and query, canonical JSON body) → the stored answer is
  replayed byte for byte and the handler does not run;
- same key with another request → ``error(422, "UNPROCESSABLE", ...)``;
- concurrent requests with one key: the later ones wait on the row lock of the first and then
  replay its answer; if the first takes longer than ``LOCK_WAIT_S`` they get ``error(409, "CONFLICT")``.

A handler that raises (a 4xx ``ApiError`` included) rolls the transaction back: nothing is stored
and a retry with the same key runs afresh. Answers with status >= 500 are not stored either.
Handlers must do all their database work on the ``transaction(request)`` connection (acquiring a
second pool connection while holding it could exhaust the pool under many concurrent same-key
requests). Without the header, ``transaction(request)`` simply opens a fresh transaction.
Call ``setup(app)`` once per app (any surface may; repeats are ignored): it purges expired keys hourly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import orjson
from aiohttp import web

from .context import POOL, SETTINGS

log = logging.getLogger(__name__)
HEADER = "Idempotency-Key"
MAX_KEY_LEN = 255
LOCK_WAIT_S = 15.0
_CONN = "idempotency.conn"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorFactory = Callable[[int, str, str], Exception]


def request_fingerprint(method: str, path: str, body: bytes) -> bytes:
    """SHA-256 of method, path with query and the body (JSON canonicalised: key order and spacing do not matter)."""
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS) if body else b""
    except orjson.JSONDecodeError:
        canonical = body
    return hashlib.sha256(method.encode() + b"\0" + path.encode() + b"\0" + canonical).digest()


def valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LEN and all(33 <= ord(c) <= 126 for c in key)


@contextlib.asynccontextmanager
async def transaction(request: web.Request) -> AsyncIterator[asyncpg.Connection]:
    """The connection of the request's idempotent transaction, or a fresh connection in a transaction."""
    conn = request.get(_CONN)
    if conn is not None:
        yield conn
        return
    async with request.app[POOL].acquire() as conn, conn.transaction():
        yield conn


class Policy:
    """A decorator factory: ``@policy`` makes a handler honour ``Idempotency-Key``."""

    def __init__(self, identify: Callable[[web.Request], Awaitable[str]], error: ErrorFactory,
                 ttl_s: Callable[[web.Request], float] | None = None) -> None:
        self.identify = identify
        self.error = error
        self.ttl_s = ttl_s or (lambda request: float(request.app[SETTINGS].idempotency_ttl_s))

    def __call__(self, handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            key = request.headers.get(HEADER)
            if key is None:
                return await handler(request)
            if not valid_key(key):
                raise self.error(400, "BAD_REQUEST", f"{HEADER} must be 1-{MAX_KEY_LEN} printable ASCII characters")
            caller = await self.identify(request)
            body = await request.read()
            fingerprint = request_fingerprint(request.method, request.path_qs, body)
            return await self._run(request, handler, caller, key, fingerprint)

        wrapper.idempotent = True  # type: ignore[attr-defined]  # the OpenAPI document lists the header
        return wrapper

    async def _run(self, request: web.Request, handler: Handler, caller: str, key: str,
                   fingerprint: bytes) -> web.StreamResponse:
        ttl = self.ttl_s(request)
        async with request.app[POOL].acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute(f"SET LOCAL lock_timeout = '{int(LOCK_WAIT_S * 1000)}ms'")
                try:
                    # Take the key: a new row, or an expired one taken over. A concurrent holder of the
                    # key makes this wait for its commit (then DO NOTHING) or rollback (then insert).
                    claimed = await conn.fetchval(
                        "INSERT INTO idempotency_keys(caller, key, request_hash, status, content_type, body)"
                        " VALUES ($1, $2, $3, 0, '', '') ON CONFLICT (caller, key) DO UPDATE"
                        " SET request_hash = EXCLUDED.request_hash, status = 0, content_type = '', body = '',"
                        " created_at = now()"
                        " WHERE idempotency_keys.created_at < now() - make_interval(secs => $4) RETURNING 1",
                        caller, key, fingerprint, ttl)
                except asyncpg.LockNotAvailableError:
                    raise self.error(409, "CONFLICT", "a request with this Idempotency-Key is in progress") from None
                if claimed is None:
                    row = await conn.fetchrow("SELECT request_hash, status, content_type, body FROM idempotency_keys"
                                              " WHERE caller = $1 AND key = $2", caller, key)
                    await tx.rollback()
                    tx = None
                    return self._replay(row, fingerprint)
                await conn.execute("SET LOCAL lock_timeout = 0")
                request[_CONN] = conn
                try:
                    response = await handler(request)
                finally:
                    request.pop(_CONN, None)
                if not isinstance(response, web.Response) or response.status >= 500 or response.body is None:
                    await tx.rollback()
                    tx = None
                    return response
                body = response.body if isinstance(response.body, bytes) else bytes(response.body)
                await conn.execute("UPDATE idempotency_keys SET status = $3, content_type = $4, body = $5"
                                   " WHERE caller = $1 AND key = $2", caller, key, response.status,
                                   response.content_type, body)
                await tx.commit()
                tx = None
                return response
            finally:
                if tx is not None and not conn.is_closed():  # a lost connection rolled back by itself
                    await tx.rollback()

    def _replay(self, row: asyncpg.Record | None, fingerprint: bytes) -> web.Response:
        if row is None:  # deleted by a purge between the two statements: treat as in progress
            raise self.error(409, "CONFLICT", "a request with this Idempotency-Key is in progress")
        if bytes(row["request_hash"]) != fingerprint:
            raise self.error(422, "UNPROCESSABLE", f"{HEADER} was already used with a different request")
        response = web.Response(body=bytes(row["body"]), status=row["status"], content_type=row["content_type"])
        response.headers["Idempotent-Replayed"] = "true"
        return response


async def purge_expired(pool: asyncpg.Pool, ttl_s: float) -> int:
    """Delete keys older than ``ttl_s``; returns how many. Expired keys are also taken over lazily."""
    result = await pool.execute("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
                                float(ttl_s))
    return int(result.split()[-1])


_INSTALLED = web.AppKey("idempotency_installed", bool)


async def _purge_ctx(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            ttl = float(app[SETTINGS].idempotency_ttl_s)
            try:
                await purge_expired(app[POOL], ttl)
            except Exception as exc:  # the store may be restarting; the next round retries
                log.warning("idempotency purge failed: %s", exc)
            await asyncio.sleep(min(3600.0, max(ttl, 1.0)))

    task = asyncio.create_task(loop(), name="idempotency-purge")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    """Own the hourly purge of expired keys (background task cancelled on shutdown)."""
    if app.get(_INSTALLED):
        return
    app[_INSTALLED] = True
    app.cleanup_ctx.append(_purge_ctx)
