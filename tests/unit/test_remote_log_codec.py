"""The batch codec between a node and its log-store owner (proxy/request_log/remote.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from proxy.request_log.remote import CHUNK_BYTES, decode_batch, encode_chunks, run_query
from proxy.request_log.writer import REQUEST_LOG, REQUEST_LOG_COLUMNS, TRAFFIC_DELTA, TRAFFIC_DELTA_COLUMNS

NOW = datetime(2026, 12, 1, 12, 0, 0, 123000, tzinfo=UTC)


def row(i: int, target: str = "a.example.com:443") -> tuple:
    return (NOW, f"c{i}", "d1", "n-0", target, "domain", 443, "1.2.3.4", "allowed", "", i, 2 * i, 3, "127.0.0.1:5",
            "socks5", 0, "", "example.com", "n-1")


def test_a_batch_round_trips_with_its_token_and_types() -> None:
    rows = [row(i) for i in range(3)]
    [body] = encode_chunks(REQUEST_LOG, rows, REQUEST_LOG_COLUMNS, "tok")
    table, token, columns, out = decode_batch(orjson.loads(body))
    assert (table, token, columns, out) == (REQUEST_LOG, "tok", REQUEST_LOG_COLUMNS, rows)


def test_a_large_batch_is_cut_into_the_same_chunks_on_every_replay() -> None:
    rows = [row(i, "x" * 2000 + ".example.com:443") for i in range(400)]
    first = encode_chunks(REQUEST_LOG, rows, REQUEST_LOG_COLUMNS, "tok")
    assert len(first) > 1 and all(len(b) < CHUNK_BYTES + 8192 for b in first)
    assert encode_chunks(REQUEST_LOG, list(rows), REQUEST_LOG_COLUMNS, "tok") == first
    decoded = [decode_batch(orjson.loads(b)) for b in first]
    assert [d[1] for d in decoded] == [f"tok-{i}" for i in range(len(first))]
    assert [r for d in decoded for r in d[3]] == rows


@pytest.mark.parametrize("change,message", [
    ({"table": "users"}, "`table` must be one of"),
    ({"token": ""}, "`token` must be a non-empty string"),
    ({"columns": ["timestamp", "nope"]}, "`columns` must be distinct columns"),
    ({"columns": ["timestamp", "timestamp"]}, "`columns` must be distinct columns"),
    ({"rows": [["2026-01-01T00:00:00Z", "d", "c", 1]]}, "every row must be a list of 5 values"),
    ({"rows": [["2026-01-01T00:00:00Z", "d", "c", -1, 0]]}, "`bytesIn` must be a non-negative integer"),
    ({"rows": [["2026-01-01T00:00:00Z", "d", "c", True, 0]]}, "`bytesIn` must be a non-negative integer"),
    ({"rows": [["2026-01-01T00:00:00Z", 5, "c", 1, 0]]}, "`deviceId` must be a string"),
    ({"rows": [[12, "d", "c", 1, 0]]}, "`timestamp` must be an ISO 8601 string"),
    ({"rows": [["yesterday", "d", "c", 1, 0]]}, "Invalid isoformat"),
    ({"rows": "many"}, "`rows` must be a list"),
])
def test_malformed_insert_bodies_are_refused_with_the_reason(change, message) -> None:
    body = {"table": TRAFFIC_DELTA, "token": "t", "columns": TRAFFIC_DELTA_COLUMNS,
            "rows": [["2026-01-01T00:00:00Z", "d", "c", 1, 0]], **change}
    with pytest.raises(ValueError, match=message):
        decode_batch(body)


@pytest.mark.parametrize("kind,args,message", [
    ("table_columns", {"table": "users"}, "`table` must be one of"),
    ("table_columns", {}, "`table` must be a string"),
    ("bandwidth", {"device_ids": ["d"], "limit": -1}, "`limit` must be a non-negative integer"),
    ("drop_everything", {}, "`kind` must be one of"),
])
def test_malformed_queries_are_refused_before_the_store_is_touched(kind, args, message) -> None:
    with pytest.raises(ValueError, match=message):
        run_query(None, kind, args)  # type: ignore[arg-type]  # never reached: no store needed
