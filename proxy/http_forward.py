"""I/O for absolute-form HTTP forwarding: carries out the actions of a sans-I/O ``ForwardSession``.

Each upstream (one per target host:port, reused across keep-alive requests) is a stream opened
through the session's exit, with the same authentication, blacklist and request-log row per
upstream as a CONNECT attempt.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from device_tunnel.server import OpenResult

from .blacklist import first_match, normalize_host
from .http_connect import protocol as http
from .http_connect.forward import (
    CloseClient,
    CloseUpstream,
    ForwardSession,
    NeedAuth,
    OpenUpstream,
    SendClient,
    SendUpstream,
)

if TYPE_CHECKING:
    from .server import ClientSession

HTTP_FOR_REP = {2: 403, 3: 502, 4: 502, 5: 502, 6: 504}


class Upstream:
    """StreamHandler of one upstream stream; counts its bytes for the request log."""

    def __init__(self, relay: HttpForwardRelay, host: str, port: int) -> None:
        self.relay = relay
        self.host = host
        self.port = port
        self.stream = None
        self.cancel = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()
        self.started_wall = datetime.now(UTC)
        self.resolved_ip = ""
        self.reply_code = -1
        self.error = ""
        self.action = "allowed"
        self.block_reason: str | None = None
        self.done = False

    def open_result(self, result: OpenResult) -> None:
        self.cancel = None
        self.resolved_ip = result.resolved_ip
        self.reply_code = result.rep
        if self.relay.upstream is not self:
            if result.stream is not None:
                result.stream.close_quietly()
            self.finish()
            return
        if result.rep != 0 or result.stream is None:
            self.error = result.reason
            self.relay.apply(self.relay.fsm.upstream_failed(HTTP_FOR_REP.get(result.rep, 502), result.reason))
            self.finish()
            return
        self.stream = result.stream
        self.relay.apply(self.relay.fsm.upstream_opened())

    def stream_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.relay.upstream is self:
            self.relay.apply(self.relay.fsm.upstream_data(bytes(data)))

    def stream_eof(self) -> None:
        if self.relay.upstream is self:
            self.relay.apply(self.relay.fsm.upstream_eof())

    def stream_closed(self, error: str | None) -> None:
        self.stream = None
        if error:
            self.error = error
        if self.relay.upstream is self:
            self.relay.apply(self.relay.fsm.upstream_eof())
        self.finish()

    def pause_source(self) -> None:
        self.relay.session.pause_source()

    def resume_source(self) -> None:
        t = self.relay.session.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def sink_ready(self) -> bool:
        return not self.relay.session.write_paused

    def write(self, data: bytes) -> None:
        if self.stream is not None:
            self.bytes_out += len(data)
            self.stream.write(data)

    def close(self) -> None:
        if self.cancel is not None:
            self.cancel()
            self.cancel = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close_quietly()
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        s = self.relay.session
        from .server import log_attempt

        if s.connection_id is not None:
            log_attempt(s.server, s.connection_id, s.device_id, self.host, self.port, resolved_ip=self.resolved_ip,
                        action=self.action, block_reason=self.block_reason, bytes_in=self.bytes_in,
                        bytes_out=self.bytes_out, started=self.started, started_wall=self.started_wall,
                        client_addr=s.client_addr, protocol="http", reply_code=self.reply_code, error=self.error)
            if self.bytes_in or self.bytes_out:
                s.server.request_log.record_traffic(datetime.now(UTC), s.device_id or "", s.connection_id,
                                                    self.bytes_in, self.bytes_out)


class HttpForwardRelay:
    """Drives one client connection in absolute-form mode."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.fsm = ForwardSession()
        self.upstream: Upstream | None = None
        self.authed: tuple[str, str] | None = None
        self.registered = False

    # client side (called by ClientSession)
    def client_data(self, data: bytes) -> None:
        self.apply(self.fsm.client_data(data))
        t = self.session.transport
        if t is not None and not t.is_closing() and self.fsm.client_backlog > 256 * 1024:
            t.pause_reading()

    def client_eof(self) -> None:
        self.apply(self.fsm.client_eof())

    def client_lost(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def pause_upstream(self) -> None:
        pass  # the upstream stream withholds credit while the client's buffer is full (sink_ready)

    def resume_upstream(self) -> None:
        if self.upstream is not None and self.upstream.stream is not None:
            self.upstream.stream.sink_drained()

    # actions
    def apply(self, actions: list) -> None:
        s = self.session
        t = s.transport
        for action in actions:
            if isinstance(action, SendClient):
                if t is not None and not t.is_closing():
                    t.write(action.data)
            elif isinstance(action, SendUpstream):
                if self.upstream is not None:
                    self.upstream.write(action.data)
            elif isinstance(action, NeedAuth):
                self._auth(action.head)
            elif isinstance(action, OpenUpstream):
                self._open(action.host, action.port)
            elif isinstance(action, CloseUpstream):
                if self.upstream is not None:
                    self.upstream.close()
                    self.upstream = None
            elif isinstance(action, CloseClient):
                if t is not None:
                    t.close()

    def _auth(self, head: http.RequestHead) -> None:
        s = self.session
        creds = http.parse_proxy_authorization(head.get("Proxy-Authorization"))
        if creds is None:
            if s.transport is not None:
                s.transport.write(http.proxy_auth_required("proxy authentication required"))
                s.transport.close()
            return
        if creds == self.authed and s.record is not None:
            self.apply(self.fsm.auth_ok())
            return

        def ok() -> None:
            self.authed = creds
            if not self.registered:
                self.registered = True
                s.server.sessions.add(s)
            self.apply(self.fsm.auth_ok())

        s.server.metrics.sessions_total += 1
        s._authenticate(creds[0], creds[1], on_ok=ok)

    def _open(self, host: str, port: int) -> None:
        s = self.session
        record = s.record
        assert record is not None
        up = self.upstream = Upstream(self, host, port)
        try:
            normalize_host(host)
        except ValueError:
            up.reply_code = 4
            self.apply(self.fsm.upstream_failed(400, "invalid target host"))
            up.finish()
            return
        hit = first_match(host, record.blacklists)
        if hit is not None:
            up.action, up.block_reason, up.reply_code = "blocked", f"{hit[0]} blacklist: {hit[1]}", 2
            s.server.metrics.sessions_blocked += 1
            self.apply(self.fsm.upstream_failed(403, up.block_reason))
            up.finish()
            return
        if record.device_id is None and not getattr(s.server.exit, "needs_no_device", False):
            up.reply_code, up.error = 3, "no device associated with this connection"
            self.apply(self.fsm.upstream_failed(403, up.error))
            up.finish()
            return
        cancel = s.server.exit.open(record.device_id, host, port, up)
        if cancel is None:
            up.reply_code, up.error = 3, "device offline"
            self.apply(self.fsm.upstream_failed(502, "device offline"))
            up.finish()
            return
        if not up.done and up.stream is None:
            up.cancel = cancel
