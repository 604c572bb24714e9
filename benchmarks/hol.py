"""A/B of the tunnel data path in one run: ``python -m benchmarks.hol --baseline REV``.

Runs a node + agent from the current checkout ("new") and from another revision ("base", exported
with ``git archive`` into a scratch directory) side by side, with the same pinning as the main
benchmark (product on CPU 0, load generator / target / link emulator on CPU 1), alternating the
order every round, and reports medians:

* loopback bulk, 1 stream (and Dante, the goal's reference, when installed);
* on each emulated mobile link: 1-stream bulk and the interactive RTT under a bulk download, with
  the queue at each layer (kernel queues with ``ss``; the agent's user-space queues from its
  ``--stats-file`` for the new code).

Raw JSON goes to ``--json``; the markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import loadgen as lgmod
from . import procs
from .loadgen import LoadGen, Via
from .procs import Stack
from .scenarios import PROFILES, Bench, Config, System, log


def export(rev: str) -> Path:
    """The tree of ``rev`` in a scratch directory (the benchmark's own code stays the current one)."""
    dest = Path(tempfile.mkdtemp(prefix="pxo-base-"))
    archive = subprocess.run(["git", "-C", str(procs.ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _median(rows: list[dict], path: tuple[str, ...]) -> float | None:
    vals = []
    for r in rows:
        v: Any = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            vals.append(float(v))
    return statistics.median(vals) if vals else None


def _stats_layers(path: Path, t0: float, t1: float) -> dict[str, dict[str, float]]:
    """p50 / max of each user-space layer in the agent's stats file between two loop times."""
    if not path.exists():
        return {}
    rows: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not t0 <= rec["t"] <= t1:
            continue
        for tun in rec["tunnels"]:
            for k, v in tun.items():
                rows.setdefault(k, []).append(v)
    out = {}
    for k, v in rows.items():
        v.sort()
        out[k] = {"p50": v[len(v) // 2], "max": v[-1], "samples": len(v)}
    return out


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hol", description=__doc__)
    p.add_argument("--baseline", default="HEAD", help="git revision to compare with (default HEAD)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profiles", default="3g,4g")
    p.add_argument("--no-loopback", action="store_true")
    p.add_argument("--plain", action="store_true", help="also the TLS-off tunnel of each version")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # stop everything started (the finally below)
    procs.set_pinning(True)
    cfg = Config.make(True)
    stack = Stack()
    bench = Bench(cfg, stack)
    base_src = export(args.baseline)
    log(f"baseline {args.baseline} in {base_src}")
    results: dict[str, Any] = {"loopback": {}, "mobile": {}}
    try:
        procs.raise_nofile()
        exe = lgmod.build()
        bench.lg = lg = LoadGen(exe)
        t = bench.target = procs.start_target(stack, exe)
        db = procs.start_postgres(stack)
        variants = [("base", base_src, "1"), ("new", procs.ROOT, "1")]
        if args.plain:
            variants += [("base_plain", base_src, "0"), ("new_plain", procs.ROOT, "0")]
        nodes = {}
        for key, src, tls in variants:
            nodes[key] = procs.start_node(stack, db, f"node-{key}", {"PYTHONPATH": str(src), "TUNNEL_TLS": tls,
                                                                     "REQUEST_LOG": "1"})
        user = procs.admin(nodes["new"], "create-user", "--name", "bench")["user_id"]
        creds = {}
        for key, _, _ in variants:
            for where in ("loop", *[pr["key"] for pr in PROFILES]):
                creds[(key, where)] = procs.make_credential(nodes["new"], user, f"{key}-{where}")
        systems: dict[str, System] = {}
        if not args.no_loopback:
            for key, src, _ in variants:
                c = creds[(key, "loop")]
                a = procs.start_agent(stack, f"agent-{key}", nodes[key], c, source=src)
                procs.wait_socks(nodes[key].proxy_port, t.echo_port, c.connection_id, c.password, 40, a)
                systems[key] = System(key, key, Via(nodes[key].proxy_port, c.connection_id, c.password),
                                      [nodes[key].proc.pid, a.pid], "")
            dante = procs.start_dante(stack)
            if dante is not None:
                systems["dante"] = System("dante", "Dante", Via(dante[1]), [dante[0].pid], "")
            rows: dict[str, list[dict]] = {k: [] for k in systems}
            for r in range(args.rounds):
                order = list(systems) if r % 2 == 0 else list(reversed(systems))
                for k in order:
                    res = lg.bulk(systems[k].via, t.source_port, 1, 3.0, 0.5)
                    log(f"loopback bulk round {r} {k}: {res.get('MBps')} MB/s")
                    rows[k].append(res)
            results["loopback"] = {k: {"rounds": v, "MBps": _median(v, ("MBps",))} for k, v in rows.items()}
        for prof in PROFILES:
            if prof["key"] not in args.profiles.split(","):
                continue
            log(f"mobile profile {prof['label']}")
            ports = {key: procs.free_port() for key, _, _ in variants}
            p_src, p_echo = procs.free_port(), procs.free_port()
            pairs = [x for key, _, _ in variants for x in ("--pair", f"{ports[key]}:{nodes[key].tunnel_port}")]
            emu = stack.spawn(f"linkemu-{prof['key']}", [
                procs.PY, "-m", "benchmarks.linkemu", "--rtt-ms", str(prof["rtt_ms"]), "--rate-mbit",
                str(prof["mbit"]), *pairs, "--pair", f"{p_src}:{t.source_port}", "--pair", f"{p_echo}:{t.echo_port}"],
                {**os.environ, "PYTHONPATH": str(procs.ROOT)}, pin="load")
            procs.wait_port(p_echo, 15, emu.popen)
            msys: list[tuple[System, int, int, dict | None, Path | None]] = [
                (System("direct", "direct TCP", Via(), [], ""), p_src, p_echo, None, None)]
            agents = []
            for key, src, _ in variants:
                c = creds[(key, prof["key"])]
                stats = None
                extra: tuple[str, ...] = ()
                if src == procs.ROOT:
                    stats = stack.tmp / f"stats-{key}-{prof['key']}.jsonl"
                    extra = ("--stats-file", str(stats))
                a = procs.start_agent(stack, f"agent-{key}-{prof['key']}", nodes[key], c, server_port=ports[key],
                                      extra=extra, source=src)
                agents.append(a)
                procs.wait_socks(nodes[key].proxy_port, t.echo_port, c.connection_id, c.password, 40, a)
                layers = {
                    "agent kernel send queue (agent → link)": ("send", None, ports[key]),
                    "link emulator kernel receive queue": ("recv", ports[key], None),
                    "node kernel receive queue (link → node)": ("recv", nodes[key].tunnel_port, None),
                }
                msys.append((System(key, key, Via(nodes[key].proxy_port, c.connection_id, c.password),
                                    [nodes[key].proc.pid, a.pid], ""), t.source_port, t.echo_port, layers, stats))
            rows = {s.key: [] for s, *_ in msys}
            for r in range(args.rounds):
                order = msys if r % 2 == 0 else list(reversed(msys))
                for s, src_port, echo_port, layers, stats in order:
                    res = bench._mobile_one(s, src_port, echo_port, prof, layers)
                    if stats is not None and "window" in res["hol"]:  # the agent's loop clock is CLOCK_MONOTONIC too
                        res["user_queues"] = _stats_layers(stats, *res["hol"]["window"])
                    rows[s.key].append(res)
                    log(f"  {prof['key']} round {r} {s.key:10s} bulk {res['bulk'].get('MBps')} MB/s, RTT under bulk "
                        f"p50 {res['hol'].get('p50_us')} p99 {res['hol'].get('p99_us')} us")
            results["mobile"][prof["key"]] = {
                k: {"rounds": v, "bulk_MBps": _median(v, ("bulk", "MBps")), "hol_p50_us": _median(v, ("hol", "p50_us")),
                    "hol_p99_us": _median(v, ("hol", "p99_us")), "hol_bulk_MBps": _median(v, ("hol_bulk_MBps",))}
                for k, v in rows.items()}
            for a in agents:
                stack.stop(a)
            stack.stop(emu)
    finally:
        stack.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    render(results)
    return 0


def render(results: dict[str, Any]) -> None:
    if results.get("loopback"):
        print("\n| loopback bulk, 1 stream | MB/s (median) | rounds |\n|---|---|---|")
        for k, v in results["loopback"].items():
            print(f"| {k} | {v['MBps']:.0f} | {', '.join(str(round(r.get('MBps', 0))) for r in v['rounds'])} |")
    for prof, rows in results.get("mobile", {}).items():
        print(f"\n| {prof} | bulk MB/s | RTT under bulk p50 ms | p99 ms | bulk meanwhile MB/s | p99 per round ms |")
        print("|---|---|---|---|---|---|")
        for k, v in rows.items():
            p99s = ", ".join(f"{(r['hol'].get('p99_us') or 0) / 1000:.0f}" for r in v["rounds"])
            print(f"| {k} | {v['bulk_MBps'] or 0:.2f} | {(v['hol_p50_us'] or 0) / 1000:.1f} | "
                  f"{(v['hol_p99_us'] or 0) / 1000:.1f} | {v['hol_bulk_MBps'] or 0:.2f} | {p99s} |")
        print(f"\n| {prof} | layer | p50 bytes | max bytes |\n|---|---|---|---|")
        for k, v in rows.items():
            last = v["rounds"][len(v["rounds"]) // 2]
            for name, q in {**last.get("queues", {}), **{f"agent user space: {n}": q for n, q in
                                                          last.get("user_queues", {}).items()}}.items():
                if q:
                    print(f"| {k} | {name} | {q['p50']} | {q['max']} |")


if __name__ == "__main__":
    sys.exit(main())
