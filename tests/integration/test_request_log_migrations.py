"""ClickHouse schema as versioned migrations, and a request-log column added safely.

chDB hosts one data path per process, so each scenario runs in a fresh Python subprocess against
its own embedded engine (real chDB, real spool files) and reports what it saw as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The shipped migrations, in order (001_initial.sql, 002_domain.sql, ...).
SHIPPED = sorted(p.name for p in (ROOT / "proxy" / "request_log" / "migrations").glob("*.sql"))
VERSIONS = [int(name.split("_", 1)[0]) for name in SHIPPED]


def run(tmp_path: Path, body: str) -> dict:
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from proxy.request_log.clickhouse import make_client
        DATA = {str(tmp_path)!r}
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_migrated_tables_match_the_column_lists(tmp_path: Path) -> None:
    out = run(tmp_path, """
        from proxy.request_log.columns import TABLES
        ch = make_client(None, DATA)
        first = ch.apply_schema(30)
        again = ch.apply_schema(30)
        described = {name: [list(r[:2]) for r in ch.query(f"DESCRIBE TABLE proxyorch.{name}")] for name in TABLES}
        declared = {name: [[c.name, c.ch_type] for c in t.columns] for name, t in TABLES.items()}
        print(json.dumps({"first": first, "again": again, "versions": ch.applied_migrations(),
                          "described": described, "declared": declared}))
    """)
    assert out["first"] == SHIPPED and out["again"] == []
    assert out["versions"] == VERSIONS
    assert out["described"] == out["declared"]   # schema, row builder and reads agree


def test_a_deployment_from_before_migrations_is_adopted_without_change(tmp_path: Path) -> None:
    out = run(tmp_path, """
        from proxy.request_log.clickhouse import load_migrations, sql_statements
        ch = make_client(None, DATA)
        # what the former schema.sql did at every start: the statements, no migrations table
        for stmt in sql_statements(load_migrations()[0].sql, 30):
            ch.command(stmt)
        ch.command("INSERT INTO proxyorch.traffic_delta VALUES (now64(3), 'dev-old', 'conn-old', 7, 3)")
        applied = ch.apply_schema(30)
        rows = ch.query("SELECT count(), sum(bytesIn) FROM proxyorch.traffic_delta WHERE deviceId = 'dev-old'")
        print(json.dumps({"applied": applied, "versions": ch.applied_migrations(), "rows": list(rows[0])}))
    """)
    assert out["applied"] == SHIPPED and out["versions"] == VERSIONS
    assert out["rows"] == [1, 7]   # existing data kept


UPGRADE = """
    import orjson, time, uuid
    from datetime import UTC, datetime, timedelta
    from pathlib import Path
    from proxy.request_log.clickhouse import Migration, load_migrations
    from proxy.request_log.columns import REQUEST_LOG, TRAFFIC_DELTA, Column, Table
    from proxy.request_log.writer import RequestLogWriter, SessionRecord

    SPOOL = DATA + "/spool"
    N = 250
    now = datetime.now(UTC).replace(microsecond=0)

    def record(i, dev):
        return SessionRecord(now - timedelta(seconds=i), "conn-" + dev, dev, "node-1", f"h{i}.test:443", "domain",
                             443, "", "allowed", None, 100 + i, 10, 5, "127.0.0.1:1", "socks5", 0, "")

    def down():
        raise ConnectionError("ClickHouse down (test)")

    # -- before the upgrade: the shipped migrations; ClickHouse is down, so rows go to the spool ----------
    ch = make_client(None, DATA)
    ch.apply_schema(30)
    old = RequestLogWriter(down, SPOOL, batch_rows=100, batch_seconds=0.05)
    old.start()
    for i in range(N):
        old.record_session(record(i, "dev-old"))
        old.record_traffic(now, "dev-old", "conn-dev-old", 100 + i, 10)
    old.flush(30)
    old.close()
    # a batch in the spool format of the previous release (no column names on the line)
    from proxy.request_log.columns import LEGACY_SPOOL_COLUMNS
    legacy_rows = [record(i, "dev-legacy").to_row()[:len(LEGACY_SPOOL_COLUMNS["request_log"])] for i in range(7)]
    Path(SPOOL, "spool-00000000000000000001.jsonl").write_bytes(
        orjson.dumps({"table": "request_log", "token": uuid.uuid4().hex, "rows": legacy_rows}) + b"\\n")
    spooled = old.stats["rows_spooled"]

    # -- the upgrade: a migration adds a column, and the new release builds rows with it ----------
    nxt = load_migrations()[-1].version + 1
    add = Migration(nxt, f"{nxt:03d}_tenant_tag.sql", "ALTER TABLE proxyorch.request_log ADD COLUMN IF NOT EXISTS "
                                             "tenantTag LowCardinality(String) DEFAULT 'before-upgrade'")
    applied = ch.apply_schema(30, [*load_migrations(), add])
    new_table = Table("request_log", (*REQUEST_LOG.columns,
                                      Column("tenantTag", "LowCardinality(String)", None, lambda r: "after-upgrade")))
    # what replaying with the current column list (the old behaviour) does to an old batch:
    try:
        ch.insert_rows("request_log", legacy_rows, new_table.names, uuid.uuid4().hex)
        naive = "inserted"
    except Exception as exc:
        naive = type(exc).__name__

    class LosesFirstAck:
        # inserts for real, but the first acknowledgement is lost: the writer must retry that batch
        def __init__(self, real):
            self.real, self.lost = real, False
        def table_columns(self, table):
            return self.real.table_columns(table)
        def insert_rows(self, table, rows, columns, token):
            self.real.insert_rows(table, rows, columns, token)
            if not self.lost:
                self.lost = True
                raise TimeoutError("acknowledgement lost (test)")

    new = RequestLogWriter(lambda: LosesFirstAck(ch), SPOOL, batch_rows=100, batch_seconds=0.05,
                           tables={"request_log": new_table, "traffic_delta": TRAFFIC_DELTA})
    new.start()
    for i in range(30):
        new.record_session(record(i, "dev-new"))
    deadline = time.time() + 60
    while time.time() < deadline and not (new.flush(10) and not list(Path(SPOOL).glob("spool-*.jsonl"))):
        time.sleep(0.1)
    stats = new.stats
    new.close()
    again = RequestLogWriter(lambda: ch, SPOOL)   # a restart replays nothing twice
    again.start()
    again.flush(10)
    again.close()

    def counts(dev):
        return [list(r) for r in ch.query(
            "SELECT tenantTag, count(), sum(bytesIn) FROM proxyorch.request_log WHERE deviceId = {d:String} "
            "GROUP BY tenantTag", {"d": dev})]
    traffic = ch.query("SELECT sum(bytesIn) FROM proxyorch.traffic_delta WHERE deviceId = 'dev-old'")[0][0]
    print(json.dumps({"spooled": spooled, "applied": applied, "versions": ch.applied_migrations(), "naive": naive,
                      "old": counts("dev-old"), "legacy": counts("dev-legacy"), "new": counts("dev-new"),
                      "traffic": int(traffic), "replayed": stats["rows_replayed"],
                      "left": [p.name for p in Path(SPOOL).glob("spool-*.jsonl")]}))
"""


def test_rows_spooled_before_an_added_column_replay_exactly_once_after_it(tmp_path: Path) -> None:
    out = run(tmp_path, UPGRADE)
    n = 250
    assert out["spooled"] == 2 * n                       # request rows + traffic deltas, all on disk
    nxt = VERSIONS[-1] + 1
    assert out["applied"] == [f"{nxt:03d}_tenant_tag.sql"] and out["versions"] == [*VERSIONS, nxt]
    assert out["naive"] != "inserted"                    # the new column list cannot take an old batch
    # every old row exactly once (one lost acknowledgement and a restart notwithstanding), with the
    # new column's default; rows written after the upgrade carry the value the new builder gives
    assert out["old"] == [["before-upgrade", n, sum(100 + i for i in range(n))]]
    assert out["legacy"] == [["before-upgrade", 7, sum(100 + i for i in range(7))]]
    assert out["new"] == [["after-upgrade", 30, sum(100 + i for i in range(30))]]
    assert out["traffic"] == sum(100 + i for i in range(n))
    assert out["replayed"] == 2 * n + 7 and out["left"] == []
