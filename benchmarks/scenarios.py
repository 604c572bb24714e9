"""The systems under test and the scenarios, run back to back (for each scenario, every system)."""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import loadgen as lgmod
from . import procs
from .loadgen import LoadGen, Via
from .procs import Credential, Node, Proc, Stack

LOG_BATCH_S = 5.0  # the nodes' request-log batch interval (their default LOG_BATCH_S)

PROFILES = [
    {"key": "4g", "label": "40 ms RTT / 100 Mbit/s", "rtt_ms": 40.0, "mbit": 100.0},
    {"key": "3g", "label": "150 ms RTT / 20 Mbit/s", "rtt_ms": 150.0, "mbit": 20.0},
]


@dataclass
class Config:
    quick: bool
    bulk_s: float
    rate_s: float
    lat_s: float
    rtt_count: int
    idle_sessions: int
    mobile_warm_s: float
    mobile_bulk_s: float
    hol_s: float
    profile_s: float
    request_log: bool = True
    warmup_s: float = 0.5
    repeat: int = 1  # rounds of each loopback scenario (every system per round); the median round is kept
    profiles: tuple[str, ...] = ("4g", "3g")

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(quick=True, bulk_s=1.0, rate_s=1.0, lat_s=0.7, rtt_count=1000, idle_sessions=300,
                       mobile_warm_s=1.5, mobile_bulk_s=2.0, hol_s=2.0, profile_s=3.0, warmup_s=0.3)
        return cls(quick=False, bulk_s=5.0, rate_s=5.0, lat_s=3.0, rtt_count=10000, idle_sessions=5000,
                   mobile_warm_s=3.0, mobile_bulk_s=8.0, hol_s=6.0, profile_s=8.0)


