"""The multiplexer shared by both ends of a tunnel: streams, credit flow control, keep-alive.

``Mux`` is an ``asyncio.Protocol`` over one tunnel TCP connection. Streams are ``MuxStream``
objects; whoever owns the local socket of a stream implements ``StreamHandler``. The node and the
device agent subclass ``Mux`` for what differs (handshake, opening streams).

Flow control (per stream, both directions): a sender may have at most ``window`` unacknowledged
bytes in flight. The receiver returns credit with WINDOW frames only once the bytes have left its
own buffers (the local socket's write buffer is below its high-water mark), so a slow reader stalls
only its own stream and memory stays bounded by the window. Receive windows auto-tune: when a
full quarter-window is consumed in less than two round trips, the window doubles (up to a cap), so
a long fat link reaches its bandwidth-delay product.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from typing import Protocol

from . import frames
from .frames import FLAG_ACK, Frame, FrameDecoder, FrameError, FrameType

log = logging.getLogger(__name__)

MAX_CHUNK = 64 * 1024          # largest DATA payload we send: bounds how long a small frame waits behind one
PENDING_HIGH = 64 * 1024       # outbound bytes held beyond the window before the source is paused
COALESCE_MAX = 64 * 1024        # flush at once beyond this many queued bytes
# Small tunnel buffers: bytes queued in the tunnel socket delay every stream's frames (head-of-line
# blocking on a slow link). Above the high-water mark new DATA waits in its own stream's queue and the
# queues are drained smallest first, so interactive streams overtake bulk ones.
TUNNEL_WRITE_HIGH = 32 * 1024
TUNNEL_WRITE_LOW = 8 * 1024
TUNNEL_NOTSENT_LOWAT = 16 * 1024  # unsent bytes the kernel may hold beyond what is in flight


class StreamHandler(Protocol):
    """The local end of a stream (a client socket on the node, a target socket on the device)."""

    def stream_data(self, data: bytes) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_closed(self, error: str | None) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...
    def sink_ready(self) -> bool: ...


class MuxStream:
    """One logical connection inside a tunnel."""

    __slots__ = ("mux", "id", "handler", "send_window", "recv_window", "recv_remaining", "unacked",
                 "pending", "pending_bytes", "fin_pending", "local_fin", "remote_fin", "closed", "source_paused",
                 "last_ack", "bytes_sent", "bytes_received")

    def __init__(self, mux: Mux, stream_id: int, handler: StreamHandler | None, send_window: int,
                 recv_window: int) -> None:
        self.mux = mux
        self.id = stream_id
        self.handler = handler
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_remaining = recv_window
        self.unacked = 0
        self.pending: deque[memoryview] = deque()   # outbound bytes waiting for credit (no copies)
        self.pending_bytes = 0
        self.fin_pending = False
        self.local_fin = False
        self.remote_fin = False
        self.closed = False
        self.source_paused = False
        self.last_ack = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- outbound -------------------------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        """Send bytes to the peer, within the window; the rest waits (and pauses the source)."""
        if self.closed or self.local_fin or not data:
            return
        if not self.pending and self.send_window >= len(data) and not self.mux.congested:
            self._send(data)
        else:
            if isinstance(data, bytearray):
                data = bytes(data)  # the caller may reuse a mutable buffer
            self.pending.append(memoryview(data))
            self.pending_bytes += len(data)
            self.mux.waiting.add(self)
            self._flush()
        self._update_source()

    def write_eof(self) -> None:
        """Half-close: FIN after whatever is still pending."""
        if self.closed or self.local_fin:
            return
        if self.pending:
            self.fin_pending = True
        else:
            self._send_fin()

    def _send(self, data: bytes | memoryview) -> None:
        mux = self.mux
        n = len(data)
        self.send_window -= n
        self.bytes_sent += n
        if n <= MAX_CHUNK:
            mux.send_data(self.id, data)
            return
        view = memoryview(data)
        for i in range(0, n, MAX_CHUNK):
            mux.send_data(self.id, view[i:i + MAX_CHUNK])

    def _flush(self) -> None:
        pending = self.pending
        mux = self.mux
        while pending and self.send_window > 0 and not mux.congested:
            head = pending[0]
            n = len(head)
            if n <= self.send_window:
                pending.popleft()
            else:
                n = self.send_window
                pending[0] = head[n:]
                head = head[:n]
            self.pending_bytes -= n
            self._send(head)
        if not pending:
            mux.waiting.discard(self)
        if not pending and self.fin_pending:
            self.fin_pending = False
            self._send_fin()

    def _send_fin(self) -> None:
        self.local_fin = True
        self.mux.send(frames.encode(FrameType.FIN, self.id))
        if self.remote_fin:
            self._finish(None)

    def _update_source(self) -> None:
        want_paused = self.pending_bytes > PENDING_HIGH
        if want_paused != self.source_paused and self.handler is not None:
            self.source_paused = want_paused
            if want_paused:
                self.handler.pause_source()
            else:
                self.handler.resume_source()

    # -- inbound --------------------------------------------------------------------------------
    def on_data(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n > self.recv_remaining:
            self.reset("flow-control violation")
            return
        self.recv_remaining -= n
        self.unacked += n
        self.bytes_received += n
        if self.handler is not None:
            self.handler.stream_data(data)
        self.maybe_ack()

    def maybe_ack(self) -> None:
        """Return credit once a quarter of the window was consumed and the local sink has room."""
        if self.closed or self.remote_fin or self.unacked < (self.recv_window >> 2):
            return
        if self.handler is not None and not self.handler.sink_ready():
            return
        increment = self.unacked
        now = time.monotonic()
        rtt = self.mux.rtt
        if now - self.last_ack < 2 * rtt and self.recv_window < self.mux.max_window:
            grow = min(self.recv_window, self.mux.max_window - self.recv_window)
            self.recv_window += grow
            increment += grow
        self.last_ack = now
        self.unacked = 0
        self.recv_remaining += increment
        self.mux.send(frames.encode_window(self.id, increment))

    def sink_drained(self) -> None:
        """The local sink drained below its low-water mark: return any withheld credit."""
        if self.unacked:
            # Force: send even below the quarter-window threshold so the sender never starves.
            if self.closed or self.remote_fin:
                return
            increment = self.unacked
            self.unacked = 0
            self.recv_remaining += increment
            self.last_ack = time.monotonic()
            self.mux.send(frames.encode_window(self.id, increment))

    def on_window(self, increment: int) -> None:
        self.send_window += increment
        self._flush()
        self._update_source()

    def on_fin(self) -> None:
        self.remote_fin = True
        if self.handler is not None:
            self.handler.stream_eof()
        if self.local_fin and not self.closed:
            self._finish(None)

    def on_rst(self, reason: str) -> None:
        self._finish(reason or "reset by peer")

    def reset(self, reason: str = "") -> None:
        """Abort the stream and tell the peer."""
        if self.closed:
            return
        self.mux.send(frames.encode(FrameType.RST, self.id, reason.encode()[:200]))
        self._finish(reason or "reset")

    def close_quietly(self) -> None:
        """Forget the stream locally (the handler is already gone); RST the peer if still open."""
        if not self.closed:
            if not (self.local_fin and self.remote_fin):
                self.mux.send(frames.encode(FrameType.RST, self.id, b"closed"))
            self.closed = True
            self.pending.clear()
            self.pending_bytes = 0
            self.mux.forget(self.id)

    def _finish(self, error: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.pending_bytes = 0
        self.mux.forget(self.id)
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.stream_closed(error)

    @property
    def buffered(self) -> int:
        """Bytes this stream holds in memory on this side (outbound, waiting for credit)."""
        return self.pending_bytes


class Mux(asyncio.Protocol):
    """Common tunnel machinery. Subclasses implement ``on_frame`` for handshake/open/control."""

    def __init__(self, *, ping_interval: float = 5.0, dead_after: float = 15.0,
                 initial_window: int = 256 * 1024, max_window: int = 8 * 1024 * 1024) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.streams: dict[int, MuxStream] = {}
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self.initial_window = initial_window
        self.max_window = max_window
        self.rtt = 0.05
        self.rtt_samples = 0
        self.write_paused = False
        self.closed = False
        self.going_away = False
        self.last_rx = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.closed_future: asyncio.Future[None] = self._loop.create_future()
        self._wbuf: list[bytes | memoryview] = []
        self.waiting: set[MuxStream] = set()   # streams with queued DATA
        self._draining = False
        self._wbuf_bytes = 0
        self._flush_scheduled = False

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=TUNNEL_WRITE_HIGH, low=TUNNEL_WRITE_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, TUNNEL_NOTSENT_LOWAT)
            except OSError:
                pass
        self._schedule_keepalive()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            for frame in self.decoder.feed(data):
                self._dispatch(frame)
        except FrameError as exc:
            log.warning("tunnel protocol error: %s", exc)
            self.abort(f"protocol error: {exc}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        for stream in list(self.streams.values()):
            stream._finish("tunnel lost")
        self.streams.clear()
        self.on_closed()
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    def pause_writing(self) -> None:
        # New DATA now waits in each stream's own queue; a stream stops reading its source only
        # when its own queue is full, so a bulk stream cannot starve the others' sources.
        self.write_paused = True

    def resume_writing(self) -> None:
        # uvloop calls this from inside a write: drain from the event loop, not re-entrantly.
        self.write_paused = False
        if self.waiting and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_writes)

    def _drain_waiting(self) -> None:
        """Send queued stream data while the tunnel has room, smallest queue first (an interactive
        reply goes ahead of bulk data)."""
        if not self.waiting or self._draining:
            return
        self._draining = True
        try:
            while self.waiting and not self.congested:
                before = len(self.waiting)
                for stream in sorted(self.waiting, key=lambda s: s.pending_bytes):
                    if self.congested:
                        break
                    stream._flush()
                    stream._update_source()
                if len(self.waiting) == before:
                    break  # the rest wait for credit (WINDOW), not for the tunnel
        finally:
            self._draining = False

    # -- frames ---------------------------------------------------------------------------------
    def _dispatch(self, frame: Frame) -> None:
        frames.validate(frame)
        t = frame.type
        if t == FrameType.DATA:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream.on_data(frame.payload)
            return
        if t == FrameType.WINDOW:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream.on_window(frames.U32.unpack(frame.payload)[0])
            return
        if t == FrameType.FIN:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream.on_fin()
            return
        if t == FrameType.RST:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream.on_rst(bytes(frame.payload).decode("utf-8", "replace"))
            else:
                self.on_orphan_rst(frame.stream_id)
            return
        if t == FrameType.PING:
            if frame.flags & FLAG_ACK:
                sent_ns = frames.U64.unpack(frame.payload)[0]
                sample = max(0.0, (time.monotonic_ns() - sent_ns) / 1e9)
                self.rtt = sample if self.rtt_samples == 0 else 0.8 * self.rtt + 0.2 * sample
                self.rtt_samples += 1
            else:
                self.send(frames.encode(FrameType.PING, 0, frame.payload, FLAG_ACK))
            return
        if t == FrameType.GOAWAY:
            self.going_away = True
            self.on_goaway(frame.json().get("reason", ""))
            return
        self.on_frame(frame)

    def on_frame(self, frame: Frame) -> None:
        """Handshake, OPEN*, CONTROL* frames: subclass business."""
        raise FrameError(f"unexpected {FrameType(frame.type).name}")

    def on_orphan_rst(self, stream_id: int) -> None:
        """RST for a stream we do not hold (already closed, or still opening)."""

    def on_goaway(self, reason: str) -> None:
        """The peer will accept no new streams."""

    def on_closed(self) -> None:
        """The tunnel connection is gone."""

    # -- sending --------------------------------------------------------------------------------
    @property
    def congested(self) -> bool:
        """True while the tunnel holds a high-water mark of unsent bytes: new DATA waits per stream."""
        return self.write_paused or self._wbuf_bytes >= TUNNEL_WRITE_HIGH

    # Frames are coalesced: everything queued during one event-loop iteration leaves in a single
    # vectored write, so many small control frames of many sessions cost one syscall.
    def send(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        self._wbuf.append(data)
        self._wbuf_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_writes)

    def send_data(self, stream_id: int, payload: bytes | memoryview) -> None:
        if self.closed or self.transport is None:
            return
        self._wbuf.append(frames.header(FrameType.DATA, stream_id, len(payload)))
        self._wbuf.append(payload)
        self._wbuf_bytes += len(payload) + frames.HEADER_SIZE
        if self._wbuf_bytes >= COALESCE_MAX:
            # Write now, but never drain stream queues from here: we may be inside a stream's own
            # _flush, and re-entering it would reorder that stream's bytes.
            self._flush_writes(drain=False)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_writes)

    def _flush_writes(self, drain: bool = True) -> None:
        if drain:
            self._flush_scheduled = False
        if self._wbuf:
            buf, self._wbuf = self._wbuf, []
            self._wbuf_bytes = 0
            if self.transport is not None and not self.closed:
                self.transport.writelines(buf)
        if self.write_paused or not self.waiting:
            return  # resume_writing() comes back for the queues
        if drain:
            self._drain_waiting()  # the coalescing buffer, not the socket, was what held them
        elif not self._flush_scheduled:
            self._flush_scheduled = True  # drain from the event loop, not from inside a stream's _flush
            self._loop.call_soon(self._flush_writes)

    def send_goaway(self, reason: str) -> None:
        self.going_away = True
        self.send(frames.encode_json(FrameType.GOAWAY, 0, {"reason": reason}))

    def forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.waiting.discard(stream)

    def abort(self, reason: str = "") -> None:
        """Drop the tunnel at once (every stream fails)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- keep-alive -----------------------------------------------------------------------------
    def _schedule_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        self._keepalive = loop.call_later(self.ping_interval, self._on_keepalive)

    def _on_keepalive(self) -> None:
        if self.closed:
            return
        if time.monotonic() - self.last_rx > self.dead_after:
            log.warning("tunnel peer silent for %.1fs: declaring it dead", time.monotonic() - self.last_rx)
            self.abort("dead peer")
            return
        self.send(frames.encode_ping(time.monotonic_ns()))
        self._schedule_keepalive()

    @property
    def buffered_bytes(self) -> int:
        """Outbound bytes held by streams plus the transport's write buffer."""
        total = sum(s.buffered for s in self.streams.values()) + self._wbuf_bytes
        if self.transport is not None and not self.closed:
            total += self.transport.get_write_buffer_size()
        return total
