"""``python -m benchmarks [--quick] [--out benchmarks/RESULTS.md]``: start everything on 127.0.0.1, run
the scenarios against direct TCP and the peer proxies, stop everything, write the report and plots."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import agent_cost, machine, procs, report
from .procs import WORK, Stack
from .scenarios import Bench, Config, log

HERE = Path(__file__).resolve().parent


def _command(argv: list[str]) -> str:
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog == "proxyorch":
        return "proxyorch " + " ".join(sys.argv[1:])
    return " ".join(["python -m benchmarks", *argv])


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write(out: Path, plot_dir: Path, data: dict[str, Any]) -> None:
    results, systems = data["results"], data["systems"]
    plot_list = report.plots(results, {s["key"]: s["label"] for s in systems}, plot_dir)
    try:
        plot_rel = str(plot_dir.relative_to(out.parent))
    except ValueError:
        plot_rel = str(plot_dir)
    text = report.render(data["meta"], results, systems, data["unavailable"], data["errors"],
                         data["profiles"], plot_list, plot_rel, data.get("restarts", []))
    if data.get("agent_cost"):
        text += "\n" + agent_cost.render(data["agent_cost"])
    out.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs (under 2 minutes)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="report path (plots go to plots/ beside it)")
    p.add_argument("--no-mobile", action="store_true", help="skip the emulated mobile links")
    p.add_argument("--no-memory", action="store_true", help="skip the idle-session memory scenario")
    p.add_argument("--no-profile", action="store_true", help="do not py-spy the product for missed goals")
    p.add_argument("--systems", help="comma-separated system keys to run (default: all)")
    p.add_argument("--only", help="comma-separated scenarios: memory,loopback,mobile,agent (default: all)")
    p.add_argument("--rerender", action="store_true",
                   help="only rewrite the report and plots from the last run (benchmarks/work/results.json)")
    p.add_argument("--request-log", choices=["0", "1"], default="1",
                   help="REQUEST_LOG of the nodes (default 1, the product default)")
    args = p.parse_args(argv)
    cfg = Config.make(args.quick)
    cfg.request_log = args.request_log == "1"
    out = Path(args.out).resolve()
    plot_dir = out.parent / "plots"
    prof_dir = out.parent / "profiles"

    if args.rerender:
        data = json.loads((WORK / "results.json").read_text())
        _write(out, plot_dir, data)
        return 0

    started = time.time()
    busy0, own0 = procs.machine_busy_seconds(), procs.own_cpu_seconds()
    old = signal.signal(signal.SIGTERM, _terminate)
    stack = Stack()
    bench = Bench(cfg, stack)
    profiles: dict[str, Any] = {}
    agent_result: dict[str, Any] = {}
    try:
        only = set(args.only.split(",")) if args.only else {"memory", "loopback", "mobile", "agent"}
        bench.setup()
        if args.systems:
            keep = set(args.systems.split(",")) | {"direct"}
            bench.systems = [s for s in bench.systems if s.key in keep]
        if not args.no_memory and "memory" in only:
            bench.run_memory()
        if "loopback" in only:
            bench.run_loopback()
        if not args.no_mobile and "mobile" in only:
            bench.run_mobile()
        if "agent" in only:  # its own two nodes (TLS / plaintext tunnel) and agents, in the same stack
            log("device agent cost and TLS on vs off")
            try:
                agent_result = agent_cost.measure(stack, cfg.quick, bench.node.env["DATABASE_URL"],
                                                  bench.target, bench.lg)
            except Exception as exc:  # noqa: BLE001
                agent_result = {"error": str(exc)}
                bench.errors.append(f"agent cost: {exc}")
        if not args.no_profile:
            missed = {g["goal"] for g in report.goals(bench.results) if g["ok"] is False}
            todo = []
            if any("bulk" in g or "1-stream" in g for g in missed):
                todo.append("bulk1")
            if any("Session rate" in g or "new session" in g for g in missed):
                todo.append("rate50")
            for what in todo:
                log(f"profiling the tunnel path during {what}")
                try:
                    profiles[what] = bench.profile(what, prof_dir)
                except Exception as exc:  # noqa: BLE001
                    profiles[what] = {"error": str(exc)}
    except KeyboardInterrupt as exc:
        bench.errors.append(f"interrupted: {exc}")
        log(f"interrupted: {exc}")
    except Exception as exc:  # noqa: BLE001
        bench.errors.append(f"setup/run failed: {exc}")
        log(f"FAILED: {exc}")
        import traceback

        traceback.print_exc()
    finally:
        busy = procs.machine_busy_seconds() - busy0
        own = procs.own_cpu_seconds() - own0
        log("stopping everything")
        stack.close()
        signal.signal(signal.SIGTERM, old)

    results = {k: dict(v) for k, v in bench.results.items()}
    systems = [{"key": s.key, "label": s.label, "auth": s.auth, "note": s.note} for s in bench.systems]
    meta = {"command": _command(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": cfg.quick,
            "elapsed_s": time.time() - started, "machine": machine.describe(), "nofile": getattr(bench, "nofile", None),
            "request_log": cfg.request_log, "foreign_cpu_s": max(0.0, busy - own), "busy_cpu_s": busy,
            "own_cpu_s": own}
    data = {"meta": meta, "systems": systems, "results": results, "unavailable": bench.unavailable,
            "errors": bench.errors, "profiles": profiles, "restarts": bench.restarts, "agent_cost": agent_result}
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps(data, indent=1, default=str))
    _write(out, plot_dir, data)
    log(f"wrote {out} ({time.time() - started:.0f} s)")
    for g in report.goals(results):
        mark = "n/a " if g["ok"] is None else ("pass" if g["ok"] else "MISS")
        print(f"  [{mark}] {g['goal']}: {g['measured']}")
    return 0 if (results or agent_result) and not bench.errors else 1


if __name__ == "__main__":
    sys.exit(main())
