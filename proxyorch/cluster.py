"""Cluster routing of one node: presence, the relay listener and pool, the dead-node sweep.

Active when ``REDIS_URL`` or ``RELAY_PORT`` is set; a single node without either runs none of it.
Relay links are TLS 1.3 with the tunnel certificate, which the nodes of a cluster share; the dialer
pins that certificate (its own fingerprint), so a node with another certificate can neither be dialled
nor pass for a peer. ``RELAY_TLS=0`` makes them plain TCP with only the HMAC handshake.
The node calls, in order: :meth:`ClusterRouting.start_presence` (refuses a live ``NODE_NAME``),
:meth:`device_presence` as the tunnel server's presence hook, :meth:`make_exit`, :meth:`bus_event`
for every bus event, :meth:`start_listeners`, :meth:`started` (returns the sweeper to own), and at
shutdown :meth:`go_away` then :meth:`close`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import accounts
from .config import Settings

log = logging.getLogger(__name__)


class ClusterRouting:
    """What one node runs to serve devices held by its peers and to let them serve its own."""

    def __init__(self, settings: Settings, pool: Any, bus: Any) -> None:
        self.settings = settings
        self.pool = pool
        self.bus = bus
        self.presence: Any = None        # proxyorch.presence.Presence
        self.relay_server: Any = None    # device_tunnel.relay.RelayServer (RELAY_PORT set)
        self.relay_metrics: Any = None
        self.exit: Any = None
        self.registry: Any = None
        self.relay_fingerprint: str | None = None  # the pinned certificate; None = plaintext links
        self.pools: Any = None  # proxy.pool_cluster.ClusterPools (relaying node)
        self._relay_ssl: Any = None
        self._relay_client: tuple[Any, Any] = (None, None)  # (client context, pin verifier)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.redis_url or self.settings.relay_port)

    def relay_address(self) -> str:
        s = self.settings
        return s.relay_advertise or (f"127.0.0.1:{s.relay_port}" if s.relay_port else "")

    def api_address(self) -> str:
        """The API URL the other nodes call (``API_ADVERTISE``, default ``http://127.0.0.1:API_PORT``)."""
        s = self.settings
        return (s.api_advertise or f"http://127.0.0.1:{s.api_port}").rstrip("/")

    async def start_presence(self) -> None:
        """Register this node; SystemExit while another live node has its name (or without a secret)."""
        from .presence import NodeNameTaken, PostgresPresence, RedisPresence

        s = self.settings
        if not self.enabled:
            return
        if s.relay_port and not s.cluster_secret:
            raise SystemExit("RELAY_PORT needs CLUSTER_SECRET (the secret every node of the cluster shares)")
        if s.relay_port:  # a bad certificate fails the start before this node is announced
            self._relay_client = self._relay_tls()
        publish = self.bus.publish
        if s.redis_url:
            presence = RedisPresence(s.redis_url, s.node_name, self.relay_address(), s.presence_ttl_s, publish,
                                     self.api_address())
        else:
            presence = PostgresPresence(self.pool, s.node_name, self.relay_address(), s.presence_ttl_s, publish,
                                        self.api_address())
        try:
            await presence.start()
        except NodeNameTaken as exc:
            raise SystemExit(f"refusing to start: {exc}") from None
        self.presence = presence

    async def device_presence(self, device_id: str, online: bool, meta: dict) -> None:
        """The tunnel server's presence hook: ``devices`` in PostgreSQL, then the presence map."""
        await accounts.set_presence(self.pool, device_id, online, self.settings.node_name, meta)
        if self.presence is not None:
            if online:
                await self.presence.device_up(device_id)
            else:
                await self.presence.device_down(device_id)

    def make_exit(self, tunnels: Any) -> Any:
        """A :class:`~proxy.cluster_exit.ClusterExit` when relaying (RELAY_PORT), else None."""
        from device_tunnel.relay import RelayMetrics, RelayPool, RelayServer, relay_config
        from proxy.cluster_exit import ClusterExit

        s = self.settings
        if not s.relay_port or self.presence is None:
            return None
        config = relay_config(tunnels.config)
        self.registry = tunnels.registry
        self.relay_metrics = RelayMetrics()
        self.relay_server = RelayServer(node_name=s.node_name, secret=s.cluster_secret, registry=tunnels.registry,
                                        config=config, budget=tunnels.budget, metrics=self.relay_metrics)
        client_ssl, verify = self._relay_client
        pool = RelayPool(node_name=s.node_name, secret=s.cluster_secret, config=config, budget=tunnels.budget,
                         metrics=self.relay_metrics, ssl=client_ssl, verify=verify)
        self.exit = ClusterExit(tunnels.registry, pool, self.presence.locate, self.presence.forget)
        return self.exit

    def make_pools(self) -> Any:
        """Pool routing across the nodes (members anywhere; sticky bindings in Redis when set), or None
        when this node does not relay. Call after :meth:`make_exit`."""
        from proxy.pool_cluster import ClusterPools

        if self.exit is None:
            return None
        self.pools = ClusterPools(self.presence.locate, self.registry.is_online, self.settings.redis_url)
        return self.pools

    def _relay_tls(self) -> tuple[Any, Any]:
        """(client context, pin verifier) for dialling peers; the listener's context is kept for
        :meth:`start_listeners`. The certificate is the tunnel's (TUNNEL_TLS_CERT/KEY, else the one
        under DATA_DIR), also when TUNNEL_TLS=0: a TLS terminator in front of the tunnel port does not
        cover the relay port."""
        from device_tunnel.tls import client_context, pin_verifier

        from .tunnel_cert import load_or_create

        if not self.settings.relay_tls:
            log.warning("RELAY_TLS=0: relay links are PLAINTEXT (client traffic in the clear between nodes); "
                        "use it only on a private network")
            return None, None
        cert = load_or_create(self.settings)
        self.relay_fingerprint = cert.fingerprint
        self._relay_ssl = cert.context()
        log.info("relay links over TLS with %s, peers pinned to %s", cert.cert_file, cert.fingerprint)
        return client_context(pin=cert.fingerprint), pin_verifier(cert.fingerprint)

    def bus_event(self, event: str) -> None:
        """Presence invalidations; ``kill:<id>`` also ends the relayed streams this node holds."""
        if self.presence is not None:
            self.presence.handle_event(event)
        if self.relay_server is not None and event.startswith("kill:"):
            self.relay_server.terminate_connection(event[5:], "connection deleted or dissociated")

    async def start_listeners(self, host: str) -> None:
        """The relay listener (TLS unless RELAY_TLS=0)."""
        if self.relay_server is not None:
            await self.relay_server.start(host, self.settings.relay_port, ssl=self._relay_ssl)

    async def control(self, device_id: str, body: dict, timeout: float) -> dict:
        """CONTROL to a device whose tunnel is on another node (see :meth:`ClusterExit.control`);
        :class:`~device_tunnel.relay.DeviceOffline` when relaying is off."""
        from device_tunnel.relay import DeviceOffline

        if self.exit is None:
            raise DeviceOffline("device offline (no tunnel on this node, and this node does not relay)")
        return await self.exit.control(device_id, body, timeout)

    async def started(self, registry: Any) -> Any:
        """The node is up: one heartbeat now (start-up work may have delayed it); returns the
        dead-node sweeper coroutine for the node to own, or None."""
        if self.presence is None:
            return None
        self.registry = registry
        await self.presence.refresh_now()
        return self._sweep_dead_nodes()

    async def _sweep_dead_nodes(self) -> None:
        """``devices.online`` / ``node`` follow the presence map: devices recorded on a node that is no
        longer alive go offline (every node sweeps; idempotent), and a device of this node that another
        node's sweep took for dead while our heartbeat was late comes back."""
        ttl = self.settings.presence_ttl_s
        me = self.settings.node_name
        while True:
            await asyncio.sleep(ttl)
            try:
                await self.pool.execute(
                    "UPDATE devices SET online = true, node = $1 WHERE remote_device_id = ANY($2::uuid[]) "
                    "AND node IS NULL AND last_seen < now() - make_interval(secs => $3)",
                    me, self.registry.device_ids(), ttl)
                live = [n["name"] for n in await self.presence.nodes()]
                if me not in live:
                    continue  # our own view is broken (store trouble): change nothing
                await self.pool.execute(
                    "UPDATE devices SET online = false, node = NULL WHERE online AND node IS NOT NULL "
                    "AND NOT (node = ANY($1::text[])) AND last_seen < now() - make_interval(secs => $2)",
                    live, ttl)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("dead-node sweep failed: %s", exc)

    def go_away(self) -> None:
        """Shutdown: accept no more links; tell the peers to open no more streams here."""
        if self.relay_server is not None:
            self.relay_server.stop_accepting()
            self.relay_server.go_away()

    async def close(self) -> None:
        """Remove this node and its devices from the presence map; close links."""
        if self.presence is not None:
            await self.presence.close()
        if self.relay_server is not None:
            self.relay_server.close_all()
        if self.exit is not None:
            self.exit.close()
        if self.pools is not None:
            await self.pools.close()
