"""A userspace link emulator: a TCP relay on 127.0.0.1 adding a fixed delay and a bandwidth cap.

netem is not available here, so the "mobile link" between a device and the node is this relay.
Each direction is modelled as a serialiser at ``rate`` (bytes leave the bottleneck queue one after
another at the link rate) followed by a delay line of RTT/2. The bottleneck queue is shallow
(``--queue-bytes``, default 32 KiB) and the relay's receive buffers are small, so the queueing an
interactive stream sees is the queueing the system under test creates itself (in its user-space
buffers and its kernel send buffer), not a property of the emulator. When the queue is full the
relay stops reading, which back-pressures the sender through ordinary TCP flow control.

    python -m benchmarks.linkemu --pair LISTEN:CONNECT [--pair ...] --rtt-ms 40 --rate-mbit 100
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import sys

PIECE = 16 * 1024
RCVBUF = 32 * 1024


class Link:
    """One direction of the emulated link, shared by every connection relayed through it."""

    def __init__(self) -> None:
        self.busy_until = 0.0


class Direction:
    """Bytes from ``src`` to ``dst`` through the link's serialiser + delay line."""

    def __init__(self, loop: asyncio.AbstractEventLoop, link: Link, rate: float, delay: float,
                 queue: int) -> None:
        self.loop = loop
        self.link = link
        self.rate = rate              # bytes per second (0 = unlimited)
        self.delay = delay            # one-way seconds
        self.queue = queue
        self.last = 0.0               # when this connection's last queued byte leaves the serialiser
        self.line: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.src: Side | None = None
        self.dst: Side | None = None
        self.held = bytearray()
        self.end: bytes | None = None
        self.end_set = False
        self.end_queued = False
        self.paused_queue = False
        self.paused_dst = False
        self.commit_timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes | None, close: bool = False) -> None:
        """Queue ``data``; ``None`` queues an end marker (EOF, or a full close with ``close``).

        At most ``queue`` bytes (of all connections) are committed to the link's serialiser; the
        rest waits here, per connection, with reading paused (like bytes in the sender's socket)."""
        if data is None:
            if close and self.end_queued and self.end is None:  # EOF already queued: close after it
                self.line.append((max(self.loop.time(), self.last) + self.delay, b""))
            if close:
                self.end = b""
            self.end_set = True
        else:
            self.held += data
        self._commit()

    def _commit(self) -> None:
        self.commit_timer = None
        now = self.loop.time()
        link = self.link
        while self.held and (not self.rate or (link.busy_until - now) * self.rate < self.queue):
            piece = bytes(self.held[:PIECE])
            del self.held[:PIECE]
            start = max(now, link.busy_until)
            link.busy_until = self.last = start + (len(piece) / self.rate if self.rate else 0.0)
            self.line.append((self.last + self.delay, piece))
        if self.held:
            if not self.paused_queue:
                self.paused_queue = True
                self._update_reading()
            when = link.busy_until - (self.queue - PIECE) / self.rate
            self.commit_timer = self.loop.call_at(max(when, now + 0.0005), self._commit)
        else:
            if self.end_set and not self.end_queued:
                self.end_queued = True
                self.line.append((max(now, self.last) + self.delay, self.end))  # None = EOF, b"" = close
            if self.paused_queue:
                self.paused_queue = False
                self._update_reading()
        self._arm()

    def _update_reading(self) -> None:
        if self.src is None or self.src.transport is None or self.src.transport.is_closing():
            return
        if self.paused_queue or self.paused_dst:
            self.src.transport.pause_reading()
        else:
            self.src.transport.resume_reading()

    def _arm(self) -> None:
        if self.timer is None and self.line:
            self.timer = self.loop.call_at(self.line[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        now = self.loop.time()
        out: list[bytes] = []
        end = False
        close = False
        while self.line and self.line[0][0] <= now + 0.0002:
            _, data = self.line.popleft()
            if not data:  # None = EOF, b"" = close
                end, close = True, data is not None
                self.line.clear()
                break
            out.append(data)
        dst = self.dst
        if dst is not None and dst.transport is not None and not dst.transport.is_closing():
            if out:
                dst.transport.write(b"".join(out))
            if end:
                if close or dst.read_eof or not dst.transport.can_write_eof():
                    dst.transport.close()
                else:
                    dst.transport.write_eof()
                    dst.wrote_eof = True
        self._arm()

    def cancel(self) -> None:
        for t in (self.timer, self.commit_timer):
            if t is not None:
                t.cancel()


class Side(asyncio.Protocol):
    """One TCP leg; ``out`` carries what it reads, ``inbound`` what it writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.out: Direction | None = None
        self.inbound: Direction | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []
        self.read_eof = False
        self.wrote_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)

    def data_received(self, data: bytes) -> None:
        if self.out is None:
            self.pending.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
        else:
            self.out.push(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        if self.out is not None:
            self.out.push(None)
        if self.wrote_eof and self.transport is not None:
            self.transport.close()
        return True

    def pause_writing(self) -> None:
        if self.inbound is not None:
            self.inbound.paused_dst = True
            self.inbound._update_reading()

    def resume_writing(self) -> None:
        if self.inbound is not None:
            self.inbound.paused_dst = False
            self.inbound._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.out is not None:
            self.out.push(None, close=True)
        if self.inbound is not None:
            self.inbound.cancel()


class Emulator:
    def __init__(self, rtt_ms: float, rate_mbit: float, queue: int) -> None:
        self.delay = rtt_ms / 2000.0
        self.rate = rate_mbit * 1e6 / 8
        self.queue = queue
        self.up, self.down = Link(), Link()

    async def accepted(self, client: Side, connect_port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(Side, "127.0.0.1", connect_port)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        up_dir = Direction(loop, self.up, self.rate, self.delay, self.queue)      # client -> upstream
        down_dir = Direction(loop, self.down, self.rate, self.delay, self.queue)  # upstream -> client
        up_dir.src, up_dir.dst = client, upstream
        down_dir.src, down_dir.dst = upstream, client
        client.out, client.inbound, client.peer = up_dir, down_dir, upstream
        upstream.out, upstream.inbound, upstream.peer = down_dir, up_dir, client
        for side, d in ((client, up_dir), (upstream, down_dir)):
            for data in side.pending:
                d.push(data)
            side.pending.clear()
            if side.read_eof:
                d.push(None)
            if side.transport is None or side.transport.is_closing():
                d.push(None, close=True)
            elif not d.paused_queue:
                side.transport.resume_reading()

    async def serve(self, pairs: list[tuple[int, int]]) -> None:
        """Relay each listen port to its connect port; all of them share the one link."""
        loop = asyncio.get_running_loop()
        servers = []
        for listen, connect in pairs:

            def factory(connect: int = connect) -> Side:
                side = Side()
                loop.call_soon(lambda: asyncio.ensure_future(self.accepted(side, connect)))
                return side

            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind(("127.0.0.1", listen))
            servers.append(await loop.create_server(factory, sock=sock, backlog=1024))
        print("ready", flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.linkemu")
    p.add_argument("--pair", action="append", required=True, metavar="LISTEN:CONNECT",
                   help="relay 127.0.0.1:LISTEN to 127.0.0.1:CONNECT (repeatable; all share the link)")
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--rate-mbit", type=float, default=100.0, help="0 = no cap")
    p.add_argument("--queue-bytes", type=int, default=32 * 1024)
    args = p.parse_args(argv)
    pairs = [(int(a), int(b)) for a, b in (x.split(":") for x in args.pair)]
    emu = Emulator(args.rtt_ms, args.rate_mbit, args.queue_bytes)
    try:
        import uvloop
    except ImportError:
        asyncio.run(emu.serve(pairs))
    else:
        uvloop.run(emu.serve(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
