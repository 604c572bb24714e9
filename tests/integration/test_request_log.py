"""Request log and bandwidth against the real embedded ClickHouse engine (chDB).

chDB hosts one data path per process, so the whole module shares one client on one path and
tests keep apart by using their own device / connection ids. The SIGKILL test runs its victim
in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.request_log.clickhouse import ClickHouse, make_client  # noqa: E402
from proxy.request_log.queries import bytes_by_connection, query_bandwidth, query_logs  # noqa: E402
from proxy.request_log.writer import (  # noqa: E402
    REQUEST_LOG_COLUMNS,
    TRAFFIC_DELTA_COLUMNS,
    RequestLogWriter,
    SessionRecord,
    Spool,
    TrafficCursor,
)

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Any:
    client = make_client(None, str(tmp_path_factory.mktemp("chdata")))
    client.apply_schema(30)
    client.apply_schema(30)   # idempotent
    yield client
    client.close()


class Switchable:
    """The real client, with a switch: ``down`` makes inserts fail before reaching ClickHouse,
    ``lose_ack`` makes them reach ClickHouse and then fail (a lost acknowledgement)."""

    def __init__(self, real: ClickHouse, delay: float = 0.0) -> None:
        self.real = real
        self.down = False
        self.lose_ack = False
        self.delay = delay
        self.batches: list[tuple[str, int]] = []

    def table_columns(self, table: str) -> set[str]:
        if self.down:
            raise ConnectionError("ClickHouse is down (test)")
        return self.real.table_columns(table)

    def insert_rows(self, table: str, rows: list[tuple], columns: list[str], dedup_token: str) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise ConnectionError("ClickHouse is down (test)")
        self.real.insert_rows(table, rows, columns, dedup_token)
        self.batches.append((table, len(rows)))
        if self.lose_ack:
            raise TimeoutError("acknowledgement lost (test)")


def ids(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def session(device: str, conn: str, i: int, ts: datetime | None = None, **kw: Any) -> SessionRecord:
    fields: dict[str, Any] = dict(
        timestamp=ts or NOW - timedelta(seconds=i), connection_id=conn, device_id=device, server_node="node-1",
        target=f"host{i}.example.com:443", target_type="domain", port=443, resolved_ip="93.184.216.34",
        action="allowed", block_reason=None, bytes_in=1000 + i, bytes_out=10 + i, duration_ms=5 * i,
        client_addr=f"127.0.0.1:{20000 + i % 1000}", protocol="socks5", reply_code=0, error="",
    )
    fields.update(kw)
    return SessionRecord(**fields)


def count_rows(ch: ClickHouse, table: str, device: str) -> tuple[int, int, int]:
    """(rows, sum bytesIn, sum bytesOut) of one device in a raw table."""
    (n, b_in, b_out), = ch.query(
        f"SELECT count(), sum(bytesIn), sum(bytesOut) FROM proxyorch.{table} WHERE deviceId = {{d:String}}",
        {"d": device},
    )
    return int(n), int(b_in), int(b_out)


def iso_ms(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def spool_segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.jsonl"))


# ---- ClickHouse client --------------------------------------------------------------------


def test_insert_dedup_token_counts_a_batch_once(ch: ClickHouse) -> None:
    dev, conn = ids("dev"), ids("conn")
    deltas = [(NOW - timedelta(hours=i % 3), dev, conn, 100, 7) for i in range(30)]
    token = uuid.uuid4().hex
    ch.insert_rows("traffic_delta", deltas, TRAFFIC_DELTA_COLUMNS, token)
    ch.insert_rows("traffic_delta", deltas, TRAFFIC_DELTA_COLUMNS, token)   # replay: same token
    assert count_rows(ch, "traffic_delta", dev) == (30, 3000, 210)
    # the rollup views are deduplicated with their source
    (total,) = query_bandwidth(ch, device_ids=[dev], connection_id=None, start=None, end=None, group_by=None)
    assert (total["bytesIn"], total["bytesOut"]) == (3000, 210)
    hourly = query_bandwidth(ch, device_ids=[dev], connection_id=None, start=NOW - timedelta(hours=5),
                             end=NOW + timedelta(hours=1), group_by="hour")
    assert sum(r["bytesIn"] for r in hourly) == 3000
    # identical data under a new token is a new batch
    ch.insert_rows("traffic_delta", deltas, TRAFFIC_DELTA_COLUMNS, uuid.uuid4().hex)
    assert count_rows(ch, "traffic_delta", dev) == (60, 6000, 420)

    rows = [session(dev, conn, i).to_row() for i in range(5)]
    token = uuid.uuid4().hex
    for _ in range(3):
        ch.insert_rows("request_log", rows, REQUEST_LOG_COLUMNS, token)
    assert count_rows(ch, "request_log", dev)[0] == 5


def test_schema_follows_retention(ch: ClickHouse) -> None:
    ch.apply_schema(45)
    try:
        ((engine,),) = ch.query("SELECT engine_full FROM system.tables WHERE database = 'proxyorch' "
                                "AND name = 'request_log'", {})
        assert "toIntervalDay(45)" in engine
    finally:
        ch.apply_schema(30)


# ---- writer -------------------------------------------------------------------------------


def test_batches_by_size_then_by_time(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    sink = Switchable(ch)
    w = RequestLogWriter(lambda: sink, str(tmp_path), batch_rows=100, batch_seconds=30.0)
    w.start()
    try:
        for i in range(250):
            w.record_session(session(dev, conn, i))
        # two full batches go out by size, long before the 30 s timer
        assert wait_for(lambda: w.stats["rows_written"] == 200, 5)
        time.sleep(0.2)
        assert sink.batches == [("request_log", 100), ("request_log", 100)]
        assert count_rows(ch, "request_log", dev)[0] == 200
        assert w.flush()
        assert sink.batches[-1] == ("request_log", 50)
        assert count_rows(ch, "request_log", dev)[0] == 250
    finally:
        w.close()

    dev2 = ids("dev")
    sink2 = Switchable(ch)
    w = RequestLogWriter(lambda: sink2, str(tmp_path / "t"), batch_rows=10000, batch_seconds=0.3)
    w.start()
    try:
        t0 = time.monotonic()
        for i in range(5):
            w.record_session(session(dev2, conn, i))
            w.record_traffic(NOW, dev2, conn, 10, 1)
        # small batches go out by age, without a flush
        assert wait_for(lambda: count_rows(ch, "request_log", dev2)[0] == 5, 5)
        assert wait_for(lambda: count_rows(ch, "traffic_delta", dev2)[0] == 5, 5)
        assert time.monotonic() - t0 < 3
        assert sorted(sink2.batches) == [("request_log", 5), ("traffic_delta", 5)]
    finally:
        w.close()


def test_exact_counts_from_many_threads(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    w = RequestLogWriter(lambda: ch, str(tmp_path), batch_rows=500, batch_seconds=0.2)
    w.start()
    per_thread, threads = 2000, 4

    def produce(k: int) -> None:
        for i in range(per_thread):
            w.record_session(session(dev, conn, i, bytes_in=3, bytes_out=1))
            w.record_traffic(NOW, dev, conn, 3, 1)

    workers = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert w.flush()
    w.close()
    n = per_thread * threads
    assert count_rows(ch, "request_log", dev) == (n, 3 * n, n)
    assert count_rows(ch, "traffic_delta", dev) == (n, 3 * n, n)
    assert w.stats["rows_written"] == 2 * n and w.stats["rows_spooled"] == 0


def test_long_session_interim_deltas_add_up_to_one_row(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    w = RequestLogWriter(lambda: ch, str(tmp_path), batch_seconds=0.05)
    w.start()
    start = NOW - timedelta(hours=2, minutes=30)
    cursor = TrafficCursor(dev, conn)
    totals = [(0, 0)]
    for k in range(1, 6):   # interim flushes every 30 min of a session spanning three hours
        totals.append((totals[-1][0] + 1000 * k, totals[-1][1] + 10 * k))
        cursor.emit(w, start + timedelta(minutes=30 * k), *totals[-1])
    assert w.flush()        # rollups are right while the session is still open
    hourly = query_bandwidth(ch, device_ids=[dev], connection_id=conn, start=start, end=NOW + timedelta(hours=1),
                             group_by="hour")
    assert sum(r["bytesIn"] for r in hourly) == totals[-1][0] and len(hourly) == 3
    assert count_rows(ch, "request_log", dev)[0] == 0
    final = (totals[-1][0] + 5, totals[-1][1] + 7)
    cursor.emit(w, NOW, *final)            # the remainder at close ...
    w.record_session(session(dev, conn, 0, ts=start, bytes_in=final[0], bytes_out=final[1]))   # ... and the row
    w.close()
    assert count_rows(ch, "request_log", dev) == (1, *final)
    (total,) = query_bandwidth(ch, device_ids=[dev], connection_id=conn, start=None, end=None, group_by=None)
    assert (total["bytesIn"], total["bytesOut"]) == final


def test_recording_never_waits_for_clickhouse(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    sink = Switchable(ch, delay=0.5)   # every insert takes half a second
    w = RequestLogWriter(lambda: sink, str(tmp_path), batch_rows=10000, batch_seconds=0.05)
    w.start()
    try:
        t0 = time.perf_counter()
        for i in range(20000):
            w.record_session(session(dev, conn, i))
        assert time.perf_counter() - t0 < 1.0
        assert w.flush(timeout=60)
        assert count_rows(ch, "request_log", dev)[0] == 20000
    finally:
        w.close()


async def test_aflush_keeps_the_event_loop_free(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    w = RequestLogWriter(lambda: Switchable(ch, delay=0.3), str(tmp_path), batch_seconds=0.05)
    w.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        for i in range(10):
            w.record_session(session(dev, conn, i))
        assert await w.aflush()
        assert ticks >= 10   # the loop kept running during the 0.3 s insert
    finally:
        task.cancel()
        w.close()
    assert count_rows(ch, "request_log", dev)[0] == 10


def test_outage_keeps_spools_and_replays_exactly_once(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    sink = Switchable(ch)
    sink.down = True
    w = RequestLogWriter(lambda: sink, str(tmp_path), batch_rows=50, batch_seconds=0.05, max_memory_rows=200)
    w.start()
    try:
        for i in range(600):
            w.record_session(session(dev, conn, i))
            w.record_traffic(NOW - timedelta(minutes=i), dev, conn, 100 + i, i)
        # memory is bounded: the overflow goes to the spool before any flush
        assert wait_for(lambda: w.stats["rows_spooled"] > 0 and w.stats["queue_len"] <= 200, 5)
        assert w.stats["batches_failed"] > 0 and "down" in w.stats["last_error"]
        assert count_rows(ch, "request_log", dev)[0] == 0
        # a flush while down puts everything on disk
        assert w.flush()
        assert w.stats["queue_len"] == 0 and w.stats["rows_spooled"] == 1200
        assert spool_segments(tmp_path)
        # rows recorded during the outage after the flush stay in memory
        for i in range(600, 650):
            w.record_session(session(dev, conn, i))
        sink.down = False
        assert w.flush()
        assert count_rows(ch, "request_log", dev) == (650, sum(1000 + i for i in range(650)),
                                                     sum(10 + i for i in range(650)))
        assert count_rows(ch, "traffic_delta", dev) == (600, sum(100 + i for i in range(600)),
                                                       sum(range(600)))
        assert not spool_segments(tmp_path)
        assert w.stats["rows_replayed"] == 1200
    finally:
        w.close()
    (total,) = query_bandwidth(ch, device_ids=[dev], connection_id=conn, start=None, end=None, group_by=None)
    assert total["bytesIn"] == sum(100 + i for i in range(600))


def test_lost_acknowledgement_is_not_double_counted(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    sink = Switchable(ch)
    sink.lose_ack = True
    w = RequestLogWriter(lambda: sink, str(tmp_path), batch_rows=40, batch_seconds=0.05)
    w.start()
    try:
        for i in range(100):
            w.record_session(session(dev, conn, i))
            w.record_traffic(NOW, dev, conn, 5, 1)
        assert wait_for(lambda: w.stats["batches_failed"] >= 3, 5)
        assert w.flush()            # still failing: spooled
        sink.lose_ack = False
        assert w.flush()            # replayed with the same tokens
        assert w.stats["queue_len"] == 0 and not spool_segments(tmp_path)
    finally:
        w.close()
    assert count_rows(ch, "request_log", dev)[0] == 100
    assert count_rows(ch, "traffic_delta", dev) == (100, 500, 100)
    (total,) = query_bandwidth(ch, device_ids=[dev], connection_id=None, start=None, end=None, group_by=None)
    assert (total["bytesIn"], total["bytesOut"]) == (500, 100)


def test_close_while_down_leaves_a_spool_the_next_writer_replays(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn = ids("dev"), ids("conn")
    sink = Switchable(ch)
    sink.down = True
    w = RequestLogWriter(lambda: sink, str(tmp_path), batch_rows=100, batch_seconds=0.05)
    w.start()
    for i in range(300):
        w.record_session(session(dev, conn, i))
    w.close()
    assert spool_segments(tmp_path) and count_rows(ch, "request_log", dev)[0] == 0

    w2 = RequestLogWriter(lambda: ch, str(tmp_path), batch_rows=100, batch_seconds=0.05)
    w2.start()
    try:
        assert wait_for(lambda: count_rows(ch, "request_log", dev)[0] == 300, 10)   # replayed at start
        assert w2.flush() and not spool_segments(tmp_path)
    finally:
        w2.close()
    assert count_rows(ch, "request_log", dev)[0] == 300


CHILD = textwrap.dedent("""
    import json, sys, time
    from datetime import UTC, datetime, timedelta
    sys.path.insert(0, {root!r})
    from proxy.request_log.writer import RequestLogWriter, SessionRecord

    def unreachable():
        raise ConnectionError("ClickHouse unreachable (child)")

    dev, conn, n = {dev!r}, {conn!r}, {n}
    w = RequestLogWriter(unreachable, {spool!r}, batch_rows=100, batch_seconds=0.05, max_memory_rows=300)
    w.start()
    now = datetime.now(UTC)
    for i in range(n):
        w.record_session(SessionRecord(now - timedelta(seconds=i), conn, dev, "child", f"h{{i}}.test:80",
                                       "domain", 80, "", "allowed", None, i, 1, 1, "127.0.0.1:1", "http", 200, ""))
        w.record_traffic(now - timedelta(hours=i % 30), dev, conn, i, 1)
    time.sleep(0.3)
    spilled = w.stats["rows_spooled"]
    assert w.flush(30)
    print(json.dumps({{"spilled_before_flush": spilled, **w.stats}}), flush=True)
    time.sleep(600)
