"""Per-registrable-domain analytics of the request log, aggregated in ClickHouse (sync: use a thread)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .clickhouse import DATABASE, ClickHouse
from .queries import _iso_ms, _ms

MAX_DOMAINS = 1000

# Rows written before the `domain` column existed read as '': they group by their bare host.
_DOMAIN_SQL = (
    "if(domain != '', domain, lower(replaceRegexpAll(replaceRegexpOne(target, ':[0-9]+$', ''), '^\\\\[|\\\\]$', '')))"
)


def query_domains(
    ch: ClickHouse,
    *,
    device_ids: list[str] | None,
    start: datetime,
    end: datetime,
    connection_id: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Top domains in [start, end] by bytesIn + bytesOut (descending, then by name).

    ``sessions`` counts every attempt, ``blocked`` those with ``action='blocked'``, ``failed`` the
    allowed ones whose ``replyCode`` is not 0. ``device_ids=None`` means every device (admin).
    """
    if device_ids is not None and not device_ids:
        return []
    conds = [
        "timestamp >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')",
        "timestamp <= fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')",
    ]
    params: dict[str, Any] = {"start_ms": _ms(start), "end_ms": _ms(end),
                              "limit": max(1, min(int(limit), MAX_DOMAINS))}
    if device_ids is not None:
        conds.append("deviceId IN {device_ids:Array(String)}")
        params["device_ids"] = list(device_ids)
    if connection_id:
        conds.append("connectionId = {connection_id:String}")
        params["connection_id"] = connection_id
    sql = (
        f"SELECT {_DOMAIN_SQL} AS d, count(), countIf(action = 'blocked'), "
        "countIf(action = 'allowed' AND replyCode != 0), sum(bytesIn), sum(bytesOut), "
        "toUnixTimestamp64Milli(min(timestamp)), toUnixTimestamp64Milli(max(timestamp)) "
        f"FROM {DATABASE}.request_log WHERE {' AND '.join(conds)} "
        "GROUP BY d ORDER BY sum(bytesIn) + sum(bytesOut) DESC, d LIMIT {limit:UInt32}"
    )
    return [
        {"domain": d, "sessions": int(n), "blocked": int(b), "failed": int(f), "bytesIn": int(bi),
         "bytesOut": int(bo), "firstSeen": _iso_ms(int(first)), "lastSeen": _iso_ms(int(last))}
        for d, n, b, f, bi, bo, first, last in ch.query(sql, params)
    ]
