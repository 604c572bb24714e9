"""What the device agent costs the phone, and what TLS on the tunnel costs, measured in one run.

``python -m benchmarks.agent_cost [--quick] [--out benchmarks/AGENT_COST.md]`` (also ``python -m
benchmarks --only agent``) starts two nodes on one embedded PostgreSQL — one with the default TLS
tunnel, one with ``TUNNEL_TLS=0`` — each with its own device agent, and measures:

- agent RSS idle (one tunnel, no session) and with N open idle streams (1000, 300 in quick mode);
- agent CPU while idle with those streams open (keep-alives only);
- agent CPU per GB relayed (one bulk download) and per 1000 sessions (50 connections opening
  sessions back to back, 64-byte echo each);
- TLS on vs off, same run: tp1 (MB/s of one stream), sessions/s, RTT p50/p99 of a 64-byte echo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import loadgen as lgmod
from . import procs
from .loadgen import LoadGen, Via
from .procs import Stack

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[agent-cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _agent_cpu(pid: int) -> float:
    return procs.cpu_seconds([pid])


def measure(stack: Stack, quick: bool, db: str | None = None, target: procs.Target | None = None,
            lg: LoadGen | None = None) -> dict[str, Any]:
    """Run every measurement (reusing the caller's PostgreSQL, target and load generator when given);
    the result is JSON-serialisable."""
    streams = 300 if quick else 1000
    bulk_s, rate_s, rtt_n, idle_s = (1.5, 1.5, 500, 6.0) if quick else (5.0, 5.0, 5000, 20.0)
    procs.raise_nofile()
    lg = lg or LoadGen(lgmod.build())
    target = target or procs.start_target(stack, lg.exe)
    log("starting two nodes (TLS tunnel / TUNNEL_TLS=0), each with its agent")
    db = db or procs.start_postgres(stack)
    nodes = {"tls": procs.start_node(stack, db, "node-tls", {"REQUEST_LOG": "0"}),
             "plain": procs.start_node(stack, db, "node-plain", {"REQUEST_LOG": "0", "TUNNEL_TLS": "0"})}
    user = procs.admin(nodes["tls"], "create-user", "--name", "agent-cost")["user_id"]
    agents, vias = {}, {}
    for key, node in nodes.items():
        cred = procs.make_credential(node, user, f"agent-cost-{key}")
        agents[key] = procs.start_agent(stack, f"agent-{key}", node, cred)
        vias[key] = Via(node.proxy_port, cred.connection_id, cred.password)
        procs.wait_socks(node.proxy_port, target.echo_port, cred.connection_id, cred.password, 60, agents[key])
    out: dict[str, Any] = {"quick": quick, "streams": streams, "idle_window_s": idle_s}

    # -- memory and idle CPU of the TLS agent -------------------------------------------------------
    agent = agents["tls"]
    time.sleep(1.5)
    out["rss_idle"] = procs.rss_bytes([agent.pid])
    cpu0, t0 = _agent_cpu(agent.pid), time.monotonic()
    time.sleep(idle_s)
    out["idle_cpu_s_per_min"] = (_agent_cpu(agent.pid) - cpu0) / (time.monotonic() - t0) * 60
    p = lg.start_idle(stack, "idle-streams", vias["tls"], target.echo_port, streams)
    try:
        info = lgmod.read_line(p, 300)
        time.sleep(1.5)
        out["rss_streams"] = procs.rss_bytes([agent.pid])
        out["streams_opened"] = int(info.get("opened", 0))
        cpu0, t0 = _agent_cpu(agent.pid), time.monotonic()
        time.sleep(idle_s)
        out["idle_streams_cpu_s_per_min"] = (_agent_cpu(agent.pid) - cpu0) / (time.monotonic() - t0) * 60
    finally:
        if p.popen.stdin is not None:
            p.popen.stdin.close()
        try:
            p.popen.wait(30)
        except Exception:  # noqa: BLE001
            pass
        stack.stop(p)
    if out["streams_opened"]:
        out["rss_per_stream"] = (out["rss_streams"] - out["rss_idle"]) / out["streams_opened"]
    time.sleep(1.0)

    # -- throughput, session rate, RTT; agent CPU per GB and per 1000 sessions; TLS on vs off ---------
    for key in ("tls", "plain"):
        via, apid, npid = vias[key], agents[key].pid, nodes[key].proc.pid
        r: dict[str, Any] = {}
        a0, n0 = _agent_cpu(apid), procs.cpu_seconds([npid])
        bulk = lg.bulk(via, target.source_port, 1, bulk_s, 0.5)
        a1, n1 = _agent_cpu(apid), procs.cpu_seconds([npid])
        gb = bulk.get("all_bytes", 0) / 1e9
        r["tp1_MBps"] = bulk.get("MBps")
        r["agent_cpu_s_per_GB"] = (a1 - a0) / gb if gb else None
        r["node_cpu_s_per_GB"] = (n1 - n0) / gb if gb else None
        time.sleep(0.5)
        a0 = _agent_cpu(apid)
        rate = lg.rate(via, target.echo_port, 50, rate_s, 0.0)
        a1 = _agent_cpu(apid)
        sessions = rate.get("sessions", 0)
        r["sessions_per_s"] = rate.get("rate")
        r["session_errors"] = rate.get("errors")
        r["agent_cpu_s_per_1000_sessions"] = (a1 - a0) / sessions * 1000 if sessions else None
        time.sleep(0.5)
        rtt = lg.rtt(via, target.echo_port, count=rtt_n)
        r["rtt_p50_us"], r["rtt_p99_us"] = rtt.get("p50_us"), rtt.get("p99_us")
        out[key] = r
        log(f"{key}: {json.dumps(r)}")
    return out


def _f(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _idle(r: dict[str, Any], key: str) -> str:
    """Idle CPU per minute; CPU time is counted in 10 ms ticks, so a zero is "under one tick"."""
    window = r.get("idle_window_s", 0)
    v = r.get(key)
    if v is None:
        return "—"
    if v == 0:
        return f"< 10 ms in {window:.0f} s (below one clock tick)"
    return f"{v * 1000:.1f} ms per minute (measured over {window:.0f} s)"


def render(r: dict[str, Any]) -> str:
    """The report section (Markdown)."""
    if "error" in r:
        return f"## Device agent cost and TLS\n\nfailed: {r['error']}\n"
    t, p = r["tls"], r["plain"]
    L = ["## Device agent cost and TLS on the tunnel\n",
         f"One agent process (one tunnel, uvloop), measured with `benchmarks/agent_cost.py`"
         f"{' (quick mode: short runs, fewer streams)' if r['quick'] else ''}. All on 127.0.0.1: the figures "
         "are this machine's, a phone's CPU is several times slower; the ratios are what carry over.\n",
         "| agent | measured |", "|---|---|",
         f"| RSS idle (tunnel up, no session) | {r['rss_idle'] / MiB:.1f} MiB |",
         f"| RSS with {r.get('streams_opened', 0)} open idle streams | {r.get('rss_streams', 0) / MiB:.1f} MiB "
         f"({_f(r.get('rss_per_stream', 0) / 1024, '.1f')} KiB per stream) |",
         f"| CPU idle, no session | {_idle(r, 'idle_cpu_s_per_min')} |",
         f"| CPU idle, {r.get('streams_opened', 0)} open streams | {_idle(r, 'idle_streams_cpu_s_per_min')} |",
         f"| CPU per GB relayed (TLS) | {_f(t['agent_cpu_s_per_GB'], '.2f')} s |",
         f"| CPU per GB relayed (plaintext) | {_f(p['agent_cpu_s_per_GB'], '.2f')} s |",
         f"| CPU per 1000 sessions (TLS) | {_f(t['agent_cpu_s_per_1000_sessions'], '.3f')} s |",
         f"| CPU per 1000 sessions (plaintext) | {_f(p['agent_cpu_s_per_1000_sessions'], '.3f')} s |",
         "",
         "| tunnel | tp1 (MB/s) | sessions/s (50 conns) | RTT p50 (µs) | RTT p99 (µs) | node CPU s/GB |",
         "|---|---|---|---|---|---|"]
    for label, x in (("TLS 1.3 (default)", t), ("plaintext (TUNNEL_TLS=0)", p)):
        L.append(f"| {label} | {_f(x['tp1_MBps'], '.1f')} | {_f(x['sessions_per_s'], '.0f')} | "
                 f"{_f(x['rtt_p50_us'], '.0f')} | {_f(x['rtt_p99_us'], '.0f')} | {_f(x['node_cpu_s_per_GB'], '.2f')} |")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agent_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, 300 streams instead of 1000")
    p.add_argument("--out", default=str(HERE / "AGENT_COST.md"))
    args = p.parse_args(argv)
    stack = Stack()
    try:
        result = measure(stack, args.quick)
    except Exception as exc:  # noqa: BLE001
        log(f"FAILED: {exc}")
        result = {"error": str(exc)}
    finally:
        stack.close()
    procs.WORK.mkdir(parents=True, exist_ok=True)
    (procs.WORK / "agent_cost.json").write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(f"# Device agent cost\n\nGenerated by `python -m benchmarks.agent_cost"
                              f"{' --quick' if args.quick else ''}` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.\n\n"
                              + render(result))
    print(render(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
