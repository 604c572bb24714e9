"""Smoke test of the benchmark harness itself (not of the product): the C load generator builds and
measures, the link emulator adds its delay and holds its cap, the report renders."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import loadgen, procs, report
from benchmarks.loadgen import LoadGen, Via
from benchmarks.scenarios import top_frames

pytestmark = pytest.mark.bench


@pytest.fixture
def stack():
    s = procs.Stack()
    yield s
    s.close()


def test_loadgen_and_linkemu(stack: procs.Stack) -> None:
    exe = loadgen.build()
    lg = LoadGen(exe)
    target = procs.start_target(stack, exe)
    r = lg.rtt(Via(), target.echo_port, count=200)
    assert r["count"] == 200 and r["errors"] == 0
    r = lg.rate(Via(), target.echo_port, conns=4, duration=0.5, warmup=0.1)
    assert r["sessions"] > 0 and r["errors"] == 0
    src, echo = procs.free_port(), procs.free_port()
    emu = stack.spawn("linkemu", [sys.executable, "-m", "benchmarks.linkemu", "--rtt-ms", "40", "--rate-mbit", "40",
                                  "--pair", f"{src}:{target.source_port}", "--pair", f"{echo}:{target.echo_port}"],
                      {"PYTHONPATH": str(procs.ROOT), "PATH": "/usr/bin:/bin"})
    procs.wait_port(echo, 15, emu.popen)
    r = lg.rtt(Via(), echo, count=5)
    assert 39_000 < r["p50_us"] < 60_000
    r = lg.bulk(Via(), src, 1, 2.0, 1.0)
    assert 0.8 * 5.0 < r["MBps"] < 1.05 * 5.0


def test_report_renders(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("main (a.py:1);f (b.py:2) 3\nmain (a.py:1);g (b.py:9) 1\n")
    top = top_frames(raw)
    assert top["samples"] == 4 and top["self"][0] == ("f (b.py:2)", 0.75)
    results = {"bulk1": {"direct": {"MBps": 100.0, "errors": 0}, "pxo_tunnel": {"MBps": 60.0, "errors": 0}}}
    systems = [{"key": "direct", "label": "direct TCP", "auth": "—", "note": ""},
               {"key": "pxo_tunnel", "label": "tunnel", "auth": "x", "note": ""}]
    meta = {"command": "python -m benchmarks --quick", "date": time.ctime(), "quick": True, "elapsed_s": 1.0,
            "machine": {"CPU": "x"}, "nofile": 1024, "request_log": True}
    text = report.render(meta, results, systems, {}, [], {}, [], "plots")
    assert "0.60 ×" in text and "**pass**" in text
    assert subprocess.run([sys.executable, "-c", "import benchmarks.__main__"], check=False).returncode == 0


def test_agent_cost_measures_and_renders(stack: procs.Stack) -> None:
    from benchmarks import agent_cost

    r = agent_cost.measure(stack, quick=True)
    for key in ("tls", "plain"):
        assert r[key]["tp1_MBps"] > 0 and r[key]["sessions_per_s"] > 0 and r[key]["rtt_p50_us"] > 0
        assert r[key]["agent_cpu_s_per_GB"] is not None and r[key]["agent_cpu_s_per_1000_sessions"] is not None
    assert r["streams_opened"] == r["streams"] and r["rss_streams"] > 0 and r["rss_idle"] > 0
    text = agent_cost.render(r)
    assert "TLS 1.3 (default)" in text and "plaintext (TUNNEL_TLS=0)" in text