""")


def test_spool_survives_sigkill(ch: ClickHouse, tmp_path: Path) -> None:
    dev, conn, n = ids("dev"), ids("conn"), 1500
    spool = tmp_path / "spool"
    code = CHILD.format(root=str(ROOT), dev=dev, conn=conn, n=n, spool=str(spool))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        stats = json.loads(child.stdout.readline())   # type: ignore[union-attr]
        assert stats["spilled_before_flush"] > 0       # bounded memory spilled on its own
        assert stats["rows_spooled"] == 2 * n and stats["queue_len"] == 0
        with pytest.raises(RuntimeError):              # a live writer owns the directory
            Spool(str(spool))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    # a torn write at the moment of the kill must not block the replay
    with open(spool_segments(spool)[-1], "ab") as f:
        f.write(b'{"table":"request_log","token":"torn","rows":[["2024-')

    w = RequestLogWriter(lambda: ch, str(spool), batch_rows=1000, batch_seconds=0.05)
    w.start()
    try:
        assert wait_for(lambda: w.stats["rows_replayed"] == 2 * n, 15)
        assert w.flush()
    finally:
        w.close()
    assert count_rows(ch, "request_log", dev) == (n, sum(range(n)), n)
    assert count_rows(ch, "traffic_delta", dev) == (n, sum(range(n)), n)
    assert not spool_segments(spool)


# ---- queries ------------------------------------------------------------------------------


def test_bandwidth_rollups_equal_the_raw_deltas(ch: ClickHouse, tmp_path: Path) -> None:
    rnd = random.Random(7)
    devices = [ids("dev") for _ in range(2)]
    conns = {d: [ids("conn") for _ in range(3)] for d in devices}
    base = NOW.replace(minute=0, second=0)
    deltas = []
    for _ in range(3000):
        d = rnd.choice(devices)
        ts = base - timedelta(minutes=rnd.randrange(0, 3 * 24 * 60), seconds=rnd.randrange(60))
        deltas.append((ts, d, rnd.choice(conns[d]), rnd.randrange(0, 10**6), rnd.randrange(0, 10**4)))
    w = RequestLogWriter(lambda: ch, str(tmp_path), batch_rows=700, batch_seconds=0.05)
    w.start()
    for ts, d, c, b_in, b_out in deltas:
        w.record_traffic(ts, d, c, b_in, b_out)
    assert w.flush()
    w.close()

    def expected(bucket_of: Any, keep: Any = lambda _r: True) -> dict[tuple, list[int]]:
        acc: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        for r in deltas:
            if keep(r):
                key = (r[1], r[2], bucket_of(r[0]))
                acc[key][0] += r[3]
                acc[key][1] += r[4]
        return dict(acc)

    def got(rows: list[dict]) -> dict[tuple, list[int]]:
        return {(r["deviceId"], r["connectionId"], r["bucket"]): [r["bytesIn"], r["bytesOut"]] for r in rows}

    def iso(ts: datetime) -> str:
        return ts.isoformat().replace("+00:00", "Z")

    hour = expected(lambda t: iso(t.replace(minute=0, second=0, microsecond=0)))
    day = expected(lambda t: iso(t.replace(hour=0, minute=0, second=0, microsecond=0)))
    total = expected(lambda t: None)
    for _ in range(2):   # before and after the SummingMergeTree merges
        assert got(query_bandwidth(ch, device_ids=devices, connection_id=None, start=None, end=None,
                                   group_by="hour")) == hour
        assert got(query_bandwidth(ch, device_ids=devices, connection_id=None, start=None, end=None,
                                   group_by="day")) == day
        assert got(query_bandwidth(ch, device_ids=devices, connection_id=None, start=None, end=None,
                                   group_by=None)) == total
        ch.command("OPTIMIZE TABLE proxyorch.bandwidth_hourly FINAL")
        ch.command("OPTIMIZE TABLE proxyorch.bandwidth_daily FINAL")
    assert sum(v[0] for v in total.values()) == sum(r[3] for r in deltas)

    # filters: one device, one connection, a range [start, end) of hour buckets
    d0, c0 = devices[0], conns[devices[0]][1]
    start, end = base - timedelta(hours=30, minutes=20), base - timedelta(hours=5)
    in_range = expected(lambda t: None, lambda r: r[1] == d0 and r[2] == c0 and
                        start.replace(minute=0) <= r[0].replace(minute=0, second=0) < end)
    rows = query_bandwidth(ch, device_ids=[d0], connection_id=c0, start=start, end=end, group_by=None)
    assert got(rows) == in_range
    rows = query_bandwidth(ch, device_ids=[d0], connection_id=c0, start=start, end=end, group_by="hour")
    assert {r["bucket"] for r in rows} <= {iso(start.replace(minute=0) + timedelta(hours=h)) for h in range(26)}
    assert sum(r["bytesIn"] for r in rows) == in_range[(d0, c0, None)][0]
    # whole-day totals come from the daily rollup and agree with the hourly one
    day_start = base.replace(hour=0) - timedelta(days=1)
    daily_total = query_bandwidth(ch, device_ids=[d0], connection_id=c0, start=day_start,
                                  end=day_start + timedelta(days=1), group_by=None)
    hourly_rows = query_bandwidth(ch, device_ids=[d0], connection_id=c0, start=day_start,
                                  end=day_start + timedelta(days=1), group_by="hour")
    assert daily_total[0]["bytesIn"] == sum(r["bytesIn"] for r in hourly_rows)
    assert query_bandwidth(ch, device_ids=[], connection_id=None, start=None, end=None, group_by=None) == []
    with pytest.raises(ValueError):
        query_bandwidth(ch, device_ids=None, connection_id=None, start=None, end=None, group_by="week")

    # per-connection bytes: last 24 h (hour granularity) and lifetime
    since = (NOW - timedelta(hours=24)).replace(minute=0, second=0)
    want = {}
    for c in conns[d0]:
        mine = [r for r in deltas if r[2] == c]
        want[c] = (sum(r[3] + r[4] for r in mine if r[0] >= since), sum(r[3] + r[4] for r in mine))
    assert bytes_by_connection(ch, [*conns[d0], "no-such-conn"], NOW) == {**want, "no-such-conn": (0, 0)}
    # deltas never create request_log rows
    assert all(count_rows(ch, "request_log", d)[0] == 0 for d in devices)


def test_query_logs_filters_pagination_and_total(ch: ClickHouse, tmp_path: Path) -> None:
    dev_a, dev_b, other = ids("dev"), ids("dev"), ids("dev")
    conn_a1, conn_a2, conn_b = ids("conn"), ids("conn"), ids("conn")
    recs = []
    for i in range(40):
        conn = conn_a1 if i % 2 else conn_a2
        blocked = i % 5 == 0
        recs.append(session(dev_a, conn, i, ts=NOW - timedelta(minutes=i),
                            target=f"API{i}.Example.com:443" if i % 3 == 0 else f"cdn{i}.other.net:80",
                            action="blocked" if blocked else "allowed",
                            block_reason="blacklist:example.com" if blocked else None))
    for i in range(15):
        recs.append(session(dev_b, conn_b, i, ts=NOW - timedelta(minutes=i, seconds=30), protocol="http",
                            target="50%_off.shop:443", reply_code=200))
    recs.append(session(other, ids("conn"), 0, ts=NOW))
    w = RequestLogWriter(lambda: ch, str(tmp_path), batch_seconds=0.05)
    w.start()
    for r in recs:
        w.record_session(r)
    assert w.flush()
    w.close()

    def q(**kw: Any) -> tuple[int, list[dict]]:
        args: dict[str, Any] = dict(device_ids=[dev_a, dev_b], start=NOW - timedelta(hours=2), end=NOW,
                                    connection_id=None, target=None, action=None, limit=100, offset=0)
        args.update(kw)
        return query_logs(ch, **args)

    total, entries = q()
    assert total == 55 and len(entries) == 55
    assert other not in {e["deviceId"] for e in entries}
    stamps = [e["timestamp"] for e in entries]
    assert stamps == sorted(stamps, reverse=True) and stamps[0] == NOW.isoformat().replace("+00:00", ".000Z")
    first = entries[0]
    assert set(first) == {"timestamp", "connectionId", "deviceId", "serverNode", "target", "targetType", "port",
                          "resolvedIp", "action", "blockReason", "bytesIn", "bytesOut", "durationMs",
                          "clientAddr", "protocol", "replyCode", "error", "domain", "deviceNode"}
    assert first["blockReason"] is None or first["action"] == "blocked"
    blocked = [e for e in entries if e["action"] == "blocked"]
    assert len(blocked) == 8 and all(e["blockReason"] == "blacklist:example.com" for e in blocked)

    # pagination: stable pages that add up to the whole, same total on every page
    pages, offset = [], 0
    while True:
        t, page = q(limit=7, offset=offset)
        assert t == 55
        if not page:
            break
        pages.extend(page)
        offset += 7
    assert pages == entries

    assert q(device_ids=[])[0] == 0
    assert q(device_ids=[dev_b])[0] == 15
    assert q(device_ids=None, connection_id=conn_a1)[0] == 20          # admin: no device restriction
    assert q(connection_id=conn_b, device_ids=[dev_a])[0] == 0          # not the caller's device
    assert q(action="blocked")[0] == 8
    assert q(target="example.COM")[0] == 14                             # case-insensitive substring
    assert q(target="%")[0] == 15                                       # wildcards are literal
    assert q(target="50%_off")[0] == 15 and q(target="5_%")[0] == 0
    assert q(target="' OR 1=1 --")[0] == 0                              # parameters, not SQL text
    start, end = NOW - timedelta(minutes=9, seconds=1), NOW - timedelta(minutes=5)
    t, page = q(start=start, end=end)
    assert t == 5 + 4 == len(page)        # dev_a: minutes 5..9, dev_b: 5.5..8.5
    assert all(iso_ms(start) <= e["timestamp"] <= iso_ms(end) for e in page)
    assert q(limit=5, offset=50)[1][-1] == entries[-1] and q(offset=60)[1] == []
    t, page = q(device_ids=[dev_b], limit=1)
    assert page[0]["protocol"] == "http" and page[0]["replyCode"] == 200 and page[0]["target"] == "50%_off.shop:443"


def test_bytes_by_connection_edge_cases(ch: ClickHouse) -> None:
    assert bytes_by_connection(ch, [], NOW) == {}
    assert bytes_by_connection(ch, ["nope", "nope"], NOW) == {"nope": (0, 0)}
