"""One node: wires the store, the bus, the auth cache, the tunnel server, the proxy and the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from pathlib import Path

import asyncpg

from device_tunnel.listener import Listener
from device_tunnel.server import TunnelServer
from proxy.auth_cache.cache import AuthCache
from proxy.auth_cache.store import PostgresCredentialStore
from proxy.exits import DirectExit, TunnelExit
from proxy.ratelimit import FailureLimiter
from proxy.server import ProxyServer
from proxy.sessions import SessionRegistry
from proxy.usage_flush import UsageKeeper
from rms.crypto import PasswordBox, load_or_create_key
from rms.service import Rms

from . import accounts, db, tunnel_cert
from .bus import InvalidationBus, RedisBus, make_bus
from .cluster import ClusterRouting
from .config import Settings
from .rotation import RotationManager
from .rotation_forward import RotationForwarder
from .tasks import TaskSet

log = logging.getLogger(__name__)


def resolve_database_url(settings: Settings) -> str:
    """``DATABASE_URL`` or the embedded server under ``DATA_DIR`` (started on first use)."""
    if settings.database_url:
        return settings.database_url
    return db.start_embedded_postgres(settings.data_dir)


def load_admin_token(settings: Settings) -> tuple[str, bool]:
    """``ADMIN_TOKEN`` or the token stored under ``DATA_DIR`` (generated once); (token, created_now)."""
    if settings.admin_token:
        return settings.admin_token, False
    path = Path(settings.data_dir) / "admin.token"
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "adm_" + secrets.token_urlsafe(32)
    path.write_text(token)
    path.chmod(0o600)
    return token, True


class Node:
    """Everything one ``proxyorch serve`` process runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.read_pool: asyncpg.Pool | None = None  # the credential store's (see start)
        self.bus: InvalidationBus | None = None
        self.tunnels: TunnelServer | None = None
        self.proxy: ProxyServer | None = None
        self.rms: Rms | None = None
        self.usage: UsageKeeper | None = None
        self.request_log = None
        self.rotations: RotationManager | None = None
        self.clickhouse = None
        self.log_reader = None
        self.api_runner = None
        self.api_listener: Listener | None = None
        self.internal_listener: Listener | None = None  # worker 0 of --workers: 127.0.0.1 only
        self.cluster: ClusterRouting | None = None  # presence and relay (REDIS_URL or RELAY_PORT)
        self.admin_token = ""
        self.tunnel_fingerprint: str | None = None  # None = plaintext tunnel (TUNNEL_TLS=0)
        self._tasks = TaskSet("node")
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        Path(s.data_dir).mkdir(parents=True, exist_ok=True)
        tunnel_ssl = self._tunnel_tls()  # a bad certificate fails the start before anything runs
        url = await asyncio.to_thread(resolve_database_url, s)
        self.database_url = url
        self.pool = await db.create_pool(url)
        await db.migrate(self.pool)
        self.admin_token, created = load_admin_token(s)
        if created:
            print(f"admin token (stored in {Path(s.data_dir) / 'admin.token'}): {self.admin_token}", flush=True)

        box = PasswordBox(load_or_create_key(s.rms_key, s.data_dir))
        self.bus = make_bus(url, s.redis_url)
        publish = self.bus.publish if isinstance(self.bus, RedisBus) else None
        self.rms = Rms(self.pool, box, publish)

        # credential reads (every cache miss) on their own small pool that skips asyncpg's reset round trip
        self.read_pool = await db.create_pool(url, min_size=1, max_size=4, reset=False)
        store = PostgresCredentialStore(self.read_pool)
        cache = AuthCache(store.fetch, ttl=s.auth_cache_ttl_ms / 1000)
        self.cluster = ClusterRouting(s, self.pool, self.bus)
        try:
            await self.cluster.start_presence()
        except SystemExit:
            await self.read_pool.close()
            await self.pool.close()
            raise
        self.tunnels = TunnelServer(
            node_name=s.node_name,
            authenticate=lambda did, tok, meta: accounts.check_device_token(self.pool, did, tok),
            presence=self.cluster.device_presence,
            ping_interval=s.tunnel_ping_s, dead_after=s.tunnel_dead_after, window=s.tunnel_window,
            max_window=s.tunnel_max_window, conn_window=s.tunnel_conn_window,
            memory_budget=s.tunnel_memory_budget, limiter=FailureLimiter(s.auth_fail_limit, s.auth_fail_window_s),
            open_timeout=s.connect_timeout_s + 5)
        if s.direct_exit:
            exit_ = DirectExit(s.connect_timeout_s, s.direct_exit_allow_private)
        else:
            exit_ = self.cluster.make_exit(self.tunnels) or TunnelExit(self.tunnels.registry)
        self.request_log = self._make_request_log()
        self.proxy = ProxyServer(
            auth_cache=cache, exit=exit_, sessions=SessionRegistry(), node_name=s.node_name,
            limiter=FailureLimiter(s.auth_fail_limit, s.auth_fail_window_s), request_log=self.request_log,
            handshake_timeout=s.handshake_timeout_s, open_timeout=s.connect_timeout_s + 5,
            rotate_wait=s.rotate_wait_s, optimistic_open=s.optimistic_open,
            max_unauth_per_ip=s.max_unauth_per_ip)
        self.proxy.pools = self.cluster.make_pools()
        self.rms.local = self._bus_event  # a change through this node's API applies here before it answers
        if self.cluster.relay_server is not None:  # relayed opens wait out a rotation as local ones do
            self.cluster.relay_server.gate = self.proxy.gate
        forwarder = RotationForwarder(s.cluster_secret, s.rotate_wait_s) if (
            self.cluster.presence is not None and s.cluster_secret) else None
        self.rotations = RotationManager(self, forwarder)  # a device on another node: rotated there
        if s.redis_url:  # several nodes: session slots and rate budget shared through Redis
            from proxy.cluster_limits import ClusterLimits
            from proxy.limits import LimitBook

            self.proxy.limits = LimitBook(leased=True)
            self.proxy.cluster = ClusterLimits(s.redis_url, s.node_name, self.proxy.limits)
            self.proxy.cluster.start()
        self.usage = UsageKeeper(self.pool, self.proxy, store, s.usage_flush_s)
        await self.usage.start()
        await self.bus.start(self._bus_event)
        # Devices that were online on this node before a crash are offline until they reconnect.
        await self.pool.execute("UPDATE devices SET online = false, node = NULL WHERE node = $1", s.node_name)
        await self.tunnels.start(s.bind_host, s.tunnel_port, ssl=tunnel_ssl, reuse_port=s.reuse_port)
        await self.cluster.start_listeners(s.relay_bind_host or s.bind_host)
        await self.proxy.start(s.bind_host, s.proxy_port, reuse_port=s.reuse_port)
        await self._start_api()
        self.rotations.start()
        if self.request_log is not None:
            self._tasks.spawn(self._traffic_reporter(), name="traffic reporter")
        sweeper = await self.cluster.started(self.tunnels.registry)
        if sweeper is not None:
            self._tasks.spawn(sweeper, name="presence sweeper")
        log.info("node %s: proxy :%d, tunnels :%d, api :%d", s.node_name, self.proxy.port, self.tunnels.port,
                 s.api_port)

    def _tunnel_tls(self):  # noqa: ANN202
        """The tunnel's TLS context (certificate created once when none is configured), or None."""
        s = self.settings
        if not s.tunnel_tls:
            log.warning("TUNNEL_TLS=0: the tunnel port is PLAINTEXT (device tokens and traffic in the clear); "
                        "use it only where TLS is terminated in front of the node")
            return None
        cert = tunnel_cert.load_or_create(s)
        self.tunnel_fingerprint = cert.fingerprint
        log.info("tunnel TLS certificate %s%s, fingerprint %s", cert.cert_file,
                 " (created)" if cert.created else "", cert.fingerprint)
        return cert.context()

    def relay_address(self) -> str:
        return self.cluster.relay_address() if self.cluster is not None else ""

    def _bus_event(self, event: str) -> None:
        self.proxy.handle_bus_event(event)  # type: ignore[union-attr]
        if self.cluster is not None:
            self.cluster.bus_event(event)

    def _make_request_log(self):  # noqa: ANN202
        s = self.settings
        if not s.request_log:
            return None
        from proxy.request_log.clickhouse import make_client
        from proxy.request_log.remote import LocalLogReader, RemoteLogReader, RemoteLogSink
        from proxy.request_log.writer import RequestLogWriter

        if s.log_store_url:  # another node owns the store: send batches there, read from there
            writer_client = RemoteLogSink(s.log_store_url, s.cluster_secret)
            self.log_reader = RemoteLogReader(s.log_store_url, s.cluster_secret)
        else:
            self.clickhouse = make_client(s.clickhouse_url, s.data_dir)
            self.clickhouse.apply_schema(s.log_retention_days)
            writer_client = self.clickhouse
            self.log_reader = LocalLogReader(self.clickhouse)
        if s.test_only_clickhouse_fault_file:
            from proxy.request_log.fault_hook import FaultInjectingClickHouse

            writer_client = FaultInjectingClickHouse(writer_client, s.test_only_clickhouse_fault_file)
        writer = RequestLogWriter(lambda: writer_client, str(Path(s.data_dir) / "spool"),
                                  batch_rows=s.log_batch_rows, batch_seconds=s.log_batch_s)
        writer.start()
        return writer

    async def _traffic_reporter(self) -> None:
        while True:
            await asyncio.sleep(self.settings.bandwidth_flush_s)
            for session in list(self.proxy.sessions.all):  # type: ignore[union-attr]
                session.report_traffic()

    async def _start_api(self) -> None:
        from aiohttp import web

        from marketplace_api.app import create_app

        app = create_app(self)
        self.api_runner = web.AppRunner(app, access_log=None)
        await self.api_runner.setup()
        s = self.settings
        # accepted by the EMFILE-safe listener (aiohttp's TCPSite would spin at the descriptor limit)
        self.api_listener = Listener(self.api_runner.server)  # type: ignore[arg-type]
        await self.api_listener.start(s.bind_host, s.api_port, backlog=1024, reuse_port=s.reuse_port)
        if s.internal_api_port:  # a supervisor's worker: its own address for the other workers (API_ADVERTISE)
            self.internal_listener = Listener(self.api_runner.server)  # type: ignore[arg-type]
            await self.internal_listener.start(s.internal_api_host, s.internal_api_port, backlog=1024)

    async def abandon_start(self) -> None:
        """After a failed :meth:`start`: free this node's name in the presence map first (a corrected
        restart must not be refused as a live duplicate), then close whatever did start."""
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            with contextlib.suppress(Exception):
                await cluster.close()
        with contextlib.suppress(Exception):
            await self.stop()

    async def stop(self) -> None:
        """Graceful: stop accepting, tell devices to go away, drain sessions, flush the log."""
        s = self.settings
        if self.proxy is not None:
            self.proxy.stop_accepting()
        if self.cluster is not None:
            self.cluster.go_away()
        if self.tunnels is not None:
            self.tunnels.stop_accepting()
            self.tunnels.go_away()
        if self.proxy is not None:
            deadline = asyncio.get_running_loop().time() + s.drain_timeout_s
            while self.proxy.sessions.all and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            for session in list(self.proxy.sessions.all):
                session.terminate("node shutting down")
            for session in list(self.proxy.handshaking):
                session.terminate("node shutting down")
            await asyncio.sleep(0)
        await self._tasks.close()
        if self.rotations is not None:
            await self.rotations.stop()
        if self.usage is not None:
            await self.usage.close()  # after the sessions ended: their last bytes are written
        if self.proxy is not None and self.proxy.cluster is not None:
            await self.proxy.cluster.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.tunnels is not None:
            for device_id in self.tunnels.registry.device_ids():
                await accounts.set_presence(self.pool, device_id, False, s.node_name, {})
            self.tunnels.close_all()
            await asyncio.sleep(0)
            await self.tunnels.wait_tasks()
        if self.api_listener is not None:
            self.api_listener.close()
        if self.internal_listener is not None:
            self.internal_listener.close()
        if self.api_runner is not None:
            await self.api_runner.cleanup()
        if self.request_log is not None:
            await asyncio.to_thread(self.request_log.close)
        if self.log_reader is not None:
            await self.log_reader.close()
        if self.bus is not None:
            await self.bus.close()
        if self.read_pool is not None:
            await self.read_pool.close()
        if self.pool is not None:
            await self.pool.close()
        self.stopped.set()


async def serve(settings: Settings) -> None:
    """Run a node until SIGINT/SIGTERM, then shut down gracefully."""
    node = Node(settings)
    try:
        await node.start()
    except BaseException:
        # a start that failed part-way (a port in use, the database gone) gives back what it took,
        # above all this node's name in the presence map: a corrected restart must not be refused
        await node.abandon_start()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"proxyorch ready: proxy {settings.bind_host}:{node.proxy.port} tunnel {node.tunnels.port} "
          f"api {settings.api_port}", flush=True)
    if node.tunnel_fingerprint:
        print(f"tunnel TLS fingerprint {node.tunnel_fingerprint} (agents: --server-fingerprint)", flush=True)
    await stop.wait()
    log.info("shutting down")
    await node.stop()
