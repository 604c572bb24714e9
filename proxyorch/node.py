"""One node: wires the store, the bus, the auth cache, the tunnel server, the proxy and the API."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from pathlib import Path

import asyncpg

from device_tunnel.server import TunnelServer
from proxy.auth_cache.cache import AuthCache
from proxy.auth_cache.store import PostgresCredentialStore
from proxy.exits import DirectExit, TunnelExit
from proxy.ratelimit import FailureLimiter
from proxy.server import ProxyServer
from proxy.sessions import SessionRegistry
from rms.crypto import PasswordBox, load_or_create_key
from rms.service import Rms

from . import accounts, db, tunnel_cert
from .bus import InvalidationBus, RedisBus, make_bus
from .config import Settings
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
        self.bus: InvalidationBus | None = None
        self.tunnels: TunnelServer | None = None
        self.proxy: ProxyServer | None = None
        self.rms: Rms | None = None
        self.request_log = None
        self.clickhouse = None
        self.log_reader = None
        self.api_runner = None
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

        store = PostgresCredentialStore(self.pool)
        cache = AuthCache(store.fetch, ttl=s.auth_cache_ttl_ms / 1000)
        self.tunnels = TunnelServer(
            node_name=s.node_name,
            authenticate=lambda did, tok, meta: accounts.check_device_token(self.pool, did, tok),
            presence=lambda did, online, meta: accounts.set_presence(self.pool, did, online, s.node_name, meta),
            ping_interval=s.tunnel_ping_s, dead_after=s.tunnel_dead_after, window=s.tunnel_window,
            max_window=s.tunnel_max_window, conn_window=s.tunnel_conn_window,
            memory_budget=s.tunnel_memory_budget)
        if s.direct_exit:
            exit_ = DirectExit(s.connect_timeout_s, s.direct_exit_allow_private)
        else:
            exit_ = TunnelExit(self.tunnels.registry)
        self.request_log = self._make_request_log()
        self.proxy = ProxyServer(
            auth_cache=cache, exit=exit_, sessions=SessionRegistry(), node_name=s.node_name,
            limiter=FailureLimiter(s.auth_fail_limit, s.auth_fail_window_s), request_log=self.request_log,
            handshake_timeout=s.handshake_timeout_s, open_timeout=s.connect_timeout_s + 5)
        await self.bus.start(self.proxy.handle_bus_event)
        # Devices that were online on this node before a crash are offline until they reconnect.
        await self.pool.execute("UPDATE devices SET online = false, node = NULL WHERE node = $1", s.node_name)
        await self.tunnels.start(s.bind_host, s.tunnel_port, ssl=tunnel_ssl, reuse_port=s.reuse_port)
        await self.proxy.start(s.bind_host, s.proxy_port, reuse_port=s.reuse_port)
        await self._start_api()
        if self.request_log is not None:
            self._tasks.spawn(self._traffic_reporter(), name="traffic reporter")
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
        site = web.TCPSite(self.api_runner, s.bind_host, s.api_port, reuse_address=True, reuse_port=s.reuse_port or None)
        await site.start()
        if s.internal_api_port:  # the supervisor's worker 0: reachable by the other workers alone
            await web.TCPSite(self.api_runner, "127.0.0.1", s.internal_api_port, reuse_address=True).start()

    async def stop(self) -> None:
        """Graceful: stop accepting, tell devices to go away, drain sessions, flush the log."""
        s = self.settings
        if self.proxy is not None:
            self.proxy.stop_accepting()
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
        if self.tunnels is not None:
            for device_id in self.tunnels.registry.device_ids():
                await accounts.set_presence(self.pool, device_id, False, s.node_name, {})
            self.tunnels.close_all()
            await asyncio.sleep(0)
            await self.tunnels.wait_tasks()
        if self.api_runner is not None:
            await self.api_runner.cleanup()
        if self.request_log is not None:
            await asyncio.to_thread(self.request_log.close)
        if self.log_reader is not None:
            await self.log_reader.close()
        if self.bus is not None:
            await self.bus.close()
        if self.pool is not None:
            await self.pool.close()
        self.stopped.set()


async def serve(settings: Settings) -> None:
    """Run a node until SIGINT/SIGTERM, then shut down gracefully."""
    node = Node(settings)
    await node.start()
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
