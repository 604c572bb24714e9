"""One ClickHouse client for both modes: a real server over HTTP(S) or the in-process chDB engine.

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
from pathlib import Path
from typing import Any

import clickhouse_connect

log = logging.getLogger(__name__)

DATABASE = "proxyorch"
SCHEMA_FILE = Path(__file__).with_name("schema.sql")

# Settings of every batch insert: exactly-once per dedup token, including the rollup views.
_INSERT_SETTINGS = {"insert_deduplicate": 1, "deduplicate_blocks_in_dependent_materialized_views": 1}


def schema_statements(retention_days: int) -> list[str]:
    """The statements of ``schema.sql`` with the retention filled in, comments removed."""
    text = SCHEMA_FILE.read_text().replace("{retention_days}", str(int(retention_days)))
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


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

    def apply_schema(self, retention_days: int) -> None:
        """Create the database, tables and views (idempotent) and apply the retention TTL."""
        with self._lock:
            for stmt in schema_statements(retention_days):
                self._client.command(stmt, settings={"materialize_ttl_after_modify": 0})
            self._types.clear()

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
