"""The decisions of one proxy client connection, sans-I/O: handshake → auth → policy → route → relay → log row.

:class:`SessionCore` is fed what happened (client bytes, the result of an authentication, the
result of opening a stream, a timer firing, the client going away) with the time passed in as an
:class:`Instant`, and returns a list of actions for the caller to carry out (send bytes, close,
authenticate these credentials, open a stream to device X host:port, emit a request-log row, …).
It serves SOCKS5, HTTP ``CONNECT`` and absolute-form forwarding alike. It imports neither asyncio
nor socket and reads no clock; ``proxy/server.py`` is the asyncio adapter that moves the bytes.

Relayed payload of an established SOCKS5/CONNECT session does not pass through the core: the
adapter copies it and counts it, and hands the counts over in :meth:`SessionCore.client_lost`.

The actions are in :mod:`proxy.session_actions`, the policy chain and the row in
:mod:`proxy.session_policy` (names re-exported here). Where to add things: a new SOCKS command
goes in :meth:`SessionCore._socks_request`; a new refusal rule in
:func:`proxy.session_policy.check_target` (used by every protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from device_tunnel.replies import ReplyCode

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
from .session_actions import (
    Action,
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
    Register,
    ResumeReading,
    Send,
    StartRelay,
    StartUdp,
    Unregister,
    UpstreamWrite,
)
from .session_policy import (
    DEVICE_OFFLINE,
    DEVICE_POLICY,
    NO_DEVICE,
    ROTATION_TIMED_OUT,
    Admission,
    Attempt,
    Refusal,
    check_admission,
    check_target,
    open_failure,
)
from .socks5.protocol import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    Credentials,
    Greeting,
    ProtocolError,
    Request,
    Socks5ServerConnection,
)
from .udp_association import UdpAssociation, UdpMetrics

if TYPE_CHECKING:
    from .access import AccessIndex
    from .auth_cache.cache import CredentialRecord

__all__ = [
    "DEVICE_POLICY",
    "ArmTimer",
    "Attempt",
    "AttemptRow",
    "Authenticate",
    "CancelOpen",
    "Close",
    "CloseUpstreamStream",
    "DisarmTimer",
    "EarlyData",
    "Instant",
    "LeaveHandshake",
    "LogRow",
    "OpenStream",
    "PauseReading",
    "Phase",
    "ProxyMetrics",
    "Refusal",
    "Register",
    "ResumeReading",
    "Send",
    "SessionCore",
    "StartRelay",
    "StartUdp",
    "Unregister",
    "UpstreamWrite",
    "check_target",
]

# Client bytes held by the absolute-form forwarder before reading the client is paused.
FORWARD_BACKLOG_PAUSE = 256 * 1024
# Client bytes an optimistic open sends before the device's answer before reading the client is paused.
OPTIMISTIC_BUFFER = 64 * 1024


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
    udp: UdpMetrics = field(default_factory=UdpMetrics)


class Phase(Enum):
    """Where a client connection is."""

    SNIFF = "sniff"  # no byte yet
    SOCKS = "socks"  # SOCKS5 handshake
    HTTP = "http"  # reading the first HTTP request head
    AUTHENTICATING = "authenticating"  # Authenticate emitted, waiting for auth_result
    OPENING = "opening"  # OpenStream emitted, waiting for open_result
    RELAY = "relay"  # SOCKS5 / CONNECT stream established
    UDP = "udp"  # SOCKS5 UDP association established (the TCP connection only keeps it alive)
    FORWARD = "forward"  # absolute-form forwarding
    CLOSED = "closed"


class SessionCore:
    """One client connection's decisions. Every method returns the actions to carry out, in order."""

    def __init__(self, *, metrics: ProxyMetrics, client_addr: str, needs_no_device: bool = False,
                 handshake_timeout: float = 15.0, open_timeout: float = 15.0, optimistic: bool = False,
                 gate: Admission | None = None, access: AccessIndex | None = None) -> None:
        self.metrics = metrics
        self.gate = gate      # the connection's limits (session slots, quota); None = none enforced
        self.access = access  # ip_only ranges: which addresses need no password
        self._slot: str | None = None  # connection id whose session slot this session holds
        self._upstream_slots: set[int] = set()
        self._by_address = False  # authenticated by an ip_only range (SOCKS5 method 0x00)
        self._held: list = []  # SOCKS5 events parsed while authenticating
        self.client_addr = client_addr
        self.needs_no_device = needs_no_device
        self.handshake_timeout = handshake_timeout
        self.open_timeout = open_timeout
        # OPTIMISTIC_OPEN: SOCKS5/CONNECT answered as soon as the open is under way, the client's first
        # bytes sent behind it; a failure then resets the client (the row keeps the real reply code)
        self.optimistic = optimistic
        self.early_pending = False  # answered optimistically, the device's outcome not known yet
        self._early_sent = 0
        self.phase = Phase.SNIFF
        self.protocol = ""
        self.record: CredentialRecord | None = None
        self.attempt = Attempt("", 0, "")
        self._socks: Socks5ServerConnection | None = None
        self._head: http.RequestHeadParser | None = None
        self._head_raw = bytearray()
        self._resume_after_auth: Phase = Phase.SNIFF
        # absolute-form forwarding
        self._fsm: ForwardSession | None = None
        self._authed: tuple[str, str] | None = None
        self._pending_creds: tuple[str, str] | None = None
        self._registered = False
        self._upstream_seq = 0
        self._upstreams: dict[int, Attempt] = {}  # upstreams whose row is not written yet
        self._current: int | None = None  # the upstream the forwarder talks to
        self.udp: UdpAssociation | None = None  # once a UDP ASSOCIATE succeeded
        self._udp_port = 0  # the port the UDP ASSOCIATE request announced
        self._waiting_device = False  # the open waits for the device's IP rotation to end

    @property
    def forwarding(self) -> bool:
        """True once the connection forwards absolute-form HTTP requests."""
        return self._fsm is not None

    @property
    def upstream(self) -> Attempt | None:
        """The attempt of the request being forwarded now (absolute-form), if any."""
        return self._upstreams.get(self._current) if self._current is not None else None

    @property
    def connection_id(self) -> str | None:
        return self.record.connection_id if self.record is not None else None

    @property
    def device_id(self) -> str | None:
        """The device this session uses: the one routing chose, else the connection's device."""
        if self.attempt.device_id is not None:
            return self.attempt.device_id
        return self.record.device_id if self.record is not None else None

    # -- events -----------------------------------------------------------------------------------
    def start(self) -> list[Action]:
        """The client connected."""
        return [ArmTimer(self.handshake_timeout)]

    def receive_data(self, data: bytes, now: Instant) -> list[Action]:
        """Client bytes (outside an established relay, which the adapter copies itself)."""
        phase = self.phase
        if phase is Phase.SNIFF:
            if data[:1] == b"\x05":
                self.phase, self.protocol = Phase.SOCKS, "socks5"
                self._socks = Socks5ServerConnection()
            else:
                self.phase, self.protocol = Phase.HTTP, "http"
                self._head = http.RequestHeadParser()
            phase = self.phase
        if phase is Phase.SOCKS:
            assert self._socks is not None
            return self._socks_events(self._socks.receive_data(data), now)
        if phase is Phase.HTTP:
            self._head_raw += data
            return self._http_data(data, now)
        if phase is Phase.FORWARD:
            return self._forward_client_data(data, now)
        if phase is Phase.OPENING and self.early_pending:
            self._early_sent += len(data)
            if self._early_sent > OPTIMISTIC_BUFFER:
                return [EarlyData(data), PauseReading()]
            return [EarlyData(data)]
        if phase in (Phase.AUTHENTICATING, Phase.OPENING) and self.attempt.protocol != "udp":
            return self._hold(data)
        return []  # UDP: bytes on the control connection mean nothing (RFC 1928 section 7)

    def client_eof(self, now: Instant) -> list[Action]:
        """The client closed its sending side (outside an established relay)."""
        if self.phase is Phase.FORWARD and self._fsm is not None:
            return self._forward(self._fsm.client_eof(), now)
        return []

    def auth_result(self, record: CredentialRecord | None, reason: str, now: Instant,
                    refused: CredentialRecord | None = None) -> list[Action]:
        """The answer to Authenticate: the credential record, or None and why (``refused``: the right
        password from an address outside a ``password_and_ip`` list, logged ``blocked``/``ip``)."""
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is Phase.AUTHENTICATING:
            self.phase = self._resume_after_auth
        if record is None:
            self.metrics.auth_failures += 1
            self.phase = Phase.CLOSED
            actions: list[Action] = []
            if refused is not None:
                self.metrics.sessions_blocked += 1
                att = self.attempt
                att.started = att.started or now
                att.protocol = att.protocol or self.protocol
                att.action, att.block_reason, att.error, att.logged = "blocked", "ip", "address not allowed", True
                actions.append(LogRow(att.row(refused.connection_id, refused.device_id, self.client_addr, now)))
            if self.protocol == "socks5":
                assert self._socks is not None
                if self._by_address:  # method 0x00 was chosen: the client waits for a request reply
                    return [*actions, Send(self._socks.reply(ReplyCode.NOT_ALLOWED)), Close()]
                return [*actions, Send(self._socks.auth_reply(False)), Close()]
            return [*actions, Send(http.proxy_auth_required(reason)), Close()]
        self.record = record
        if self.phase is Phase.FORWARD:
            actions = []
            self._authed, self._pending_creds = self._pending_creds, None
            if not self._registered:
                self._registered = True
                actions.append(Register())
            assert self._fsm is not None
            return actions + self._forward(self._fsm.auth_ok(), now)
        if self.protocol == "socks5":
            assert self._socks is not None
            actions = [] if self._by_address else [Send(self._socks.auth_reply(True))]
            held, self._held = self._held, []
            return actions + self._socks_events(held + self._socks.receive_data(b""), now)
        return self._connect(now)

    def auth_unavailable(self) -> list[Action]:
        """The credential store could not be asked: a clear refusal."""
        if self.phase is Phase.CLOSED:
            return []
        self.phase = Phase.CLOSED
        if self.protocol == "socks5":
            return [Send(b"\x01\x01"), Close()]
        return [Send(http.error_response(503, "credential store unavailable")), Close()]

    def open_unavailable(self, now: Instant) -> list[Action]:
        """OpenStream found no live tunnel for the device."""
        if self.phase is not Phase.OPENING:
            return []
        return self._fail(DEVICE_OFFLINE)

    def routed(self, device_id: str, upstream: int | None = None) -> None:
        """Routing chose ``device_id`` (a pool member) for the session's stream or an upstream's."""
        att = self.attempt if upstream is None else self._upstreams.get(upstream)
        if att is not None:
            att.device_id = device_id

    def open_deferred(self, wait: float) -> list[Action]:
        """The device is rotating its IP: the open waits up to ``wait`` seconds for it, then fails 0x03."""
        if self.phase is not Phase.OPENING:
            return []
        self._waiting_device = True
        return [ArmTimer(wait)]

    def open_resumed(self) -> list[Action]:
        """The wait is over: the open proceeds (under the usual open timeout)."""
        if self.phase is not Phase.OPENING or not self._waiting_device:
            return []
        self._waiting_device = False
        return [ArmTimer(self.open_timeout)]

    def open_sent(self, now: Instant) -> list[Action]:
        """An optimistic OpenStream is under way: answer the client now, pass on what it sent ahead."""
        if self.phase is not Phase.OPENING or self.early_pending:
            return []
        self.early_pending = True
        if self.protocol == "socks5":
            assert self._socks is not None
            reply, early = self._socks.reply(ReplyCode.SUCCEEDED), self._socks.take_remaining()
        else:
            assert self._head is not None
            reply, early = b"HTTP/1.1 200 Connection established\r\n\r\n", self._head.take_remaining()
        self._early_sent = len(early)
        return [Send(reply), *([EarlyData(early)] if early else [])]

    def admission_refused(self, refusal: Refusal, now: Instant) -> list[Action]:
        """The cluster-wide session count (Redis) had no free slot: refuse like the node's own limit."""
        if self.phase is not Phase.OPENING:
            return []
        self.attempt.action = ""
        return [DisarmTimer(), *self._fail(refusal)]

    def open_result(self, rep: int, reason: str, resolved_ip: str, bound_host: str, bound_port: int,
                    opened: bool, now: Instant) -> list[Action]:
        """The device's answer to OpenStream (``opened``: a stream came with it)."""
        self.attempt.resolved_ip = resolved_ip
        if self.phase is not Phase.OPENING:
            return []
        actions: list[Action] = [DisarmTimer()]
        if rep != 0 or not opened:
            return actions + self._fail(open_failure(rep, reason))
        self.attempt.reply_code = 0
        self.metrics.sessions_established += 1
        if self.attempt.protocol == "udp":
            return actions + self._udp_started(bound_host, bound_port)
        self.phase = Phase.RELAY
        actions += [LeaveHandshake(), Register()]
        if self.early_pending:  # the client has its answer and its first bytes are on the stream
            self.early_pending = False
            return [*actions, StartRelay(b""), ResumeReading()]
        if self.protocol == "socks5":
            assert self._socks is not None
            actions.append(Send(self._socks.reply(ReplyCode.SUCCEEDED, bound_host, bound_port)))
            early = self._socks.take_remaining()
        else:
            assert self._head is not None
            actions.append(Send(b"HTTP/1.1 200 Connection established\r\n\r\n"))
            early = self._head.take_remaining()
        return [*actions, StartRelay(early), ResumeReading()]

    def stream_closed(self, error: str | None) -> None:
        """The session's stream ended (``error``: why, for the log row)."""
        if error:
            self.attempt.error = error

    def terminate(self, reason: str) -> None:
        """The node closes the session (connection deleted, shutdown): the reason goes in the row."""
        self.attempt.error = reason

    def timer_fired(self, now: Instant) -> list[Action]:
        """The timer of the last ArmTimer fired."""
        if self.phase is Phase.OPENING and self._waiting_device:
            return [CancelOpen(), *self._fail(ROTATION_TIMED_OUT)]
        if self.phase is Phase.OPENING:
            return [CancelOpen(), *self._fail(Refusal(ReplyCode.TTL_EXPIRED, "device did not answer in time", 504))]
        if self.phase in (Phase.RELAY, Phase.FORWARD, Phase.UDP, Phase.CLOSED):
            return []
        return [Close(abort=True)]

    def client_lost(self, now: Instant, bytes_in: int = 0, bytes_out: int = 0) -> list[Action]:
        """The client connection is gone; ``bytes_*`` are what the adapter relayed for this attempt."""
        prev, self.phase = self.phase, Phase.CLOSED
        actions: list[Action] = [DisarmTimer()]
        if prev is Phase.OPENING:
            actions.append(CancelOpen())
        for uid in list(self._upstreams):
            actions += self._finish_upstream(uid, now)
        self._current = None
        self._release()
        if prev in (Phase.RELAY, Phase.FORWARD, Phase.UDP) or self._registered:
            actions.append(Unregister())
        att = self.attempt
        att.bytes_in, att.bytes_out = bytes_in, bytes_out
        if self.udp is not None:
            self._udp_row(att)
        if not att.logged and att.action and self.record is not None:
            att.logged = True
            actions.append(LogRow(att.row(self.record.connection_id, self.record.device_id, self.client_addr, now)))
        return actions

    # -- forwarder upstreams --------------------------------------------------------------------
    def upstream_unavailable(self, uid: int, now: Instant) -> list[Action]:
        """OpenStream of upstream ``uid`` found no live tunnel."""
        return self._upstream_refused(uid, DEVICE_OFFLINE, now)

    def upstream_admission_refused(self, uid: int, refusal: Refusal, now: Instant) -> list[Action]:
        """The cluster-wide session count (Redis) had no free slot for upstream ``uid``."""
        if refusal.blocked:
            self.metrics.sessions_blocked += 1
        return self._upstream_refused(uid, refusal, now)

    def upstream_open_result(self, uid: int, rep: int, reason: str, resolved_ip: str, opened: bool,
                             now: Instant) -> list[Action]:
        """The device's answer for upstream ``uid``."""
        att = self._upstreams.get(uid)
        if att is None:  # already closed: drop the stream
            return [CloseUpstreamStream(uid)]
        att.resolved_ip = resolved_ip
        att.reply_code = rep
        if uid != self._current:
            return self._finish_upstream(uid, now)
        if rep != 0 or not opened:
            refusal = open_failure(rep, reason)
            att.error = reason
            if refusal.blocked:
                att.action, att.block_reason = "blocked", DEVICE_POLICY
                self.metrics.sessions_blocked += 1
            return self._upstream_refused(uid, refusal, now, record=False)
        assert self._fsm is not None
        return self._forward(self._fsm.upstream_opened(), now)

    def upstream_data(self, uid: int, data: bytes, now: Instant) -> list[Action]:
        """Bytes from upstream ``uid``."""
        att = self._upstreams.get(uid)
        if att is not None:
            att.bytes_in += len(data)
        if uid != self._current or self._fsm is None:
            return []
        return self._forward(self._fsm.upstream_data(bytes(data)), now)

    def upstream_eof(self, uid: int, now: Instant) -> list[Action]:
        """Upstream ``uid`` closed its sending side."""
        if uid != self._current or self._fsm is None:
            return []
        return self._forward(self._fsm.upstream_eof(), now)

    def upstream_closed(self, uid: int, error: str | None, now: Instant) -> list[Action]:
        """Upstream ``uid``'s stream ended."""
        att = self._upstreams.get(uid)
        if att is not None and error:
            att.error = error
        actions: list[Action] = []
        if uid == self._current and self._fsm is not None:
            actions += self._forward(self._fsm.upstream_eof(), now)
        return actions + self._finish_upstream(uid, now)

    # -- SOCKS5 -----------------------------------------------------------------------------------
    def _socks_events(self, events: list, now: Instant) -> list[Action]:
        socks = self._socks
        assert socks is not None
        actions: list[Action] = []
        for ev in events:
            if isinstance(ev, Greeting):
                by_address = self.access.match(self.client_addr) if self.access is not None else None
                answer = socks.select_method(ev, no_auth=by_address is not None)
                actions.append(Send(answer))
                if answer[1] == 0xFF:
                    self.phase = Phase.CLOSED
                    return [*actions, Close()]
                if answer[1] == 0x00 and by_address is not None:  # ip_only: the address is the credential
                    self._by_address = True
                    return actions + self._authenticate(by_address, "", by_address=True)
                events.extend(socks.receive_data(b""))  # credentials the client sent ahead
            elif isinstance(ev, Credentials):
                return actions + self._authenticate(ev.username, ev.password)
            elif isinstance(ev, Request):
                return actions + self._socks_request(ev, now)
            elif isinstance(ev, ProtocolError):
                self.phase = Phase.CLOSED
                return [*actions, *([Send(ev.reply)] if ev.reply else []), Close()]
        return actions

    def _socks_request(self, req: Request, now: Instant) -> list[Action]:
        self.metrics.sessions_total += 1
        self.attempt = Attempt(req.host, req.port, "socks5")
        if req.command == CMD_UDP_ASSOCIATE:
            return self._udp_associate(req, now)
        if req.command != CMD_CONNECT:
            assert self._socks is not None
            self.attempt.reply_code = ReplyCode.COMMAND_NOT_SUPPORTED
            self.phase = Phase.CLOSED
            return [Send(self._socks.reply(ReplyCode.COMMAND_NOT_SUPPORTED)), Close()]
        return self._connect(now)

    # -- SOCKS5 UDP ASSOCIATE -----------------------------------------------------------------------
    def _udp_associate(self, req: Request, now: Instant) -> list[Action]:
        """Open a UDP stream on the device; the adapter binds the relay socket. The row's target is
        the first datagram's (unknown yet); DST.PORT is where the client will send from (0: unknown)."""
        record = self.record
        assert record is not None
        self.attempt = att = Attempt("", 0, "udp", started=now)
        if record.device_id is None and not self.needs_no_device:
            return self._fail(NO_DEVICE)
        att.action = "allowed"
        self._udp_port = req.port
        self.phase = Phase.OPENING
        return [OpenStream(record.device_id, req.host, req.port, udp=True), ArmTimer(self.open_timeout)]

    def _udp_started(self, bound_host: str, bound_port: int) -> list[Action]:
        assert self.record is not None and self._socks is not None
        self.phase = Phase.UDP
        self.udp = UdpAssociation(self.record, self.client_addr, self._udp_port, self.metrics.udp, self.attempt)
        self.metrics.udp.associations_total += 1
        self.metrics.udp.associations_active += 1
        return [LeaveHandshake(), Register(), Send(self._socks.reply(ReplyCode.SUCCEEDED, bound_host, bound_port)),
                StartUdp()]

    def _udp_row(self, att: Attempt) -> None:
        """The association's one row: the first target relayed (else the first blocked), payload bytes."""
        udp = self.udp
        assert udp is not None
        self.metrics.udp.associations_active -= 1
        att.bytes_in, att.bytes_out = udp.bytes_in, udp.bytes_out
        att.resolved_ip = udp.resolved_ip
        if udp.first_target is not None:
            att.host, att.port = udp.first_target
        elif udp.first_blocked is not None:
            att.host, att.port, refusal = udp.first_blocked
            if refusal.blocked:
                att.action, att.block_reason = "blocked", refusal.reason
        summary = udp.summary()
        if summary and not att.error:
            att.error = summary

    # -- HTTP CONNECT -----------------------------------------------------------------------------
    def _http_data(self, data: bytes, now: Instant) -> list[Action]:
        assert self._head is not None
        try:
            head = self._head.receive_data(data)
        except http.HttpParseError as exc:
            return self._http_refuse(http.error_response(exc.status, exc.reason))
        if head is None:
            return []
        if head.method.upper() != "CONNECT":
            return self._start_forward(now)
        self._head_raw = bytearray()
        try:
            host, port = http.parse_connect_target(head.target)
        except http.HttpParseError as exc:
            return self._http_refuse(http.error_response(exc.status, exc.reason))
        creds = http.parse_proxy_authorization(head.get("Proxy-Authorization"))
        by_address = self._ip_only_connection() if creds is None else None
        if creds is None and by_address is None:
            return self._http_refuse(http.proxy_auth_required("proxy authentication required"))
        self.attempt = Attempt(host, port, "http")
        self.metrics.sessions_total += 1
        if by_address is not None:
            return self._authenticate(by_address, "", by_address=True)
        assert creds is not None
        return self._authenticate(*creds)

    def _ip_only_connection(self) -> str | None:
        """The ``ip_only`` connection whose ranges hold the client's address (no password needed)."""
        return self.access.match(self.client_addr) if self.access is not None else None

    def _http_refuse(self, response: bytes) -> list[Action]:
        self.phase = Phase.CLOSED
        return [Send(response), Close()]

    # -- shared steps -----------------------------------------------------------------------------
    def _authenticate(self, username: str, password: str, by_address: bool = False) -> list[Action]:
        if self.phase is not Phase.FORWARD:  # the forwarder keeps taking (and holding) client bytes
            self._resume_after_auth = self.phase
            self.phase = Phase.AUTHENTICATING
        return [Authenticate(username, password, by_address)]

    def _release(self) -> None:
        """Give back the session slot(s) this session holds."""
        if self.gate is not None:
            if self._slot is not None:
                self.gate.release(self._slot)
            for _ in self._upstream_slots:
                assert self.record is not None
                self.gate.release(self.record.connection_id)
        self._slot = None
        self._upstream_slots.clear()

    def _hold(self, data: bytes) -> list[Action]:
        """Bytes that arrive before the session can use them stay in the parser (bounded there)."""
        if self._socks is not None:
            events = self._socks.receive_data(data)
            if any(isinstance(ev, ProtocolError) for ev in events):
                return self._abort_handshake()
            self._held += events  # a request sent ahead while the address is checked (method 0x00)
        elif self._head is not None:
            self._head.receive_data(data)
        return []

    def _abort_handshake(self) -> list[Action]:
        actions: list[Action] = [CancelOpen()] if self.phase is Phase.OPENING else []
        self.phase = Phase.CLOSED
        return [*actions, Close()]

    def _connect(self, now: Instant) -> list[Action]:
        """Policy, route, open a stream on the device."""
        record = self.record
        assert record is not None
        att = self.attempt
        att.started = now
        refusal = check_target(record, att.host, self.needs_no_device) or check_admission(record, self.gate, now)
        if refusal is not None:
            return self._fail(refusal)
        if self.gate is not None:
            self._slot = record.connection_id
        att.action = "allowed"
        self.phase = Phase.OPENING
        # the timer first: opening may defer (device rotating) and re-arm it for the wait
        if self.optimistic:  # the adapter answers with open_sent (or open_unavailable)
            return [ArmTimer(self.open_timeout), OpenStream(record.device_id, att.host, att.port, optimistic=True)]
        return [PauseReading(), ArmTimer(self.open_timeout), OpenStream(record.device_id, att.host, att.port)]

    def _fail(self, refusal: Refusal) -> list[Action]:
        att = self.attempt
        blocked_by_device = refusal.blocked and att.action == "allowed"
        att.refuse(refusal, DEVICE_POLICY if blocked_by_device else None)
        if refusal.blocked:
            self.metrics.sessions_blocked += 1
        else:
            self.metrics.sessions_failed += 1
        self.phase = Phase.CLOSED
        self._release()
        if self.early_pending:  # the client was told "succeeded": reset it; the row has the real code
            self.early_pending = False
            return [Close(abort=True, reset=True)]
        if self.protocol == "socks5":
            assert self._socks is not None
            return [Send(self._socks.reply(refusal.rep)), Close()]
        extra = [("Retry-After", str(refusal.retry_after))] if refusal.retry_after else []
        return [Send(http.error_response(refusal.http_status, refusal.reason, extra)), Close()]

    # -- absolute-form forwarding ---------------------------------------------------------------
    def _start_forward(self, now: Instant) -> list[Action]:
        self.phase = Phase.FORWARD
        self._fsm = ForwardSession()
        raw, self._head_raw = bytes(self._head_raw), bytearray()
        return [LeaveHandshake(), DisarmTimer(), *self._forward_client_data(raw, now)]

    def _forward_client_data(self, data: bytes, now: Instant) -> list[Action]:
        fsm = self._fsm
        assert fsm is not None
        actions = self._forward(fsm.client_data(data), now)
        if fsm.client_backlog > FORWARD_BACKLOG_PAUSE and self.phase is not Phase.CLOSED:
            actions.append(PauseReading())
        return actions

    def _forward(self, fsm_actions: list, now: Instant) -> list[Action]:
        """Carry out the forwarder's actions as far as they are decisions; the rest goes to the adapter."""
        out: list[Action] = []
        for a in fsm_actions:
            if isinstance(a, SendClient):
                out.append(Send(a.data))
            elif isinstance(a, SendUpstream):
                uid = self._current
                if uid is not None and uid in self._upstreams:
                    self._upstreams[uid].bytes_out += len(a.data)
                    out.append(UpstreamWrite(uid, a.data))
            elif isinstance(a, NeedAuth):
                out += self._forward_auth(a.head, now)
            elif isinstance(a, OpenUpstream):
                out += self._open_upstream(a.host, a.port, now)
            elif isinstance(a, CloseUpstream):
                uid, self._current = self._current, None
                if uid is not None:
                    out += self._finish_upstream(uid, now)
            elif isinstance(a, CloseClient):
                self.phase = Phase.CLOSED
                out.append(Close())
        return out

    def _forward_auth(self, head: http.RequestHead, now: Instant) -> list[Action]:
        creds = http.parse_proxy_authorization(head.get("Proxy-Authorization"))
        if creds is None:
            by_address = self._ip_only_connection()
            if by_address is None:
                return self._http_refuse(http.proxy_auth_required("proxy authentication required"))
            creds = (by_address, "")
            if creds == self._authed and self.record is not None:
                assert self._fsm is not None
                return self._forward(self._fsm.auth_ok(), now)
            self.metrics.sessions_total += 1
            self._pending_creds = creds
            return self._authenticate(by_address, "", by_address=True)
        if creds == self._authed and self.record is not None:
            assert self._fsm is not None
            return self._forward(self._fsm.auth_ok(), now)
        self.metrics.sessions_total += 1
        self._pending_creds = creds
        return self._authenticate(*creds)

    def _open_upstream(self, host: str, port: int, now: Instant) -> list[Action]:
        record = self.record
        assert record is not None
        self._upstream_seq += 1
        uid = self._current = self._upstream_seq
        self._upstreams[uid] = Attempt(host, port, "http", started=now, action="allowed")
        refusal = check_target(record, host, self.needs_no_device) or check_admission(record, self.gate, now)
        if refusal is not None:
            if refusal.blocked:
                self.metrics.sessions_blocked += 1
            return self._upstream_refused(uid, refusal, now)
        if self.gate is not None:
            self._upstream_slots.add(uid)
        return [OpenStream(record.device_id, host, port, uid)]

    def _upstream_refused(self, uid: int, refusal: Refusal, now: Instant, record: bool = True) -> list[Action]:
        att = self._upstreams.get(uid)
        if att is None:
            return []
        if record:
            att.refuse(refusal)
        actions: list[Action] = []
        if uid == self._current and self._fsm is not None:
            self._current = None
            extra = (("Retry-After", str(refusal.retry_after)),) if refusal.retry_after else ()
            actions += self._forward(self._fsm.upstream_failed(refusal.http_status, refusal.reason, extra), now)
        return actions + self._finish_upstream(uid, now)

    def _finish_upstream(self, uid: int, now: Instant) -> list[Action]:
        """Upstream ``uid`` is done: close it and write its row (once)."""
        att = self._upstreams.pop(uid, None)
        if att is None:
            return []
        if uid in self._upstream_slots and self.gate is not None and self.record is not None:
            self._upstream_slots.discard(uid)
            self.gate.release(self.record.connection_id)
        actions: list[Action] = [CloseUpstreamStream(uid)]
        if self.record is not None:
            actions.append(LogRow(att.row(self.record.connection_id, self.record.device_id, self.client_addr, now),
                                  uid))
        return actions
