"""Stream states and the one table of allowed transitions (anything else is a protocol error)."""

from __future__ import annotations

from collections import deque
from enum import Enum

from .windows import ReceiveWindow


class StreamState(Enum):
    OPENING = "opening"                        # OPEN sent (node) / received (agent), no answer yet
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"    # we sent FIN
    HALF_CLOSED_REMOTE = "half_closed_remote"  # the peer sent FIN
    CLOSED = "closed"


class Transition(Enum):
    SEND_OPEN_OK = "send_open_ok"
    RECV_OPEN_OK = "recv_open_ok"
    SEND_OPEN_FAIL = "send_open_fail"
    RECV_OPEN_FAIL = "recv_open_fail"
    SEND_DATA = "send_data"
    RECV_DATA = "recv_data"
    SEND_FIN = "send_fin"
    RECV_FIN = "recv_fin"
    SEND_RST = "send_rst"
    RECV_RST = "recv_rst"


S, T = StreamState, Transition
TRANSITIONS: dict[tuple[StreamState, Transition], StreamState] = {
    (S.OPENING, T.SEND_OPEN_OK): S.OPEN,
    (S.OPENING, T.RECV_OPEN_OK): S.OPEN,
    (S.OPENING, T.SEND_OPEN_FAIL): S.CLOSED,
    (S.OPENING, T.RECV_OPEN_FAIL): S.CLOSED,
    (S.OPENING, T.SEND_RST): S.CLOSED,
    (S.OPENING, T.RECV_RST): S.CLOSED,
    (S.OPEN, T.SEND_DATA): S.OPEN,
    (S.OPEN, T.RECV_DATA): S.OPEN,
    (S.OPEN, T.SEND_FIN): S.HALF_CLOSED_LOCAL,
    (S.OPEN, T.RECV_FIN): S.HALF_CLOSED_REMOTE,
    (S.OPEN, T.SEND_RST): S.CLOSED,
    (S.OPEN, T.RECV_RST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, T.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, T.RECV_FIN): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, T.SEND_RST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, T.RECV_RST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, T.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, T.SEND_FIN): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, T.SEND_RST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, T.RECV_RST): S.CLOSED,
}
del S, T


def next_state(state: StreamState, transition: Transition) -> StreamState | None:
    """The state after ``transition``, or None when the table does not allow it."""
    return TRANSITIONS.get((state, transition))


class Stream:
    """Core record of one stream: state, send credit and queue, receive window."""

    __slots__ = ("id", "state", "send_credit", "pending", "pending_bytes", "fin_pending", "source_paused",
                 "recv", "bytes_sent", "bytes_received", "udp", "dgrams", "dgram_bytes", "early")

    def __init__(self, stream_id: int, recv: ReceiveWindow, send_credit: int = 0, udp: bool = False) -> None:
        self.id = stream_id
        self.state = StreamState.OPENING
        self.send_credit = send_credit
        self.pending: deque[memoryview] = deque()   # outbound bytes waiting for credit (no copies)
        self.pending_bytes = 0
        self.fin_pending = False
        self.source_paused = False
        self.recv = recv
        self.bytes_sent = 0
        self.bytes_received = 0
        self.udp = udp                              # a UDP association: DATAGRAM frames, never DATA
        self.dgrams: deque[tuple[bytes, bytes]] = deque()  # DATAGRAMs waiting for room (bounded)
        self.dgram_bytes = 0
        self.early = False  # node: optimistic open, DATA may follow OPEN before OPEN_OK

    @property
    def local_closed(self) -> bool:
        return self.state in (StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED) or self.fin_pending

    @property
    def remote_closed(self) -> bool:
        return self.state in (StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED)
