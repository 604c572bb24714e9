"""The request log's `domain` column: added to an existing table, filled at row-build time and for
old spool lines, and grouped in ClickHouse (real chDB, in a subprocess: chDB is one engine per process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson

from proxy.request_log.writer import REQUEST_LOG, REQUEST_LOG_COLUMNS, Spool

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
from datetime import UTC, datetime, timedelta
from proxy.request_log.clickhouse import make_client, schema_statements
from proxy.request_log.domain_stats import query_domains
from proxy.request_log.writer import REQUEST_LOG_COLUMNS, SessionRecord

ch = make_client(None, sys.argv[1])
# The table as it was before the `domain` column.
for stmt in schema_statements(30):
    if "ADD COLUMN IF NOT EXISTS domain" in stmt or "ADD COLUMN IF NOT EXISTS deviceNode" in stmt:
        continue
    ch.command("\n".join(l for l in stmt.splitlines() if not l.strip().startswith("domain ")))
now = datetime.now(UTC)
old_cols = [c for c in REQUEST_LOG_COLUMNS if c not in ("domain", "deviceNode")]
def rec(target, bytes_in, action="allowed", reply=0):
    return SessionRecord(timestamp=now, connection_id="c1", device_id="d1", server_node="n", target=target,
                         target_type="domain", port=443, resolved_ip="", action=action, block_reason=None,
                         bytes_in=bytes_in, bytes_out=1, duration_ms=1, client_addr="127.0.0.1",
                         protocol="socks5", reply_code=reply, error="")
ch.insert_rows("request_log", [rec("a.b.Legacy.example.com:443", 10).to_row()[:-2],
                               rec("[2001:db8::1]:80", 5).to_row()[:-2]], old_cols, "t1")
ch.apply_schema(30)   # adds the column; old rows read ''
ch.apply_schema(30)   # idempotent
ch.insert_rows("request_log", [rec("x.example.co.uk:443", 100).to_row(), rec("y.example.co.uk:443", 0, reply=4).to_row(),
                               rec("z.example.co.uk:443", 0, action="blocked", reply=2).to_row()],
               REQUEST_LOG_COLUMNS, "t2")
rows = query_domains(ch, device_ids=["d1"], start=now - timedelta(minutes=1), end=now + timedelta(minutes=1),
                     connection_id=None, limit=10)
print(json.dumps([(r["domain"], r["sessions"], r["blocked"], r["failed"], r["bytesIn"]) for r in rows]))
print(json.dumps(query_domains(ch, device_ids=["other"], start=now - timedelta(minutes=1),
                               end=now + timedelta(minutes=1), connection_id=None, limit=10)))
ch.close()
"""


def test_old_tables_gain_the_domain_column_and_old_rows_group_by_host(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ch")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == [
        ["example.co.uk", 3, 1, 1, 100],
        ["a.b.legacy.example.com", 1, 0, 0, 10],   # written before the column: its bare host
        ["2001:db8::1", 1, 0, 0, 5],
    ]
    assert json.loads(lines[-1]) == []


def test_spool_lines_from_before_the_domain_column_replay_with_their_own_columns(tmp_path: Path) -> None:
    """A batch spooled before the `domain` column keeps its own column names (the insert leaves
    `domain` at its default ''; the domains query groups such rows by their bare host)."""
    old_row = ["2026-01-01T00:00:00+00:00", "c1", "d1", "n", "www.shop.example.co.uk:443", "domain", 443, "",
               "allowed", "", 1, 2, 3, "127.0.0.1", "socks5", 0, ""]
    assert len(old_row) == len(REQUEST_LOG_COLUMNS) - 2
    line = orjson.dumps({"table": REQUEST_LOG, "token": "t", "rows": [old_row]})
    batch = Spool._parse(line, tmp_path / "seg")
    assert batch is not None and len(batch.rows[0]) == len(old_row)
    assert "domain" not in batch.columns and batch.columns == REQUEST_LOG_COLUMNS[:-2]
