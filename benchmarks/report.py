"""Turn the results into ``RESULTS.md`` (tables, goals with pass/miss) and PNG plots."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .scenarios import PROFILES

KIB = 1024


def _get(results: dict, scenario: str, key: str, field: str) -> float | None:
    r = results.get(scenario, {}).get(key)
    if not isinstance(r, dict) or "error" in r:
        return None
    v = r.get(field)
    return float(v) if isinstance(v, int | float) else None


def _fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


def _ms(us: float | None) -> str:
    return "—" if us is None else f"{us / 1000:.2f}"


# -- goals -------------------------------------------------------------------------------------------
def goals(results: dict) -> list[dict]:
    out: list[dict] = []

    def add(name: str, measured: str, ok: bool | None, detail: str = "") -> None:
        out.append({"goal": name, "measured": measured, "ok": ok, "detail": detail})

    # -- the rows of issue 19's table, each a ratio against something measured in the same run ----------
    one_hop = ("microsocks", "dante", "pproxy")

    def best(scenario: str, field: str, keys: tuple[str, ...], low: bool = False) -> tuple[str, float] | None:
        vals = [(k, v) for k in keys if (v := _get(results, scenario, k, field)) is not None]
        if not vals:
            return None
        return (min if low else max)(vals, key=lambda kv: kv[1])

    tun = _get(results, "bulk1", "pxo_tunnel", "MBps")
    dante = _get(results, "bulk1", "dante", "MBps")
    name = "Bulk, 1 stream ≥ Dante (C, one hop)"
    if tun is not None and dante:
        add(name, f"{tun:.0f} / {dante:.0f} MB/s = {tun / dante:.2f} ×", tun >= dante)
    else:
        add(name, "not measured", None)

    rt = _get(results, "rate50", "pxo_tunnel", "rate")
    ms = _get(results, "rate50", "microsocks", "rate")
    name = "Session rate, 50 clients, target closes ≥ microsocks"
    if rt is not None and ms:
        add(name, f"{rt:.0f} / {ms:.0f} sessions/s = {rt / ms:.2f} ×", rt >= ms)
    else:
        add(name, "not measured", None)

    cps = _get(results, "rate50", "pxo_tunnel", "cpu_us_per_session")
    name = "Product CPU per session (node + agent) ≤ 200 µs"
    if cps is not None:
        add(name, f"{cps:.0f} µs = {cps / 200:.2f} × the goal", cps <= 200)
    else:
        add(name, "not measured", None)

    r50 = _get(results, "rtt", "pxo_tunnel", "p50_us")
    peer = best("rtt", "p50_us", one_hop, low=True)
    name = "64-byte RTT on an open session, p50 ≤ the best one-hop peer"
    if r50 is not None and peer:
        add(name, f"{r50:.0f} / {peer[1]:.0f} µs ({peer[0]}) = {r50 / peer[1]:.2f} ×", r50 <= peer[1])
    else:
        add(name, "not measured", None)

    for prof in sorted(PROFILES, key=lambda p: -p["rtt_ms"]):
        r = results.get(f"mobile_{prof['key']}", {}).get("pxo_tunnel")
        limit = prof["rtt_ms"] + 25
        name = f"{prof['label']} link: interactive RTT under a bulk download, p99 ≤ link RTT + 25 ms = {limit:.0f} ms"
        p99 = r["hol"].get("p99_us") if isinstance(r, dict) and "error" not in r else None
        d = results.get(f"mobile_{prof['key']}", {}).get("direct")
        dp99 = d["hol"].get("p99_us") if isinstance(d, dict) and "error" not in d else None
        if p99 is None:
            add(name, "not measured", None)
        else:
            ref = f"; direct TCP {dp99 / 1000:.0f} ms" if dp99 is not None else ""
            add(name, f"{p99 / 1000:.0f} ms = {p99 / 1000 / limit:.2f} × the limit{ref}", p99 / 1000 <= limit)

    slow = max(PROFILES, key=lambda p: p["rtt_ms"])
    for key, what in (("pxo_tunnel", "default"), ("pxo_opt", "OPTIMISTIC_OPEN=1")):
        r = results.get(f"mobile_{slow['key']}", {}).get(key)
        ns = r.get("new_session", {}).get("total_us") if isinstance(r, dict) and "error" not in r else None
        name = (f"New session through a {slow['rtt_ms']:.0f} ms link ({what}): SOCKS reply + first response "
                f"byte ≤ 1 link RTT + target RTTs (< 1.5 link RTTs counts as one)")
        if ns is None:
            add(name, "not measured", None)
        else:
            n_rtt = ns / 1000 / slow["rtt_ms"]
            add(name, f"{ns / 1000:.0f} ms = {n_rtt:.2f} link RTTs", n_rtt < 1.5)

    # -- further goals of the earlier rounds -----------------------------------------------------------
    mem = _get(results, "memory", "pxo_tunnel", "bytes_per_session")
    n = _get(results, "memory", "pxo_tunnel", "sessions")
    if mem is not None:
        add("Memory ≤ 16 KiB per idle tunnelled session (node + agent)",
            f"{mem / KIB:.1f} KiB ({n:.0f} sessions)", mem <= 16 * KIB)
    else:
        add("Memory ≤ 16 KiB per idle tunnelled session (node + agent)", "not measured", None)

    for prof in PROFILES:
        r = results.get(f"mobile_{prof['key']}", {}).get("pxo_tunnel")
        if not isinstance(r, dict) or "error" in r:
            add(f"Mobile {prof['label']}: 1-stream throughput ≥ 0.8 × cap", "not measured", None)
            continue
        frac = r["fraction_of_cap"]
        add(f"Mobile {prof['label']}: 1-stream throughput ≥ 0.8 × cap",
            f"{r['bulk']['MBps']:.2f} / {r['cap_MBps']:.2f} MB/s = {frac:.2f} ×", frac >= 0.8)
    return out


# -- plots -------------------------------------------------------------------------------------------
def plots(results: dict, labels: dict[str, str], plot_dir: Path) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []
    keys = list(labels)

    def bars(name: str, title: str, ylabel: str, series: list[tuple[str, str, str, float]],
             hline: tuple[float, str] | None = None, log: bool = False) -> None:
        sys_keys = [k for k in keys if any(_get(results, sc, k, f) is not None for _, sc, f, _ in series)]
        if not sys_keys:
            return
        fig, ax = plt.subplots(figsize=(9, 4.2))
        width = 0.8 / len(series)
        for i, (lab, sc, f, scale) in enumerate(series):
            vals = [(_get(results, sc, k, f) or 0) * scale for k in sys_keys]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(sys_keys))]
            b = ax.bar(xs, vals, width, label=lab)
            ax.bar_label(b, fmt="%.4g", fontsize=7)
        ax.set_xticks(range(len(sys_keys)), [labels[k] for k in sys_keys], rotation=15, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if hline:
            ax.axhline(hline[0], color="red", linestyle="--", linewidth=1, label=hline[1])
        if len(series) > 1 or hline:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append((name, title))

    bars("throughput", "Bulk throughput on loopback (download)", "MB/s",
         [("1 stream", "bulk1", "MBps", 1), ("8 streams", "bulk8", "MBps", 1)])
    bars("session_rate", "New sessions/s, 50 concurrent clients (handshake+auth+CONNECT+64 B echo)", "sessions/s",
         [("sessions/s", "rate50", "rate", 1)])
    bars("session_latency", "Latency of one new session, 1 client", "ms",
         [("p50", "rate1", "p50_us", 1e-3), ("p99", "rate1", "p99_us", 1e-3)])
    bars("rtt", "Round trip of 64 B on an established session", "µs",
         [("p50", "rtt", "p50_us", 1), ("p99", "rtt", "p99_us", 1)])
    bars("cpu_per_gb", "CPU seconds per GB relayed (proxy processes, 1 stream)", "CPU s / GB",
         [("1 stream", "bulk1", "cpu_s_per_GB", 1), ("8 streams", "bulk8", "cpu_s_per_GB", 1)])
    bars("memory", "Memory per idle session (RSS delta / sessions)", "KiB",
         [("KiB / session", "memory", "bytes_per_session", 1 / KIB)], hline=(16, "goal: 16 KiB"))

    # mobile
    mob = [(p, results.get(f"mobile_{p['key']}", {})) for p in PROFILES]
    mob = [(p, r) for p, r in mob if r]
    if mob:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        mkeys = ["direct", "pxo_tunnel", "ssh"]
        names = {"direct": "direct TCP", "pxo_tunnel": "proxyorch tunnel", "ssh": "OpenSSH -R"}
        for j, k in enumerate(mkeys):
            fr = [(r.get(k) or {}).get("fraction_of_cap", 0) or 0 for _, r in mob]
            xs = [i + (j - 1) * 0.27 for i in range(len(mob))]
            b = axes[0].bar(xs, fr, 0.27, label=names[k])
            axes[0].bar_label(b, fmt="%.2f", fontsize=7)
            p99 = [((r.get(k) or {}).get("hol") or {}).get("p99_us") or 0 for _, r in mob]
            b = axes[1].bar(xs, [v / 1000 for v in p99], 0.27, label=names[k])
            axes[1].bar_label(b, fmt="%.0f", fontsize=7)
        axes[0].axhline(0.8, color="red", linestyle="--", linewidth=1, label="goal 0.8")
        axes[0].set_title("1-stream throughput / link cap")
        axes[1].set_title("Interactive RTT p99 under a bulk stream (ms)")
        axes[1].set_yscale("log")
        for i, (p, _) in enumerate(mob):
            axes[1].hlines(p["rtt_ms"] + 25, i - 0.45, i + 0.45, colors="red", linestyles="--", linewidth=1)
        for ax in axes:
            ax.set_xticks(range(len(mob)), [p["label"] for p, _ in mob], fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / "mobile.png", dpi=110)
        plt.close(fig)
        made.append(("mobile", "Mobile-like links: throughput and head-of-line isolation"))
    return made


# -- why a goal is missed --------------------------------------------------------------------------------
def _top(profiles: dict, what: str, proc: str, n: int = 3) -> str:
    p = profiles.get(what, {}).get(proc, {})
    if "self" not in p:
        return "not profiled"
    return ", ".join(f"`{f.split(' (')[0]}` {share:.0%}" for f, share in p["self"][:n])


def _share(profiles: dict, what: str, proc: str, needles: tuple[str, ...], label: str) -> str:
    p = profiles.get(what, {}).get(proc, {})
    if "self" not in p:
        return ""
    share = sum(x for f, x in p["self"] if any(n in f for n in needles))
    return f" Of the node's samples, {share:.0%} (among its top functions) are {label}." if share else ""


def why_missed(results: dict, profiles: dict) -> str:
    """One paragraph per goal of issue 19's table: what the measurements say about why it is met or not."""
    L = ["## What explains each goal (issue 19's table)\n"]
    g = {x["goal"].split(" ≥")[0].split(" ≤")[0].split(":")[0]: x for x in goals(results)}

    def mark(prefix: str) -> str:
        for k, x in g.items():
            if k.startswith(prefix):
                return "met" if x["ok"] else ("missed" if x["ok"] is False else "not measured")
        return "not measured"

    tls, plain = _get(results, "bulk1", "pxo_tunnel", "MBps"), _get(results, "bulk1", "pxo_plain", "MBps")
    gb_t, gb_p = (_get(results, "bulk1", k, "cpu_s_per_GB") for k in ("pxo_tunnel", "pxo_plain"))
    dex = _get(results, "bulk1", "pxo_direct", "MBps")
    L.append(f"- **Bulk, 1 stream** ({mark('Bulk')}): every byte crosses two Python processes sharing one core "
             f"(node and agent; Dante is one C hop), and both ends of the tunnel encrypt or decrypt it. TLS on vs "
             f"off in the same run: {_fmt(tls, '.0f')} vs {_fmt(plain, '.0f')} MB/s, {_fmt(gb_t, '.2f')} vs "
             f"{_fmt(gb_p, '.2f')} CPU s/GB; the node alone (direct exit, one hop) relays {_fmt(dex, '.0f')} MB/s. "
             f"Top self time (bulk1 profile): node {_top(profiles, 'bulk1', 'node')}; agent "
             f"{_top(profiles, 'bulk1', 'agent')}.")
    cps = _get(results, "rate50", "pxo_tunnel", "cpu_us_per_session")
    cpp = _get(results, "rate50", "pxo_plain", "cpu_us_per_session")
    L.append(f"- **Sessions/s and CPU per session** ({mark('Session rate')}; {mark('Product CPU')}): "
             f"{_fmt(cps, '.0f')} µs of node + agent CPU per session with TLS, {_fmt(cpp, '.0f')} µs without "
             "(the tunnel connection is long-lived: TLS costs per byte, not per handshake). One session is a SOCKS "
             "handshake, an auth-cache lookup, OPEN/OPEN_OK JSON frames, a TCP connect on the agent, two "
             "transports and their protocol objects, a request-log row — all in Python on one core. Top self "
             f"time (rate50 profile): node {_top(profiles, 'rate50', 'node')}; agent "
             f"{_top(profiles, 'rate50', 'agent')}." + _share(profiles, "rate50", "node",
             ("chdb", "request_log"), "the request log's chDB insert (a thread in the node process; `Condition.wait` samples are threads waiting, not CPU)")
             + " Compiling the sans-I/O cores with mypyc (`scripts/build_mypyc.sh`, opt-in) makes the cores "
             "1.3–2× faster (about 30–35 µs per session in all) but is within the noise end to end; what "
             "remains is mostly uvloop, syscalls and the agent's target connect (flame graphs, A/B figures and "
             "what each change bought: `CPU-PROFILE.md`).")
    r50 = _get(results, "rtt", "pxo_tunnel", "p50_us")
    rp = _get(results, "rtt", "pxo_plain", "p50_us")
    L.append(f"- **64-byte RTT** ({mark('64-byte RTT')}): {_fmt(r50, '.0f')} µs with TLS, {_fmt(rp, '.0f')} µs "
             "without; each echo wakes four event-loop callbacks in two Python processes on one core (client → "
             "node → agent → target and back), each with a TLS record and a frame, where a one-hop peer wakes "
             f"two in C. Top self time (rtt profile): node {_top(profiles, 'rtt', 'node')}; agent "
             f"{_top(profiles, 'rtt', 'agent')}.")
    for prof in sorted(PROFILES, key=lambda p: -p["rtt_ms"]):
        r = results.get(f"mobile_{prof['key']}", {}).get("pxo_tunnel")
        if not isinstance(r, dict) or "error" in r:
            continue
        q = r.get("queues") or {}
        rate = prof["mbit"] * 1e6 / 8
        parts = [f"{name}: p50 {v['p50'] / 1024:.0f} KiB ≈ {v['p50'] / rate * 1000:.0f} ms"
                 for name, v in q.items() if v]
        m = results.get(f"mobile_{prof['key']}", {})
        cmp_ = "; ".join(f"{lab} p99 {_ms(x['hol'].get('p99_us'))} ms" for key, lab in (
            ("direct", "direct TCP over the same link"), ("pxo_plain", "the tunnel with TLS off"))
            if isinstance(x := m.get(key), dict) and "error" not in x)
        L.append(f"- **Interactive RTT under a bulk download, {prof['label']}** "
                 f"({mark(prof['label'])}): p99 {_ms(r['hol'].get('p99_us'))} ms"
                 + (f" ({cmp_})" if cmp_ else "") + ". The 64 B reply waits behind "
                 "the download's bytes that are already queued in FIFO buffers below the tunnel core's per-stream "
                 "queues: " + ("; ".join(parts) if parts else "queues not sampled") + ", plus up to 32 KiB "
                 "(the emulator's bottleneck queue) of the same connection. Direct TCP sends the ping on its own "
                 "connection, so the emulator queues it apart from the download (like a per-flow queue in a "
                 "real network); the tunnel carries both in one TCP connection, so everything queued for that "
                 "connection is ahead of the reply. The core sends the smallest stream queue first, but only "
                 "for bytes still in its own queues, which is why the sender paces: it keeps the bytes in "
                 "flight (written, not yet read by the peer) near the measured bandwidth × RTT and leaves the "
                 "rest in the per-stream queues, where small streams go first (`device_tunnel/pacing.py`, "
                 "PROTOCOL.md revision 2.2). What is left is the standing queue the pacer keeps (its rate "
                 "estimate runs 5–10 % high) and, on the faster link, a core shared by the agent's TLS and "
                 "the bulk stream; the agent's user-space queues before and after pacing, from its "
                 "`--stats-file`, are in `HOL.md`. Not done: a second tunnel connection for interactive streams.")
    slow = max(PROFILES, key=lambda p: p["rtt_ms"])
    m = results.get(f"mobile_{slow['key']}", {})
    ns = {k: (m.get(k) or {}).get("new_session", {}).get("total_us") for k in ("pxo_tunnel", "pxo_opt")}
    if ns["pxo_tunnel"] is not None:
        opt = (f"; with `OPTIMISTIC_OPEN=1` {ns['pxo_opt'] / 1000:.0f} ms = "
               f"{ns['pxo_opt'] / 1000 / slow['rtt_ms']:.2f} link RTTs" if ns["pxo_opt"] is not None else "")
        L.append(f"- **New session through the {slow['rtt_ms']:.0f} ms link**: by default "
                 f"{ns['pxo_tunnel'] / 1000:.0f} ms = {ns['pxo_tunnel'] / 1000 / slow['rtt_ms']:.2f} link RTTs "
                 "(OPEN → OPEN_OK, then the first bytes → the response)" + opt + " (the node answers at once, "
                 "the first bytes follow OPEN in the same flight, the response comes back after one RTT). "
                 "`OPTIMISTIC_OPEN` is off by default: with it a target that fails is a reset after a "
                 "success reply, which some clients report less clearly than a SOCKS error code.")
    L.append("")
    return "\n".join(L)


