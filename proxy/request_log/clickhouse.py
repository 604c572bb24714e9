"""One ClickHouse client for both modes: a real server over HTTP(S) or the in-process chDB engine.

The schema is versioned like PostgreSQL's: ``migrations/NNN_name.sql`` applied in order, each
once, recorded in ``proxyorch.schema_migrations`` (so an existing deployment gets a new column at
start). Migrations must be idempotent (``IF NOT EXISTS``), because two nodes sharing one ClickHouse
server may apply the same one at once. ``retention.sql`` follows LOG_RETENTION_DAYS at every start.

Both go through ``clickhouse-connect`` and run the same SQL. The client is synchronous: callers
run it off the event loop (the request-log writer thread, ``asyncio.to_thread`` for queries).
chDB hosts one engine (one data path) per process, so create one :class:`ClickHouse` per process
and share it between the writer and the query side; calls on it are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clickhouse_connect

log = logging.getLogger(__name__)

DATABASE = "proxyorch"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
RETENTION_FILE = Path(__file__).with_name("retention.sql")
_MIGRATIONS_TABLE = f"""CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations
(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))
ENGINE = ReplacingMergeTree ORDER BY version"""

# Settings of every batch insert: exactly-once per dedup token, including the rollup views.
_INSERT_SETTINGS = {"insert_deduplicate": 1, "deduplicate_blocks_in_dependent_materialized_views": 1}


@dataclass(frozen=True)
class Migration:
    """One schema change: ``version`` from the file name ``NNN_name.sql``."""

    version: int
    name: str
    sql: str


def sql_statements(text: str, retention_days: int) -> list[str]:
    """The statements of ``text`` with the retention filled in, comments removed."""
    text = text.replace("{retention_days}", str(int(retention_days)))
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations of ``directory`` in version order (duplicate versions are an error)."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        head = path.name.split("_", 1)[0]
        if not head.isdigit():
            raise ValueError(f"ClickHouse migration {path.name}: name must start with its number")
        version = int(head)
        if version in found:
            raise ValueError(f"ClickHouse migrations {found[version].name} and {path.name} share version {version}")
        found[version] = Migration(version, path.name, path.read_text())
    return [found[v] for v in sorted(found)]


def schema_statements(retention_days: int) -> list[str]:
    """Every statement of every migration, then the retention (for reading; apply with apply_schema)."""
    out = [s for m in load_migrations() for s in sql_statements(m.sql, retention_days)]
    return out + sql_statements(RETENTION_FILE.read_text(), retention_days)


class ClickHouse:
    """Thread-safe wrapper of a ``clickhouse_connect`` client (see :func:`make_client`)."""

    def __init__(self, client: Any, *, embedded: bool) -> None:
        self._client = client
        self.embedded = embedded
        # chDB: one handle shared by writer and queries -> serialise. HTTP clients without a
        # session id are safe to share, so concurrent queries are not held behind inserts.
        self._lock: Any = threading.Lock() if embedded else contextlib.nullcontext()
        self._types: dict[str, dict[str, str]] = {}
        self._closed = False

    def apply_schema(self, retention_days: int, migrations: list[Migration] | None = None) -> list[str]:
        """Apply the pending migrations in order (each recorded once), then the retention TTL;
        returns the names applied now. ``migrations`` defaults to ``migrations/*.sql``."""
        migrations = load_migrations() if migrations is None else migrations
        applied_now: list[str] = []
        settings = {"materialize_ttl_after_modify": 0}
        with self._lock:
            self._client.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
            self._client.command(_MIGRATIONS_TABLE)
            done = {int(r[0]) for r in self._client.query(
                f"SELECT DISTINCT version FROM {DATABASE}.schema_migrations").result_rows}
            for m in migrations:
                if m.version in done:
                    continue
                for stmt in sql_statements(m.sql, retention_days):
                    self._client.command(stmt, settings=settings)
                self._client.insert(f"{DATABASE}.schema_migrations", [(m.version, m.name)],
                                    column_names=["version", "name"])
                applied_now.append(m.name)
                log.info("applied ClickHouse migration %s", m.name)
            for stmt in sql_statements(RETENTION_FILE.read_text(), retention_days):
                self._client.command(stmt, settings=settings)
            self._types.clear()
        return applied_now

    def applied_migrations(self) -> list[int]:
        """Versions recorded in ``schema_migrations``, ascending."""
        with self._lock:
            rows = self._client.query(
                f"SELECT DISTINCT version FROM {DATABASE}.schema_migrations ORDER BY version").result_rows
        return [int(r[0]) for r in rows]

    def table_columns(self, table: str) -> set[str]:
        """The column names ``table`` has now."""
        full = table if "." in table else f"{DATABASE}.{table}"
        with self._lock:
            return set(self._column_types(full))

    def insert_rows(self, table: str, rows: list[tuple], columns: list[str], dedup_token: str) -> None:
        """Insert one batch; a second insert with the same ``dedup_token`` is a no-op."""
        if not rows:
            return
        full = table if "." in table else f"{DATABASE}.{table}"
        settings = {**_INSERT_SETTINGS, "insert_deduplication_token": dedup_token}
        with self._lock:
            types = self._column_types(full)
            self._client.insert(
                full,
                rows,
                column_names=columns,
                column_type_names=[types[c] for c in columns],
                settings=settings,
            )

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        """Rows of a parameterised query (``{name:Type}`` placeholders, bound server side)."""
        with self._lock:
            return list(self._client.query(sql, parameters=parameters or {}).result_rows)

    def query_dicts(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Like :meth:`query`, each row as a dict keyed by column name."""
        with self._lock:
            res = self._client.query(sql, parameters=parameters or {})
            names = res.column_names
            return [dict(zip(names, row, strict=True)) for row in res.result_rows]

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        """Run a statement that returns no rows (DDL, OPTIMIZE, ...)."""
        with self._lock:
            return self._client.command(sql, parameters=parameters or None)

    def ping(self) -> bool:
        with self._lock:
            return bool(self._client.ping())

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._client.close()

    def _column_types(self, full_table: str) -> dict[str, str]:
        """Column name -> type name, read once per table (spares a DESCRIBE per insert)."""
        types = self._types.get(full_table)
        if types is None:
            res = self._client.query(f"DESCRIBE TABLE {full_table}")
            types = {row[0]: row[1] for row in res.result_rows}
            self._types[full_table] = types
        return types


def _skip_dataframe_libraries() -> None:
    """We insert and read plain tuples: tell clickhouse-connect not to import pandas/pyarrow/polars.

    Its lazy import of pandas on the first insert took ~0.5 s of GIL time inside the node (stalling
    the proxy's event loop) and ~100 MB of RSS.
    """
    from clickhouse_connect.driver import options

    for name in (*getattr(options, "_PANDAS_ATTRS", ("pd", "pd_time_test")), "arrow", "pl"):
        options.__dict__.setdefault(name, None)


def make_client(clickhouse_url: str | None, data_dir: str) -> ClickHouse:
    """A server client for ``clickhouse_url`` (http(s)://user:pass@host:port), else chDB under
    ``DATA_DIR/clickhouse``. Raises when the server is unreachable (callers retry)."""
    _skip_dataframe_libraries()
    if clickhouse_url:
        client = clickhouse_connect.get_client(
            dsn=clickhouse_url,
            autogenerate_session_id=False,
            connect_timeout=5,
            send_receive_timeout=60,
        )
        return ClickHouse(client, embedded=False)
    path = os.path.realpath(os.path.join(data_dir, "clickhouse"))
    os.makedirs(path, exist_ok=True)
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    return ClickHouse(client, embedded=True)
