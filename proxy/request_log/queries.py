"""Read side of the request log and bandwidth rollups (synchronous: call via ``asyncio.to_thread``).

Every value from a caller is a bound ``{name:Type}`` parameter; only fixed SQL fragments are
assembled. Times travel as epoch milliseconds / seconds so neither side's time zone matters.
Rollup tables are ``SummingMergeTree``: rows merge eventually, so reads always ``sum()``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from .clickhouse import DATABASE, ClickHouse
from .columns import REQUEST_LOG

MAX_LIMIT = 10_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_LOG_COLUMNS = REQUEST_LOG.select_list()   # every column of columns.REQUEST_LOG, named as in the API
_LOG_KEYS = tuple(REQUEST_LOG.names)
# Newest first; the tie-breakers make LIMIT/OFFSET pages stable between calls.
_LOG_ORDER = "timestamp DESC, connectionId, clientAddr, target, durationMs, bytesIn, bytesOut"


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _ms(ts: datetime) -> int:
    return (_utc(ts) - _EPOCH) // timedelta(milliseconds=1)


def _iso_ms(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_s(seconds: int) -> str:
    return (_EPOCH + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def _like_pattern(text: str) -> str:
    """``%text%`` for LIKE with the caller's wildcards escaped."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def query_logs(
    ch: ClickHouse,
    *,
    device_ids: list[str] | None,
    start: datetime,
    end: datetime,
    connection_id: str | None,
    target: str | None,
    action: str | None,
    limit: int,
    offset: int,
) -> tuple[int, list[dict[str, Any]]]:
    """(total matching, one page newest first) of ``request_log`` in [start, end].

    ``device_ids=None`` means every device (admin); ``[]`` means none. ``target`` is a
    case-insensitive substring.
    """
    if device_ids is not None and not device_ids:
        return 0, []
    conds = [
        "timestamp >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')",
        "timestamp <= fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')",
    ]
    params: dict[str, Any] = {"start_ms": _ms(start), "end_ms": _ms(end)}
    if device_ids is not None:
        conds.append("deviceId IN {device_ids:Array(String)}")
        params["device_ids"] = list(device_ids)
    if connection_id:
        conds.append("connectionId = {connection_id:String}")
        params["connection_id"] = connection_id
    if target:
        conds.append("lower(target) LIKE {target:String}")
        params["target"] = _like_pattern(target)
    if action:
        conds.append("action = {action:String}")
        params["action"] = action
    where = " AND ".join(conds)
    table = f"{DATABASE}.request_log"
    total = int(ch.query(f"SELECT count() FROM {table} WHERE {where}", params)[0][0])
    limit, offset = max(0, min(int(limit), MAX_LIMIT)), max(0, int(offset))
    if total == 0 or limit == 0 or offset >= total:
        return total, []
    params |= {"limit": limit, "offset": offset}
    rows = ch.query(
        f"SELECT {_LOG_COLUMNS} FROM {table} WHERE {where} ORDER BY {_LOG_ORDER} "
        "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
        params,
    )
    entries = []
    for row in rows:
        entry = dict(zip(_LOG_KEYS, row, strict=True))
        entry["timestamp"] = _iso_ms(entry["timestamp"])
        entry["blockReason"] = entry["blockReason"] or None
        entries.append(entry)
    return total, entries


def _aligned_to_day(ts: datetime | None) -> bool:
    return ts is None or _utc(ts) == _utc(ts).replace(hour=0, minute=0, second=0, microsecond=0)


