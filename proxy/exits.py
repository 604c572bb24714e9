"""Where a session's traffic leaves: through a device tunnel (the product) or from the node itself.

Both give the session the same thing: ``open(host, port, handler)`` and later one call of
``handler.open_result(OpenResult)`` with a stream object that has ``write``, ``write_eof``,
``reset``, ``close_quietly`` and ``sink_drained``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from device_tunnel.registry import DeviceRegistry
from device_tunnel.replies import ReplyCode, reply_for_errno
from device_tunnel.server import NodeTunnel, OpenHandler, OpenResult
from device_tunnel.target_policy import is_forbidden_address, parse_ip_literal

CancelOpen = Callable[[], None]
EARLY_LIMIT = 256 * 1024  # target bytes a DirectStream reads before the session takes it


class TunnelExit:
    """Open streams on the device's tunnel (the least loaded one when it has several)."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    def is_online(self, device_id: str) -> bool:
        """The device has a usable tunnel on this node."""
        return self.registry.is_online(device_id)

    def _tunnel(self, device_id: str | None) -> NodeTunnel | None:
        """A live tunnel of the device on this node, or None."""
        return self.registry.pick(device_id) if device_id is not None else None

    def open(self, device_id: str | None, host: str, port: int, handler: OpenHandler) -> CancelOpen | None:
        """Start opening; None when the device has no live tunnel on this node."""
        tunnel = self._tunnel(device_id)
        if tunnel is None:
            return None
        sid = tunnel.open_stream(host, port, handler)
        return lambda: tunnel.cancel_open(sid)

    def open_udp(self, device_id: str | None, handler: OpenHandler) -> CancelOpen | None:
        """Start opening a UDP association stream; None when the device has no live tunnel here."""
        tunnel = self._tunnel(device_id)
        if tunnel is None:
            return None
        sid = tunnel.open_udp(handler)
        return lambda: tunnel.cancel_open(sid)

    def open_optimistic(self, device_id: str | None, host: str, port: int, handler: OpenHandler) -> EarlyOpen | None:
        """``open`` whose client bytes may be written before the outcome (OPTIMISTIC_OPEN)."""
        tunnel = self._tunnel(device_id)
        if tunnel is None:
            return None
        return EarlyOpen(tunnel, tunnel.open_stream_early(host, port, handler))


class EarlyOpen:
    """An optimistic open in progress: the client's first bytes go to the device before the outcome."""

    __slots__ = ("tunnel", "sid")

    def __init__(self, tunnel: NodeTunnel, sid: int) -> None:
        self.tunnel, self.sid = tunnel, sid

    def write(self, data: bytes) -> None:
        self.tunnel.early_write(self.sid, data)

    def write_eof(self) -> None:
        self.tunnel.early_eof(self.sid)

    def cancel(self) -> None:
        self.tunnel.cancel_open(self.sid)


class DirectStream(asyncio.Protocol):
    """Node-side socket to the target, presented to the session like a tunnel stream."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.handler: OpenHandler | None = None
        self.write_paused = False
        self.closed = False
        self.early = bytearray()  # bytes read before the session took the stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)

    def data_received(self, data: bytes) -> None:
        h = self.handler
        if h is None:
            self.early += data
            if len(self.early) >= EARLY_LIMIT:  # the session has not taken the stream yet: hold the target
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        h.stream_data(data)
        if not h.sink_ready():
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if self.handler is not None:
            self.handler.stream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        h, self.handler = self.handler, None
        if h is not None:
            h.stream_closed(str(exc) if exc else None)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_source()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_source()

    # the stream interface the session uses
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def reset(self, reason: str = "") -> None:
        self.handler = None
        if self.transport is not None:
            self.transport.abort()

    def close_quietly(self) -> None:
        self.handler = None
        if self.transport is not None:
            self.transport.close()

    def sink_drained(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


class DirectExit:
    """The node connects to targets itself (server-side exit; also the benchmark's mode 2)."""

    def __init__(self, connect_timeout: float = 10.0, allow_private: bool = False) -> None:
        self.connect_timeout = connect_timeout
        self.allow_private = allow_private

    def open(self, device_id: str | None, host: str, port: int, handler: OpenHandler) -> CancelOpen | None:
        task = asyncio.get_running_loop().create_task(self._open(host, port, handler))
        return task.cancel

    def open_udp(self, device_id: str | None, handler: OpenHandler) -> CancelOpen | None:
        """UDP ASSOCIATE is served through devices only: answered 0x07 here."""
        handle = asyncio.get_running_loop().call_soon(handler.open_result, OpenResult(
            rep=ReplyCode.COMMAND_NOT_SUPPORTED, reason="UDP is relayed through device exits only"))
        return handle.cancel

    async def _open(self, host: str, port: int, handler: OpenHandler) -> None:
        loop = asyncio.get_running_loop()
        try:
            ip = parse_ip_literal(host)
            if ip is None:
                infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=1), self.connect_timeout)
                if not infos:
                    raise OSError("no address")
                addr = infos[0][4][0]
            else:
                addr = str(ip)
            resolved = parse_ip_literal(addr)
            if not self.allow_private and resolved is not None and is_forbidden_address(resolved):
                handler.open_result(OpenResult(rep=ReplyCode.NOT_ALLOWED, reason="private target", resolved_ip=addr))
                return
            transport, proto = await asyncio.wait_for(
                loop.create_connection(DirectStream, addr, port), self.connect_timeout)
        except TimeoutError:
            handler.open_result(OpenResult(rep=ReplyCode.TTL_EXPIRED, reason="connect timed out"))
            return
        except OSError as exc:
            rep = ReplyCode.HOST_UNREACHABLE if isinstance(exc, socket.gaierror) else reply_for_errno(exc)
            handler.open_result(OpenResult(rep=rep, reason=str(exc)))
            return
        sock = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        handler.open_result(OpenResult(rep=ReplyCode.SUCCEEDED, bound_host=sock[0], bound_port=sock[1], resolved_ip=addr,
                                       stream=proto))  # type: ignore[arg-type]
        proto.handler = handler
        if proto.early:
            early, proto.early = bytes(proto.early), bytearray()
            handler.stream_data(early)
            if proto.handler is handler and not proto.closed and handler.sink_ready():
                transport.resume_reading()
