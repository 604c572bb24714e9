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

from . import accounts, db
from .bus import InvalidationBus, RedisBus, make_bus
from .config import Settings

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


class FaultInjectingClickHouse:
    """Test hook (``CLICKHOUSE_FAULT_FILE``): inserts fail while that file exists, as if ClickHouse were down."""

    def __init__(self, inner, flag_path: str) -> None:  # noqa: ANN001
        self.inner = inner
        self.flag = Path(flag_path)

    def insert_rows(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if self.flag.exists():
            raise ConnectionError("ClickHouse unavailable (fault injected)")
        return self.inner.insert_rows(*args, **kwargs)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)


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
        self.api_runner = None
        self.presence = None      # proxyorch.presence.Presence in a cluster (REDIS_URL or RELAY_PORT)
        self.relay_server = None  # device_tunnel.relay.RelayServer when RELAY_PORT is set
        self.relay_metrics = None
        self.admin_token = ""
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        Path(s.data_dir).mkdir(parents=True, exist_ok=True)
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
        await self._start_presence()
        self.tunnels = TunnelServer(
            node_name=s.node_name,
            authenticate=lambda did, tok, meta: accounts.check_device_token(self.pool, did, tok),
            presence=self._device_presence,
            ping_interval=s.tunnel_ping_s, dead_after=s.tunnel_dead_after, window=s.tunnel_window,
            max_window=s.tunnel_max_window, conn_window=s.tunnel_conn_window,
            memory_budget=s.tunnel_memory_budget)
        if s.direct_exit:
            exit_ = DirectExit(s.connect_timeout_s, s.direct_exit_allow_private)
        elif s.relay_port and self.presence is not None:
            exit_ = self._make_relay()
        else:
            exit_ = TunnelExit(self.tunnels.registry)
        self.request_log = self._make_request_log()
        self.proxy = ProxyServer(
            auth_cache=cache, exit=exit_, sessions=SessionRegistry(), node_name=s.node_name,
            limiter=FailureLimiter(s.auth_fail_limit, s.auth_fail_window_s), request_log=self.request_log,
            handshake_timeout=s.handshake_timeout_s, open_timeout=s.connect_timeout_s + 5)
        await self.bus.start(self._bus_event)
        # Devices that were online on this node before a crash are offline until they reconnect.
        await self.pool.execute("UPDATE devices SET online = false, node = NULL WHERE node = $1", s.node_name)
        await self.tunnels.start(s.bind_host, s.tunnel_port)
        if self.relay_server is not None:
            await self.relay_server.start(s.bind_host, s.relay_port)
        await self.proxy.start(s.bind_host, s.proxy_port)
        await self._start_api()
        if self.request_log is not None:
            self._tasks.append(asyncio.create_task(self._traffic_reporter()))
        if self.presence is not None:
            await self.presence.refresh_now()  # start-up work may have delayed the first heartbeat
            self._tasks.append(asyncio.create_task(self._sweep_dead_nodes()))
        log.info("node %s: proxy :%d, tunnels :%d, api :%d", s.node_name, self.proxy.port, self.tunnels.port,
                 s.api_port)

    def relay_address(self) -> str:
        s = self.settings
        return s.relay_advertise or (f"127.0.0.1:{s.relay_port}" if s.relay_port else "")

    async def _start_presence(self) -> None:
        """In a cluster (REDIS_URL or RELAY_PORT): register this node; refuse a name that is live."""
        from .presence import NodeNameTaken, PostgresPresence, RedisPresence

        s = self.settings
        if not (s.redis_url or s.relay_port):
            return
        if s.relay_port and not s.cluster_secret:
            await self.pool.close()
            raise SystemExit("RELAY_PORT needs CLUSTER_SECRET (the secret every node of the cluster shares)")
        publish = self.bus.publish
        if s.redis_url:
            presence = RedisPresence(s.redis_url, s.node_name, self.relay_address(), s.presence_ttl_s, publish)
        else:
            presence = PostgresPresence(self.pool, s.node_name, self.relay_address(), s.presence_ttl_s, publish)
        try:
            await presence.start()
        except NodeNameTaken as exc:
            await self.pool.close()
            raise SystemExit(f"refusing to start: {exc}") from None
        self.presence = presence

    async def _device_presence(self, device_id: str, online: bool, meta: dict) -> None:
        await accounts.set_presence(self.pool, device_id, online, self.settings.node_name, meta)
        if self.presence is not None:
            if online:
                await self.presence.device_up(device_id)
            else:
                await self.presence.device_down(device_id)

    def _make_relay(self):  # noqa: ANN202
        from device_tunnel.relay import RelayMetrics, RelayPool, RelayServer, relay_config
        from proxy.cluster_exit import ClusterExit

        s = self.settings
        assert self.tunnels is not None and self.presence is not None
        config = relay_config(self.tunnels.config)
        self.relay_metrics = RelayMetrics()
        self.relay_server = RelayServer(node_name=s.node_name, secret=s.cluster_secret, registry=self.tunnels.registry,
                                        config=config, budget=self.tunnels.budget, metrics=self.relay_metrics)
        pool = RelayPool(node_name=s.node_name, secret=s.cluster_secret, config=config, budget=self.tunnels.budget,
                         metrics=self.relay_metrics)
        return ClusterExit(self.tunnels.registry, pool, self.presence.locate, self.presence.forget)

    def _bus_event(self, event: str) -> None:
        """Invalidations for the auth cache and presence; ``kill:`` also ends relayed streams held here."""
        self.proxy.handle_bus_event(event)  # type: ignore[union-attr]
        if self.presence is not None:
            self.presence.handle_event(event)
        if self.relay_server is not None and event.startswith("kill:"):
            self.relay_server.terminate_connection(event[5:], "connection deleted or dissociated")

    def _make_request_log(self):  # noqa: ANN202
        s = self.settings
        if not s.request_log:
            return None
        from proxy.request_log.clickhouse import make_client
        from proxy.request_log.writer import RequestLogWriter

        self.clickhouse = make_client(s.clickhouse_url, s.data_dir)
        self.clickhouse.apply_schema(s.log_retention_days)
        writer_client = self.clickhouse
        if s.clickhouse_fault_file:
            writer_client = FaultInjectingClickHouse(self.clickhouse, s.clickhouse_fault_file)
        writer = RequestLogWriter(lambda: writer_client, str(Path(s.data_dir) / "spool"),
                                  batch_rows=s.log_batch_rows, batch_seconds=s.log_batch_s)
        writer.start()
        return writer

    async def _sweep_dead_nodes(self) -> None:
        """Devices recorded online on a node that is no longer alive (killed, never restarted) are
        offline: ``devices.online`` / ``node`` follow the presence map (every node sweeps; idempotent)."""
        ttl = self.settings.presence_ttl_s
        while True:
            await asyncio.sleep(ttl)
            try:
                me = self.settings.node_name
                # a device the sweep of another node took for dead while our heartbeat was late
                await self.pool.execute(  # type: ignore[union-attr]
                    "UPDATE devices SET online = true, node = $1 WHERE remote_device_id = ANY($2::uuid[]) "
                    "AND node IS NULL AND last_seen < now() - make_interval(secs => $3)",
                    me, self.tunnels.registry.device_ids(), ttl)  # type: ignore[union-attr]
                live = [n["name"] for n in await self.presence.nodes()]  # type: ignore[union-attr]
                if me not in live:
                    continue  # our own view is broken (store trouble): change nothing
                await self.pool.execute(  # type: ignore[union-attr]
                    "UPDATE devices SET online = false, node = NULL WHERE online AND node IS NOT NULL "
                    "AND NOT (node = ANY($1::text[])) AND last_seen < now() - make_interval(secs => $2)",
                    live, ttl)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("dead-node sweep failed: %s", exc)

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
        site = web.TCPSite(self.api_runner, self.settings.bind_host, self.settings.api_port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        """Graceful: stop accepting, tell devices to go away, drain sessions, flush the log."""
        s = self.settings
        if self.proxy is not None:
            self.proxy.stop_accepting()
        if self.relay_server is not None:
            self.relay_server.stop_accepting()
            self.relay_server.go_away()
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
        for t in self._tasks:
            t.cancel()
        if self.presence is not None:
            await self.presence.close()
        if self.relay_server is not None:
            self.relay_server.close_all()
        close_exit = getattr(self.proxy.exit if self.proxy is not None else None, "close", None)
        if close_exit is not None:
            close_exit()
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
    await stop.wait()
    log.info("shutting down")
    await node.stop()