def query_bandwidth(
    ch: ClickHouse,
    *,
    device_ids: list[str] | None,
    connection_id: str | None,
    start: datetime | None,
    end: datetime | None,
    group_by: str | None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Bytes per (device, connection[, bucket]) from the rollups (``limit`` rows from ``offset``).

    ``group_by`` is ``"hour"``, ``"day"`` or None (totals over the range). A bucket counts when
    its start lies in [start floored to the bucket, end). Totals use the daily rollup (which
    outlives the log retention) when the range is whole days, else the hourly one.
    """
    if group_by not in (None, "hour", "day"):
        raise ValueError("group_by must be 'hour', 'day' or None")
    if device_ids is not None and not device_ids:
        return []
    daily = group_by == "day" or (group_by is None and _aligned_to_day(start) and _aligned_to_day(end))
    if daily:
        table, col, bucket_sql = f"{DATABASE}.bandwidth_daily", "day", "toUnixTimestamp(toDateTime(day, 'UTC'))"
    else:
        table, col, bucket_sql = f"{DATABASE}.bandwidth_hourly", "hour", "toUnixTimestamp(hour)"
    conds: list[str] = []
    params: dict[str, Any] = {}
    if device_ids is not None:
        conds.append("deviceId IN {device_ids:Array(String)}")
        params["device_ids"] = list(device_ids)
    if connection_id:
        conds.append("connectionId = {connection_id:String}")
        params["connection_id"] = connection_id
    if start is not None:
        s = _utc(start)
        if daily:
            conds.append("day >= {start_day:Date}")
            params["start_day"] = s.date()
        else:
            conds.append("hour >= toDateTime({start_s:Int64}, 'UTC')")
            params["start_s"] = int(s.replace(minute=0, second=0, microsecond=0).timestamp())
    if end is not None:
        e = _utc(end)
        if daily:
            conds.append("day < {end_day:Date}")
            params["end_day"] = e.date() if _aligned_to_day(e) else e.date() + timedelta(days=1)
        else:
            conds.append("hour < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')")
            params["end_ms"] = _ms(e)
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    page = ""
    if limit is not None:
        page = " LIMIT {limit:UInt32} OFFSET {offset:UInt64}"
        params |= {"limit": max(0, int(limit)), "offset": max(0, int(offset))}
    if group_by is None:
        sql = (f"SELECT deviceId, connectionId, sum(bytesIn), sum(bytesOut) FROM {table} {where} "
               "GROUP BY deviceId, connectionId ORDER BY deviceId, connectionId" + page)
        return [
            {"deviceId": d, "connectionId": c, "bytesIn": int(bi), "bytesOut": int(bo), "bucket": None}
            for d, c, bi, bo in ch.query(sql, params)
        ]
    sql = (f"SELECT deviceId, connectionId, {bucket_sql} AS bucket, sum(bytesIn), sum(bytesOut) "
           f"FROM {table} {where} GROUP BY deviceId, connectionId, {col} "
           "ORDER BY bucket, deviceId, connectionId" + page)
    return [
        {"deviceId": d, "connectionId": c, "bytesIn": int(bi), "bytesOut": int(bo), "bucket": _iso_s(int(b))}
        for d, c, b, bi, bo in ch.query(sql, params)
    ]


def bytes_by_connection(ch: ClickHouse, connection_ids: list[str], now: datetime) -> dict[str, tuple[int, int]]:
    """connectionId -> (bytes in the last 24 h, lifetime bytes), bytes = in + out.

    The 24 h window is read from the hourly rollup at hour granularity: it covers the hour
    buckets from the one holding ``now - 24h`` up to ``now`` (so up to one extra hour).
    """
    if not connection_ids:
        return {}
    ids = list(dict.fromkeys(connection_ids))
    out = {cid: (0, 0) for cid in ids}
    since = _utc(now) - timedelta(hours=24)
    params: dict[str, Any] = {
        "ids": ids,
        "since_s": int(since.replace(minute=0, second=0, microsecond=0).timestamp()),
        "now_s": int(_utc(now).timestamp()),
    }
    recent = dict(ch.query(
        f"SELECT connectionId, sum(bytesIn + bytesOut) FROM {DATABASE}.bandwidth_hourly "
        "WHERE connectionId IN {ids:Array(String)} "
        "AND hour >= toDateTime({since_s:Int64}, 'UTC') AND hour <= toDateTime({now_s:Int64}, 'UTC') "
        "GROUP BY connectionId",
        params,
    ))
    lifetime = dict(ch.query(
        f"SELECT connectionId, sum(bytesIn + bytesOut) FROM {DATABASE}.bandwidth_daily "
        "WHERE connectionId IN {ids:Array(String)} "
        "GROUP BY connectionId",
        params,
    ))
    for cid in ids:
        out[cid] = (int(recent.get(cid, 0)), int(lifetime.get(cid, 0)))
    return out

