"""The request-log tables as column lists: one list per table defines its schema, its row builder
and what the read side selects.

Adding a column (a newcomer's checklist, three places):
1. a :class:`Column` here (name, ClickHouse type exactly as ``DESCRIBE`` prints it, how the value
   comes from the record; ``read`` when the API wants an expression instead of the bare column);
2. a field on ``writer.SessionRecord`` (with a default, so callers that do not know it still work);
3. a migration ``migrations/NNN_<what>.sql`` with ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS``.
``tests/integration/test_request_log_migrations.py`` fails when the migrated table and this list
disagree. Spooled batches carry their column names, so rows spooled before an upgrade replay
after it (the new column takes its default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .domains import registrable_domain


def utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def uint(v: int) -> int:
    return max(0, int(v))


def uint16(v: int) -> int:
    return min(uint(v), 65535)


def text(v: Any) -> str:
    return "" if v is None else str(v)


@dataclass(frozen=True)
class Column:
    """One column: its name, its ClickHouse type, and the value it takes from a record:
    ``conv(record.<source>)`` for an attribute name, ``conv(record[source])`` for an index,
    ``conv(record)`` when ``source`` is None."""

    name: str
    ch_type: str
    source: str | int | None
    conv: Callable[[Any], Any]
    read: str | None = None     # SQL the read side selects (default: the column itself)


@dataclass(frozen=True)
class Table:
    """A table's columns in insert order, and the row builder they define."""

    name: str
    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        # The row builder runs once per logged attempt on the writer thread (which shares the GIL
        # with the proxy's event loop): compile it to one tuple expression, as fast as a handwritten one.
        namespace: dict[str, Any] = {}
        parts = []
        for i, c in enumerate(self.columns):
            namespace[f"c{i}"] = c.conv
            if c.source is None:
                parts.append(f"c{i}(r)")
            elif isinstance(c.source, int):
                parts.append(f"c{i}(r[{c.source}])")
            elif c.source.isidentifier():
                parts.append(f"c{i}(r.{c.source})")
            else:
                raise ValueError(f"column {c.name}: source {c.source!r} is not an attribute name")
        exec(f"def row(r):\n    return ({', '.join(parts)},)", namespace)  # noqa: S102 - built from the list above
        object.__setattr__(self, "_row", namespace["row"])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def row(self, record: Any) -> tuple:
        """The row of ``record``, in :attr:`names` order."""
        return self._row(record)  # type: ignore[attr-defined]

    def select_list(self) -> str:
        return ", ".join(c.read or c.name for c in self.columns)

    def type_of(self) -> dict[str, str]:
        return {c.name: c.ch_type for c in self.columns}


# One row per SOCKS5 / HTTP CONNECT attempt (built from ``writer.SessionRecord``).
REQUEST_LOG = Table("request_log", (
    Column("timestamp", "DateTime64(3, 'UTC')", "timestamp", utc, "toUnixTimestamp64Milli(timestamp)"),
    Column("connectionId", "String", "connection_id", str),
    Column("deviceId", "LowCardinality(String)", "device_id", text),
    Column("serverNode", "LowCardinality(String)", "server_node", str),
    Column("target", "String", "target", str),
    Column("targetType", "LowCardinality(String)", "target_type", str),
    Column("port", "UInt16", "port", uint16),
    Column("resolvedIp", "String", "resolved_ip", text),
    Column("action", "LowCardinality(String)", "action", str),
    Column("blockReason", "LowCardinality(String)", "block_reason", text),
    Column("bytesIn", "UInt64", "bytes_in", uint),
    Column("bytesOut", "UInt64", "bytes_out", uint),
    Column("durationMs", "UInt64", "duration_ms", uint),
    Column("clientAddr", "String", "client_addr", text),
    Column("protocol", "LowCardinality(String)", "protocol", str),
    Column("replyCode", "UInt16", "reply_code", uint16),
    Column("error", "String", "error", text),
    Column("domain", "String", "target", lambda t: registrable_domain(str(t))),  # migration 002
    # The node holding the device's tunnel (differs from serverNode when relayed); migration 003.
    Column("deviceNode", "LowCardinality(String)", None, lambda r: str(r.device_node or r.server_node)),
))

# Byte deltas of open and closing sessions, built from (ts, device_id, connection_id, in, out).
TRAFFIC_DELTA = Table("traffic_delta", (
    Column("timestamp", "DateTime64(3, 'UTC')", 0, utc),
    Column("deviceId", "LowCardinality(String)", 1, text),
    Column("connectionId", "String", 2, str),
    Column("bytesIn", "UInt64", 3, uint),
    Column("bytesOut", "UInt64", 4, uint),
))

TABLES: dict[str, Table] = {t.name: t for t in (REQUEST_LOG, TRAFFIC_DELTA)}

# The columns of spool lines written before batches carried their names (spool format 1).
LEGACY_SPOOL_COLUMNS: dict[str, Sequence[str]] = {
    "request_log": ("timestamp", "connectionId", "deviceId", "serverNode", "target", "targetType", "port",
                    "resolvedIp", "action", "blockReason", "bytesIn", "bytesOut", "durationMs", "clientAddr",
                    "protocol", "replyCode", "error"),
    "traffic_delta": ("timestamp", "deviceId", "connectionId", "bytesIn", "bytesOut"),
}
