"""The actions :class:`proxy.session_core.SessionCore` returns, and the time it is given (sans-I/O).

Each action is one thing the asyncio adapter (``proxy/server.py``) carries out. A new kind of
effect is a new dataclass here plus one branch in ``ClientSession._run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Instant:
    """The time of an event: ``mono`` (monotonic seconds, for durations) and ``wall`` (UTC, for rows)."""

    mono: float
    wall: datetime


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client connection (``abort``: drop unsent bytes; ``reset``: and send a TCP RST)."""

    abort: bool = False
    reset: bool = False


@dataclass(frozen=True, slots=True)
class PauseReading:
    """Stop reading the client."""


@dataclass(frozen=True, slots=True)
class ResumeReading:
    """Read the client again."""


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """(Re)start the session's one timer; call :meth:`SessionCore.timer_fired` when it fires."""

    delay: float


@dataclass(frozen=True, slots=True)
class DisarmTimer:
    """Cancel the session's timer."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials (rate limit, credential store); answer with ``auth_result``."""

    username: str
    password: str
    by_address: bool = False  # ip_only: ``username`` is the connection whose ranges hold the client address


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Open a stream to ``host:port`` through ``device_id``; ``upstream`` is None for the session's own
    stream (answer ``open_result``/``open_unavailable``) or a forwarder upstream id (``upstream_*``).
    ``udp``: a UDP association instead (bind the node's relay socket, open a UDP stream; answer
    ``open_result`` with the relay's address as the bound address)."""

    device_id: str | None
    host: str
    port: int
    upstream: int | None = None
    udp: bool = False
    optimistic: bool = False  # optimistic open: answer ``open_sent`` once the open is under way


@dataclass(frozen=True, slots=True)
class EarlyData:
    """Client bytes of an optimistic open: send them on the stream still opening."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CancelOpen:
    """Give up the open in flight for the session's own stream."""


@dataclass(frozen=True, slots=True)
class StartRelay:
    """The stream is open: relay both ways, first writing ``early`` (client bytes sent ahead) to it."""

    early: bytes


@dataclass(frozen=True, slots=True)
class StartUdp:
    """The UDP association is up: relay datagrams as :attr:`SessionCore.udp` decides."""


@dataclass(frozen=True, slots=True)
class UpstreamWrite:
    """Write ``data`` to forwarder upstream ``upstream``."""

    upstream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseUpstreamStream:
    """Cancel the open of / close forwarder upstream ``upstream``."""

    upstream: int


@dataclass(frozen=True, slots=True)
class LeaveHandshake:
    """The session is no longer handshaking (not subject to the node's handshake accounting)."""


@dataclass(frozen=True, slots=True)
class Register:
    """Add the session to the node's registry (so deleting its connection terminates it)."""


@dataclass(frozen=True, slots=True)
class Unregister:
    """Remove the session from the node's registry."""


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One request-log row: one SOCKS5/CONNECT attempt or one forwarder upstream."""

    timestamp: datetime
    connection_id: str
    device_id: str
    target: str
    target_type: str
    port: int
    resolved_ip: str
    action: str
    block_reason: str | None
    bytes_in: int
    bytes_out: int
    duration_ms: int
    client_addr: str
    protocol: str
    reply_code: int
    error: str
    device_node: str = ""  # node holding the device's tunnel; "" = this node (serverNode)


@dataclass(frozen=True, slots=True)
class LogRow:
    """Emit ``row``; ``upstream`` is None for the session's own attempt, else a forwarder upstream id."""

    row: AttemptRow
    upstream: int | None = None


Action = (Send | Close | PauseReading | ResumeReading | ArmTimer | DisarmTimer | Authenticate | OpenStream
          | CancelOpen | StartRelay | UpstreamWrite | CloseUpstreamStream | LeaveHandshake | Register
          | Unregister | LogRow | StartUdp | EarlyData)