# -- markdown ----------------------------------------------------------------------------------------
def render(meta: dict, results: dict, systems: list[dict], unavailable: dict[str, str], errors: list[str],
           profiles: dict[str, Any], plot_list: list[tuple[str, str]], plot_rel: str,
           restarts: list[str] | None = None) -> str:
    L: list[str] = []
    w = L.append
    w("# proxyorch data-plane benchmarks\n")
    w(f"Generated by `{meta['command']}` on {meta['date']} in {meta['elapsed_s']:.0f} s "
      f"({'quick' if meta['quick'] else 'full'} mode)."
      + (f" Scenarios not re-run then are from the run of {meta['merged_from']} (`--merge`)."
         if meta.get("merged_from") else "") + "\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    for k, v in meta["machine"].items():
        w(f"| {k} | {html.escape(str(v))} |")
    w(f"| RLIMIT_NOFILE | {meta.get('nofile')} |")
    w(f"| request log (ClickHouse rows) | {'on (product default)' if meta['request_log'] else 'off'} |")
    if meta.get("busy_cpu_s") is not None:
        w(f"| CPU used during the run | {meta['own_cpu_s']:.0f} s by the benchmark and what it started; "
          f"{meta['foreign_cpu_s']:.0f} s by other processes on the machine "
          f"({meta['foreign_cpu_s'] / max(meta['elapsed_s'], 1):.0%} of one core on average) |")
    w(f"| load average at start / end | {meta.get('loadavg_start', '—')} / {meta.get('loadavg_end', '—')} |")
    w("")
    if meta.get("pinned"):
        w("All traffic is on 127.0.0.1. Method of issue 19: the product (node + device agent; each peer in its "
          "place: microsocks, Dante, pproxy, sshd + ssh) is pinned with `taskset` to CPU 0, the load generator, "
          "the target and the link emulator to CPU 1 (other processes on the machine are not pinned). "
          "Each scenario runs every system back to back"
          + (f", {meta['repeat']} rounds, and reports each system's median round" if meta.get("repeat", 1) > 1
             else "") + ".\n")
    else:
        w("All traffic is on 127.0.0.1; the load generator, the target server, every proxy and the link "
          "emulator share the same cores (not pinned), so absolute numbers are a property of this machine. "
          "Each scenario runs every system back to back.\n")

    w("## Goals\n")
    w("| goal | measured | result |\n|---|---|---|")
    for g in goals(results):
        res = "—" if g["ok"] is None else ("**pass**" if g["ok"] else "**MISS**")
        w(f"| {g['goal']} | {g['measured']} | {res} |")
    w("")

    w("## Systems\n")
    w("| system | authentication | notes |\n|---|---|---|")
    for s in systems:
        w(f"| {s['label']} | {s['auth']} | {s['note']} |")
    for k, why in unavailable.items():
        w(f"| {k} | — | **not measured:** {why} |")
    w("")

    ceiling = results.get("bulk1", {}).get("direct", {})
    c_rate = results.get("rate50", {}).get("direct", {})
    w("## Load generator ceiling\n")
    w("The load generator is a C program (`benchmarks/loadgen.c`, built into `benchmarks/work/` with the system "
      "compiler): blocking sockets, one thread per stream or per concurrent client, SOCKS5 greeting → RFC 1929 "
      "auth → CONNECT, each step waiting for its reply. Against direct TCP to the same C epoll target it reaches:\n")
    if ceiling and "error" not in ceiling:
        w(f"- bulk, 1 stream: **{ceiling['MBps']:.0f} MB/s** (loadgen CPU {ceiling.get('loadgen_cpu_s', 0):.2f} s "
          f"over the run)")
    b8 = results.get("bulk8", {}).get("direct", {})
    if b8 and "error" not in b8:
        w(f"- bulk, 8 streams: **{b8['MBps']:.0f} MB/s**")
    if c_rate and "error" not in c_rate:
        w(f"- sessions (connect + 64 B echo + close), 50 clients: **{c_rate['rate']:.0f} sessions/s**, "
          f"p99 {_ms(c_rate.get('p99_us'))} ms")
    rtt = results.get("rtt", {}).get("direct", {})
    if rtt and "error" not in rtt:
        w(f"- 64 B round trip: p50 {rtt['p50_us']:.0f} µs, p99 {rtt['p99_us']:.0f} µs")
    best_proxy_rate = max([_get(results, "rate50", s["key"], "rate") or 0 for s in systems if s["key"] != "direct"]
                          or [0])
    if c_rate and "error" not in c_rate and best_proxy_rate:
        w(f"\nThe fastest proxy reaches {best_proxy_rate / c_rate['rate']:.0%} of the generator's direct session "
          "ceiling, so the generator is not what limits the proxies' numbers.")
    w("")

    def table(title: str, cols: list[tuple[str, str, str, Any]]) -> None:
        w(f"### {title}\n")
        w("| system | " + " | ".join(c[0] for c in cols) + " |")
        w("|---|" + "---:|" * len(cols))
        for s in systems:
            cells = []
            for _, sc, f, fmt in cols:
                r = results.get(sc, {}).get(s["key"])
                if r is None:
                    cells.append("—")
                elif "error" in r:
                    cells.append("error")
                else:
                    cells.append(fmt(r.get(f)))
            w(f"| {s['label']} | " + " | ".join(cells) + " |")
        w("")

    mbs = lambda v: _fmt(v, ".1f")  # noqa: E731
    w("## Loopback results\n")
    table("Bulk throughput (download: target → proxy → client, MB/s = 10⁶ B/s)", [
        ("1 stream MB/s", "bulk1", "MBps", mbs), ("8 streams MB/s", "bulk8", "MBps", mbs),
        ("CPU s/GB (1 stream)", "bulk1", "cpu_s_per_GB", lambda v: _fmt(v, ".2f")),
        ("CPU s/GB (8 streams)", "bulk8", "cpu_s_per_GB", lambda v: _fmt(v, ".2f"))])
    table("New sessions (handshake + auth + CONNECT + 64 B echo + close)", [
        ("50 clients: sessions/s", "rate50", "rate", lambda v: _fmt(v, ".0f")),
        ("p50 ms", "rate50", "p50_us", _ms), ("p99 ms", "rate50", "p99_us", _ms),
        ("errors", "rate50", "errors", lambda v: _fmt(v, ".0f")),
        ("CPU µs / session", "rate50", "cpu_us_per_session", lambda v: _fmt(v, ".0f")),
        ("1 client: p50 ms", "rate1", "p50_us", _ms), ("p99 ms", "rate1", "p99_us", _ms)])
    table("Round trip of 64 B on an established session", [
        ("p50 µs", "rtt", "p50_us", lambda v: _fmt(v, ".0f")), ("p90 µs", "rtt", "p90_us", lambda v: _fmt(v, ".0f")),
        ("p99 µs", "rtt", "p99_us", lambda v: _fmt(v, ".0f")), ("samples", "rtt", "count", lambda v: _fmt(v, ".0f"))])
    table("Memory per idle session (RSS of the proxy processes after opening N sessions, minus before, / N)", [
        ("sessions", "memory", "sessions", lambda v: _fmt(v, ".0f")),
        ("KiB / session", "memory", "bytes_per_session", lambda v: _fmt(None if v is None else v / KIB, ".1f")),
        ("RSS before MiB", "memory", "rss_before", lambda v: _fmt(None if v is None else v / 2**20, ".1f")),
        ("RSS after MiB", "memory", "rss_after", lambda v: _fmt(None if v is None else v / 2**20, ".1f")),
        ("open time s", "memory", "open_seconds", lambda v: _fmt(v, ".1f")),
        ("fds left open after closing / session", "memory", "leaked_fds_per_session", lambda v: _fmt(v, ".2f"))])
    w("CPU s/GB counts user + system CPU of the proxy's own processes (node; node + agent; sshd + ssh; "
      "dante's process tree) over the whole run divided by all bytes relayed; not the generator's or the "
      "target's. Memory is measured first, on freshly started processes, each session opened with one 64 B "
      "echo so it is established end to end.\n")

    if any(results.get(f"mobile_{p['key']}") for p in PROFILES):
        w("## Mobile-like links\n")
        w("The link between the device side and the node side (agent → node for proxyorch, ssh → sshd for "
          "OpenSSH -R, client → target for direct TCP) goes through `benchmarks/linkemu.py`: a userspace relay "
          "that serialises each direction at the link rate through a shallow 32 KiB bottleneck queue and then "
          "delays it by RTT/2. Uncapped it relays several hundred MB/s, far above either profile. "
          "Bulk = one download stream (steady state after a warm-up that excludes slow start); "
          "interactive = 64 B echo every 20 ms on a second session through the same proxy (and the same "
          "tunnel / ssh connection) while a bulk download saturates it.\n")
        w("| profile | system | idle RTT p50 ms | new session: SOCKS reply ms | + first response byte ms | "
          "= link RTTs | bulk MB/s | × cap | queue drain after bulk s | "
          "new session under bulk: open ms | RTT under bulk p50 ms | p99 ms | samples | bulk meanwhile MB/s |")
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        names = {"direct": "direct TCP (separate connections)", "pxo_tunnel": "proxyorch tunnel (TLS)",
                 "pxo_opt": "proxyorch tunnel, OPTIMISTIC_OPEN=1", "pxo_plain": "proxyorch tunnel, TLS off",
                 "ssh": "OpenSSH -R"}
        for p in PROFILES:
            for k, r in results.get(f"mobile_{p['key']}", {}).items():
                if "error" in r:
                    w(f"| {p['label']} | {names.get(k, k)} | error: {r['error'][:80]} | | | | | | | | | | | |")
                    continue
                ns = r.get("new_session") or {}
                n_rtt = ns["total_us"] / 1000 / p["rtt_ms"] if ns.get("total_us") is not None else None
                w(f"| {p['label']} | {names.get(k, k)} | {_ms(r['idle_rtt'].get('p50_us'))} | "
                  f"{_ms(ns.get('open_us'))} | {_ms(ns.get('total_us'))} | {_fmt(n_rtt, '.2f')} | "
                  f"{r['bulk']['MBps']:.2f} | {r['fraction_of_cap']:.2f} | {_fmt(r.get('drain_after_bulk_s'))} | "
                  f"{_ms(r['hol'].get('open_us'))} | {_ms(r['hol'].get('p50_us'))} | "
                  f"{_ms(r['hol'].get('p99_us'))} | {r['hol'].get('count', 0)} | "
                  f"{_fmt(r.get('hol_bulk_MBps'), '.2f')} |")
        w("")

    qrows = [(p, k, r) for p in PROFILES for k, r in results.get(f"mobile_{p['key']}", {}).items()
             if isinstance(r, dict) and r.get("queues")]
    if qrows:
        w("### Where the interactive reply waits: the queue at each layer under the bulk download\n")
        w("Sampled every 100 ms with `ss` while the interactive stream pinged (bytes; p50 / max). The link "
          "emulator itself holds at most its 32 KiB bottleneck queue plus the bytes in flight on the delay "
          "line (rate × RTT/2). A 64 B reply queued behind Q bytes at a layer drained at the link rate waits "
          "Q / rate; the proxyorch agent's own user-space queues (the tunnel core's per-stream queues and "
          "its TLS transport buffer) are not visible from outside and come on top.\n")
        w("| profile | system | layer | p50 bytes | max bytes | ≈ wait at the link rate (p50) ms |")
        w("|---|---|---|---:|---:|---:|")
        for p, k, r in qrows:
            rate = p["mbit"] * 1e6 / 8
            for layer, q in r["queues"].items():
                if q:
                    w(f"| {p['label']} | {names.get(k, k)} | {layer} | {q['p50']} | {q['max']} | "
                      f"{q['p50'] / rate * 1000:.0f} |")
        w("")

    if plot_list:
        w("## Plots\n")
        for name, title in plot_list:
            w(f"![{title}]({plot_rel}/{name}.png)\n")

    w(why_missed(results, profiles))

    if profiles:
        w("## Profiles of the missed goals\n")
        w("py-spy (`record --format raw --rate 250 --nonblocking`) on the node and on the device agent while the "
          "scenario ran through the tunnel. Shares are of all samples of that process (idle samples excluded "
          "by py-spy, so the shares are of busy time). Raw stacks are in `benchmarks/profiles/`. py-spy sees Python "
          "frames only: self time of `Runner.run` is time inside uvloop's C loop (epoll, recv/send syscalls, "
          "transport bookkeeping); self time of a Python function that calls `transport.write` (e.g. "
          "`stream_data`, `_flush_writes`) is mostly the `send()` syscall that uvloop issues inline.\n")
        for what, prof in profiles.items():
            if "error" in prof:
                w(f"- {what}: {prof['error']}\n")
                continue
            w(f"### {what}\n")
            sc = prof.get("scenario", {})
            if "MBps" in sc:
                w(f"Scenario during profiling: {sc['MBps']:.1f} MB/s.\n")
            elif "rate" in sc:
                w(f"Scenario during profiling: {sc['rate']:.0f} sessions/s.\n")
            elif "p50_us" in sc:
                w(f"Scenario during profiling: 64 B echo, p50 {sc['p50_us']:.0f} µs ({sc.get('count')} samples).\n")
            for proc in ("node", "agent"):
                p = prof.get(proc, {})
                if "self" not in p:
                    continue
                w(f"**{proc}** ({p['samples']} samples) — top self time:\n")
                w("| function | self |\n|---|---:|")
                for f, share in p["self"][:10]:
                    w(f"| `{f}` | {share:.1%} |")
                w("")
                w("<details><summary>inclusive time</summary>\n")
                w("| function | inclusive |\n|---|---:|")
                for f, share in p["inclusive"][:16]:
                    w(f"| `{f}` | {share:.1%} |")
                w("\n</details>\n")
    w("## Notes and caveats\n")
    if meta["quick"]:
        w("- **Quick mode:** short runs (1 s per loopback measurement), idle-session memory for proxyorch only "
          "with 300 sessions (too few for a stable per-session figure), short mobile runs. "
          "Use the full run (`python -m benchmarks`) for the numbers that count.")
    w("- The proxyorch tunnel runs TLS 1.3 (the default; the agents pin the node's certificate), like OpenSSH "
      "which encrypts and MACs every byte; 'proxyorch tunnel, TLS off' is the same with `TUNNEL_TLS=0`. "
      "'optimistic open' is `OPTIMISTIC_OPEN=1`: the node answers SOCKS/CONNECT at once and sends the "
      "client's first bytes with OPEN.")
    w("- CPU per session = user + system CPU of node + agent during the 50-client session run (warm-up "
      "included) / (sessions/s × (run + warm-up)).")
    w("- New session (mobile table) = one fresh session through the proxy on the node side of the link: "
      "SOCKS greeting, auth and CONNECT until the reply (the 'SOCKS reply' column), then 64 B out and the "
      "echo back (the first response byte); median of the samples. The target is on loopback beside the "
      "agent, so target RTTs are ≈ 0 here and the figure is in link RTTs.")
    w("- Authentication: proxyorch, microsocks and pproxy are configured with username/password (RFC 1929, "
      "checked on every session). Dante runs with method `none` (its username method authenticates against "
      "system accounts); OpenSSH's dynamic forward has no SOCKS authentication.")
    w("- pproxy 2.7.9 does not start on uvloop ≥ 0.22 (`get_event_loop()` with no loop); "
      "`benchmarks/pproxy_uvloop.py` creates the uvloop loop first and then runs pproxy's own `main`.")
    w("- Session latency under 50 concurrent clients is dominated by queueing in whatever is slowest; the "
      "per-session latency goal is judged on 1 client.")
    w("- Mobile bulk runs exclude slow start (warm-up before measuring). After each bulk run the benchmark waits "
      "until a fresh session's round trip is back at the link RTT before the next measurement, so every "
      "measurement starts on an empty link; the time that took is the 'queue drain' column.")
    w("- The other processes' CPU (first table) is load that shared this machine's cores during the run; it "
      "adds noise to every number, most to the CPU-bound loopback scenarios.")
    w("")
    for r in restarts or []:
        w(f"- **Restart:** {r} — a socket leak in the direct-exit path (see the fds column of the memory "
          "table); the node was restarted so the next scenario measures the relay rather than the leak.")
    if restarts:
        w("")
    if errors:
        w("## Errors during the run\n")
        for e in errors:
            w(f"- {e}")
        w("")
    return "\n".join(L) + "\n"
