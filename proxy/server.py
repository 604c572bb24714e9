"""The proxy listener: one mixed port that answers SOCKS5 (first byte 0x05) or HTTP.

``ClientSession`` is the ``asyncio.Protocol`` of one client connection, a thin adapter around the
sans-I/O :class:`proxy.session_core.SessionCore`, which makes every decision (handshake, auth,
policy, routing, log rows). The adapter carries out the core's actions (writes, timers, the
credential lookup, opening streams through the exit) and, once a stream is established, copies
bytes both ways with back-pressure. There is no unauthenticated path: this is never an open proxy.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from datetime import UTC, datetime

from device_tunnel.listener import Listener
from device_tunnel.replies import ReplyCode
from device_tunnel.server import OpenResult
from proxyorch.bus_events import CONN, KILL, decode

from .access import AccessIndex
from .auth_cache.cache import AuthCache
from .authenticate import Authenticator, AuthOutcome
from .http_forward import Upstream
from .limits import SESSIONS_FULL, ConnState, LimitBook
from .pacing import Held, Sink
from .pool_routing import Lease, PoolRouter
from .ratelimit import FailureLimiter
from .request_log.writer import SessionRecord
from .rotation_gate import RotationGate
from .session_core import (
    ArmTimer,
    AttemptRow,
    Authenticate,
    CancelOpen,
    Close,
    CloseUpstreamStream,
    DisarmTimer,
    EarlyData,
    Instant,
    LeaveHandshake,
    LogRow,
    OpenStream,
    PauseReading,
    Phase,
    ProxyMetrics,
    Register,
    ResumeReading,
    Send,
    SessionCore,
    StartRelay,
    StartUdp,
    Unregister,
    UpstreamWrite,
)
from .sessions import SessionRegistry
from .udp_relay import UdpRelay
from .username_params import RouteParams

__all__ = ["ClientSession", "NullRequestLog", "ProxyMetrics", "ProxyServer"]

log = logging.getLogger(__name__)

CLIENT_WRITE_HIGH = 256 * 1024
CLIENT_WRITE_LOW = 64 * 1024


def _linger_zero(t: asyncio.BaseTransport) -> None:
    """Make the next close of ``t`` a TCP RST (SO_LINGER on, 0 s)."""
    sock = t.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


def _now() -> Instant:
    return Instant(time.monotonic(), datetime.now(UTC))


class NullRequestLog:
    """Used when request logging is off."""

    def record_session(self, rec: object) -> None:
        pass

    def record_traffic(self, *args: object) -> None:
        pass


class ProxyServer:
    """Shared context of every session on this node."""

    def __init__(self, *, auth_cache: AuthCache, exit, sessions: SessionRegistry, node_name: str,  # noqa: ANN001
                 limiter: FailureLimiter, request_log=None, handshake_timeout: float = 15.0,  # noqa: ANN001
                 open_timeout: float = 15.0, rotate_wait: float = 30.0, optimistic_open: bool = False,
                 max_unauth_per_ip: int = 64) -> None:
        self.auth_cache = auth_cache
        self.exit = exit
        self.sessions = sessions
        self.node_name = node_name
        self.limiter = limiter
        self.request_log = request_log or NullRequestLog()
        self.handshake_timeout = handshake_timeout
        self.open_timeout = open_timeout
        # OPTIMISTIC_OPEN, where the exit can carry client bytes before the outcome (the tunnel exit)
        self.optimistic_open = optimistic_open and hasattr(exit, "open_optimistic")
        self.metrics = ProxyMetrics()
        self.handshaking: set[ClientSession] = set()
        self.authenticator = Authenticator(auth_cache, limiter, self.metrics)
        self.router = PoolRouter()  # pool members and sticky sessions
        self.gate = RotationGate()  # devices rotating their IP: their new sessions wait
        self.rotate_wait = rotate_wait
        self.limits = LimitBook()     # per-connection limits and usage counts of this node
        self.access = AccessIndex()   # ip_only ranges (kept fresh by proxy/usage_flush.py)
        self.on_connection_changed = None  # callback(connection_id | None) set by the usage keeper
        self.on_quota_reached = None  # callback() set by the usage keeper (flush soon)
        self.on_lease_needed = None  # callback() set by the usage keeper (a quota lease runs low)
        self.cluster = None  # proxy.cluster_limits.ClusterLimits with REDIS_URL: limits shared by the nodes
        self.pools = None  # proxy.pool_cluster.ClusterPools on a relaying node: members and bindings cluster-wide
        self.bind_host = "0.0.0.0"  # UDP relay sockets bind here (see proxy/udp_relay.py)
        self.max_unauth_per_ip = max_unauth_per_ip
        self.unauth: dict[str, int] = {}  # client address -> connections not authenticated yet
        self.unauth_refused = 0  # connections closed at once: their address had max_unauth_per_ip
        self.listener = Listener(lambda: ClientSession(self))  # pauses accepting at EMFILE

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        self.bind_host = host
        await self.listener.start(host, port, backlog=4096, reuse_port=reuse_port)

    @property
    def port(self) -> int:
        return self.listener.port

    def stop_accepting(self) -> None:
        self.listener.close()
        self.authenticator.close()

    def admit_unauthenticated(self, addr: str) -> bool:
        """Count a new connection from ``addr``; False (refuse it) when the address has its maximum."""
        n = self.unauth.get(addr, 0)
        if n >= self.max_unauth_per_ip:
            self.unauth_refused += 1
            return False
        self.unauth[addr] = n + 1
        return True

    def authenticated_or_gone(self, addr: str) -> None:
        """A connection counted by ``admit_unauthenticated`` authenticated, left the handshake or closed."""
        n = self.unauth.get(addr, 0) - 1
        if n > 0:
            self.unauth[addr] = n
        else:
            self.unauth.pop(addr, None)

    def client_buffered_bytes(self) -> int:
        """Bytes waiting in client sockets' write buffers on this node (what slow readers cost)."""
        total = 0
        for s in self.sessions.all:
            t = getattr(s, "transport", None)
            if t is not None and not t.is_closing():
                total += t.get_write_buffer_size()
        return total

    def handle_bus_event(self, event: str) -> None:
        """Invalidate the cache; on a kill event terminate that connection's sessions."""
        self.auth_cache.handle_event(event)
        ev = decode(event)
        if self.on_connection_changed is not None:
            self.on_connection_changed(ev.ident if ev.kind is CONN or ev.kind is KILL else None)
        if ev.kind is KILL and ev.ident:
            n = self.sessions.terminate_connection(ev.ident, "connection deleted or dissociated")
            if n:
                log.info("terminated %d sessions of %s", n, ev.ident)

    def device_usable(self, device_id: str) -> bool:
        """A pool member can take a new session: online here (or on another node of the cluster), or
        rotating (the session waits)."""
        online = getattr(self.exit, "is_online", None)
        return (self.gate.is_rotating(device_id) or online is None or online(device_id)
                or (self.pools is not None and self.pools.online_elsewhere(device_id)))

    def record_row(self, row: AttemptRow) -> None:
        """Hand one request-log row to the writer; never blocks."""
        self.metrics.bytes_in += row.bytes_in
        self.metrics.bytes_out += row.bytes_out
        self.request_log.record_session(SessionRecord(
            timestamp=row.timestamp, connection_id=row.connection_id, device_id=row.device_id,
            server_node=self.node_name, target=row.target, target_type=row.target_type, port=row.port,
            resolved_ip=row.resolved_ip, action=row.action, block_reason=row.block_reason,
            bytes_in=row.bytes_in, bytes_out=row.bytes_out, duration_ms=row.duration_ms,
            client_addr=row.client_addr, protocol=row.protocol, reply_code=row.reply_code, error=row.error,
            device_node=row.device_node))


