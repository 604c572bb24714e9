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
    """One column: its name, its ClickHouse type, and the value it takes from a record."""

    name: str
    ch_type: str
    build: Callable[[Any], Any]
    read: str | None = None     # SQL the read side selects (default: the column itself)


@dataclass(frozen=True)
class Table:
    """A table's columns in insert order, and the row builder they define."""

    name: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def row(self, record: Any) -> tuple:
        """The row of ``record``, in :attr:`names` order."""
        return tuple([c.build(record) for c in self.columns])

    def select_list(self) -> str:
        return ", ".join(c.read or c.name for c in self.columns)

    def type_of(self) -> dict[str, str]:
        return {c.name: c.ch_type for c in self.columns}


def _attr(name: str, conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def get(record: Any) -> Any:
        return conv(getattr(record, name))

    get.__name__ = f"get_{name}"
    return get


def _at(index: int, conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda item: conv(item[index])


# One row per SOCKS5 / HTTP CONNECT attempt (built from ``writer.SessionRecord``).
REQUEST_LOG = Table("request_log", (
    Column("timestamp", "DateTime64(3, 'UTC')", _attr("timestamp", utc), "toUnixTimestamp64Milli(timestamp)"),
    Column("connectionId", "String", _attr("connection_id", str)),
    Column("deviceId", "LowCardinality(String)", _attr("device_id", text)),
    Column("serverNode", "LowCardinality(String)", _attr("server_node", str)),
    Column("target", "String", _attr("target", str)),
    Column("targetType", "LowCardinality(String)", _attr("target_type", str)),
    Column("port", "UInt16", _attr("port", uint16)),
    Column("resolvedIp", "String", _attr("resolved_ip", text)),
    Column("action", "LowCardinality(String)", _attr("action", str)),
    Column("blockReason", "LowCardinality(String)", _attr("block_reason", text)),
    Column("bytesIn", "UInt64", _attr("bytes_in", uint)),
    Column("bytesOut", "UInt64", _attr("bytes_out", uint)),
    Column("durationMs", "UInt64", _attr("duration_ms", uint)),
    Column("clientAddr", "String", _attr("client_addr", text)),
    Column("protocol", "LowCardinality(String)", _attr("protocol", str)),
    Column("replyCode", "UInt16", _attr("reply_code", uint16)),
    Column("error", "String", _attr("error", text)),
))

# Byte deltas of open and closing sessions, built from (ts, device_id, connection_id, in, out).
TRAFFIC_DELTA = Table("traffic_delta", (
    Column("timestamp", "DateTime64(3, 'UTC')", _at(0, utc)),
    Column("deviceId", "LowCardinality(String)", _at(1, text)),
    Column("connectionId", "String", _at(2, str)),
    Column("bytesIn", "UInt64", _at(3, uint)),
    Column("bytesOut", "UInt64", _at(4, uint)),
))

TABLES: dict[str, Table] = {t.name: t for t in (REQUEST_LOG, TRAFFIC_DELTA)}

# The columns of spool lines written before batches carried their names (spool format 1).
LEGACY_SPOOL_COLUMNS: dict[str, Sequence[str]] = {
    "request_log": ("timestamp", "connectionId", "deviceId", "serverNode", "target", "targetType", "port",
                    "resolvedIp", "action", "blockReason", "bytesIn", "bytesOut", "durationMs", "clientAddr",
                    "protocol", "replyCode", "error"),
    "traffic_delta": ("timestamp", "deviceId", "connectionId", "bytesIn", "bytesOut"),
}
