"""``python -m benchmarks.session_ab``: CPU per session, session rate and 64-byte RTT of the tunnel path,
A/B between source trees in one run (interleaved rounds, medians), with optional py-spy flame graphs.

Each tree (``--tree NAME=DIR``; the default is this checkout, named ``current``) gets its own node and
device agent, both started from that tree (``PYTHONPATH``) and pinned to the product CPU like the main
benchmark; the load generator and target run on the other CPU. Every round runs every system back to
back, so a busy machine slows them alike. CPU per session is the node's and the agent's CPU time (all
threads, the request-log writer included: the window waits one log batch interval after the run so
the batch insert of those sessions is counted) divided by the sessions the load generator completed,
less the idle CPU of the same window.

    python -m benchmarks.session_ab --tree base=/tmp/base --tree current=. --rounds 5 --flame benchmarks/profiles
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import loadgen as lgmod
from . import procs
from .loadgen import LoadGen, Via
from .procs import Node, Proc, Stack

LOG_BATCH_S = 5.0  # the node's LOG_BATCH_S (its default); the CPU window waits this long after a run


def log(msg: str) -> None:
    print(f"[session-ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tree(spec: str) -> tuple[str, Path, dict[str, str]]:
    """``NAME=DIR[@KEY=VALUE,...]``: a source tree and extra node settings."""
    name, _, rest = spec.partition("=")
    path, _, extra = rest.partition("@")
    env = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
    return name, Path(path).resolve(), env


def start_node(stack: Stack, db: str, name: str, tree: Path, extra: dict[str, str]) -> Node:
    data_dir = stack.tmp / name
    data_dir.mkdir(parents=True, exist_ok=True)
    env = procs.node_env(data_dir, db, name, {"LOG_BATCH_S": str(LOG_BATCH_S), **extra, "PYTHONPATH": str(tree)})
    node = Node(name, int(env["PROXY_PORT"]), int(env["TUNNEL_PORT"]), int(env["API_PORT"]), data_dir, env)
    node.proc = stack.spawn(name, [procs.PY, "-m", "proxyorch", "serve"], env, cwd=data_dir, pin="product")
    try:
        procs.wait_port(node.api_port, 120, node.proc.popen)
        procs.wait_port(node.proxy_port, 10, node.proc.popen)
    except Exception as exc:
        raise RuntimeError(f"node {name} did not start: {exc}\n{node.proc.tail()}") from exc
    return node


def start_agent(stack: Stack, name: str, node: Node, cred: procs.Credential, tree: Path) -> Proc:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return stack.spawn(name, [procs.PY, "-m", "proxyorch", "device-agent", "--server",
                              f"{procs.HOST}:{node.tunnel_port}", "--device-id", cred.device_id,
                              "--token", cred.device_token, "--allow-private", "--tunnels", "1",
                              "--log-level", "WARNING", *node.agent_tls_args()], env, pin="product")


def cpu_of(pids: list[int]) -> list[float]:
    return [procs.cpu_seconds([p]) for p in pids]


def measure_rate(lg: LoadGen, via: Via, echo: int, pids: list[int], conns: int, duration: float,
                 warmup: float, batch_s: float = LOG_BATCH_S) -> dict[str, Any]:
    """One session-rate run with the CPU of each pid per completed session (idle CPU subtracted)."""
    idle0, t0 = cpu_of(pids), time.monotonic()
    time.sleep(0.5)
    idle1, t1 = cpu_of(pids), time.monotonic()
    idle_rate = [(b - a) / (t1 - t0) for a, b in zip(idle0, idle1, strict=True)]
    c0, w0 = cpu_of(pids), time.monotonic()
    r = lg.rate(via, echo, conns, duration, warmup)
    time.sleep(batch_s + 0.3)  # the writer's batch of these sessions
    c1, w1 = cpu_of(pids), time.monotonic()
    sessions = r.get("rate", 0) * (duration + warmup)  # the CPU window spans the warm-up too
    if sessions:
        per = [max(0.0, (b - a) - ir * (w1 - w0)) / sessions * 1e6
               for a, b, ir in zip(c0, c1, idle_rate, strict=True)]
        r["cpu_us"] = per
        r["cpu_us_total"] = sum(per)
    return r


def flame(stack: Stack, pid: int, out: Path, seconds: float, fmt: str = "flamegraph") -> Proc:
    """py-spy on ``pid`` for ``seconds``: a flame graph SVG (``fmt="raw"``: collapsed stacks)."""
    spy = Path(procs.PY).parent / "py-spy"
    return stack.spawn(f"py-spy-{out.name}", [str(spy), "record", "--pid", str(pid), "--duration",
                                               str(int(seconds)), "--rate", "250", "--nonblocking",
                                               "--format", fmt, "-o", str(out)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.session_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[],
                   help="NAME=DIR[@KEY=VALUE,...]: a source tree to run, with extra node settings (repeatable)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0, help="seconds of each session-rate run")
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--rtt-count", type=int, default=3000)
    p.add_argument("--tls", choices=["on", "off", "both"], default="on")
    p.add_argument("--request-log", choices=["0", "1"], default="1")
    p.add_argument("--microsocks", action="store_true", help="also run microsocks (the goal's peer)")
    p.add_argument("--flame", help="write py-spy flame graphs (SVG) of node and agent here, per system")
    p.add_argument("--flame-tag", default="", help="suffix of the flame graph file names")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--no-pin", action="store_true")
    args = p.parse_args(argv)
    procs.set_pinning(not args.no_pin)
    procs.raise_nofile()
    trees = [_tree(t) for t in args.tree] or [("current", procs.ROOT, {})]
    tls_modes = {"on": ["1"], "off": ["0"], "both": ["1", "0"]}[args.tls]
    stack = Stack()
    results: dict[str, list[dict]] = {}
    try:
        exe = lgmod.build()
        lg = LoadGen(exe)
        target = procs.start_target(stack, exe)
        log("starting embedded PostgreSQL")
        db = procs.start_postgres(stack)
        systems: list[tuple[str, Via, list[int]]] = []
        waits: dict[str, float] = {}  # the node's LOG_BATCH_S: its CPU window waits for that batch
        first: Node | None = None
        user = None
        for name, tree, env in trees:
            for tls in tls_modes:
                key = f"{name}{'' if tls == '1' else '-plain'}"
                log(f"starting {key} from {tree} {env or ''}")
                node = start_node(stack, db, f"node-{key}", tree, {"REQUEST_LOG": args.request_log,
                                                                    "TUNNEL_TLS": tls, **env})
                waits[key] = float(env.get("LOG_BATCH_S", LOG_BATCH_S))
                if first is None:
                    first = node
                    user = procs.admin(node, "create-user", "--name", "bench")["user_id"]
                cred = procs.make_credential(first, user, f"bench-{key}")
                agent = start_agent(stack, f"agent-{key}", node, cred, tree)
                procs.wait_socks(node.proxy_port, target.echo_port, cred.connection_id, cred.password, 60, agent)
                systems.append((key, Via(node.proxy_port, cred.connection_id, cred.password),
                                [node.proc.pid, agent.pid]))
        if args.microsocks:
            got = procs.start_microsocks(stack, "bench", "benchpw1")
            if got is not None:
                proc, port = got
                systems.append(("microsocks", Via(port, "bench", "benchpw1"), [proc.pid]))
        for _key, via, _pids in systems:  # warm every path (imports, caches, first chDB insert)
            lg.rate(via, target.echo_port, args.conns, 1.0, 0.2)
        for rnd in range(args.rounds):
            for key, via, pids in systems:
                r = measure_rate(lg, via, target.echo_port, pids, args.conns, args.duration, 0.3,
                                 waits.get(key, 0.0))
                rt = lg.rtt(via, target.echo_port, count=args.rtt_count)
                r["rtt_p50_us"], r["rtt_p99_us"] = rt.get("p50_us"), rt.get("p99_us")
                results.setdefault(key, []).append(r)
                cpu = " + ".join(f"{x:.0f}" for x in r.get("cpu_us", []))
                log(f"round {rnd + 1} {key:16s} {r['rate']:7.0f} sess/s  cpu/session {cpu} = "
                    f"{r.get('cpu_us_total', 0):.0f} us  rtt p50 {r['rtt_p50_us']} us  ({r['errors']} err)")
        if args.flame:
            out = Path(args.flame).resolve()
            out.mkdir(parents=True, exist_ok=True)
            secs = max(4.0, args.duration)
            for key, via, pids in systems:
                if key == "microsocks":
                    continue
                spies = [flame(stack, pid, out / f"rate50-{role}-{key}{args.flame_tag}.{ext}", secs, fmt)
                         for role, pid in zip(("node", "agent"), pids, strict=True)
                         for ext, fmt in (("svg", "flamegraph"), ("txt", "raw"))]
                time.sleep(0.5)
                lg.rate(via, target.echo_port, args.conns, secs - 1.0, 0.2)
                for s in spies:
                    try:
                        s.popen.wait(secs + 30)
                    except Exception:  # noqa: BLE001
                        pass
                    stack.stop(s)
                log(f"flame graphs of {key} in {out}")
    finally:
        stack.close()
    summary = {}
    for key, runs in results.items():
        def med(f: Any, runs: list[dict] = runs) -> float:
            vals = [f(r) for r in runs if f(r) is not None]
            return statistics.median(vals) if vals else float("nan")

        def least(f: Any, runs: list[dict] = runs) -> float:  # the round least disturbed by other load
            vals = [f(r) for r in runs if f(r) is not None]
            return min(vals) if vals else float("nan")
        summary[key] = {
            "rate": med(lambda r: r.get("rate")),
            "cpu_us_node": med(lambda r: r["cpu_us"][0] if r.get("cpu_us") else None),
            "cpu_us_agent": med(lambda r: r["cpu_us"][1] if len(r.get("cpu_us", [])) > 1 else None),
            "cpu_us_total": med(lambda r: r.get("cpu_us_total")),
            "rtt_p50_us": med(lambda r: r.get("rtt_p50_us")),
            "min_cpu_us_total": least(lambda r: r.get("cpu_us_total")),
            "max_rate": -least(lambda r: -r["rate"] if r.get("rate") else None),
            "min_rtt_p50_us": least(lambda r: r.get("rtt_p50_us")),
            "rounds": len(runs),
        }
    print(f"{'system':18s} {'sess/s':>8s} {'node us':>8s} {'agent us':>9s} {'total us':>9s} {'rtt p50':>8s}"
          f" | {'best sess/s':>11s} {'best total us':>13s} {'best rtt':>8s}")
    for key, s in summary.items():
        print(f"{key:18s} {s['rate']:8.0f} {s['cpu_us_node']:8.0f} {s['cpu_us_agent']:9.0f} "
              f"{s['cpu_us_total']:9.0f} {s['rtt_p50_us']:8.0f} | {s['max_rate']:11.0f} "
              f"{s['min_cpu_us_total']:13.0f} {s['min_rtt_p50_us']:8.0f}")
    print(f"(medians, then the best round, of {args.rounds} interleaved rounds; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results, "id": uuid.uuid4().hex},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