class ClientSession(asyncio.Protocol):
    """One client connection: carries out the core's actions, then relays through a device stream."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client_addr = ""
        self.core = SessionCore(metrics=server.metrics, client_addr="",
                                needs_no_device=getattr(server.exit, "needs_no_device", False),
                                handshake_timeout=server.handshake_timeout, open_timeout=server.open_timeout,
                                optimistic=server.optimistic_open, gate=server.limits, access=server.access)
        self.stream = None  # the device stream once relaying (tunnel stream or DirectStream)
        self._opened = None  # stream of an open_result, until StartRelay takes it
        self.cancel_open = None
        self.early_open = None  # proxy.exits.EarlyOpen of an optimistic open, until its outcome
        self.upstreams: dict[int, Upstream] = {}  # absolute-form forwarder upstreams
        self.udp: UdpRelay | None = None  # the relay socket of a UDP association
        self._udp_bound = ("0.0.0.0", 0)
        self.route_params: RouteParams | None = None  # from the username (sticky session, country)
        self.leases: dict[int | None, Lease] = {}  # pool routing holds: None = own stream, else upstream id
        self.timer: asyncio.TimerHandle | None = None
        self.relaying = False
        self.write_paused = False
        self.auth_paused = False
        self.bytes_in = 0      # target -> client
        self.bytes_out = 0     # client -> target
        self.reported_in = 0
        self.reported_out = 0
        self.client_eof = False
        self.upstream_eof = False
        # limits: the connection's shared state while relaying, and the throttles of both directions
        self.lim: ConnState | None = None
        self.up_throttle: asyncio.TimerHandle | None = None    # client reading paused by the upload bucket
        self.down_throttle: asyncio.TimerHandle | None = None  # stream paused by the download bucket
        self.held_up: Held | None = None    # client bytes a limit holds back (client reading paused meanwhile)
        self.held_down: Held | None = None  # target bytes a limit holds back (sink_ready False meanwhile)
        self.source_paused = False  # the stream asked us to stop reading the client (back-pressure)
        self.cluster_slot: str | None = None  # the session's slot in the cluster-wide session count
        self.upstream_cluster_slots: dict[int, str] = {}  # absolute-form upstreams' slots in that count
        self.unauth_counted = False  # counted in server.unauth until authenticated or gone

    @property
    def connection_id(self) -> str | None:
        return self.core.connection_id

    @property
    def device_id(self) -> str | None:
        return self.core.device_id

    # -- what SessionRegistry.snapshot reads (proxy/sessions.py: the live sessions view) ----------
    @property
    def protocol(self) -> str:
        return self.core.protocol

    @property
    def target_host(self) -> str:
        return self.core.attempt.host

    @property
    def target_port(self) -> int:
        return self.core.attempt.port

    @property
    def started(self) -> float:
        """Monotonic start of the attempt (0.0 before the target is known)."""
        return self.core.attempt.started.mono if self.core.attempt.started is not None else 0.0

    @property
    def started_wall(self) -> datetime | None:
        return self.core.attempt.started_wall

    @property
    def http_forward(self) -> SessionCore | None:
        """The core while it forwards absolute-form requests (its ``upstream`` is the current request)."""
        return self.core if self.core.forwarding else None

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no subclass)
        transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH, low=CLIENT_WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.client_addr = self.core.client_addr = peer[0] if peer else ""
        if not self.server.admit_unauthenticated(self.client_addr):
            self.core.phase = Phase.CLOSED
            transport.abort()
            return
        self.unauth_counted = True
        self.server.handshaking.add(self)
        self._run(self.core.start())

    def data_received(self, data: bytes) -> None:
        if self.relaying:
            if self.lim is not None:
                self._send(False, self._to_stream, data)
                return
            self.bytes_out += len(data)
            self.stream.write(data)
            return
        self._run(self.core.receive_data(data, _now()))

    def eof_received(self) -> bool:
        if self.held_up and (self.relaying or self.core.phase is Phase.FORWARD):
            self.held_up.push_event(self._client_eof)  # after the bytes a limit still holds
            return True
        return self._client_eof()

    def _client_eof(self) -> bool:
        if self.relaying and self.stream is not None:
            self.client_eof = True
            self.stream.write_eof()
            if self.upstream_eof:  # both directions finished: nothing left to relay
                self.transport.close()
            return True
        if self.core.phase is Phase.FORWARD:
            self._run(self.core.client_eof(_now()))
            return True
        if self.core.early_pending and self.early_open is not None:  # FIN follows the early bytes
            self.client_eof = True
            self.early_open.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        self.server.handshaking.discard(self)
        self.relaying = False
        self._leave_limits()
        slot, self.cluster_slot = self.cluster_slot, None
        if slot is not None and self.server.cluster is not None:
            self.server.cluster.release(slot)
        if self.upstream_cluster_slots and self.server.cluster is not None:
            for slot in self.upstream_cluster_slots.values():
                self.server.cluster.release(slot)
        self.upstream_cluster_slots.clear()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close_quietly()
        if self.udp is not None:  # the association ends with its control connection
            self.udp.close()
        self._run(self.core.client_lost(_now(), self.bytes_in, self.bytes_out))
        for key in list(self.leases):
            self._release(key)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.down_throttle is not None or self.held_down:
            return  # the limit's timer (or the keeper's lease) resumes the source
        self._sink_drained()

    def _sink_drained(self) -> None:
        """The client socket drained: return the withheld credit of the stream (or, for absolute-form
        forwarding, of every upstream stream)."""
        if self.stream is not None:
            self.stream.sink_drained()
        else:
            for up in list(self.upstreams.values()):
                if up.stream is not None:
                    up.stream.sink_drained()

    # -- OpenHandler (the device side of the relay) ---------------------------------------------
    def open_result(self, result: OpenResult) -> None:
        self.cancel_open = self.early_open = None
        self._opened = result.stream
        if result.node:  # relayed: the request log names the node that holds the device (deviceNode)
            self.core.attempt.device_node = result.node
        self._run(self.core.open_result(result.rep, result.reason, result.resolved_ip, result.bound_host,
                                        result.bound_port, result.stream is not None, _now()))
        stream, self._opened = self._opened, None
        if stream is not None:  # the core did not take it (client gone, or refused)
            stream.close_quietly()

    def stream_data(self, data: bytes) -> None:
        if self.lim is not None:
            self._send(True, self._to_client, data)
            return
        self.bytes_in += len(data)
        self.transport.write(data)

    def stream_eof(self) -> None:
        if self.held_down:
            self.held_down.push_event(self._stream_eof)
            return
        self._stream_eof()

    def _stream_eof(self) -> None:
        self.upstream_eof = True
        t = self.transport
        if t is not None and not t.is_closing():
            if self.client_eof:
                t.close()  # both directions finished
            elif t.can_write_eof():
                t.write_eof()

    def stream_closed(self, error: str | None) -> None:
        self.stream = None
        self.relaying = False
        self.core.stream_closed(error)
        if self.held_down:  # the bytes a limit holds back go first
            self.held_down.push_event(self._close_client)
            return
        self._close_client()

    def _close_client(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            # close() still flushes what the device already sent before the stream ended.
            t.close()

    def pause_source(self) -> None:
        """The stream is full (back-pressure): stop reading the client until ``resume_source``."""
        self.source_paused = True
        self._pause_client()

    def _pause_client(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_source(self) -> None:
        self.source_paused = False
        if self.relaying:
            self.resume_reading()

    def resume_reading(self) -> None:
        if self.up_throttle is not None or self.held_up:  # the limit's timer (or a lease) resumes
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def sink_ready(self) -> bool:
        return not self.write_paused and self.down_throttle is None and not self.held_down

    def terminate(self, reason: str) -> None:
        """Close this session now (connection deleted/dissociated, node shutdown)."""
        self.core.terminate(reason)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.reset(reason)
        if self.transport is not None:
            self.transport.abort()

    # -- UDP association (UdpRelay's owner) ---------------------------------------------------------
    def udp_open_result(self, result: OpenResult) -> None:
        """The device's answer to the UDP stream; the reply announces the node's relay socket."""
        self.cancel_open = None
        host, port = self._udp_bound
        self._run(self.core.open_result(result.rep, result.reason, result.resolved_ip, host, port,
                                        result.stream is not None, _now()))
        if self.core.phase is not Phase.UDP and self.udp is not None:
            self.udp.close()

    def udp_stream_closed(self, error: str | None) -> None:
        """The device side of the association ended: so does the control connection."""
        self.core.stream_closed(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _open_udp(self, a: OpenStream) -> None:
        relay = self.udp = UdpRelay(self)
        try:
            sockname = self.transport.get_extra_info("sockname") if self.transport is not None else None
            self._udp_bound = relay.bind(self.server.bind_host, sockname[0] if sockname else "0.0.0.0")
        except OSError as exc:
            self._run(self.core.open_result(ReplyCode.GENERAL_FAILURE, f"cannot bind the UDP relay: {exc}", "",
                                            "0.0.0.0", 0, False, _now()))
            return
        open_udp = getattr(self.server.exit, "open_udp", None)
        cancel = open_udp(a.device_id, relay) if open_udp is not None else None
        if cancel is None:
            relay.close()
            self._run(self.core.open_unavailable(_now()))
        elif self.core.phase is Phase.OPENING:
            self.cancel_open = cancel

    # -- limits: quota, speed (see proxy/limits.py) -------------------------------------------------
    def _join_limits(self) -> None:
        record = self.core.record
        if record is None:
            return
        lim = self.server.limits.states.get(record.connection_id)
        if lim is not None:
            self.lim = lim
            lim.members.add(self)
            if lim.wants_lease(time.monotonic()) and self.server.on_lease_needed is not None:
                self.server.on_lease_needed()  # before the first byte arrives

    def _leave_limits(self) -> None:
        for timer in (self.up_throttle, self.down_throttle):
            if timer is not None:
                timer.cancel()
        self.up_throttle = self.down_throttle = None
        for held in (self.held_up, self.held_down):
            if held is not None:
                held.clear()  # a drain in progress stops here too
        self.held_up = self.held_down = None
        self._leave_members()

    def _leave_members(self) -> None:
        lim, self.lim = self.lim, None
        if lim is not None:
            lim.members.discard(self)

    def _to_stream(self, data: bytes) -> None:
        if self.stream is not None:
            self.bytes_out += len(data)
            self.stream.write(data)

    def _to_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.transport.write(data)

    def _send(self, down: bool, sink: Sink, data: bytes) -> None:
        """Relay ``data`` to ``sink`` as far as the connection's quota lease and the direction's bucket
        let it; the rest waits in order (``proxy/pacing.py``) and its source is paused."""
        held = self.held_down if down else self.held_up
        if held:  # behind what already waits
            held.push(sink, data)
            return
        n = self._grant(down, len(data))
        if n == len(data):
            sink(data)
            lim = self.lim
            if lim is not None and lim.limits.quota_bytes is not None and lim.exhausted():
                self._quota_reached()  # exactly at the quota (a node that caps alone)
            return
        if n:
            sink(data[:n])
        if held is None:
            held = Held()
            if down:
                self.held_down = held
            else:
                self.held_up = held
        held.push(sink, memoryview(data)[n:])
        self._wait(down)

    def _grant(self, down: bool, n: int) -> int:
        """How many of ``n`` bytes may go now (taken from the lease and the bucket, and counted)."""
        lim = self.lim
        if lim is None:
            return n
        bucket = lim.down if down else lim.up
        if bucket is None and lim.limits.quota_bytes is None:  # nothing limits this direction
            lim.count(n)
            return n
        now = time.monotonic()
        k = lim.allow(n, now)
        if k and bucket is not None:
            k = bucket.take(k, now)
        if k:
            lim.count(k)
        if lim.leasing and lim.wants_lease(now) and self.server.on_lease_needed is not None:
            self.server.on_lease_needed()
        return k

    def _wait(self, down: bool) -> None:
        """Something is held: close at the quota, else wait for a lease (the keeper wakes us through
        ``lease_changed``) or for the bucket's tokens (a loop timer); the source stays paused."""
        lim = self.lim
        if lim is None:
            return
        if lim.exhausted():
            self._quota_reached()
            return
        if not down and self.transport is not None:
            self.transport.pause_reading()
        now = time.monotonic()
        if lim.allow(1, now) == 0:  # the quota lease: requested, the keeper answers
            if self.server.on_lease_needed is not None:
                self.server.on_lease_needed()
            return
        bucket = lim.down if down else lim.up
        held = self.held_down if down else self.held_up
        delay = bucket.until(held.first_size() or 1, now) if bucket is not None else 0.0
        name = "down_throttle" if down else "up_throttle"
        if getattr(self, name) is None:
            setattr(self, name, asyncio.get_running_loop().call_later(max(delay, 0.0), self._resume, down))

    def _resume(self, down: bool) -> None:
        """Relay what waits; when nothing does, let the source go again."""
        if down:
            self.down_throttle = None
        else:
            self.up_throttle = None
        held = self.held_down if down else self.held_up
        if held and not held.drain(lambda n: self._grant(down, n)):
            self._wait(down)
            return
        if down:
            if self.write_paused or self.held_down:
                return
            self._sink_drained()
        elif (self.relaying or self.core.phase is Phase.FORWARD) and not self.source_paused and not self.held_up:
            self.resume_reading()

    def limits_changed(self) -> None:
        """The connection's rates changed: re-time the waits now (a lowered or lifted limit)."""
        for down in (True, False):
            timer = self.down_throttle if down else self.up_throttle
            if timer is not None:
                timer.cancel()
                self._resume(down)

    def lease_changed(self) -> None:
        """The keeper answered a quota lease request: relay what waits, or close at the quota."""
        lim = self.lim
        if lim is None:
            return
        if lim.exhausted():
            self._quota_reached()
            return
        for down in (True, False):
            if (self.held_down if down else self.held_up) and (self.down_throttle if down else self.up_throttle) is None:
                self._resume(down)

    def _quota_reached(self) -> None:
        """The quota is used up: nothing more is relayed and the session closes (what was written flushes)."""
        self.relaying = False
        self.core.terminate("traffic quota exhausted")
        if self.server.on_quota_reached is not None:
            self.server.on_quota_reached()  # flush now: the other nodes see the quota used up at once
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.reset("traffic quota exhausted")
        self._leave_limits()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- forwarder upstreams (UpstreamOwner) ------------------------------------------------------
    def upstream_open_result(self, up: Upstream, result: OpenResult) -> None:
        if self.upstreams.get(up.uid) is not up:  # closed while opening
            if result.stream is not None:
                result.stream.close_quietly()
            return
        up.stream = result.stream
        self._run(self.core.upstream_open_result(up.uid, result.rep, result.reason, result.resolved_ip,
                                                 result.stream is not None, _now()))

    def upstream_data(self, uid: int, data: bytes) -> None:
        if self._forward_limits():
            self._send(True, lambda d: self._run(self.core.upstream_data(uid, d, _now())), data)
        else:
            self._run(self.core.upstream_data(uid, data, _now()))

    def _forward_limits(self) -> bool:
        """Absolute-form forwarding: join the connection's limits state (True when it has one)."""
        record = self.core.record
        lim = self.server.limits.states.get(record.connection_id) if record is not None else None
        if lim is None:
            return False
        if self.lim is not lim:  # join the connection's state (limit changes re-time our throttles)
            self._leave_members()
            self.lim = lim
            lim.members.add(self)
        return True

    def upstream_eof(self, uid: int) -> None:
        if self.held_down:
            self.held_down.push_event(lambda: self._run(self.core.upstream_eof(uid, _now())))
            return
        self._run(self.core.upstream_eof(uid, _now()))

    def upstream_closed(self, uid: int, error: str | None) -> None:
        if self.held_down:
            self.held_down.push_event(lambda: self._run(self.core.upstream_closed(uid, error, _now())))
            return
        self._run(self.core.upstream_closed(uid, error, _now()))

    # -- carrying out the core's actions ----------------------------------------------------------
    def _run(self, actions: list) -> None:
        t = self.transport
        for a in actions:
            kind = type(a)
            if kind is Send:
                if t is not None and not t.is_closing():
                    t.write(a.data)
            elif kind is Close:
                if t is not None:
                    if a.reset:
                        _linger_zero(t)
                    t.abort() if a.abort else t.close()
            elif kind is Authenticate:
                self._authenticate(a.username, a.password, a.by_address)
            elif kind is OpenStream:
                self._open(a)
            elif kind is ArmTimer:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = asyncio.get_running_loop().call_later(a.delay, self._timer_fired)
            elif kind is DisarmTimer:
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
            elif kind is StartRelay:
                self.stream, self._opened = self._opened, None
                self.relaying = True
                self._join_limits()
                if a.early:
                    if self.lim is not None:
                        self._send(False, self._to_stream, a.early)
                    else:
                        self.bytes_out += len(a.early)
                        self.stream.write(a.early)
            elif kind is StartUdp:
                if self.udp is not None and self.core.udp is not None:
                    self.udp.start(self.core.udp)
            elif kind is EarlyData:
                if self.early_open is not None:
                    self.bytes_out += len(a.data)
                    self.early_open.write(a.data)
            elif kind is PauseReading:
                self._pause_client()
            elif kind is ResumeReading:
                self.resume_reading()
            elif kind is UpstreamWrite:
                up = self.upstreams.get(a.upstream)
                if up is not None:
                    if self._forward_limits():
                        self._send(False, up.write, a.data)
                    else:
                        up.write(a.data)
            elif kind is CloseUpstreamStream:
                if self.held_up:  # after the bytes a limit still holds for it
                    self.held_up.push_event(lambda uid=a.upstream: self._close_upstream(uid))
                else:
                    self._close_upstream(a.upstream)
            elif kind is LogRow:
                self._log(a)
            elif kind is CancelOpen:
                cancel, self.cancel_open = self.cancel_open, None
                if cancel is not None:
                    cancel()
            elif kind is LeaveHandshake:
                self.server.handshaking.discard(self)
                self._uncount()
            elif kind is Register:
                self.server.sessions.add(self)
            elif kind is Unregister:
                self.server.sessions.remove(self)

    def _close_upstream(self, uid: int) -> None:
        up = self.upstreams.pop(uid, None)
        if up is not None:
            up.close()
        self._release(uid)
        slot = self.upstream_cluster_slots.pop(uid, None)
        if slot is not None and self.server.cluster is not None:
            self.server.cluster.release(slot)

    def _timer_fired(self) -> None:
        self.timer = None
        self._run(self.core.timer_fired(_now()))

    def _open(self, a: OpenStream, prepared: bool = False, hint: str | None = None) -> None:
        """Route (pool member, sticky session), wait out an IP rotation of the device, then open.

        On a cluster node the route is prepared first when this node does not know enough
        (members held by other nodes, the token's cluster-wide binding): see proxy/pool_cluster.py."""
        server = self.server
        device_id = a.device_id
        record = self.core.record
        params = self.route_params
        if record is not None and not self.core.needs_no_device and (
                record.is_pool or (params is not None and not params.plain)):
            candidates = record.pool or ((device_id, None),)
            pools, token = server.pools, params.session if params is not None else None
            if pools is not None and not prepared and (record.pool or device_id) and pools.needs_prepare(
                    [c[0] for c in candidates], token):
                self._prepare_route(pools, a, record.connection_id, [c[0] for c in candidates], token)
                return
            lease = server.router.choose(record.connection_id, candidates,
                                         params or RouteParams(record.connection_id), server.device_usable,
                                         time.monotonic(), server.gate.is_rotating,
                                         hint) if (record.pool or device_id) else None
            if lease is None:
                if a.upstream is None:
                    self._run(self.core.open_unavailable(_now()))
                else:
                    self.upstreams[a.upstream] = Upstream(self, a.upstream)
                    self._run(self.core.upstream_unavailable(a.upstream, _now()))
                return
            self.leases[a.upstream] = lease
            device_id = lease.device_id
            if pools is not None and lease.sticky_key is not None:
                pools.bound(record.connection_id, lease.sticky_key[1], device_id)
            self.core.routed(device_id, a.upstream)
        if device_id is not None and server.gate.is_rotating(device_id):
            self._defer(a, device_id)
            return
        self._open_now(a, device_id)

    def _prepare_route(self, pools, a: OpenStream, connection_id: str, members: list[str],  # noqa: ANN001
                       token: str | None) -> None:
        """Ask the cluster where the members are (and the token's binding), then route."""
        task = asyncio.get_running_loop().create_task(pools.prepare(connection_id, members, token))
        pools.own(task)
        up = None
        if a.upstream is None:
            self.cancel_open = task.cancel
        else:
            up = self.upstreams[a.upstream] = Upstream(self, a.upstream)
            up.cancel = task.cancel

        def prepared(t: asyncio.Task) -> None:
            if t.cancelled() or self.transport is None or self.transport.is_closing():
                return
            if up is None:
                if self.core.phase is not Phase.OPENING:
                    return
                self.cancel_open = None
            elif self.upstreams.get(a.upstream) is up:
                del self.upstreams[a.upstream]
            else:
                return
            self._open(a, prepared=True, hint=t.result())
        task.add_done_callback(prepared)

    def _release(self, key: int | None) -> None:
        lease = self.leases.pop(key, None)
        if lease is not None:
            ttl = self.server.router.release(lease, time.monotonic())
            pools = self.server.pools
            if ttl is not None and pools is not None and lease.sticky_key is not None:
                pools.idle(lease.sticky_key[0], lease.sticky_key[1], lease.device_id, ttl)

    def _defer(self, a: OpenStream, device_id: str) -> None:
        """Park the open until the device's rotation ends (bounded by ROTATE_WAIT_S), without blocking."""
        gate = self.server.gate
        if a.upstream is None:
            def resume() -> None:
                self.cancel_open = None
                if self.core.phase is Phase.OPENING:
                    self._run(self.core.open_resumed())
                    self._open_now(a, device_id)
            self.cancel_open = gate.wait(device_id, resume)
            self._run(self.core.open_deferred(self.server.rotate_wait))
            return
        up = self.upstreams[a.upstream] = Upstream(self, a.upstream)

        def resume_upstream() -> None:
            timer.cancel()
            if self.upstreams.get(a.upstream) is up:
                del self.upstreams[a.upstream]
                self._open_now(a, device_id)

        def timed_out() -> None:
            cancel_wait()
            if self.upstreams.get(a.upstream) is up:
                up.cancel = None
                self._run(self.core.upstream_unavailable(a.upstream, _now()))

        cancel_wait = gate.wait(device_id, resume_upstream)
        timer = asyncio.get_running_loop().call_later(self.server.rotate_wait, timed_out)
        up.cancel = lambda: (cancel_wait(), timer.cancel())

    def _open_now(self, a: OpenStream, device_id: str | None) -> None:
        if a.udp:
            self._open_udp(a)
            return
        cluster, record = self.server.cluster, self.core.record
        if cluster is not None and record is not None and record.limits.max_concurrent_sessions is not None:
            # a slot of the cluster-wide session count first (Redis), for every kind of open
            up = None
            if a.upstream is not None:
                up = self.upstreams[a.upstream] = Upstream(self, a.upstream)
            task = asyncio.get_running_loop().create_task(self._cluster_open(cluster, a, record, device_id, up))
            cluster.own(task)
            if up is not None:
                up.cancel = task.cancel
            else:
                self.cancel_open = task.cancel
            return
        if a.optimistic:
            self._open_early(a, device_id)
            return
        if a.upstream is None:
            self._open_own(a, device_id)
            return
        self._open_upstream(a, device_id, Upstream(self, a.upstream))

    def _open_early(self, a: OpenStream, device_id: str | None) -> None:
        early = self.server.exit.open_optimistic(device_id, a.host, a.port, self)
        if early is None:  # no local tunnel: an ordinary open (a cluster exit relays it to the device's node)
            self._open_own(a, device_id)
        elif self.core.phase is Phase.OPENING:
            self.early_open, self.cancel_open = early, early.cancel
            self._run(self.core.open_sent(_now()))

    def _open_upstream(self, a: OpenStream, device_id: str | None, up: Upstream) -> None:
        self.upstreams[a.upstream] = up
        cancel = self.server.exit.open(device_id, a.host, a.port, up)
        if cancel is None:
            self._run(self.core.upstream_unavailable(a.upstream, _now()))
        elif up.stream is None and self.upstreams.get(a.upstream) is up:
            up.cancel = cancel

    async def _cluster_open(self, cluster, a: OpenStream, record, device_id: str | None,  # noqa: ANN001
                            up: Upstream | None) -> None:
        """Take a slot of the cluster-wide session count (Redis), then open (a stream, an optimistic
        open, or an absolute-form upstream ``up``)."""
        try:
            slot = await cluster.acquire(record.connection_id, record.limits.max_concurrent_sessions)
        except Exception as exc:  # Redis unreachable: this node's own count still holds
            cluster.unreachable(exc)
            slot = ""
        if up is not None:
            if self.upstreams.get(a.upstream) is not up or self.transport is None or self.transport.is_closing():
                if slot:
                    cluster.release(slot)
                return
            up.cancel = None
            if slot is None:
                self._run(self.core.upstream_admission_refused(a.upstream, SESSIONS_FULL, _now()))
                return
            if slot:
                self.upstream_cluster_slots[a.upstream] = slot
            self._open_upstream(a, device_id, up)
            return
        if self.core.phase is not Phase.OPENING or self.transport is None or self.transport.is_closing():
            if slot:
                cluster.release(slot)
            return
        self.cancel_open = None
        if slot is None:
            self._run(self.core.admission_refused(SESSIONS_FULL, _now()))
            return
        self.cluster_slot = slot or None
        if a.optimistic:
            self._open_early(a, device_id)
        else:
            self._open_own(a, device_id)

    def _open_own(self, a: OpenStream, device_id: str | None) -> None:
        cancel = self.server.exit.open(device_id, a.host, a.port, self)
        if cancel is None:
            self._run(self.core.open_unavailable(_now()))
        elif self.core.phase is Phase.OPENING:
            self.cancel_open = cancel

    def _authenticate(self, username: str, password: str, by_address: bool = False) -> None:
        if self.server.authenticator.authenticate(self.client_addr, username, password, self._auth_done,
                                                  by_address):
            self.auth_paused = True
            self._pause_client()  # until the store answers

    def _auth_done(self, outcome: AuthOutcome) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if outcome.unavailable:
            self._run(self.core.auth_unavailable())
            return
        if self.auth_paused:
            self.auth_paused = False
            self.resume_reading()
        if outcome.record is not None:
            self.route_params = outcome.params
            self._uncount()
        self._run(self.core.auth_result(outcome.record, outcome.reason, _now(), outcome.refused))

    def _uncount(self) -> None:
        """No longer an unauthenticated connection of its address (MAX_UNAUTH_PER_IP)."""
        if self.unauth_counted:
            self.unauth_counted = False
            self.server.authenticated_or_gone(self.client_addr)

    # -- request log ------------------------------------------------------------------------------
    def report_traffic(self) -> None:
        """Emit the byte delta since the last report (interim bandwidth of long sessions)."""
        din, dout = self.bytes_in - self.reported_in, self.bytes_out - self.reported_out
        cid = self.connection_id
        if (din or dout) and cid:
            self.reported_in, self.reported_out = self.bytes_in, self.bytes_out
            self.server.request_log.record_traffic(datetime.now(UTC), self.device_id or "", cid, din, dout)

    def _log(self, a: LogRow) -> None:
        row = a.row
        if a.upstream is None:
            self.report_traffic()
        elif row.bytes_in or row.bytes_out:
            self.server.request_log.record_traffic(datetime.now(UTC), row.device_id, row.connection_id,
                                                   row.bytes_in, row.bytes_out)
        self.server.record_row(row)
