"""The proxy listener: one mixed port that answers SOCKS5 (first byte 0x05) or HTTP.

``ClientSession`` is the ``asyncio.Protocol`` of one client connection. It runs the handshake
(via the sans-I/O parsers in ``proxy.socks5`` and ``proxy.http_connect``), authenticates against
the auth cache, applies blacklists, opens a stream through the connection's device and then relays
bytes with back-pressure both ways. There is no unauthenticated path: this is never an open proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from device_tunnel.server import OpenResult

from .auth_cache.cache import MISSING, AuthCache, CredentialRecord, normalize_connection_id
from .blacklist import first_match, normalize_host, parse_ip
from .http_connect import protocol as http
from .ratelimit import FailureLimiter
from .request_log.writer import SessionRecord
from .sessions import SessionRegistry
from .socks5.protocol import (
    Credentials,
    Greeting,
    ProtocolError,
    Request,
    Socks5Reply,
    Socks5ServerConnection,
)

log = logging.getLogger(__name__)

CLIENT_WRITE_HIGH = 256 * 1024
CLIENT_WRITE_LOW = 64 * 1024

HTTP_STATUS_FOR_REP = {
    Socks5Reply.NOT_ALLOWED: (403, "Forbidden"),
    Socks5Reply.NETWORK_UNREACHABLE: (502, "Bad Gateway"),
    Socks5Reply.HOST_UNREACHABLE: (502, "Bad Gateway"),
    Socks5Reply.CONNECTION_REFUSED: (502, "Bad Gateway"),
    Socks5Reply.TTL_EXPIRED: (504, "Gateway Timeout"),
    Socks5Reply.GENERAL_FAILURE: (502, "Bad Gateway"),
}


@dataclass
class ProxyMetrics:
    """Counters exported on ``/metrics``."""

    sessions_total: int = 0
    sessions_established: int = 0
    sessions_blocked: int = 0
    sessions_failed: int = 0
    auth_failures: int = 0
    auth_rate_limited: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    by_protocol: dict[str, int] = field(default_factory=dict)


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

    def client_buffered_bytes(self) -> int:
        """Bytes waiting in client sockets' write buffers on this node (what slow readers cost)."""
        total = 0
        for s in self.sessions.all:
            t = getattr(s, "transport", None)
            if t is not None and not t.is_closing():
                total += t.get_write_buffer_size()
        return total

    def handle_bus_event(self, event: str) -> None:
        """Invalidate the cache; on ``kill:<id>`` terminate that connection's sessions."""
        self.auth_cache.handle_event(event)
        kind, _, ident = event.partition(":")
        if kind == "kill":
            n = self.sessions.terminate_connection(ident, "connection deleted or dissociated")
            if n:
                log.info("terminated %d sessions of %s", n, ident)


