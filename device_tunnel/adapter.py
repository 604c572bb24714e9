"""The asyncio adapter both ends of a tunnel share: moves bytes between a transport and the
sans-I/O :class:`~device_tunnel.connection.TunnelConnection`, and events to stream handlers.

Whoever owns the local socket of a stream (a client socket on the node, a target socket on the
device) implements :class:`StreamHandler`; it talks to the tunnel through :class:`TunnelStream`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Coroutine
from typing import Any, Protocol

from .connection import Role, TunnelConfig, TunnelConnection
from .errors import ErrorCode
from .events import (
    ConnectionTerminated,
    DatagramReceived,
    DataReceived,
    Event,
    PingAcknowledged,
    StreamClosed,
    StreamEnded,
    StreamReset,
    StreamResumed,
)
from .windows import MemoryBudget

log = logging.getLogger(__name__)

COALESCE_MAX = 64 * 1024  # write at once beyond this many queued bytes
# Small tunnel buffers: bytes queued in the tunnel socket delay every stream's frames (head-of-line
# blocking on a slow link); beyond them new DATA waits in its own stream's queue in the core.
TUNNEL_WRITE_HIGH = 32 * 1024
TUNNEL_WRITE_LOW = 8 * 1024
TUNNEL_NOTSENT_LOWAT = 16 * 1024
CLOSE_GRACE_S = 2.0  # a closing tunnel whose peer does not read its last frames is aborted after this

# Streams reset because their outbound queue passed the core's ``pending_max``, by ``queue_kind``
# ("tunnel": device tunnels and agents, "relay": node-to-node links); process-wide, for /metrics.
QUEUE_OVERFLOWS: Counter[str] = Counter()
_overflow_warned = False


class StreamHandler(Protocol):
    """The local end of a stream."""

    def stream_data(self, data: bytes) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_closed(self, error: str | None) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...
    def sink_ready(self) -> bool: ...


class TunnelStream:
    """One stream as its local end sees it: ``write``, ``write_eof``, ``reset``, ``close_quietly``,
    ``sink_drained``."""

    __slots__ = ("tunnel", "id", "handler", "closed")

    def __init__(self, tunnel: TunnelProtocol, stream_id: int, handler: StreamHandler | None) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self.handler = handler
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        """Send bytes to the peer within the windows; the rest is queued (and pauses the source)."""
        if self.closed:
            return
        t = self.tunnel
        if t.conn.send_data(self.id, data) and self.handler is not None:
            self.handler.pause_source()
        t.output_ready()

    def send_datagram(self, host: str, port: int, data: bytes | memoryview) -> bool:
        """A UDP stream's datagram (to the target from the node, from it on the device); False when
        it was dropped (the stream's bounded queue is full, or the stream is gone)."""
        if self.closed:
            return False
        ok = self.tunnel.conn.send_datagram(self.id, host, port, data)  # type: ignore[arg-type]
        self.tunnel.output_ready()
        return ok

    def write_eof(self) -> None:
        """Half-close: FIN after whatever is still queued."""
        if not self.closed:
            self.tunnel.conn.send_eof(self.id)
            self.tunnel.output_ready()

    def sink_drained(self) -> None:
        """The local sink drained below its low-water mark: return the withheld credit."""
        if not self.closed:
            conn = self.tunnel.conn
            stream = conn.streams.get(self.id)
            if stream is not None and stream.recv.held:
                conn.acknowledge_received_data(self.id, stream.recv.held, self.tunnel.now(), force=True)
                self.tunnel.output_ready()

    def reset(self, reason: str = "") -> None:
        """Abort the stream, tell the peer, and tell the handler (``stream_closed``)."""
        if self.closed:
            return
        self.tunnel.conn.reset_stream(self.id, ErrorCode.CANCEL, reason)
        self.tunnel.output_ready()
        self._finish(reason or "reset")

    def close_quietly(self) -> None:
        """Forget the stream locally (the handler is already gone); RST the peer if still open."""
        if not self.closed:
            self.closed = True
            self.handler = None
            self.tunnel.handles.pop(self.id, None)
            self.tunnel.conn.forget_stream(self.id)
            self.tunnel.output_ready()

    def _finish(self, error: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.tunnel.handles.pop(self.id, None)
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.stream_closed(error)

    @property
    def buffered(self) -> int:
        return self.tunnel.conn.stream_buffered(self.id)


class TunnelProtocol(asyncio.Protocol):
    """Common adapter; subclasses handle handshake, OPEN and CONTROL events in ``on_event``."""

    role: Role
    queue_kind = "tunnel"

    def __init__(self, config: TunnelConfig, budget: MemoryBudget | None) -> None:
        self._loop = asyncio.get_running_loop()
        self.conn = TunnelConnection(self.role, self._loop.time(), config, budget)
        self.transport: asyncio.Transport | None = None
        self.handles: dict[int, TunnelStream] = {}
        self.closed = False
        self.closed_future: asyncio.Future[None] = self._loop.create_future()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closing = False
        self._tls = False
        self._overflows_seen = 0

    def now(self) -> float:
        return self._loop.time()

    # -- owned tasks ---------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task owned by this tunnel: kept referenced, cancelled when the tunnel ends."""
        task = self._loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.connected_at = self.conn.last_rx = self.now()
        transport.set_write_buffer_limits(high=TUNNEL_WRITE_HIGH, low=TUNNEL_WRITE_LOW)
        # TLS writes each buffer of writelines as its own record: one write of the joined frames
        # makes full 16 KiB records instead of a record per 10-byte frame header.
        self._tls = transport.get_extra_info("ssl_object") is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, TUNNEL_NOTSENT_LOWAT)
            except OSError:
                pass
        self.on_connected()
        self._arm_timer()
        self.output_ready()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        shaken = conn.handshake_done
        self.dispatch(conn.receive_data(data, self._loop.time()))
        if not shaken and conn.handshake_done:
            self._arm_timer()  # the handshake deadline gave way to the (sooner) ping schedule
        self.output_ready()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.dispatch(self.conn.connection_lost())
        for handle in list(self.handles.values()):
            handle._finish("tunnel lost")
        for task in list(self.tasks):
            task.cancel()
        self.on_closed()
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    def pause_writing(self) -> None:
        self.conn.send_paused = True

    def resume_writing(self) -> None:
        # uvloop calls this from inside a write: drain from the event loop, not re-entrantly.
        self.conn.send_paused = False
        self._schedule_flush()

    # -- output ----------------------------------------------------------------------------------
    def output_ready(self) -> None:
        """The core has output: write now when a lot is queued, else once this loop iteration ends
        (frames of many streams leave in one vectored write)."""
        if self.conn.out_bytes >= COALESCE_MAX:
            self._write(drain=False)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write(drain=True)
        events = self.conn.pop_events()
        if events:
            self.dispatch(events)
            self._write(drain=True)
        if self.conn.queue_overflows != self._overflows_seen:
            self._queue_overflowed()
        self._arm_timer()  # an in-flight probe may be due before the next ping

    def _queue_overflowed(self) -> None:
        """Count streams the core reset for an outbound queue over its cap; warn once per process."""
        global _overflow_warned
        n = self.conn.queue_overflows - self._overflows_seen
        self._overflows_seen = self.conn.queue_overflows
        QUEUE_OVERFLOWS[self.queue_kind] += n
        if not _overflow_warned:
            _overflow_warned = True
            log.warning("tunnel %s: a stream's outbound queue passed %d bytes and was reset (a flow-control "
                        "bug; further ones are counted in proxyorch_tunnel_queue_overflows_total only)",
                        self.describe(), self.conn.pending_max)

    def _write(self, drain: bool) -> None:
        t = self.transport
        if t is None or self.closed:
            return
        conn = self.conn
        now = self._loop.time()
        while out := conn.data_to_send_list(drain, now):
            if self._tls and len(out) > 1:
                t.write(b"".join(out))
            else:
                t.writelines(out)
            if not drain or conn.send_paused:
                break
        if conn.closed and not self._closing:
            self._closing = True
            t.close()
            self._loop.call_later(CLOSE_GRACE_S, t.abort)

    # -- timers ----------------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        at = self.conn.get_timer()
        if at is None or self.closed:
            return
        if self._timer is not None:
            if self._timer_at <= at:
                return  # fires first; _on_timer re-arms
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        self.dispatch(self.conn.handle_timer(self._loop.time()))
        self.output_ready()
        self._arm_timer()

    # -- events ----------------------------------------------------------------------------------
    def dispatch(self, events: list[Event]) -> None:
        handles = self.handles
        conn = self.conn
        for ev in events:
            cls = type(ev)
            if cls is DataReceived:
                h = handles.get(ev.stream_id)  # type: ignore[attr-defined]
                if h is None or h.handler is None:
                    if h is None and self.hold_early(ev.stream_id, ev.data):  # type: ignore[attr-defined]
                        continue
                    conn.acknowledge_received_data(ev.stream_id, len(ev.data))  # type: ignore[attr-defined]
                    continue
                h.handler.stream_data(ev.data)  # type: ignore[attr-defined, arg-type]
                if h.handler is not None and h.handler.sink_ready():
                    conn.acknowledge_received_data(ev.stream_id, len(ev.data))  # type: ignore[attr-defined]
            elif cls is DatagramReceived:
                h = handles.get(ev.stream_id)  # type: ignore[attr-defined]
                if h is not None and h.handler is not None:
                    h.handler.stream_datagram(ev.host, ev.port, ev.data)  # type: ignore[attr-defined]
            elif cls is StreamResumed:
                h = handles.get(ev.stream_id)  # type: ignore[attr-defined]
                if h is not None and h.handler is not None:
                    s = conn.streams.get(ev.stream_id)  # type: ignore[attr-defined]
                    if s is not None and s.source_paused:
                        continue  # stale: send_data paused the source again after this was queued
                    h.handler.resume_source()
            elif cls is StreamEnded:
                h = handles.get(ev.stream_id)  # type: ignore[attr-defined]
                if h is not None and h.handler is not None:
                    h.handler.stream_eof()
            elif cls is StreamClosed:
                h = handles.get(ev.stream_id)  # type: ignore[attr-defined]
                if h is not None:
                    h._finish(None)
            elif cls is StreamReset:
                h = handles.get(ev.stream_id)  # type: ignore[attr-defined]
                if h is not None:
                    h._finish(ev.reason or ev.code.name.lower())  # type: ignore[attr-defined]
                else:
                    self.on_event(ev)
            elif cls is PingAcknowledged:
                pass
            elif cls is ConnectionTerminated:
                if not ev.remote:  # type: ignore[attr-defined]
                    log.warning("tunnel %s closed: %s (%s)", self.describe(), ev.reason,  # type: ignore[attr-defined]
                                ev.code.name)  # type: ignore[attr-defined]
                self.on_event(ev)
            else:
                self.on_event(ev)

    def hold_early(self, stream_id: int, data: bytes) -> bool:
        """DATA for a stream that has no local end yet (the agent while it connects: optimistic open).
        True when kept (acknowledged later by the subclass); False drops and acknowledges it."""
        return False

    def on_connected(self) -> None:
        """The transport is up (subclass hook)."""

    def on_event(self, event: Event) -> None:
        """Handshake, OPEN, CONTROL, GOAWAY events (subclass business)."""

    def on_closed(self) -> None:
        """The tunnel connection is gone (subclass hook)."""

    def describe(self) -> str:
        return "?"

    # -- what the rest of the node reads ---------------------------------------------------------
    @property
    def streams(self) -> dict:
        return self.conn.streams

    @property
    def going_away(self) -> bool:
        return self.conn.going_away or self.conn.peer_going_away or self.conn.closed

    @property
    def rtt(self) -> float:
        return self.conn.rtt

    @property
    def rtt_samples(self) -> int:
        return self.conn.rtt_samples

    @property
    def buffered_bytes(self) -> int:
        """Outbound bytes held by streams and the transport's write buffer."""
        total = self.conn.buffered_bytes
        if self.transport is not None and not self.closed:
            total += self.transport.get_write_buffer_size()
        return total

    def queue_stats(self) -> dict[str, float]:
        """Where this side's outbound bytes wait, by layer (user space; the kernel's are ``ss``'s):
        the core's per-stream queues, its output list, the transport's buffer (for TLS: the
        records not yet handed to the socket), and the pacer's view of what is in flight."""
        conn = self.conn
        p = conn.pacer
        transport = 0
        if self.transport is not None and not self.closed:
            transport = self.transport.get_write_buffer_size()
        return {"stream_queues": conn.buffered_bytes - conn.out_bytes, "core_output": conn.out_bytes,
                "transport": transport, "in_flight": conn.in_flight, "limit": p.cwnd if p.active else 0,
                "min_rtt_ms": round(p.min_rtt * 1000, 2), "bandwidth_Bps": round(p.bandwidth)}

    def abort(self, reason: str = "") -> None:
        """Drop the tunnel at once (every stream fails)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()