@dataclass
class System:
    key: str
    label: str
    via: Via
    pids: list[int]
    auth: str
    note: str = ""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    cfg: Config
    stack: Stack
    results: dict[str, Any] = field(default_factory=lambda: collections.defaultdict(dict))
    systems: list[System] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    nofile: int = 1024

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        self.nofile = procs.raise_nofile()
        self.exe = lgmod.build()
        self.lg = LoadGen(self.exe)
        self.target = procs.start_target(self.stack, self.exe)
        log("starting embedded PostgreSQL")
        db_url = procs.start_postgres(self.stack)
        rl = "1" if self.cfg.request_log else "0"
        log("starting proxyorch nodes (tunnel with TLS, plaintext tunnel, optimistic open, direct exit)")
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            # node-tunnel holds the device (Y); node-relay (X) serves clients for it through the
            # node-to-node relay (presence in PostgreSQL: no Redis needed for the benchmark)
            secret = uuid.uuid4().hex
            # a cluster setting needs RMS_KEY (and ADMIN_TOKEN, which node_env sets) explicitly
            rms_key = base64.b64encode(os.urandom(32)).decode()
            cluster = {"CLUSTER_SECRET": secret, "RELAY_PORT": str(procs.free_port()), "RMS_KEY": rms_key}
            f_tun = ex.submit(procs.start_node, self.stack, db_url, "node-tunnel", {"REQUEST_LOG": rl, **cluster})
            f_plain = ex.submit(procs.start_node, self.stack, db_url, "node-plain",
                                {"REQUEST_LOG": rl, "TUNNEL_TLS": "0"})
            f_opt = ex.submit(procs.start_node, self.stack, db_url, "node-optimistic",
                              {"REQUEST_LOG": rl, "OPTIMISTIC_OPEN": "1"})
            f_dir = ex.submit(procs.start_node, self.stack, db_url, "node-direct",
                              {"REQUEST_LOG": rl, "DIRECT_EXIT": "1", "DIRECT_EXIT_ALLOW_PRIVATE": "1"})
            self.node: Node = f_tun.result()
            self.pnode: Node = f_plain.result()
            self.onode: Node = f_opt.result()
            self.dnode: Node = f_dir.result()
        shared_tls = self.node.data_dir / "tunnel-tls"  # the relay link is TLS, pinned to one shared certificate
        self.xnode: Node = procs.start_node(self.stack, db_url, "node-relay", {
            "REQUEST_LOG": rl, "CLUSTER_SECRET": secret, "RELAY_PORT": str(procs.free_port()), "RMS_KEY": rms_key,
            "TUNNEL_TLS_CERT": str(shared_tls / "cert.pem"), "TUNNEL_TLS_KEY": str(shared_tls / "key.pem")})
        user = procs.admin(self.node, "create-user", "--name", "bench")["user_id"]
        keys = ["loop", "plain", "opt", *[p["key"] for p in PROFILES], *[p["key"] + "-opt" for p in PROFILES],
                *[p["key"] + "-plain" for p in PROFILES]]
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futs = {k: ex.submit(procs.make_credential, self.node, user, f"bench-{k}") for k in keys}
            self.creds: dict[str, Credential] = {k: f.result() for k, f in futs.items()}
        cred = self.creds["loop"]
        self.agent = procs.start_agent(self.stack, "agent", self.node, cred)
        self.pagent = procs.start_agent(self.stack, "agent-plain", self.pnode, self.creds["plain"])
        self.oagent = procs.start_agent(self.stack, "agent-opt", self.onode, self.creds["opt"])
        procs.wait_socks(self.node.proxy_port, self.target.echo_port, cred.connection_id, cred.password, 30,
                         self.agent)
        pc, oc = self.creds["plain"], self.creds["opt"]
        procs.wait_socks(self.pnode.proxy_port, self.target.echo_port, pc.connection_id, pc.password, 30,
                         self.pagent)
        procs.wait_socks(self.onode.proxy_port, self.target.echo_port, oc.connection_id, oc.password, 30,
                         self.oagent)
        procs.wait_socks(self.dnode.proxy_port, self.target.echo_port, cred.connection_id, cred.password, 30)
        auth = "RFC 1929 user/password"
        self.systems = [
            System("direct", "direct TCP", Via(), [], "—", "no proxy: the ceiling"),
            System("pxo_direct", "proxyorch direct exit", Via(self.dnode.proxy_port, cred.connection_id,
                   cred.password), [self.dnode.proc.pid], auth, "node connects to the target itself"),
            System("pxo_tunnel", "proxyorch via device tunnel", Via(self.node.proxy_port, cred.connection_id,
                   cred.password), [self.node.proc.pid, self.agent.pid], auth,
                   "node + device agent (1 tunnel), TLS on the tunnel (the default)"),
            System("pxo_plain", "proxyorch tunnel, TLS off", Via(self.pnode.proxy_port, pc.connection_id,
                   pc.password), [self.pnode.proc.pid, self.pagent.pid], auth,
                   "the same with TUNNEL_TLS=0 (plaintext tunnel)"),
            System("pxo_opt", "proxyorch tunnel, optimistic open", Via(self.onode.proxy_port, oc.connection_id,
                   oc.password), [self.onode.proc.pid, self.oagent.pid], auth,
                   "TLS tunnel with OPTIMISTIC_OPEN=1"),
        ]
        try:
            procs.wait_socks(self.xnode.proxy_port, self.target.echo_port, cred.connection_id, cred.password, 30)
            self.systems.append(System(
                "pxo_relay", "proxyorch relayed (client at X, device on Y)",
                Via(self.xnode.proxy_port, cred.connection_id, cred.password),
                [self.xnode.proc.pid, self.node.proc.pid, self.agent.pid], auth,
                "node X -> relay link -> node Y -> device agent"))
        except Exception as exc:  # noqa: BLE001
            self.unavailable["pxo_relay"] = f"does not relay: {exc}"
        self._add_peer("microsocks", "microsocks", lambda: procs.start_microsocks(self.stack, "bench", "benchpw1"),
                       "bench", "benchpw1", auth, "C, thread per client")
        self._add_peer("dante", "Dante", lambda: procs.start_dante(self.stack), None, None,
                       "none (username method needs system users)", "C, pre-forked processes")
        self._add_peer("pproxy", "pproxy (uvloop)", lambda: procs.start_pproxy(self.stack, "bench", "benchpw1"),
                       "bench", "benchpw1", auth, "Python asyncio + uvloop")
        try:
            self.sshd = procs.start_sshd(self.stack)
            if self.sshd is None:
                self.unavailable["ssh"] = "sshd/ssh not installed (apt-get install openssh-server openssh-client)"
            else:
                self.ssh, port = procs.start_ssh_reverse(self.stack, self.sshd, "ssh-R")
                procs.wait_socks(port, self.target.echo_port, None, None, 20, self.ssh)
                self.systems.append(System("ssh", "OpenSSH -R (reverse dynamic)", Via(port), [
                    self.sshd.proc.pid, self.ssh.pid], "none (ssh SOCKS has no auth)",
                    "sshd + ssh client; encrypted (default cipher)"))
        except Exception as exc:  # noqa: BLE001
            self.unavailable["ssh"] = f"failed to start: {exc}"
        for k, why in self.unavailable.items():
            log(f"{k} unavailable: {why}")

    def _add_peer(self, key: str, label: str, start: Any, user: str | None, pw: str | None, auth: str,
                  note: str) -> None:
        try:
            got = start()
        except Exception as exc:  # noqa: BLE001
            self.unavailable[key] = f"failed to start: {exc}"
            return
        if got is None:
            self.unavailable[key] = "not installed"
            return
        proc, port = got
        try:
            procs.wait_socks(port, self.target.echo_port, user, pw, 15, proc)
        except Exception as exc:  # noqa: BLE001
            self.unavailable[key] = f"does not relay: {exc}"
            self.stack.stop(proc)
            return
        self.systems.append(System(key, label, Via(port, user, pw), [proc.pid], auth, note))

    def proxies(self) -> list[System]:
        return [s for s in self.systems if s.key != "direct"]

    # -- running ------------------------------------------------------------------------------------
    def _each(self, scenario: str, fn: Any, systems: list[System] | None = None, rounds: int = 1) -> None:
        try:
            self.check_fd_leak()
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"restarting node-direct: {exc}")
        log(f"scenario {scenario}" + (f" ({rounds} rounds)" if rounds > 1 else ""))
        got: dict[str, list[dict]] = collections.defaultdict(list)
        for rnd in range(rounds):
            for s in systems if systems is not None else self.systems:
                try:
                    res = fn(s)
                    got[s.key].append(res)
                    log(f"  {s.key:12s} {summary(scenario, res)}")
                except Exception as exc:  # noqa: BLE001
                    msg = f"{scenario}/{s.key} (round {rnd + 1}): {exc}"
                    self.errors.append(msg)
                    self.results[scenario][s.key] = {"error": str(exc)[:300]}
                    log(f"  {s.key:12s} ERROR {exc}")
                    traceback.print_exc(file=sys.stderr)
                time.sleep(0.2)
        metric = {"bulk1": "MBps", "bulk8": "MBps", "rate50": "rate", "rate1": "p50_us", "rtt": "p50_us"}.get(scenario)
        for key, runs in got.items():
            if metric and len(runs) > 1:
                runs.sort(key=lambda r: r.get(metric) or 0)
                med = dict(runs[len(runs) // 2])
                med["rounds"] = [r.get(metric) for r in runs]
                self.results[scenario][key] = med
            elif runs:
                self.results[scenario][key] = runs[-1]

    def check_fd_leak(self) -> None:
        """The direct-exit node leaks sockets (see the report); restart it before it hits RLIMIT_NOFILE so
        the next scenario measures the relay, not the leak. Every restart is recorded."""
        sysm = next((s for s in self.systems if s.key == "pxo_direct"), None)
        if sysm is None or self.dnode.proc is None:
            return
        fds = procs.open_fds([self.dnode.proc.pid])
        if fds < self.nofile // 4:
            return
        log(f"node-direct holds {fds} fds after the sessions closed: restarting it")
        self.restarts.append(f"node-direct restarted holding {fds} open fds (RLIMIT_NOFILE {self.nofile})")
        self.stack.stop(self.dnode.proc)
        env = {k: self.dnode.env[k] for k in ("REQUEST_LOG", "DIRECT_EXIT", "DIRECT_EXIT_ALLOW_PRIVATE")}
        self.dnode = procs.start_node(self.stack, self.dnode.env["DATABASE_URL"], "node-direct", env)
        cred = self.creds["loop"]
        procs.wait_socks(self.dnode.proxy_port, self.target.echo_port, cred.connection_id, cred.password, 30)
        sysm.via = Via(self.dnode.proxy_port, cred.connection_id, cred.password)
        sysm.pids = [self.dnode.proc.pid]

    def run_loopback(self) -> None:
        c, t = self.cfg, self.target

        def bulk(streams: int) -> Any:
            def fn(s: System) -> dict:
                cpu0 = procs.cpu_seconds(s.pids)
                r = self.lg.bulk(s.via, t.source_port, streams, c.bulk_s, c.warmup_s)
                cpu = procs.cpu_seconds(s.pids) - cpu0
                r["cpu_s"] = cpu
                if s.pids and r.get("all_bytes"):
                    r["cpu_s_per_GB"] = cpu / (r["all_bytes"] / 1e9)
                return r
            return fn

        n = c.repeat
        self._each("bulk1", bulk(1), rounds=n)
        self._each("bulk8", bulk(8))
        def rate50(s: System) -> dict:
            # proxyorch nodes insert the request-log batch of these sessions up to LOG_BATCH_S later: the CPU
            # window waits for it and the idle CPU of the wait is subtracted (measured just before)
            wait = LOG_BATCH_S + 0.3 if s.key.startswith("pxo_") and self.cfg.request_log else 0.0
            idle = 0.0
            if wait:
                i0 = procs.cpu_seconds(s.pids)
                time.sleep(0.5)
                idle = (procs.cpu_seconds(s.pids) - i0) / 0.5
            cpu0 = procs.cpu_seconds(s.pids)
            r = self.lg.rate(s.via, t.echo_port, 50, c.rate_s, c.warmup_s)
            time.sleep(wait)
            cpu = procs.cpu_seconds(s.pids) - cpu0
            if wait:
                cpu = max(0.0, cpu - idle * wait)
            # the CPU window also spans the warm-up, at about the same rate: sessions ≈ rate × (warm-up + run)
            n = r.get("rate", 0) * (c.rate_s + c.warmup_s)
            if s.pids and n:
                r["cpu_s"], r["cpu_us_per_session"] = cpu, cpu / n * 1e6
            return r

        self._each("rate50", rate50, rounds=n)
        self._each("rate1", lambda s: self.lg.rate(s.via, t.echo_port, 1, c.lat_s, c.warmup_s))
        self._each("rtt", lambda s: self.lg.rtt(s.via, t.echo_port, count=c.rtt_count), rounds=n)

    def run_memory(self) -> None:
        n = self.cfg.idle_sessions

        def fn(s: System) -> dict:
            time.sleep(0.5)
            fds_before = procs.open_fds(s.pids)
            before = procs.rss_bytes(s.pids)
            p = self.lg.start_idle(self.stack, f"idle-{s.key}", s.via, self.target.echo_port, n)
            try:
                info = lgmod.read_line(p, 300)
                time.sleep(1.0)
                after = procs.rss_bytes(s.pids)
            finally:
                if p.popen.stdin is not None:
                    p.popen.stdin.close()
                try:
                    p.popen.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                self.stack.stop(p)
            opened = int(info.get("opened", 0))
            time.sleep(1.5)
            fds_after_close = procs.open_fds(s.pids)
            res = {"sessions": opened, "errors": info.get("errors"), "open_seconds": info.get("open_seconds"),
                   "rss_before": before, "rss_after": after, "fds_before": fds_before,
                   "fds_after_close": fds_after_close}
            if opened:
                res["bytes_per_session"] = (after - before) / opened
                res["leaked_fds_per_session"] = (fds_after_close - fds_before) / opened
            return res

        systems = self.proxies()
        if self.cfg.quick:  # the goal's subject (and its direct-exit sibling) only
            systems = [s for s in systems if s.key.startswith("pxo_")]
        self._each("memory", fn, systems)

    # -- mobile-like links -----------------------------------------------------------------------------
    def run_mobile(self) -> None:
        t = self.target
        for prof in PROFILES:
            key = prof["key"]
            if key not in self.cfg.profiles:
                continue
            log(f"mobile profile {prof['label']}")
            started: list[Proc] = []
            try:
                p_tun, p_otun, p_ptun, p_ssh, p_src, p_echo = (procs.free_port() for _ in range(6))
                emu = self.stack.spawn(f"linkemu-{key}", [
                    procs.PY, "-m", "benchmarks.linkemu", "--rtt-ms", str(prof["rtt_ms"]),
                    "--rate-mbit", str(prof["mbit"]), "--pair", f"{p_tun}:{self.node.tunnel_port}",
                    "--pair", f"{p_otun}:{self.onode.tunnel_port}",
                    "--pair", f"{p_ptun}:{self.pnode.tunnel_port}",
                    "--pair", f"{p_src}:{t.source_port}", "--pair", f"{p_echo}:{t.echo_port}",
                    *(["--pair", f"{p_ssh}:{self.sshd.port}"] if self.ssh_ok() else [])],
                    {**os.environ, "PYTHONPATH": str(procs.ROOT)}, pin="load")
                started.append(emu)
                procs.wait_port(p_echo, 15, emu.popen)
                cred = self.creds[key]
                agent = procs.start_agent(self.stack, f"agent-{key}", self.node, cred, server_port=p_tun)
                started.append(agent)
                procs.wait_socks(self.node.proxy_port, t.echo_port, cred.connection_id, cred.password, 40, agent)
                ocred = self.creds[key + "-opt"]
                oagent = procs.start_agent(self.stack, f"agent-{key}-opt", self.onode, ocred, server_port=p_otun)
                started.append(oagent)
                procs.wait_socks(self.onode.proxy_port, t.echo_port, ocred.connection_id, ocred.password, 40,
                                 oagent)
                pcred = self.creds[key + "-plain"]
                pagent = procs.start_agent(self.stack, f"agent-{key}-plain", self.pnode, pcred, server_port=p_ptun)
                started.append(pagent)
                procs.wait_socks(self.pnode.proxy_port, t.echo_port, pcred.connection_id, pcred.password, 40,
                                 pagent)
                systems = [
                    (System("direct", "direct TCP over the link", Via(), [], "—"), p_src, p_echo),
                    (System("pxo_tunnel", "proxyorch via device tunnel", Via(self.node.proxy_port,
                            cred.connection_id, cred.password), [self.node.proc.pid, agent.pid], ""),
                     t.source_port, t.echo_port),
                    (System("pxo_opt", "proxyorch tunnel, optimistic open", Via(self.onode.proxy_port,
                            ocred.connection_id, ocred.password), [self.onode.proc.pid, oagent.pid], ""),
                     t.source_port, t.echo_port),
                    (System("pxo_plain", "proxyorch tunnel, TLS off", Via(self.pnode.proxy_port,
                            pcred.connection_id, pcred.password), [self.pnode.proc.pid, pagent.pid], ""),
                     t.source_port, t.echo_port),
                ]
                if self.ssh_ok():
                    ssh, sport = procs.start_ssh_reverse(self.stack, self.sshd, f"ssh-R-{key}", p_ssh)
                    started.append(ssh)
                    procs.wait_socks(sport, t.echo_port, None, None, 20, ssh)
                    systems.append((System("ssh", "OpenSSH -R", Via(sport), [self.sshd.proc.pid, ssh.pid], ""),
                                    t.source_port, t.echo_port))
                for s, src, echo in systems:
                    try:
                        layers = None
                        if s.key in ("pxo_tunnel", "pxo_opt", "pxo_plain"):
                            node = {"pxo_tunnel": self.node, "pxo_opt": self.onode, "pxo_plain": self.pnode}[s.key]
                            link = {"pxo_tunnel": p_tun, "pxo_opt": p_otun, "pxo_plain": p_ptun}[s.key]
                            layers = {  # the download's path: agent → link → node → client
                                "agent kernel send queue (agent → link)": ("send", None, link),
                                "link emulator kernel receive queue (its socket from the agent)": ("recv", link, None),
                                "node kernel receive queue (link → node)": ("recv", node.tunnel_port, None),
                                "node kernel send queues (node → clients)": ("send", node.proxy_port, None),
                            }
                        elif s.key == "ssh":
                            layers = {"ssh client kernel send queue (ssh → link)": ("send", None, p_ssh),
                                      "link emulator kernel receive queue (its socket from ssh)": ("recv", p_ssh, None),
                                      "sshd kernel receive queue (link → sshd)": ("recv", self.sshd.port, None)}
                        self.results[f"mobile_{key}"][s.key] = self._mobile_one(s, src, echo, prof, layers)
                        r = self.results[f"mobile_{key}"][s.key]
                        log(f"  {s.key:12s} new session {r['new_session'].get('total_us')} us; "
                            f"bulk {r['bulk']['MBps']:.2f} MB/s ({r['fraction_of_cap']:.2f} x cap), "
                            f"RTT under bulk p50 {r['hol']['p50_us']} us p99 {r['hol']['p99_us']} us "
                            f"({r['hol']['count']} samples, open {r['hol'].get('open_us')} us)")
                    except Exception as exc:  # noqa: BLE001
                        self.errors.append(f"mobile_{key}/{s.key}: {exc}")
                        self.results[f"mobile_{key}"][s.key] = {"error": str(exc)[:300]}
                        log(f"  {s.key:12s} ERROR {exc}")
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"mobile_{key}: {exc}")
                log(f"mobile {key} ERROR {exc}")
                traceback.print_exc(file=sys.stderr)
            finally:
                for p in reversed(started):
                    self.stack.stop(p)

    def ssh_ok(self) -> bool:
        return "ssh" not in self.unavailable and getattr(self, "sshd", None) is not None

    def _wait_drained(self, s: System, echo: int, rtt_ms: float, limit_s: float = 30.0) -> float:
        """Wait until a fresh session's round trip is back near the link RTT (queues drained)."""
        t0 = time.time()
        while time.time() - t0 < limit_s:
            try:
                r = self.lg.rtt(s.via, echo, count=3, interval_ms=5)
                if r.get("p50_us") is not None and r["p50_us"] / 1000 < rtt_ms * 1.3 + 5:
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
        return time.time() - t0

    def _mobile_one(self, s: System, src: int, echo: int, prof: dict, layers: dict | None = None) -> dict:
        c = self.cfg
        cap = prof["mbit"] * 1e6 / 8 / 1e6  # MB/s
        self._wait_drained(s, echo, prof["rtt_ms"])
        idle = self.lg.rtt(s.via, echo, count=20, interval_ms=10)
        # a new session's SOCKS handshake + CONNECT reply + first 64 B echo (time to the first response byte)
        news = []
        for _ in range(3 if c.quick else 7):
            r = self.lg.rtt(s.via, echo, count=1, interval_ms=1)
            if r.get("first_us", -1) >= 0:
                news.append({"open_us": r["open_us"], "first_us": r["first_us"],
                             "total_us": r["open_us"] + r["first_us"]})
        news.sort(key=lambda x: x["total_us"])
        new_session = dict(news[len(news) // 2], samples=len(news)) if news else {}
        bulk = self.lg.bulk(s.via, src, 1, c.mobile_bulk_s, c.mobile_warm_s)
        drain_s = self._wait_drained(s, echo, prof["rtt_ms"])
        # interactive stream while a bulk stream saturates the same link (and the same tunnel): a new session
        # is opened (its open time is reported) and then pings every 20 ms for hol_s seconds
        bg = self.lg.start_bulk(self.stack, f"bg-{s.key}", s.via, src, 1, 600, c.mobile_warm_s)
        stop = threading.Event()
        samples: dict[str, list[int]] = collections.defaultdict(list)

        def sample() -> None:  # the queue at each layer while the interactive stream pings
            while not stop.wait(0.1):
                for name, (which, sport, dport) in (layers or {}).items():
                    rq, sq = procs.socket_queues(sport, dport)
                    samples[name].append(sq if which == "send" else rq)

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            time.sleep(c.mobile_warm_s)
            sampler.start()
            hol_from = time.monotonic()
            hol = self.lg.rtt(s.via, echo, duration=c.hol_s, interval_ms=20)
            hol["window"] = (hol_from, time.monotonic())
        finally:
            stop.set()
            bg_res = lgmod.finish(self.stack, bg, timeout=30, interrupt=True)
        queues = {}
        for name, v in samples.items():
            v.sort()
            queues[name] = {"p50": v[len(v) // 2], "max": v[-1], "samples": len(v)} if v else {}
        self._wait_drained(s, echo, prof["rtt_ms"])
        return {"cap_MBps": cap, "rtt_ms": prof["rtt_ms"], "idle_rtt": idle, "new_session": new_session, "bulk": bulk,
                "fraction_of_cap": bulk.get("MBps", 0) / cap, "hol": hol, "hol_bulk_MBps": bg_res.get("MBps"),
                "drain_after_bulk_s": drain_s, "queues": queues}

    # -- profiles of the product ---------------------------------------------------------------------
    def profile(self, what: str, out_dir: Path) -> dict:
        """py-spy on the node and the agent while one tunnel scenario runs; top self-time functions."""
        spy = Path(procs.PY).parent / "py-spy"
        if not spy.exists():
            return {"error": "py-spy not installed (pip install py-spy)"}
        sysm = next(s for s in self.systems if s.key == "pxo_tunnel")
        d = self.cfg.profile_s
        out_dir.mkdir(parents=True, exist_ok=True)
        spies = {}
        for name, pid in (("node", self.node.proc.pid), ("agent", self.agent.pid)):
            raw = out_dir / f"{what}-{name}.txt"
            spies[name] = (raw, self.stack.spawn(f"py-spy-{what}-{name}", [
                str(spy), "record", "--pid", str(pid), "--duration", str(int(d)), "--rate", "250",
                "--format", "raw", "--nonblocking", "-o", str(raw)]))
        time.sleep(0.5)
        t = self.target
        if what == "bulk1":
            res = self.lg.bulk(sysm.via, t.source_port, 1, d - 1.0, 0.3)
        elif what == "rtt":
            res = self.lg.rtt(sysm.via, t.echo_port, duration=d - 1.0)
        else:
            res = self.lg.rate(sysm.via, t.echo_port, 50, d - 1.0, 0.3)
        out: dict[str, Any] = {"scenario": res}
        for name, (raw, proc) in spies.items():
            try:
                proc.popen.wait(d + 30)
            except subprocess.TimeoutExpired:
                pass
            self.stack.stop(proc)
            out[name] = top_frames(raw) if raw.exists() else {"error": proc.tail(500)}
        return out


_LINE = re.compile(r":\d+\)")
_PATH = re.compile(r"\((?:/[^()]*/)?(?:site-packages/|lib/python3\.\d+/)?")


def top_frames(raw: Path, n: int = 12) -> dict:
    """Self time per function (leaf frame) and inclusive time per function from py-spy raw output."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        lines = [_PATH.sub("(", f.strip()) for f in stack.split(";") if f.strip()]
        lines = [f for f in lines if not f.startswith("process ") and not f.startswith("thread ")]
        if not lines:
            continue
        self_t[lines[-1]] += k  # self time keeps the line number
        for f in {_LINE.sub(")", x) for x in lines}:
            incl[f] += k
    generic = ("_run_code", "_run_module_as_main", "<module>", "main (", "cmd_", "_run (", "run (uvloop",
               "Runner.run", "Thread._bootstrap", "Thread.run")
    incl = collections.Counter({f: c for f, c in incl.items() if not f.startswith(generic)})
    return {"samples": total, "self": [(f, c / total) for f, c in self_t.most_common(n)] if total else [],
            "inclusive": [(f, c / total) for f, c in incl.most_common(n + 8)] if total else []}


def summary(scenario: str, r: dict) -> str:
    if "error" in r:
        return f"error {r['error']}"
    if scenario.startswith("bulk"):
        extra = f", {r['cpu_s_per_GB']:.2f} CPU s/GB" if "cpu_s_per_GB" in r else ""
        return f"{r['MBps']:.1f} MB/s ({r['errors']} err){extra}"
    if scenario.startswith("rate"):
        return f"{r['rate']:.0f} sess/s p50 {r['p50_us']} us p99 {r['p99_us']} us ({r['errors']} err)"
    if scenario == "rtt":
        return f"p50 {r['p50_us']} us p99 {r['p99_us']} us"
    if scenario == "memory":
        b = r.get("bytes_per_session")
        return f"{r['sessions']} sessions, {b / 1024:.1f} KiB/session" if b is not None else str(r)
    return str(r)
