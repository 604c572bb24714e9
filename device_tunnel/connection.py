"""The tunnel connection as a sans-I/O state machine, shared by the node and the device agent.

In the manner of python-hyper h2 and aioquic: bytes in, events out (:meth:`receive_data`); calls
in, bytes out (:meth:`data_to_send`); credit only when the application says the bytes left its
local socket (:meth:`acknowledge_received_data`); timers as arguments (:meth:`get_timer`,
:meth:`handle_timer`). It imports no I/O module and reads no clock: every ``now`` is passed in
(seconds, monotonic). The wire format is ``PROTOCOL.md``.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from . import frames
from .errors import (
    ErrorCode,
    FloodError,
    HandshakeError,
    LocalUsageError,
    StreamError,
    TunnelError,
    error_code,
)
from .events import (
    ConnectionTerminated,
    ControlReceived,
    ControlReplyReceived,
    DatagramReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PingAcknowledged,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
    StreamReset,
    StreamResumed,
    WelcomeReceived,
)
from .frames import FLAG_ACK, FLAG_UDP, Frame, FrameDecoder, FrameType
from .pacing import ACTIVE_RTT, Pacer
from .replies import ReplyCode
from .stream import Stream, StreamState, Transition, next_state
from .windows import MemoryBudget, WindowManager, WindowSettings

REASON_MAX = 200  # characters of a peer's OPEN_FAIL reason kept

MAX_CHUNK = 64 * 1024       # largest DATA payload sent on a paced (slow) path with a large limit
SLOW_CHUNK = 16 * 1024      # ... with an in-flight limit under 1 MiB: a small frame waits behind less
FAST_CHUNK = frames.MAX_PAYLOAD  # on an unpaced (LAN, loopback) path: fewer, larger frames
PENDING_HIGH = 64 * 1024    # outbound bytes queued beyond the window before the source is paused
OUT_HIGH = 32 * 1024        # queued output beyond which new DATA waits in its stream's queue
# Scheduling classes: a stream that has sent less than URGENT_BYTES, or has at most SMALL_QUEUE queued,
# goes before the others ("new and small first"); round-robin within a class. After URGENT_RUN bytes of
# urgent data in a row a waiting bulk stream gets one turn, so bulk is never starved.
URGENT_BYTES = 64 * 1024
SMALL_QUEUE = 4 * 1024
URGENT_RUN = 256 * 1024
URGENT_SLACK = 16 * 1024    # paced path: urgent bytes beyond the in-flight limit / pacing rate
PROBE_INTERVAL = 0.05       # in-flight probes (PINGs) at most this often, 20/s: within a v2 peer's limit
PROBE_INTERVAL_PACE = 0.01  # ... 100/s when both sides announced "pace" (their PING limit is raised)
PING_PER_S_PACE = 250       # the PING limit when the peer announced "pace"
EARLY_DATA_MAX = 64 * 1024  # most stream bytes a node sends before OPEN_OK (optimistic open)


class Role(Enum):
    NODE = "node"
    AGENT = "agent"


# Frames each side may receive (anything else from the peer is a PROTOCOL_ERROR).
_ACCEPTS = {
    Role.NODE: frozenset({FrameType.HELLO, FrameType.OPEN_OK, FrameType.OPEN_FAIL, FrameType.DATA,
                          FrameType.WINDOW, FrameType.FIN, FrameType.RST, FrameType.PING,
                          FrameType.GOAWAY, FrameType.CONTROL_REPLY, FrameType.DATAGRAM}),
    Role.AGENT: frozenset({FrameType.WELCOME, FrameType.OPEN, FrameType.DATA, FrameType.WINDOW,
                           FrameType.FIN, FrameType.RST, FrameType.PING, FrameType.GOAWAY,
                           FrameType.CONTROL, FrameType.DATAGRAM}),
}


@dataclass
class TunnelConfig:
    """Timers, windows and flood limits of one tunnel connection."""

    ping_interval: float = 5.0
    dead_after: float = 15.0
    handshake_timeout: float = 10.0
    windows: WindowSettings = field(default_factory=WindowSettings)
    ping_per_s: int = 50            # PING frames (either kind) the peer may send per second
    # WINDOW frames over the connection's life: this many, plus one per KiB of DATA sent, plus 4 per
    # stream. Legit credit follows DATA; a flood beyond what our DATA explains is ENHANCE_YOUR_CALM.
    window_base: int = 1000
    control_per_s: int = 500        # CONTROL*, GOAWAY, unknown, empty DATA, OPEN* for dead streams
    # DATAGRAMs a UDP stream may queue while the tunnel has no room; beyond either bound they drop.
    dgram_queue_max: int = 256
    dgram_queue_bytes: int = 1024 * 1024
    dgram_tunnel_bytes: int = 16 * 1024 * 1024  # all UDP streams of the tunnel together
    # Hard cap on one stream's outbound queue (defense in depth: correct flow control never comes
    # near it); beyond it the stream is reset. 0 = 2 x (max_window + PENDING_HIGH + a frame), what
    # a source that keeps writing a full window of its own after being paused could queue, doubled.
    pending_max: int = 0


class _Rate:
    """Frames per one-second bucket; ``hit`` returns False once the budget is exceeded."""

    __slots__ = ("limit", "start", "count")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.start = -1e18
        self.count = 0

    def hit(self, now: float) -> bool:
        if now - self.start >= 1.0:
            self.start, self.count = now, 0
        self.count += 1
        return self.count <= self.limit


class TunnelConnection:
    """One tunnel connection, either side. Not thread-safe; one owner calls it."""

    def __init__(self, role: Role, now: float, config: TunnelConfig | None = None,
                 budget: MemoryBudget | None = None) -> None:
        self.role = role
        self.config = config or TunnelConfig()
        self.windows = WindowManager(self.config.windows, budget)
        self._decoder = FrameDecoder()
        self._accepts = _ACCEPTS[role]
        self.streams: dict[int, Stream] = {}
        self._highest_id = 0             # node: last id allocated; agent: last OPEN seen
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        self._waiting: dict[Stream, None] = {}  # streams with queued DATA, in round-robin order
        self._taken = 0                  # output bytes handed to the transport so far
        self._urgent_run = 0             # urgent bytes sent since bulk last had a turn
        self._announced_pace = False     # we announced "pace" (our PING limit follows the peer's)
        self.pacer = Pacer(PROBE_INTERVAL)
        self._probe_mark = 0             # data_bytes_sent at the last probe
        self._dgram_waiting: dict[Stream, None] = {}  # UDP streams with queued DATAGRAMs, in order
        self.datagrams_dropped = 0       # DATAGRAMs not sent: their stream's queue was full
        self._dgram_queued = 0           # payload bytes queued over every UDP stream
        self.peer_features: frozenset[str] = frozenset()  # node side: what HELLO announced
        self._events: list[Event] = []
        self.send_paused = False         # set by the adapter while its transport is full
        self.conn_send_credit = 0        # the peer's connection window (known after HELLO/WELCOME)
        self.handshake_done = False
        self._first_byte_seen = False  # node side: the peer's first byte must open a HELLO frame
        self._hello_seen = False
        self.closed = False
        self.close_code: ErrorCode | None = None
        self.going_away = False          # we sent GOAWAY
        self.peer_going_away = False
        self.now = now
        self.connected_at = now
        self.last_rx = now
        self._next_ping = now + self.config.ping_interval
        self._pings: deque[int] = deque(maxlen=4)
        self.rtt = 0.05
        self.rtt_samples = 0
        c = self.config
        self._ping_rate, self._control_rate = _Rate(c.ping_per_s), _Rate(c.control_per_s)
        self._windows_received = 0
        self.data_bytes_sent = 0
        # optimistic open: the agent takes DATA on a stream before its OPEN_OK, up to this many bytes
        # (announced in HELLO as "early_data"; 0 = the peer does not, and the node then waits for OPEN_OK)
        self.peer_early_data = 0
        self.stream_errors = 0  # streams this side reset for the peer's violation
        self.malformed_open_replies = 0  # of those: OPEN_OK with a malformed address
        self.pending_max = self.config.pending_max or 2 * (self.config.windows.max_window + PENDING_HIGH
                                                           + frames.MAX_PAYLOAD)
        self.queue_overflows = 0  # streams reset because their outbound queue passed pending_max

    # == handshake ================================================================================
    def send_hello(self, device_id: str, token: str, meta: dict, features: tuple[str, ...] = ()) -> None:
        """Agent: introduce the device (first frame on the connection); ``features`` such as "udp";
        ``early_data``: how much DATA may follow an OPEN before OPEN_OK (optimistic open)."""
        body = {"version": frames.PROTOCOL_VERSION, "device_id": device_id, "token": token, "meta": meta,
                "window": self.config.windows.conn_window, "early_data": self.config.windows.min_window}
        features = (*features, frames.FEATURE_PACE)
        self._announced_pace = True
        body["features"] = list(features)
        self._send_json(FrameType.HELLO, 0, body)

    def accept(self, node: str) -> None:
        """Node: the device may use this tunnel (WELCOME ok)."""
        if self.closed:
            return
        self.handshake_done = True
        self._announced_pace = True
        self._send_json(FrameType.WELCOME, 0, {"ok": True, "node": node,
                                               "ping_interval": self.config.ping_interval,
                                               "window": self.config.windows.conn_window,
                                               "features": [frames.FEATURE_PACE]})
        self._peer_features_known()
        self._next_ping = self.now  # a first RTT sample at once (it decides whether to pace)

    def refuse(self, error: str) -> None:
        """Node: refuse the device (WELCOME not ok, queued before the close)."""
        self._send_json(FrameType.WELCOME, 0, {"ok": False, "error": error})
        self._terminate(ErrorCode.HANDSHAKE_FAILED, error, remote=False, goaway=False)

    # == streams, node side =======================================================================
    def open_stream(self, host: str, port: int, early: bool = False, relay: dict | None = None) -> int:
        """Node: allocate a stream and queue OPEN. Raises LocalUsageError when no stream may open.

        ``early`` (optimistic open): when the agent announced ``early_data``, ``send_data`` may be called
        before OPEN_OK and up to that many bytes (at most ``EARLY_DATA_MAX``) follow OPEN at once; the
        rest, and a FIN, wait in the stream's queue for OPEN_OK. Without the announcement everything waits.
        ``relay`` (node-to-node links only) rides in the OPEN as ``"relay"``: which device to use."""
        if self.closed or not self.handshake_done or self.peer_going_away or self.going_away:
            raise LocalUsageError("tunnel is not accepting new streams")
        if not self.windows.can_open:
            raise LocalUsageError("tunnel has its maximum number of streams")
        self._highest_id += 1
        sid = self._highest_id
        rw = self.windows.open(sid, self.now)
        stream = self.streams[sid] = Stream(sid, rw)
        body: dict = {"host": host, "port": port, "window": rw.window}
        if relay is not None:
            body["relay"] = relay
        self._send_json(FrameType.OPEN, sid, body)
        if early:
            stream.early = True
            stream.send_credit = min(self.peer_early_data, EARLY_DATA_MAX)
        return sid

    def open_udp_stream(self) -> int:
        """Node: open a UDP association stream (OPEN with the UDP flag); DATAGRAMs follow OPEN_OK.
        Raises LocalUsageError when no stream may open or the device did not announce "udp"."""
        if frames.FEATURE_UDP not in self.peer_features:
            raise LocalUsageError("the device does not support UDP")
        if self.closed or not self.handshake_done or self.peer_going_away or self.going_away:
            raise LocalUsageError("tunnel is not accepting new streams")
        if not self.windows.can_open:
            raise LocalUsageError("tunnel has its maximum number of streams")
        self._highest_id += 1
        sid = self._highest_id
        rw = self.windows.open(sid, self.now, minimal=True)
        self.streams[sid] = Stream(sid, rw, udp=True)
        self._queue(frames.encode_json(FrameType.OPEN, sid, {"host": "", "port": 0, "window": rw.window}, FLAG_UDP))
        return sid

    def send_datagram(self, stream_id: int, host: str, port: int, payload: bytes) -> bool:
        """Queue one DATAGRAM on a UDP stream (to ``host:port`` from the node, from it on the device).
        Sent at once when the tunnel has room, else queued up to ``dgram_queue_max`` datagrams /
        ``dgram_queue_bytes``; False when it was dropped (queue full, stream gone, bad address or
        over-long payload). Not flow-controlled by stream credit: UDP semantics, never unbounded."""
        stream = self.streams.get(stream_id)
        if (stream is None or not stream.udp or self.closed or stream.local_closed
                or stream.state is StreamState.OPENING or len(payload) > frames.MAX_UDP_PAYLOAD):
            return False
        try:
            head = frames.encode_datagram_head(stream_id, frames.encode_address(host, port), len(payload))
        except ValueError:
            return False
        if not stream.dgrams and self._room() > 0:
            self._out.append(head)
            self._out.append(payload)
            self._out_bytes += len(head) + len(payload)
            return True
        c = self.config
        if (len(stream.dgrams) >= c.dgram_queue_max or stream.dgram_bytes + len(payload) > c.dgram_queue_bytes
                or self._dgram_queued + len(payload) > c.dgram_tunnel_bytes):
            self.datagrams_dropped += 1
            return False
        stream.dgrams.append((head, payload))
        stream.dgram_bytes += len(payload)
        self._dgram_queued += len(payload)
        self._dgram_waiting[stream] = None
        return True

    # == streams, agent side ======================================================================
    def accept_stream(self, stream_id: int, bound_host: str, bound_port: int, resolved_ip: str) -> bool:
        """Agent: the target is connected (OPEN_OK). False when the stream is gone meanwhile."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state is not StreamState.OPENING:
            return False
        stream.state = StreamState.OPEN
        self._send_json(FrameType.OPEN_OK, stream_id, {"bound_host": bound_host, "bound_port": bound_port,
                                                       "resolved_ip": resolved_ip, "window": stream.recv.window})
        return True

    def reject_stream(self, stream_id: int, rep: int, reason: str, resolved_ip: str = "") -> None:
        """Agent: the target could not be reached (OPEN_FAIL with a ReplyCode)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state is not StreamState.OPENING:
            return
        self._send_json(FrameType.OPEN_FAIL, stream_id, {"rep": int(rep), "reason": reason,
                                                         "resolved_ip": resolved_ip})
        self._forget(stream)

    # == data =====================================================================================
    def send_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Queue stream bytes (sent within the windows). Returns True when the source should pause
        (its queue is over ``PENDING_HIGH``; on every such write, so pausing must be idempotent);
        ``StreamResumed`` says when to resume. Bytes for a stream that is gone or half-closed
        locally are dropped. A write while paused that takes the queue over ``pending_max`` (a
        source that ignores the pause) resets the stream: RST to the peer, ``StreamReset`` here."""
        stream = self.streams.get(stream_id)
        if stream is None or not data or stream.local_closed or self.closed:
            return False
        if stream.udp or (stream.state is StreamState.OPENING and not stream.early):
            raise LocalUsageError(f"stream {stream_id} is not open yet or carries datagrams")
        n = len(data)
        if (not stream.pending and n <= stream.send_credit and n <= self.conn_send_credit
                and (not self._waiting or self._urgent(stream))):
            room = self._room(self._urgent(stream))
            if room > 0 and (n <= room or not self._paced):
                self._emit_data(stream, data)
                return False
        if isinstance(data, bytearray):
            data = bytes(data)  # the caller may reuse a mutable buffer
        stream.pending.append(memoryview(data))
        stream.pending_bytes += n
        self._waiting[stream] = None
        self._drain_waiting()
        if stream.source_paused and stream.pending_bytes > self.pending_max:  # paused before this write
            self._queue_overflow(stream)
            return False
        if stream.pending_bytes > PENDING_HIGH:
            if not stream.source_paused:
                stream.source_paused = True
                if self._events:
                    self._withdraw_resume(stream_id)
            return True  # on every write over the mark, not only the first: a lost pause heals
        return False

    def _queue_overflow(self, stream: Stream) -> None:
        """The stream's outbound queue passed ``pending_max``: its source ignored back-pressure (a bug;
        flow control keeps it near ``PENDING_HIGH`` plus a window). Reset it rather than grow."""
        self.queue_overflows += 1
        reason = f"outbound queue over {self.pending_max} bytes"
        self._queue(frames.encode_rst(stream.id, ErrorCode.INTERNAL_ERROR, reason))
        opening = stream.state is StreamState.OPENING
        self._forget(stream)
        if opening and self.role is Role.NODE:  # an optimistic open: its opener waits for an outcome
            self._events.append(StreamOpenFailed(stream.id, ReplyCode.GENERAL_FAILURE, reason, ""))
        else:
            self._events.append(StreamReset(stream.id, ErrorCode.INTERNAL_ERROR, reason, remote=False))

    def _withdraw_resume(self, stream_id: int) -> None:
        """The source was just paused again: a ``StreamResumed`` of this stream still queued (a drain
        inside another call, e.g. another stream's ``send_data``, took the queue below ``PENDING_HIGH``
        before this write filled it again) is stale. Delivered after the pause, it would resume the
        source while the core counts it paused, and the core would never say pause again."""
        self._events = [ev for ev in self._events
                        if not (type(ev) is StreamResumed and ev.stream_id == stream_id)]  # type: ignore[attr-defined]

    def send_eof(self, stream_id: int) -> None:
        """Half-close our direction: FIN after whatever is still queued."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        if stream.state is StreamState.OPENING:
            if stream.early:  # FIN only after OPEN_OK (the agent's table has no FIN while opening)
                stream.fin_pending = True
            return
        if stream.pending:
            stream.fin_pending = True
        else:
            self._send_fin(stream)

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort a stream (also an OPEN still waiting for its answer) and tell the peer."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self._queue(frames.encode_rst(stream_id, code, reason))
        self._forget(stream)

    def forget_stream(self, stream_id: int) -> None:
        """Drop a stream whose both directions ended, or RST it if it is still open either way."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.state is StreamState.CLOSED:
            self._forget(stream)
        else:
            self.reset_stream(stream_id, ErrorCode.LOCAL_CLOSED, "closed")

    def acknowledge_received_data(self, stream_id: int, n: int, now: float | None = None,
                                  force: bool = False) -> None:
        """``n`` received bytes really left the local socket: return credit (stream and connection).
        ``force`` sends even a small increment (the sink drained: never let the sender starve)."""
        if now is not None:
            self.now = now
        stream = self.streams.get(stream_id)
        w = self.windows
        if stream is not None and not force:  # fast path: below the quarter-window threshold
            rw = stream.recv
            window = rw.window
            if (rw.reserved == window and n <= rw.received - rw.acked
                    and rw.acked + n + window - rw.limit < (window >> 2)):
                rw.acked += n
                w.conn_acked += n
                if w.conn_acked + w.s.conn_window - w.conn_limit < (w.s.conn_window >> 3):
                    return
                stream = None  # only the connection credit is due
                n = 0
        if stream is not None:
            if stream.remote_closed:  # no more DATA will come: account, but send no stream credit
                w.consume(stream.recv, n)
            else:
                inc = w.acknowledge(stream.recv, n, self.now, self.rtt, force)
                if inc:
                    self._queue(frames.encode_window(stream_id, inc))
        inc = w.connection_increment(force)
        if inc:
            self._queue(frames.encode_window(0, inc))

    def stream_buffered(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        return stream.pending_bytes if stream is not None else 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes this side holds: queued outbound stream data plus output not yet taken."""
        return sum(s.pending_bytes for s in self._waiting) + self._dgram_queued + self._out_bytes

    @property
    def ping_limit(self) -> int:
        """PING frames the peer may send per second (raised when it announced "pace")."""
        return self._ping_rate.limit

    @property
    def in_flight(self) -> int:
        """Bytes written (to the transport) that the peer has not yet confirmed reading (probes)."""
        return self._taken + self._out_bytes - self.pacer.acked

    @property
    def held_bytes(self) -> int:
        """Received bytes not yet acknowledged by the application (the memory the windows bound)."""
        return sum(s.recv.held for s in self.streams.values())

    # == control ==================================================================================
    def send_control(self, body: dict) -> None:
        self._send_json(FrameType.CONTROL, 0, body)

    def send_control_reply(self, body: dict) -> None:
        self._send_json(FrameType.CONTROL_REPLY, 0, body)

    def send_goaway(self, reason: str, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """No new streams on this tunnel; the live ones finish."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self._send_json(FrameType.GOAWAY, 0, {"code": int(code), "reason": reason})

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the tunnel: GOAWAY with ``code``; the adapter then closes the transport."""
        self._terminate(code, reason, remote=False)

    def connection_lost(self) -> list[Event]:
        """The transport is gone: every live stream ends (as reset); returns those events."""
        if not self.closed:
            self._terminate(ErrorCode.INTERNAL_ERROR, "tunnel lost", remote=True, goaway=False)
        return self._take_events()

    # == output ===================================================================================
    @property
    def _paced(self) -> bool:
        return self.pacer.min_rtt >= ACTIVE_RTT

    def _room(self, urgent: bool = False) -> int:
        """Bytes of DATA that may be framed now: the output list's room, and on a paced path what
        the in-flight limit and the pacing rate leave (0 or less: wait); an urgent stream may
        exceed those by ``URGENT_SLACK`` (a small reply does not wait for the next release)."""
        if self.send_paused:
            return 0
        room = OUT_HIGH - self._out_bytes
        p = self.pacer
        if p.min_rtt >= ACTIVE_RTT:
            room = min(room, p.allowance(self._taken + self._out_bytes, self.now) + (URGENT_SLACK if urgent else 0))
        return room

    @property
    def _congested(self) -> bool:
        return self._room() <= 0

    @property
    def _chunk(self) -> int:
        """The largest DATA frame to send now: large where the path is fast, small where it is slow."""
        if not self._paced:
            return FAST_CHUNK
        return SLOW_CHUNK if self.pacer.cwnd < 1024 * 1024 else MAX_CHUNK

    @property
    def out_bytes(self) -> int:
        return self._out_bytes

    def data_to_send_list(self, drain: bool = True, now: float | None = None) -> list[bytes | memoryview]:
        """Output as a list of buffers (for ``writelines``, no copy). With ``drain`` (and the
        transport not paused) queued stream data is moved out first (urgent streams first, see
        ``URGENT_BYTES``), up to about ``OUT_HIGH`` bytes and within the in-flight limit: call again
        while the transport has room. ``now`` (the clock) lets an in-flight probe go out when due."""
        if now is not None:
            self.now = now
        if self._out_bytes or self._waiting:
            self._maybe_probe()
        if drain and self._dgram_waiting and not self.send_paused:
            self._drain_datagrams()
        if drain and self._waiting and not self.send_paused:
            self._drain_waiting()
        out, self._out = self._out, []
        self._taken += self._out_bytes
        self._out_bytes = 0
        return out

    def _maybe_probe(self) -> None:
        """Queue an in-flight probe (a PING behind the bytes written so far) when one is due."""
        p = self.pacer
        if not self.handshake_done or self.closed or p.min_rtt < ACTIVE_RTT:
            return
        sent = self._taken + self._out_bytes
        if self.data_bytes_sent > self._probe_mark and p.probe_due(self.now, sent):
            self._probe_mark = self.data_bytes_sent  # no DATA since: no probe (pongs do not echo forever)
            # ahead of the output not yet handed out: its pong measures the queue in front of that
            # output (the standing queue), not the burst that follows it
            ping = frames.encode_ping(p.probe(self.now, self._taken, bool(self._waiting)))
            self._out.insert(0, ping)
            self._out_bytes += len(ping)

    def data_to_send(self) -> bytes:
        """Output as one bytes object (tests and simple transports)."""
        chunks: list[bytes | memoryview] = []
        while part := self.data_to_send_list():
            chunks += part
        return b"".join(chunks)

    def pop_events(self) -> list[Event]:
        """Events produced outside ``receive_data`` (e.g. ``StreamResumed`` after a drain)."""
        return self._take_events()

    # == timers ===================================================================================
    def get_timer(self) -> float | None:
        """When ``handle_timer`` must be called next (None: closed)."""
        if self.closed:
            return None
        at = self.last_rx + self.config.dead_after
        if self.handshake_done:
            at = min(at, self._next_ping)
            if self.pacer.min_rtt >= ACTIVE_RTT:
                if self.data_bytes_sent > self._probe_mark:
                    probe = self.pacer.next_probe(self._taken + self._out_bytes)
                    if probe is not None:
                        at = min(at, probe)
                if self._waiting:  # paced: the next frame's release
                    at = min(at, self.pacer.next_release())
        else:
            at = min(at, self.connected_at + self.config.handshake_timeout)
        return at

    def handle_timer(self, now: float) -> list[Event]:
        """Send due PINGs; declare the peer dead after ``dead_after`` seconds of silence."""
        self.now = now
        if self.closed:
            return []
        if not self.handshake_done and now >= self.connected_at + self.config.handshake_timeout:
            self._terminate(ErrorCode.HANDSHAKE_FAILED, "no handshake in time", remote=False)
        elif now - self.last_rx >= self.config.dead_after:
            self._terminate(ErrorCode.DEAD_PEER, f"peer silent for {now - self.last_rx:.1f}s", remote=False)
        elif self.handshake_done:
            if now >= self._next_ping:
                opaque = int(now * 1e9) & 0x7FFFFFFFFFFFFFFF  # bit 63 clear: not a probe
                self._pings.append(opaque)
                self._queue(frames.encode_ping(opaque))
                self._next_ping = now + self.config.ping_interval
            self._maybe_probe()
        return self._take_events()

    # == input ====================================================================================
    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the tunnel socket; returns what happened. A protocol violation by the
        peer resets a stream or terminates the connection (an event says which), never raises."""
        self.now = now
        if self.closed:
            return []
        self.last_rx = now
        try:
            if not self._first_byte_seen and data:
                self._first_byte_seen = True
                if self.role is Role.NODE and data[0] != FrameType.HELLO:
                    # fail at once, not at the HELLO deadline: the peer does not speak this protocol
                    raise HandshakeError("a TLS ClientHello on a plaintext tunnel port (run the agent with "
                                         "--plaintext, or the node with TUNNEL_TLS=1)" if data[0] == 0x16
                                         else f"the first frame is not HELLO (byte 0x{data[0]:02x})")
            for frame in self._decoder.feed(data):
                try:
                    self._on_frame(frame)
                except StreamError as exc:
                    self._stream_error(exc)
                if self.closed:
                    break
        except TunnelError as exc:
            self._terminate(exc.code, str(exc), remote=False)
        return self._take_events()

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t == FrameType.DATA:   # the hot path first
            self._on_data(frame)
            return
        if t == FrameType.DATAGRAM:
            self._on_datagram(frame)
            return
        if t not in frames.KNOWN_TYPES:
            self._flood(self._control_rate, "unknown frames")
            return  # extension point: ignored
        frames.validate(frame)
        if t not in self._accepts:
            raise TunnelError(f"{FrameType(t).name} is not allowed from the {'node' if self.role is Role.AGENT else 'device'}")
        if not self.handshake_done and t not in (FrameType.HELLO, FrameType.WELCOME):
            raise HandshakeError(f"{FrameType(t).name} before the handshake")
        if t == FrameType.WINDOW:
            self._windows_received += 1
            if self._windows_received > (self.config.window_base + (self.data_bytes_sent >> 10)
                                         + 4 * self._highest_id):
                raise FloodError("WINDOW flood: more WINDOW frames than the DATA sent explains")
            self._on_window(frame)
        elif t == FrameType.FIN:
            self._on_fin(frame.stream_id)
        elif t == FrameType.RST:
            self._on_rst(frame)
        elif t == FrameType.PING:
            self._flood(self._ping_rate, "PING")
            self._on_ping(frame)
        elif t == FrameType.OPEN:
            self._on_open(frame)
        elif t in (FrameType.OPEN_OK, FrameType.OPEN_FAIL):
            self._on_open_reply(frame)
        elif t == FrameType.HELLO:
            self._on_hello(frame)
        elif t == FrameType.WELCOME:
            self._on_welcome(frame)
        else:
            self._flood(self._control_rate, FrameType(t).name)
            body = frame.json()
            if t == FrameType.GOAWAY:
                self.peer_going_away = True
                self._events.append(GoAwayReceived(error_code(_int(body.get("code"), 0)),
                                                   str(body.get("reason", ""))))
            elif t == FrameType.CONTROL:
                self._events.append(ControlReceived(body))
            else:
                self._events.append(ControlReplyReceived(body))

    def _flood(self, rate: _Rate, what: str) -> None:
        if not rate.hit(self.now):
            raise FloodError(f"{what} flood: more than {rate.limit} per second")

    def _live(self, stream_id: int) -> Stream | None:
        """The stream, or None for one that existed and is gone; never-opened ids are an error."""
        stream = self.streams.get(stream_id)
        if stream is None and (stream_id == 0 or stream_id > self._highest_id):
            raise TunnelError(f"frame for stream {stream_id}, which was never opened")
        return stream

    def _transition(self, stream: Stream, tr: Transition, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        new = next_state(stream.state, tr)
        if new is None:
            if tr is Transition.RECV_DATA and stream.remote_closed:
                code = ErrorCode.STREAM_CLOSED
            raise StreamError(stream.id, f"{tr.value} in state {stream.state.value}", code)
        stream.state = new

    def _on_data(self, frame: Frame) -> None:
        if not self.handshake_done:
            raise HandshakeError("DATA before the handshake")
        payload = frame.payload
        n = len(payload)
        stream = self._live(frame.stream_id)
        if n == 0:
            self._flood(self._control_rate, "empty DATA")
        if stream is None:
            self.windows.on_data(None, n)   # still counts against the connection window
            self.windows.discard(n)
            inc = self.windows.connection_increment()
            if inc:
                self._queue(frames.encode_window(0, inc))
            return
        early = stream.state is StreamState.OPENING and self.role is Role.AGENT
        if stream.udp or (stream.state is not StreamState.OPEN
                          and stream.state is not StreamState.HALF_CLOSED_LOCAL and not early):
            self.windows.on_data(None, n)
            self.windows.discard(n)
            if stream.udp:
                raise StreamError(stream.id, "DATA on a UDP stream")
            self._transition(stream, Transition.RECV_DATA)
        self.windows.on_data(stream.recv, n)
        stream.bytes_received += n
        if n:
            self._events.append(DataReceived(stream.id, payload))

    def _on_datagram(self, frame: Frame) -> None:
        if not self.handshake_done:
            raise HandshakeError("DATAGRAM before the handshake")
        frames.validate(frame)  # stream 0 is a PROTOCOL_ERROR
        stream = self._live(frame.stream_id)
        if stream is None:
            return  # in flight when the association ended
        if not stream.udp:
            raise StreamError(stream.id, "DATAGRAM on a TCP stream")
        if stream.state is not StreamState.OPEN and stream.state is not StreamState.HALF_CLOSED_LOCAL:
            code = ErrorCode.STREAM_CLOSED if stream.remote_closed else ErrorCode.PROTOCOL_ERROR
            raise StreamError(stream.id, f"DATAGRAM in state {stream.state.value}", code)
        payload = frame.payload
        addr = frames.decode_address(payload)
        if addr is None:
            raise StreamError(stream.id, "DATAGRAM with a malformed address")
        host, port, used = addr
        data = payload[used:]
        if len(data) > frames.MAX_UDP_PAYLOAD:
            raise StreamError(stream.id, "DATAGRAM payload over 65507 bytes", ErrorCode.FRAME_SIZE_ERROR)
        stream.bytes_received += len(data)
        self._events.append(DatagramReceived(stream.id, host, port, data))

    def _on_window(self, frame: Frame) -> None:
        inc = frames.U32.unpack(frame.payload)[0]
        if inc == 0:
            raise TunnelError("WINDOW increment of 0")
        if frame.stream_id == 0:
            self.conn_send_credit += inc
            if self.conn_send_credit > 0xFFFFFFFF * 4:
                raise TunnelError("connection window overflow", ErrorCode.FLOW_CONTROL_ERROR)
            if self._waiting:
                self._drain_waiting()
            return
        stream = self._live(frame.stream_id)
        if stream is None:
            return
        if stream.state is StreamState.OPENING and self.role is Role.NODE:
            raise StreamError(stream.id, "WINDOW before OPEN_OK")
        stream.send_credit += inc
        if stream.send_credit > 0xFFFFFFFF:
            raise StreamError(stream.id, "stream window overflow", ErrorCode.FLOW_CONTROL_ERROR)
        if stream.pending:
            self._waiting[stream] = None
            self._drain_waiting()

    def _on_fin(self, stream_id: int) -> None:
        stream = self._live(stream_id)
        if stream is None:
            return
        code = ErrorCode.STREAM_CLOSED if stream.remote_closed else ErrorCode.PROTOCOL_ERROR
        self._transition(stream, Transition.RECV_FIN, code)
        self._events.append(StreamEnded(stream_id))
        if stream.state is StreamState.CLOSED:
            self._forget(stream)
            self._events.append(StreamClosed(stream_id))

    def _on_rst(self, frame: Frame) -> None:
        stream = self._live(frame.stream_id)
        if stream is None:
            self._flood(self._control_rate, "RST for a closed stream")
            return
        code, reason = frames.decode_rst(frame.payload)
        opening = stream.state is StreamState.OPENING
        self._forget(stream)
        if opening and self.role is Role.NODE:
            rep = ReplyCode.GENERAL_FAILURE
            self._events.append(StreamOpenFailed(stream.id, rep, reason or code.name.lower(), ""))
        else:
            self._events.append(StreamReset(stream.id, code, reason or "reset by peer", remote=True))

    def _on_ping(self, frame: Frame) -> None:
        opaque = frames.U64.unpack(frame.payload)[0]
        if not frame.flags & FLAG_ACK:
            self._queue(frames.encode_ping(opaque, ack=True))
            return
        if opaque not in self._pings:
            if self.pacer.on_pong(self.now, opaque) and self._waiting:
                self._drain_waiting()  # the peer read what was in flight: room for more
            return  # otherwise not ours (or too old): no RTT sample
        self._pings.remove(opaque)
        sample = max(0.0, self.now - opaque / 1e9)
        self.rtt = sample if self.rtt_samples == 0 else 0.8 * self.rtt + 0.2 * sample
        self.rtt_samples += 1
        self.pacer.on_rtt(self.now, sample)
        self._events.append(PingAcknowledged(sample))

    def _on_open(self, frame: Frame) -> None:
        sid = frame.stream_id
        if sid <= self._highest_id:
            raise TunnelError(f"OPEN reuses stream id {sid}")
        self._highest_id = sid
        body = frame.json()
        if self.going_away or not self.windows.can_open:
            self._queue(frames.encode_rst(sid, ErrorCode.REFUSED_STREAM, "refused"))
            return
        window = _int(body.get("window"), -1)
        if not 0 < window <= 0xFFFFFFFF:
            self._queue(frames.encode_rst(sid, ErrorCode.PROTOCOL_ERROR, "bad window"))
            return
        udp = bool(frame.flags & FLAG_UDP)
        stream = Stream(sid, self.windows.open(sid, self.now, minimal=udp), send_credit=window, udp=udp)
        self.streams[sid] = stream
        relay = body.get("relay")
        self._events.append(StreamOpenRequested(sid, str(body.get("host", "")), _int(body.get("port"), 0), udp,
                                                relay if isinstance(relay, dict) else None))

    def _on_open_reply(self, frame: Frame) -> None:
        sid = frame.stream_id
        stream = self._live(sid)
        ok = frame.type == FrameType.OPEN_OK
        if stream is None:
            self._flood(self._control_rate, "answers for closed streams")
            if ok:  # nobody waits any more
                self._queue(frames.encode_rst(sid, ErrorCode.CANCEL, "cancelled"))
            return
        body = frame.json()
        if not ok:
            self._transition(stream, Transition.RECV_OPEN_FAIL)
            self._forget(stream)
            rep = _int(body.get("rep"), 1)
            if not ReplyCode.GENERAL_FAILURE <= rep <= ReplyCode.TTL_EXPIRED:
                rep = ReplyCode.GENERAL_FAILURE
            self._events.append(StreamOpenFailed(sid, rep, str(body.get("reason", ""))[:REASON_MAX],
                                                 _ip_text(body.get("resolved_ip", "")) or ""))
            return
        window = _int(body.get("window"), -1)
        if not 0 < window <= 0xFFFFFFFF:
            raise StreamError(sid, "OPEN_OK without a valid window")
        bound_host, resolved = _ip_text(body.get("bound_host", "0.0.0.0")), _ip_text(body.get("resolved_ip", ""))
        bound_port = _int(body.get("bound_port", 0), -1)
        if bound_host is None or resolved is None or not 0 <= bound_port <= 0xFFFF:
            self.malformed_open_replies += 1
            raise StreamError(sid, "OPEN_OK with a malformed bound or resolved address")
        self._transition(stream, Transition.RECV_OPEN_OK)
        stream.send_credit = window - stream.bytes_sent if stream.early else window  # early DATA counts
        self._events.append(StreamOpened(sid, bound_host or "0.0.0.0", bound_port, resolved))
        if stream.pending or stream.fin_pending:
            self._waiting[stream] = None
            self._drain_waiting()

    def _on_hello(self, frame: Frame) -> None:
        if self._hello_seen:
            raise HandshakeError("duplicate HELLO")
        self._hello_seen = True
        body = frame.json()
        self.conn_send_credit = _window(body)
        self.peer_early_data = max(0, _int(body.get("early_data"), 0))
        meta = body.get("meta")
        features = body.get("features")
        names = tuple(str(f) for f in features[:32]) if isinstance(features, list) else ()
        self.peer_features = frozenset(names)
        self._peer_features_known()
        self._events.append(HelloReceived(str(body.get("device_id", "")), str(body.get("token", "")),
                                          _int(body.get("version"), 0), meta if isinstance(meta, dict) else {},
                                          names))

    def _on_welcome(self, frame: Frame) -> None:
        if self._hello_seen:
            raise HandshakeError("duplicate WELCOME")
        self._hello_seen = True
        body = frame.json()
        ok = body.get("ok") is True
        if ok:
            self.handshake_done = True
            self.conn_send_credit = _window(body)
            features = body.get("features")
            if isinstance(features, list):
                self.peer_features = frozenset(str(f) for f in features[:32])
            self._peer_features_known()
            self._next_ping = self.now  # a first RTT sample at once (it decides whether to pace)
        ping = body.get("ping_interval")
        self._events.append(WelcomeReceived(ok, str(body.get("node", "")), str(body.get("error", "")),
                                            float(ping) if isinstance(ping, int | float) else 0.0))

    # == internals ================================================================================
    def _peer_features_known(self) -> None:
        """A peer that announced "pace" probes up to 100/s: take its PINGs; probe as fast only when
        we announced it too (then the peer takes ours)."""
        if frames.FEATURE_PACE in self.peer_features:
            self._ping_rate.limit = max(self._ping_rate.limit, PING_PER_S_PACE)
            if self._announced_pace:
                self.pacer.min_interval = PROBE_INTERVAL_PACE

    def _queue(self, data: bytes) -> None:
        if self.closed:
            return
        self._out.append(data)
        self._out_bytes += len(data)

    def _send_json(self, ftype: int, sid: int, body: dict) -> None:
        self._queue(frames.encode_json(ftype, sid, body))

    def _emit_data(self, stream: Stream, data: bytes | memoryview) -> None:
        n = len(data)
        stream.send_credit -= n
        self.conn_send_credit -= n
        stream.bytes_sent += n
        self.data_bytes_sent += n
        out = self._out
        chunk = self._chunk
        if chunk != FAST_CHUNK:
            self.pacer.spend(n)
        if n <= chunk:
            out.append(frames.header(FrameType.DATA, stream.id, n))
            out.append(data)
        else:
            view = memoryview(data)
            for i in range(0, n, chunk):
                part = view[i:i + chunk]
                out.append(frames.header(FrameType.DATA, stream.id, len(part)))
                out.append(part)
        self._out_bytes += n + frames.HEADER_SIZE * (1 + (n - 1) // chunk)

    def _flush_stream(self, stream: Stream, quantum: int) -> int:
        """Move up to ``quantum`` queued bytes of one stream out, within its credit and the room;
        returns how many. FIN follows the last byte; the source resumes below ``PENDING_HIGH``."""
        pending = stream.pending
        sent = 0
        paced = self._paced
        urgent = self._urgent(stream)
        while pending and sent < quantum:
            room = self._room(urgent)
            credit = min(stream.send_credit, self.conn_send_credit, quantum - sent)
            if room <= 0 or credit <= 0:
                break
            head = pending[0]
            if paced:  # within the room, in whole frames, and no sliver frames
                if room < min(len(head), credit, 1024):
                    break
                credit = min(credit, room)
                if credit > self._chunk:
                    credit -= credit % self._chunk
            n = len(head)
            if n <= credit:
                pending.popleft()
            else:
                n = credit
                pending[0] = head[n:]
                head = head[:n]
            stream.pending_bytes -= n
            sent += n
            self._emit_data(stream, head)
        if not pending:
            self._waiting.pop(stream, None)
            if stream.fin_pending and stream.state is not StreamState.OPENING:
                stream.fin_pending = False
                self._send_fin(stream)
        if stream.source_paused and stream.pending_bytes <= PENDING_HIGH and stream.id in self.streams:
            stream.source_paused = False
            self._events.append(StreamResumed(stream.id))
        return sent

    @staticmethod
    def _urgent(stream: Stream) -> bool:
        """New and small streams go first: under ``URGENT_BYTES`` sent, or at most ``SMALL_QUEUE``
        queued (an interactive stream's reply)."""
        return stream.bytes_sent < URGENT_BYTES or stream.pending_bytes <= SMALL_QUEUE

    def _drain_datagrams(self) -> None:
        """Send queued DATAGRAMs while there is room, one per UDP stream in turn."""
        waiting = self._dgram_waiting
        while waiting and not self._congested:
            for stream in list(waiting):
                if self._congested:
                    break
                head, payload = stream.dgrams.popleft()
                stream.dgram_bytes -= len(payload)
                self._dgram_queued -= len(payload)
                self._out.append(head)
                self._out.append(payload)
                self._out_bytes += len(head) + len(payload)
                if not stream.dgrams:
                    del waiting[stream]

    def _drain_waiting(self) -> None:
        """Send queued stream data while there is room: urgent streams first (``_urgent``), one
        frame each in turn; bulk streams (one frame each) when no urgent one can send, and after
        ``URGENT_RUN`` urgent bytes in a row (never starved)."""
        waiting = self._waiting
        while waiting and self.conn_send_credit > 0 and self._room() > 0:
            urgent = [s for s in waiting if self._urgent(s)]
            bulk = [s for s in waiting if not self._urgent(s)] if len(urgent) < len(waiting) else []
            bulk_turn = bool(bulk) and (not urgent or self._urgent_run >= URGENT_RUN)
            first, second = (bulk, urgent) if bulk_turn else (urgent, bulk)
            if bulk_turn:
                self._urgent_run = 0
            if not self._serve(first, bulk_turn) and not self._serve(second, not bulk_turn):
                break  # the rest wait for credit, not for room

    def _serve(self, group: list[Stream], is_bulk: bool) -> bool:
        """One frame for each stream of ``group`` in turn; True when any progressed."""
        waiting = self._waiting
        quantum = self._chunk
        progressed = False
        for stream in group:
            if self._room() <= 0:
                return True
            if stream not in waiting:
                continue
            n = self._flush_stream(stream, quantum)
            if n or stream not in waiting:
                progressed = True
            if n:
                self._urgent_run = 0 if is_bulk else self._urgent_run + n
                if stream in waiting:  # to the back of the round
                    del waiting[stream]
                    waiting[stream] = None
        return progressed

    def _send_fin(self, stream: Stream) -> None:
        new = next_state(stream.state, Transition.SEND_FIN)
        if new is None:
            return
        stream.state = new
        self._queue(frames.encode(FrameType.FIN, stream.id))
        if new is StreamState.CLOSED:
            self._forget(stream)
            self._events.append(StreamClosed(stream.id))

    def _forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        stream.state = StreamState.CLOSED
        self._waiting.pop(stream, None)
        stream.pending.clear()
        stream.pending_bytes = 0
        if stream.dgrams:
            self._dgram_waiting.pop(stream, None)
            self._dgram_queued -= stream.dgram_bytes
            stream.dgrams.clear()
            stream.dgram_bytes = 0
        held = self.windows.close(stream.recv)
        if held:
            self.windows.discard(held)
            inc = self.windows.connection_increment()
            if inc:
                self._queue(frames.encode_window(0, inc))

    def _stream_error(self, exc: StreamError) -> None:
        self.stream_errors += 1
        stream = self.streams.get(exc.stream_id)
        self._queue(frames.encode_rst(exc.stream_id, exc.code, str(exc)))
        if stream is not None:
            opening = stream.state is StreamState.OPENING
            self._forget(stream)
            if opening and self.role is Role.NODE:
                self._events.append(StreamOpenFailed(exc.stream_id, ReplyCode.GENERAL_FAILURE, str(exc), ""))
            else:
                self._events.append(StreamReset(exc.stream_id, exc.code, str(exc), remote=False))

    def _terminate(self, code: ErrorCode, reason: str, remote: bool, goaway: bool = True) -> None:
        if self.closed:
            return
        if goaway and not remote and code is not ErrorCode.DEAD_PEER:
            self._send_json(FrameType.GOAWAY, 0, {"code": int(code), "reason": reason[:200]})
        self.closed = True
        self.close_code = code
        self._decoder = FrameDecoder()
        for stream in list(self.streams.values()):
            opening = stream.state is StreamState.OPENING
            self._forget(stream)
            if opening and self.role is Role.NODE:
                self._events.append(StreamOpenFailed(stream.id, ReplyCode.NETWORK_UNREACHABLE,
                                                     "device disconnected", ""))
            else:
                self._events.append(StreamReset(stream.id, code, "tunnel lost", remote=remote))
        self._events.append(ConnectionTerminated(code, reason, remote))

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def _ip_text(value: object) -> str | None:
    """An address a device reported (OPEN_OK / OPEN_FAIL): its canonical text, "" for none, None if
    malformed (not an IPv4/IPv6 literal). Private addresses are well-formed: they are reported."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _window(body: dict) -> int:
    w = _int(body.get("window"), -1)
    if not 0 < w <= 0xFFFFFFFF * 4:
        raise HandshakeError("handshake without a valid connection window")
    return w
