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
import time
from datetime import UTC, datetime

from device_tunnel.server import OpenResult
from proxyorch.bus_events import KILL, decode

from .auth_cache.cache import AuthCache
from .authenticate import Authenticator, AuthOutcome
from .http_forward import Upstream
from .ratelimit import FailureLimiter
from .request_log.writer import SessionRecord
from .session_core import (
    ArmTimer,
    AttemptRow,
    Authenticate,
    CancelOpen,
    Close,
    CloseUpstreamStream,
    DisarmTimer,
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
    Unregister,
    UpstreamWrite,
)
from .sessions import SessionRegistry

__all__ = ["ClientSession", "NullRequestLog", "ProxyMetrics", "ProxyServer"]

log = logging.getLogger(__name__)

CLIENT_WRITE_HIGH = 256 * 1024
CLIENT_WRITE_LOW = 64 * 1024


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
                 open_timeout: float = 15.0) -> None:
        self.auth_cache = auth_cache
        self.exit = exit
        self.sessions = sessions
        self.node_name = node_name
        self.limiter = limiter
        self.request_log = request_log or NullRequestLog()
        self.handshake_timeout = handshake_timeout
        self.open_timeout = open_timeout
        self.metrics = ProxyMetrics()
        self.handshaking: set[ClientSession] = set()
        self.authenticator = Authenticator(auth_cache, limiter, self.metrics)
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ClientSession(self), host, port, reuse_address=True,
                                                backlog=4096, reuse_port=reuse_port or None)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        self.authenticator.close()

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
        if ev.kind is KILL and ev.ident:
            n = self.sessions.terminate_connection(ev.ident, "connection deleted or dissociated")
            if n:
                log.info("terminated %d sessions of %s", n, ev.ident)

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
                                handshake_timeout=server.handshake_timeout, open_timeout=server.open_timeout)
        self.stream = None  # the device stream once relaying (tunnel stream or DirectStream)
        self._opened = None  # stream of an open_result, until StartRelay takes it
        self.cancel_open = None
        self.upstreams: dict[int, Upstream] = {}  # absolute-form forwarder upstreams
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
        self.server.handshaking.add(self)
        self._run(self.core.start())

    def data_received(self, data: bytes) -> None:
        if self.relaying:
            self.bytes_out += len(data)
            self.stream.write(data)
            return
        self._run(self.core.receive_data(data, _now()))

    def eof_received(self) -> bool:
        if self.relaying and self.stream is not None:
            self.client_eof = True
            self.stream.write_eof()
            if self.upstream_eof:  # both directions finished: nothing left to relay
                self.transport.close()
            return True
        if self.core.phase is Phase.FORWARD:
            self._run(self.core.client_eof(_now()))
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.handshaking.discard(self)
        self.relaying = False
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close_quietly()
        self._run(self.core.client_lost(_now(), self.bytes_in, self.bytes_out))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stream is not None:
            self.stream.sink_drained()
        else:
            for up in list(self.upstreams.values()):
                if up.stream is not None:
                    up.stream.sink_drained()

    # -- OpenHandler (the device side of the relay) ---------------------------------------------
    def open_result(self, result: OpenResult) -> None:
        self.cancel_open = None
        self._opened = result.stream
        self._run(self.core.open_result(result.rep, result.reason, result.resolved_ip, result.bound_host,
                                        result.bound_port, result.stream is not None, _now()))
        stream, self._opened = self._opened, None
        if stream is not None:  # the core did not take it (client gone, or refused)
            stream.close_quietly()

    def stream_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.transport.write(data)

    def stream_eof(self) -> None:
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
        t = self.transport
        if t is not None and not t.is_closing():
            # close() still flushes what the device already sent before the stream ended.
            t.close()

    def pause_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.relaying:
            self.resume_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def sink_ready(self) -> bool:
        return not self.write_paused

    def terminate(self, reason: str) -> None:
        """Close this session now (connection deleted/dissociated, node shutdown)."""
        self.core.terminate(reason)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.reset(reason)
        if self.transport is not None:
            self.transport.abort()

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
        self._run(self.core.upstream_data(uid, data, _now()))

    def upstream_eof(self, uid: int) -> None:
        self._run(self.core.upstream_eof(uid, _now()))

    def upstream_closed(self, uid: int, error: str | None) -> None:
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
                    t.abort() if a.abort else t.close()
            elif kind is Authenticate:
                self._authenticate(a.username, a.password)
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
                if a.early:
                    self.bytes_out += len(a.early)
                    self.stream.write(a.early)
            elif kind is PauseReading:
                self.pause_source()
            elif kind is ResumeReading:
                self.resume_reading()
            elif kind is UpstreamWrite:
                up = self.upstreams.get(a.upstream)
                if up is not None:
                    up.write(a.data)
            elif kind is CloseUpstreamStream:
                up = self.upstreams.pop(a.upstream, None)
                if up is not None:
                    up.close()
            elif kind is LogRow:
                self._log(a)
            elif kind is CancelOpen:
                cancel, self.cancel_open = self.cancel_open, None
                if cancel is not None:
                    cancel()
            elif kind is LeaveHandshake:
                self.server.handshaking.discard(self)
            elif kind is Register:
                self.server.sessions.add(self)
            elif kind is Unregister:
                self.server.sessions.remove(self)

    def _timer_fired(self) -> None:
        self.timer = None
        self._run(self.core.timer_fired(_now()))

    def _open(self, a: OpenStream) -> None:
        exit_ = self.server.exit
        if a.upstream is None:
            cancel = exit_.open(a.device_id, a.host, a.port, self)
            if cancel is None:
                self._run(self.core.open_unavailable(_now()))
            elif self.core.phase is Phase.OPENING:
                self.cancel_open = cancel
            return
        up = self.upstreams[a.upstream] = Upstream(self, a.upstream)
        cancel = exit_.open(a.device_id, a.host, a.port, up)
        if cancel is None:
            self._run(self.core.upstream_unavailable(a.upstream, _now()))
        elif up.stream is None and self.upstreams.get(a.upstream) is up:
            up.cancel = cancel

    def _authenticate(self, username: str, password: str) -> None:
        if self.server.authenticator.authenticate(self.client_addr, username, password, self._auth_done):
            self.auth_paused = True
            self.pause_source()  # until the store answers

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
        self._run(self.core.auth_result(outcome.record, outcome.reason, _now()))

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
