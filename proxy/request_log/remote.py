"""The request log of a node whose store is on another node (``LOG_STORE_URL``).

Write side: :class:`RemoteLogSink` stands where the writer's ClickHouse client stands
(``insert_rows(table, rows, columns, token)``) and posts each batch to the owner's
``/internal/log/insert``. It raises on any failure, so the writer keeps the batch (memory, then
spool) and retries it with the same token; the owner inserts with that token as ClickHouse's
dedup token, so a batch whose answer was lost still counts once. A batch larger than one request
is cut into chunks at fixed byte boundaries, chunk ``i`` with token ``<token>-<i>`` (the cut is a
function of the rows, so a replay cuts the same chunks).

Read side: a *reader* runs the named read queries of this package, either on the local store
(:class:`LocalLogReader`) or on the owner (:class:`RemoteLogReader`, ``/internal/log/query``).
Arguments and results travel as JSON in both cases (:func:`run_query` is the one dispatcher).
The sink asks the owner which columns its tables have (``table_columns``), so the writer leaves
out columns the owner's table lacks exactly as it does for a local store.
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from proxyorch.internal_client import CLUSTER_SECRET_HEADER as SECRET_HEADER

from .clickhouse import ClickHouse
from .writer import COLUMNS

INSERT_PATH = "/internal/log/insert"
QUERY_PATH = "/internal/log/query"
CHUNK_BYTES = 256 * 1024          # well under the API's 1 MiB body limit
MAX_ROWS_PER_REQUEST = 50_000
MAX_STRING_CHARS = 65_536
_INT_COLUMNS = frozenset({"port", "bytesIn", "bytesOut", "durationMs", "replyCode"})
_TIME_COLUMNS = frozenset({"timestamp"})


class LogStoreError(RuntimeError):
    """The owner did not take the batch / answer the query (the caller keeps or reports it)."""


# ---- batch codec -------------------------------------------------------------------------------

def encode_chunks(table: str, rows: list[tuple], columns: list[str], token: str) -> list[bytes]:
    """Request bodies for one batch: chunks of at most ~``CHUNK_BYTES`` of rows each."""
    encoded = [orjson.dumps(row) for row in rows]
    groups: list[list[bytes]] = [[]]
    size = 0
    for row in encoded:
        if groups[-1] and size + len(row) > CHUNK_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(row)
        size += len(row) + 1
    head = orjson.dumps({"table": table, "columns": columns})[:-1]
    bodies = []
    for i, group in enumerate(groups):
        chunk_token = token if len(groups) == 1 else f"{token}-{i}"
        bodies.append(head + b',"token":' + orjson.dumps(chunk_token) + b',"rows":[' + b",".join(group) + b"]}")
    return bodies


def _cell(column: str, value: Any) -> Any:
    if column in _TIME_COLUMNS:
        if not isinstance(value, str):
            raise ValueError(f"`{column}` must be an ISO 8601 string")
        ts = datetime.fromisoformat(value)
        try:
            return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
        except OverflowError:  # an offset that moves year 1 or 9999 out of range in UTC
            raise ValueError(f"`{column}` is out of range") from None
    if column in _INT_COLUMNS:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise ValueError(f"`{column}` must be a non-negative integer")
        return value
    if not isinstance(value, str) or len(value) > MAX_STRING_CHARS:
        raise ValueError(f"`{column}` must be a string of at most {MAX_STRING_CHARS} characters")
    return value


def decode_batch(body: dict[str, Any]) -> tuple[str, str, list[str], list[tuple]]:
    """(table, token, columns, rows) of an insert body, every cell checked; ValueError otherwise."""
    table, token, columns, rows = body.get("table"), body.get("token"), body.get("columns"), body.get("rows")
    if not isinstance(table, str) or table not in COLUMNS:  # (a list or object is not hashable)
        raise ValueError(f"`table` must be one of {sorted(COLUMNS)}")
    if not isinstance(token, str) or not 0 < len(token) <= 200:
        raise ValueError("`token` must be a non-empty string of at most 200 characters")
    known = COLUMNS[table]
    if (not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns)
            or len(set(columns)) != len(columns) or any(c not in known for c in columns)):
        raise ValueError(f"`columns` must be distinct columns of {table}: {known}")
    if not isinstance(rows, list) or len(rows) > MAX_ROWS_PER_REQUEST:
        raise ValueError(f"`rows` must be a list of at most {MAX_ROWS_PER_REQUEST} rows")
    out = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(columns):
            raise ValueError(f"every row must be a list of {len(columns)} values")
        out.append(tuple(_cell(c, v) for c, v in zip(columns, row, strict=True)))
    return table, token, columns, out


class RemoteLogSink:
    """The writer's client when the owner is another node (synchronous: the writer thread calls it)."""

    def __init__(self, url: str, secret: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.secret = secret
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._columns: dict[str, set[str]] = {}

    def _post(self, path: str, body: bytes) -> bytes:
        for attempt in (0, 1):  # a kept-alive connection the owner closed: one fresh retry
            if self._conn is None:
                cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self._conn = cls(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("POST", path, body, {"Content-Type": "application/json",
                                                        SECRET_HEADER: self.secret})
                resp = self._conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                self._conn = None
                if attempt:
                    raise LogStoreError(f"log store {self.host}:{self.port} unreachable: {exc!r}") from exc
                continue
            if resp.status != 200:
                raise LogStoreError(f"log store answered {resp.status}: {data[:200]!r}")
            return data
        raise AssertionError("unreachable")

    def table_columns(self, table: str) -> set[str]:
        """The column names the owner's ``table`` has (asked once per sink, as ClickHouse's client does)."""
        known = self._columns.get(table)
        if known is None:
            body = orjson.dumps({"kind": "table_columns", "args": {"table": table}})
            known = set(orjson.loads(self._post(QUERY_PATH, body))["result"])
            self._columns[table] = known
        return known

    def insert_rows(self, table: str, rows: list[tuple], columns: list[str], dedup_token: str) -> None:
        """Post one batch (in chunks); raises :class:`LogStoreError` unless every chunk was taken."""
        if not rows:
            return
        for body in encode_chunks(table, rows, columns, dedup_token):
            self._post(INSERT_PATH, body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---- read queries -------------------------------------------------------------------------------

def _ids(v: Any, name: str, optional: bool) -> list[str] | None:
    if v is None and optional:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"`{name}` must be a list of strings")
    return v


def _time(v: Any, name: str, optional: bool) -> datetime | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise ValueError(f"`{name}` must be an ISO 8601 string")
    return _cell("timestamp", v)


def _str(v: Any, name: str, optional: bool) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > 1000:
        raise ValueError(f"`{name}` must be a string")
    return v


def _int(v: Any, name: str, optional: bool) -> int | None:
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"`{name}` must be a non-negative integer")
    return v


_PARSERS: dict[str, Callable[[Any, str, bool], Any]] = {"ids": _ids, "time": _time, "str": _str, "int": _int}


def _spec() -> dict[str, tuple[Callable[..., Any], dict[str, str]]]:
    from .domain_stats import query_domains
    from .queries import bytes_by_connection, query_bandwidth, query_logs

    return {
        "logs": (query_logs, {"device_ids": "ids?", "start": "time", "end": "time", "connection_id": "str?",
                              "target": "str?", "action": "str?", "limit": "int", "offset": "int"}),
        "bandwidth": (query_bandwidth, {"device_ids": "ids?", "connection_id": "str?", "start": "time?",
                                        "end": "time?", "group_by": "str?", "limit": "int?",
                                        "offset": "int?"}),
        "domains": (query_domains, {"device_ids": "ids?", "start": "time", "end": "time",
                                    "connection_id": "str?", "limit": "int"}),
        "bytes_by_connection": (bytes_by_connection, {"connection_ids": "ids", "now": "time"}),
        "table_columns": (ClickHouse.table_columns, {"table": "str"}),
    }


def run_query(ch: ClickHouse, kind: Any, args: Any) -> Any:
    """Run read query ``kind`` with JSON ``args`` on ``ch``; the result JSON-shaped (ValueError on bad input)."""
    spec = _spec()
    if not isinstance(kind, str) or kind not in spec:  # (a list or object is not hashable)
        raise ValueError(f"`kind` must be one of {sorted(spec)}")
    if not isinstance(args, dict) or set(args) - set(spec[kind][1]):
        raise ValueError(f"`args` must be an object with keys among {sorted(spec[kind][1])}")
    fn, params = spec[kind]
    kwargs = {}
    for name, typ in params.items():
        base, optional = typ.rstrip("?"), typ.endswith("?")
        value = _PARSERS[base](args.get(name), name, optional)
        if value is None and base == "int":
            continue  # an optional count left out: the query's own default
        kwargs[name] = value
    if kind == "table_columns":
        if kwargs["table"] not in COLUMNS:
            raise ValueError(f"`table` must be one of {sorted(COLUMNS)}")
        return sorted(ch.table_columns(kwargs["table"]))
    if kind == "bytes_by_connection":
        return {k: list(v) for k, v in fn(ch, kwargs["connection_ids"], kwargs["now"]).items()}
    result = fn(ch, **kwargs)
    if kind == "logs":
        total, entries = result
        return {"total": total, "entries": entries}
    return result


def encode_args(args: dict[str, Any]) -> dict[str, Any]:
    """Query arguments as JSON values (datetimes as ISO 8601)."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in args.items()}


class LocalLogReader:
    """Reads this node's own store."""

    def __init__(self, ch: ClickHouse) -> None:
        self.ch = ch

    async def query(self, kind: str, **args: Any) -> Any:
        return await asyncio.to_thread(run_query, self.ch, kind, encode_args(args))

    async def close(self) -> None:
        return None


class RemoteLogReader:
    """Reads the store of the node at ``LOG_STORE_URL`` (one pooled aiohttp session, closed by :meth:`close`)."""

    def __init__(self, url: str, secret: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") + QUERY_PATH
        self.secret = secret
        self.timeout = timeout
        self._http: Any = None

    async def query(self, kind: str, **args: Any) -> Any:
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        body = orjson.dumps({"kind": kind, "args": encode_args(args)})
        async with self._http.post(self.url, data=body, headers={"Content-Type": "application/json",
                                                                SECRET_HEADER: self.secret}) as r:
            data = await r.read()
            if r.status != 200:
                raise LogStoreError(f"log store answered {r.status}: {data[:200]!r}")
        return orjson.loads(data)["result"]

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