class ClientSession(asyncio.Protocol):
    """One client connection: handshake, then relay through a device stream."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client_addr = ""
        self.state = "sniff"
        self.protocol = ""
        self.socks: Socks5ServerConnection | None = None
        self.http_parser: http.RequestHeadParser | None = None
        self.http_forward = None
        self.connection_id: str | None = None
        self.device_id: str | None = None
        self.record: CredentialRecord | None = None
        self.stream = None
        self.cancel_open = None
        self.timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.bytes_in = 0      # target -> client
        self.bytes_out = 0     # client -> target
        self.reported_in = 0
        self.reported_out = 0
        self.started = 0.0
        self.started_wall: datetime | None = None
        self.target_host = ""
        self.target_port = 0
        self.resolved_ip = ""
        self.action = ""
        self.block_reason: str | None = None
        self.reply_code = -1
        self.error = ""
        self.http_raw = bytearray()
        self.logged = False
        self.client_eof = False
        self.upstream_eof = False

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH, low=CLIENT_WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.client_addr = peer[0] if peer else ""
        self.server.handshaking.add(self)
        self.timer = asyncio.get_running_loop().call_later(self.server.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state == "relay":
            self.bytes_out += len(data)
            self.stream.write(data)  # type: ignore[union-attr]
            return
        if self.state == "sniff":
            if data[0] == 0x05:
                self.state, self.protocol = "socks", "socks5"
                self.socks = Socks5ServerConnection()
            else:
                self.state, self.protocol = "http", "http"
                self.http_parser = http.RequestHeadParser()
        if self.state == "socks":
            self._socks_events(self.socks.receive_data(data))  # type: ignore[union-attr]
        elif self.state == "http":
            self.http_raw += data
            self._http_data(data)
        elif self.state == "forward":
            self.http_forward.client_data(data)  # type: ignore[union-attr]
        # 'auth' / 'opening': reading is paused; anything that still arrives stays in the parser.

    def eof_received(self) -> bool:
        if self.state == "relay" and self.stream is not None:
            self.client_eof = True
            self.stream.write_eof()
            if self.upstream_eof:  # both directions finished: nothing left to relay
                self.transport.close()  # type: ignore[union-attr]
            return True
        if self.state == "forward" and self.http_forward is not None:
            self.http_forward.client_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.handshaking.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.cancel_open is not None:
            self.cancel_open()
            self.cancel_open = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close_quietly()
        if self.http_forward is not None:
            self.http_forward.client_lost()
        prev, self.state = self.state, "closed"
        if prev in ("relay", "forward"):
            self.server.sessions.remove(self)
        self._log_attempt()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.state == "forward" and self.http_forward is not None:
            self.http_forward.pause_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stream is not None:
            self.stream.sink_drained()
        elif self.state == "forward" and self.http_forward is not None:
            self.http_forward.resume_upstream()

    # -- StreamHandler (the device side of the relay) ------------------------------------------
    def open_result(self, result: OpenResult) -> None:
        self.cancel_open = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.resolved_ip = result.resolved_ip
        if self.state == "closed":
            if result.stream is not None:
                result.stream.close_quietly()
            return
        if result.rep != 0 or result.stream is None:
            self._fail(result.rep or Socks5Reply.GENERAL_FAILURE, result.reason or "device could not connect")
            return
        self.stream = result.stream
        self.reply_code = 0
        self.server.metrics.sessions_established += 1
        self.server.handshaking.discard(self)
        self.server.sessions.add(self)
        if self.protocol == "socks5":
            self.transport.write(self.socks.reply(0, result.bound_host, result.bound_port))  # type: ignore[union-attr]
            early = self.socks.take_remaining()  # type: ignore[union-attr]
        else:
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")  # type: ignore[union-attr]
            early = self.http_parser.take_remaining()  # type: ignore[union-attr]
        self.state = "relay"
        if early:
            self.bytes_out += len(early)
            self.stream.write(early)
        self.transport.resume_reading()  # type: ignore[union-attr]

    def stream_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

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
        if error:
            self.error = error
        t = self.transport
        if t is not None and not t.is_closing():
            # close() still flushes what the device already sent before the stream ended.
            t.close()

    def pause_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.state == "relay":
            self.transport.resume_reading()

    def sink_ready(self) -> bool:
        return not self.write_paused

    def terminate(self, reason: str) -> None:
        """Close this session now (connection deleted/dissociated, node shutdown)."""
        self.error = reason
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.reset(reason)
        if self.transport is not None:
            self.transport.abort()

    # -- SOCKS5 -------------------------------------------------------------------------------
    def _socks_events(self, events: list) -> None:
        socks = self.socks
        assert socks is not None and self.transport is not None
        for ev in events:
            if isinstance(ev, Greeting):
                answer = socks.select_method(ev)
                self.transport.write(answer)
                if answer[1] == 0xFF:
                    self.transport.close()
                    return
                events.extend(socks.receive_data(b""))  # credentials the client sent ahead
            elif isinstance(ev, Credentials):
                self._authenticate(ev.username, ev.password)
                return  # further bytes are parsed after the auth answer
            elif isinstance(ev, Request):
                self._socks_request(ev)
                return
            elif isinstance(ev, ProtocolError):
                if ev.reply:
                    self.transport.write(ev.reply)
                self.transport.close()
                return

    def _socks_request(self, req: Request) -> None:
        self.server.metrics.sessions_total += 1
        self.target_host, self.target_port = req.host, req.port
        if req.command != 1:
            self.reply_code = Socks5Reply.COMMAND_NOT_SUPPORTED
            self.transport.write(self.socks.reply(Socks5Reply.COMMAND_NOT_SUPPORTED))  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
            return
        self._connect()

    # -- HTTP ---------------------------------------------------------------------------------
    def _http_data(self, data: bytes) -> None:
        assert self.http_parser is not None and self.transport is not None
        try:
            head = self.http_parser.receive_data(data)
        except http.HttpParseError as exc:
            self.transport.write(http.error_response(exc.status, exc.reason))
            self.transport.close()
            return
        if head is None:
            return
        if head.method.upper() != "CONNECT":
            self._start_forward()
            return
        self.http_raw = bytearray()
        try:
            host, port = http.parse_connect_target(head.target)
        except http.HttpParseError as exc:
            self.transport.write(http.error_response(exc.status, exc.reason))
            self.transport.close()
            return
        creds = http.parse_proxy_authorization(head.get("Proxy-Authorization"))
        if creds is None:
            self.transport.write(http.proxy_auth_required("proxy authentication required"))
            self.transport.close()
            return
        self.target_host, self.target_port = host, port
        self.server.metrics.sessions_total += 1
        self._authenticate(creds[0], creds[1], on_ok=self._connect)

    def _start_forward(self) -> None:
        from .http_forward import HttpForwardRelay

        self.state = "forward"
        self.server.handshaking.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        raw, self.http_raw = bytes(self.http_raw), bytearray()
        self.http_forward = HttpForwardRelay(self)
        self.http_forward.client_data(raw)

    # -- shared steps -------------------------------------------------------------------------
    def _authenticate(self, username: str, password: str, on_ok: Callable[[], None] | None = None) -> None:
        srv = self.server
        limiter = srv.limiter
        conn_id = normalize_connection_id(username)
        if not limiter.allowed(self.client_addr, conn_id):
            srv.metrics.auth_rate_limited += 1
            self._auth_done(None, "too many failed attempts", conn_id, on_ok)
            return
        if conn_id is None:
            self._auth_done(None, "unknown connection", None, on_ok)
            return
        cached = srv.auth_cache.get_cached(conn_id)
        if cached is not MISSING:
            self._check(cached, password, conn_id, on_ok)  # type: ignore[arg-type]
            return
        self.state = "auth"
        self.transport.pause_reading()  # type: ignore[union-attr]
        asyncio.get_running_loop().create_task(self._lookup(conn_id, password, on_ok))

    async def _lookup(self, conn_id: str, password: str, on_ok: Callable[[], None] | None) -> None:
        try:
            record = await self.server.auth_cache.lookup(conn_id)
        except Exception as exc:  # store unreachable: a clear refusal, not a crash
            log.warning("credential lookup failed: %s", exc)
            self._store_down()
            return
        if self.transport is None or self.transport.is_closing():
            return
        self.state = {"socks5": "socks", "http": "http"}[self.protocol] if self.http_forward is None else "forward"
        self.transport.resume_reading()
        self._check(record, password, conn_id, on_ok)

    def _store_down(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.protocol == "socks5":
            t.write(b"\x01\x01")
        else:
            t.write(http.error_response(503, "credential store unavailable"))
        t.close()

    def _check(self, record: CredentialRecord | None, password: str, conn_id: str, on_ok: Callable[[], None] | None) -> None:
        if record is None or not password or not record.check_password(password):
            self._auth_done(None, "invalid credentials", conn_id, on_ok)
            return
        self._auth_done(record, "", conn_id, on_ok)

    def _auth_done(self, record: CredentialRecord | None, reason: str, conn_id: str | None,
                   on_ok: Callable[[], None] | None) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        srv = self.server
        if record is None:
            srv.metrics.auth_failures += 1
            srv.limiter.record_failure(self.client_addr)
            if conn_id is not None:
                srv.limiter.record_failure(conn_id)
            if self.protocol == "socks5":
                t.write(self.socks.auth_reply(False))  # type: ignore[union-attr]
            else:
                t.write(http.proxy_auth_required(reason))
            t.close()
            return
        srv.limiter.record_success(self.client_addr, record.connection_id)
        self.record = record
        self.connection_id = record.connection_id
        self.device_id = record.device_id
        if self.protocol == "socks5":
            t.write(self.socks.auth_reply(True))  # type: ignore[union-attr]
            rest = self.socks.receive_data(b"")  # type: ignore[union-attr]
            if rest:
                self._socks_events(rest)
        elif on_ok is not None:
            on_ok()

    def _connect(self) -> None:
        """Blacklist, route, open a stream on the device."""
        srv = self.server
        record = self.record
        assert record is not None and self.transport is not None
        self.started = time.monotonic()
        self.started_wall = datetime.now(UTC)
        host, port = self.target_host, self.target_port
        try:
            normalize_host(host)
        except ValueError:
            self.action = "allowed"
            self._fail(Socks5Reply.HOST_UNREACHABLE, "invalid target host", http_status=(400, "Bad Request"))
            return
        hit = first_match(host, record.blacklists)
        if hit is not None:
            scope, entry = hit
            self.action = "blocked"
            self.block_reason = f"{scope} blacklist: {entry}"
            srv.metrics.sessions_blocked += 1
            self._fail(Socks5Reply.NOT_ALLOWED, self.block_reason, log_blocked=True)
            return
        self.action = "allowed"
        if record.device_id is None and not getattr(srv.exit, "needs_no_device", False):
            self._fail(Socks5Reply.NETWORK_UNREACHABLE, "no device associated with this connection",
                       http_status=(403, "Forbidden"))
            return
        self.state = "opening"
        self.transport.pause_reading()
        cancel = srv.exit.open(record.device_id, host, port, self)
        if cancel is None:
            self._fail(Socks5Reply.NETWORK_UNREACHABLE, "device offline")
            return
        if self.state == "opening":
            self.cancel_open = cancel
            if self.timer is not None:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_later(srv.open_timeout, self._open_timeout)

    def _open_timeout(self) -> None:
        self.timer = None
        if self.state != "opening":
            return
        if self.cancel_open is not None:
            self.cancel_open()
            self.cancel_open = None
        self._fail(Socks5Reply.TTL_EXPIRED, "device did not answer in time")

    def _fail(self, rep: int, reason: str, log_blocked: bool = False,
              http_status: tuple[int, str] | None = None) -> None:
        self.reply_code = int(rep)
        self.error = reason
        if not log_blocked:
            self.server.metrics.sessions_failed += 1
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.protocol == "socks5":
            t.write(self.socks.reply(rep))  # type: ignore[union-attr]
        else:
            status, _text = http_status or HTTP_STATUS_FOR_REP.get(rep, (502, "Bad Gateway"))
            t.write(http.error_response(status, reason))
        t.close()

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.state in ("relay", "forward", "closed"):
            return
        if self.state == "opening":
            self._open_timeout()
            return
        if self.transport is not None:
            self.transport.abort()

    # -- request log --------------------------------------------------------------------------
    def report_traffic(self) -> None:
        """Emit the byte delta since the last report (interim bandwidth of long sessions)."""
        din, dout = self.bytes_in - self.reported_in, self.bytes_out - self.reported_out
        if (din or dout) and self.connection_id:
            self.reported_in, self.reported_out = self.bytes_in, self.bytes_out
            self.server.request_log.record_traffic(datetime.now(UTC), self.device_id or "", self.connection_id,
                                                   din, dout)

    def _log_attempt(self) -> None:
        if self.logged or not self.action or self.connection_id is None:
            return
        self.logged = True
        self.report_traffic()
        log_attempt(self.server, self.connection_id, self.device_id, self.target_host, self.target_port,
                    resolved_ip=self.resolved_ip, action=self.action, block_reason=self.block_reason,
                    bytes_in=self.bytes_in, bytes_out=self.bytes_out, started=self.started,
                    started_wall=self.started_wall, client_addr=self.client_addr, protocol=self.protocol,
                    reply_code=self.reply_code, error=self.error)


def log_attempt(server: ProxyServer, connection_id: str, device_id: str | None, host: str, port: int, *,
                resolved_ip: str, action: str, block_reason: str | None, bytes_in: int, bytes_out: int,
                started: float, started_wall: datetime | None, client_addr: str, protocol: str,
                reply_code: int, error: str, device_node: str = "") -> None:
    """Hand one request-log row (one proxy attempt) to the writer; never blocks."""
    server.metrics.bytes_in += bytes_in
    server.metrics.bytes_out += bytes_out
    ip = parse_ip(host) if host else None
    target_type = "domain" if ip is None else ("ipv4" if ip.version == 4 else "ipv6")
    shown = host if ip is None or ip.version == 4 else f"[{host}]"
    server.request_log.record_session(SessionRecord(
        timestamp=started_wall or datetime.now(UTC),
        connection_id=connection_id,
        device_id=device_id or "",
        server_node=server.node_name,
        target=f"{shown}:{port}",
        target_type=target_type,
        port=port,
        resolved_ip=resolved_ip,
        action=action,
        block_reason=block_reason,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        duration_ms=int((time.monotonic() - started) * 1000) if started else 0,
        client_addr=client_addr,
        protocol=protocol,
        reply_code=max(reply_code, 0),
        error=error,
        device_node=device_node,
    ))
