"""The request log's `deviceNode` column (migration 003): the node holding the device's tunnel.

Rows written before the column (old tables, old spool batches without the name) read as their
`serverNode` (they were never relayed); new rows carry the record's device node, or the server
node when the session was not relayed; `/proxy/logs` entries return it. Real chDB in a subprocess
(one engine per process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys
    from datetime import UTC, datetime, timedelta
    from proxy.request_log.clickhouse import load_migrations, make_client
    from proxy.request_log.queries import query_logs
    from proxy.request_log.writer import REQUEST_LOG_COLUMNS, SessionRecord

    ch = make_client(None, sys.argv[1])
    before = [m for m in load_migrations() if m.version < 3]
    ch.apply_schema(30, before)                       # a deployment from before the column
    now = datetime.now(UTC).replace(microsecond=0)

    def rec(i, server, device_node=""):
        return SessionRecord(timestamp=now - timedelta(seconds=i), connection_id="c1", device_id="d1",
                             server_node=server, target=f"h{i}.test:443", target_type="domain", port=443,
                             resolved_ip="", action="allowed", block_reason=None, bytes_in=i, bytes_out=1,
                             duration_ms=1, client_addr="127.0.0.1", protocol="socks5", reply_code=0, error="",
                             device_node=device_node)

    old_cols = [c for c in REQUEST_LOG_COLUMNS if c != "deviceNode"]
    ch.insert_rows("request_log", [rec(1, "node-old").to_row()[:-1]], old_cols, "t-old")
    applied = ch.apply_schema(30)
    # a batch spooled before the upgrade replays with its own column names
    ch.insert_rows("request_log", [rec(2, "node-spooled").to_row()[:-1]], old_cols, "t-spool")
    ch.insert_rows("request_log", [rec(3, "node-a").to_row(), rec(4, "node-a", device_node="node-b").to_row()],
                   REQUEST_LOG_COLUMNS, "t-new")
    total, entries = query_logs(ch, device_ids=["d1"], start=now - timedelta(minutes=1),
                                end=now + timedelta(minutes=1), connection_id=None, target=None, action=None,
                                limit=10, offset=0)
    print(json.dumps({"applied": applied, "total": total,
                      "nodes": sorted([e["target"], e["serverNode"], e["deviceNode"]] for e in entries)}))
    ch.close()
""")


def test_device_node_column_old_rows_read_their_server_node(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ch")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["applied"] == ["003_device_node.sql"]
    assert got["total"] == 4
    assert got["nodes"] == [
        ["h1.test:443", "node-old", "node-old"],          # in the table before the column
        ["h2.test:443", "node-spooled", "node-spooled"],  # spooled before the column
        ["h3.test:443", "node-a", "node-a"],              # not relayed: the server node
        ["h4.test:443", "node-a", "node-b"],              # relayed: the node holding the tunnel
    ]
