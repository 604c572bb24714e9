"""What a proxy attempt is allowed to do and what its request-log row says (sans-I/O).

:func:`check_target` is the one policy chain every protocol (SOCKS5, CONNECT, absolute-form)
applies before routing; :func:`open_failure` turns a device's answer into a refusal (a device's own
``NOT_ALLOWED`` is its target policy: logged ``blocked`` with ``blockReason=device_policy``).
A new refusal rule goes in :func:`check_target`; a new request-log field in :class:`Attempt` and
:class:`proxy.session_actions.AttemptRow`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from device_tunnel.replies import ReplyCode, http_status
from proxyorch.blacklist import first_match, normalize_host, parse_ip

from .session_actions import AttemptRow, Instant

if TYPE_CHECKING:
    from .auth_cache.cache import CredentialRecord

# blockReason of a target the device (or the node's direct exit) refused by its own policy.
DEVICE_POLICY = "device_policy"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a target is not opened: the reply code, the HTTP status, and what the log row says."""

    rep: ReplyCode
    reason: str
    http_status: int
    blocked: bool = False  # action=blocked with block_reason = reason (or ``block_reason``)
    block_reason: str | None = None
    retry_after: int | None = None  # HTTP Retry-After seconds


class Admission(Protocol):
    """The node's per-connection limits (:class:`proxy.limits.LimitBook`): takes a session slot or refuses."""

    def admit(self, record: CredentialRecord, now: float, wall: datetime) -> Refusal | None: ...

    def release(self, connection_id: str) -> None: ...


INVALID_HOST = Refusal(ReplyCode.HOST_UNREACHABLE, "invalid target host", 400)
NO_DEVICE = Refusal(ReplyCode.NETWORK_UNREACHABLE, "no device associated with this connection", 403)
DEVICE_OFFLINE = Refusal(ReplyCode.NETWORK_UNREACHABLE, "device offline", 502)
ROTATION_TIMED_OUT = Refusal(ReplyCode.NETWORK_UNREACHABLE, "device IP rotation did not end in time", 502)


def check_target(record: CredentialRecord, host: str, needs_no_device: bool) -> Refusal | None:
    """The policy chain every protocol applies before routing: valid host, blacklists, a device."""
    try:
        normalize_host(host)
    except ValueError:
        return INVALID_HOST
    hit = first_match(host, record.blacklists)
    if hit is not None:
        scope, entry = hit
        return Refusal(ReplyCode.NOT_ALLOWED, f"{scope} blacklist: {entry}", 403, blocked=True)
    if record.device_id is None and not record.is_pool and not needs_no_device:
        return NO_DEVICE
    return None


def check_admission(record: CredentialRecord, gate: Admission | None, now: Instant) -> Refusal | None:
    """The connection's limits: quota left and a free session slot (taken when None is returned)."""
    if gate is None:
        return None
    return gate.admit(record, now.mono, now.wall)


def open_failure(rep: int, reason: str) -> Refusal:
    """The refusal for a failed open: a device's own ``NOT_ALLOWED`` is its target policy (blocked)."""
    try:
        code = ReplyCode(rep) if rep else ReplyCode.GENERAL_FAILURE
    except ValueError:
        code = ReplyCode.GENERAL_FAILURE
    reason = reason or "device could not connect"
    if code is ReplyCode.NOT_ALLOWED:
        return Refusal(code, reason, 403, blocked=True)
    return Refusal(code, reason, http_status(code))


@dataclass(slots=True)
class Attempt:
    """What the request-log row of one attempt will say."""

    host: str
    port: int
    protocol: str
    started: Instant | None = None
    resolved_ip: str = ""
    action: str = ""
    block_reason: str | None = None
    reply_code: int = -1
    error: str = ""
    bytes_in: int = 0  # target -> client
    bytes_out: int = 0  # client -> target
    logged: bool = False
    device_node: str = ""  # the node holding the device's tunnel when relayed ("" = this node)
    device_id: str | None = None  # the device routing chose (a pool member), when known

    @property
    def started_wall(self) -> datetime | None:
        return self.started.wall if self.started is not None else None

    def refuse(self, refusal: Refusal, detail: str | None = None) -> None:
        """Record a refusal; ``detail`` is the block reason logged (defaults to the refusal's reason)."""
        self.reply_code = int(refusal.rep)
        self.error = refusal.reason
        if refusal.blocked:
            self.action, self.block_reason = "blocked", detail or refusal.block_reason or refusal.reason
        elif not self.action:
            self.action = "allowed"

    def row(self, connection_id: str, device_id: str | None, client_addr: str, now: Instant) -> AttemptRow:
        """The row, with the duration up to ``now``."""
        host, port = self.host, self.port
        try:
            ip = parse_ip(host) if host else None
        except ValueError:  # an invalid host is logged as the client sent it
            ip = None
        target_type = "domain" if ip is None else ("ipv4" if ip.version == 4 else "ipv6")
        shown = host if ip is None or ip.version == 4 else f"[{host}]"
        started = self.started
        return AttemptRow(
            timestamp=started.wall if started else now.wall,
            connection_id=connection_id,
            device_id=self.device_id or device_id or "",
            device_node=self.device_node,
            target=f"{shown}:{port}",
            target_type=target_type,
            port=port,
            resolved_ip=self.resolved_ip,
            action=self.action,
            block_reason=self.block_reason,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration_ms=int((now.mono - started.mono) * 1000) if started else 0,
            client_addr=client_addr,
            protocol=self.protocol,
            reply_code=max(self.reply_code, 0),
            error=self.error,
        )
