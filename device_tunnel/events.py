"""Events a :class:`~device_tunnel.connection.TunnelConnection` reports (bytes in -> events out)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ErrorCode


class Event:
    """Base class of every tunnel event."""

    __slots__ = ()


@dataclass(slots=True)
class HelloReceived(Event):
    """Node side: the device introduced itself; answer with ``accept()`` or ``refuse()``."""

    device_id: str
    token: str
    version: int
    meta: dict
    features: tuple[str, ...] = ()  # what the device supports beyond the base protocol (e.g. "udp")


@dataclass(slots=True)
class WelcomeReceived(Event):
    """Agent side: the node's answer to HELLO (``ok`` False = refused; the node closes)."""

    ok: bool
    node: str
    error: str
    ping_interval: float


@dataclass(slots=True)
class StreamOpenRequested(Event):
    """Agent side: connect to host:port, then ``accept_stream`` or ``reject_stream``."""

    stream_id: int
    host: str
    port: int
    udp: bool = False  # a UDP association (OPEN with the UDP flag): no connect, DATAGRAMs follow

    relay: dict | None = None  # node-to-node links: {"device", "connection"} (see relay.py)


@dataclass(slots=True)
class DatagramReceived(Event):
    """A DATAGRAM of a UDP stream: to ``host:port`` (node -> device) or from it (device -> node)."""

    stream_id: int
    host: str
    port: int
    data: bytes | memoryview


@dataclass(slots=True)
class StreamOpened(Event):
    """Node side: the device connected (OPEN_OK)."""

    stream_id: int
    bound_host: str
    bound_port: int
    resolved_ip: str


@dataclass(slots=True)
class StreamOpenFailed(Event):
    """Node side: the device could not connect; ``rep`` is a ReplyCode value."""

    stream_id: int
    rep: int
    reason: str
    resolved_ip: str


@dataclass(slots=True)
class DataReceived(Event):
    """Stream bytes for the local sink. Credit returns only with ``acknowledge_received_data``."""

    stream_id: int
    data: bytes | memoryview


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream (FIN): no more DATA will come."""

    stream_id: int


@dataclass(slots=True)
class StreamClosed(Event):
    """Both directions finished cleanly; the stream is gone."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The stream was aborted: by the peer's RST (``remote``) or by a local protocol error."""

    stream_id: int
    code: ErrorCode
    reason: str
    remote: bool


@dataclass(slots=True)
class StreamResumed(Event):
    """The stream's send queue drained below its high-water mark: resume reading its source."""

    stream_id: int


@dataclass(slots=True)
class PingAcknowledged(Event):
    """A PING of ours came back; ``rtt`` in seconds."""

    rtt: float


@dataclass(slots=True)
class ControlReceived(Event):
    """Agent side: a CONTROL message; answer with ``send_control_reply``."""

    body: dict


@dataclass(slots=True)
class ControlReplyReceived(Event):
    """Node side: a CONTROL_REPLY."""

    body: dict


@dataclass(slots=True)
class GoAwayReceived(Event):
    """The peer opens/accepts no new streams; existing ones finish."""

    code: ErrorCode
    reason: str


@dataclass(slots=True)
class ConnectionTerminated(Event):
    """The tunnel is over: send ``data_to_send()`` one last time and close the transport."""

    code: ErrorCode
    reason: str
    remote: bool
