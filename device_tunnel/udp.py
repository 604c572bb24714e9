"""Device side of a UDP association: send the node's DATAGRAMs from this device's network.

Each datagram passes the same target policy as a TCP stream: names are resolved here (cached
briefly per association), every address is checked (private, loopback, link-local refused unless
``allow_private``), and the datagram goes to a checked address only. The local socket is bound to
the agent's *current* ``source_address`` (read at every send: a rotation may change it), one socket
per source address and family, at most :data:`MAX_SOCKETS`. Replies are relayed back only from
addresses this association sent to (address-restricted, like a NAT); nothing is buffered beyond the
tunnel stream's bounded queue: a full socket or queue drops the datagram (UDP semantics).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import Counter
from typing import TYPE_CHECKING

from .frames import MAX_UDP_PAYLOAD
from .target_policy import is_forbidden_address, parse_ip_literal

if TYPE_CHECKING:
    from .adapter import TunnelStream
    from .agent import AgentTunnel

log = logging.getLogger(__name__)

MAX_SOCKETS = 4            # local sockets per association (source addresses x families)
MAX_PEERS = 4096           # remembered destinations (replies accepted from these)
NAME_TTL_S = 30.0          # a resolved name is reused this long
MAX_NAMES = 256
MAX_UNRESOLVED = 64        # datagrams waiting for a name lookup, per association
READS_PER_WAKEUP = 256
RECV_SIZE = 65_535

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DeviceUdpAssociation:
    """The local end of one UDP stream on the device (a stream handler with ``stream_datagram``)."""

    def __init__(self, tunnel: AgentTunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.stream: TunnelStream | None = None
        self.config = tunnel.config
        self._loop = asyncio.get_running_loop()
        self.sockets: dict[tuple[str | None, int], socket.socket] = {}
        self.peers: dict[tuple[str, int], None] = {}
        self.names: dict[str, tuple[float, list[IPAddress]]] = {}
        self.unresolved: dict[str, list[tuple[int, bytes | memoryview]]] = {}
        self.unresolved_count = 0
        self.refused_logged: set[str] = set()
        self.sent = 0
        self.received = 0
        self.dropped: Counter[str] = Counter()
        self.closed = False

    # -- node -> target -----------------------------------------------------------------------------
    def stream_datagram(self, host: str, port: int, data: bytes | memoryview) -> None:
        if self.closed:
            return
        if not 0 < port < 65536 or len(data) > MAX_UDP_PAYLOAD:
            self.dropped["bad_target"] += 1
            return
        literal = parse_ip_literal(host)
        if literal is not None:
            self._send(host, [literal], port, data)
            return
        cached = self.names.get(host)
        if cached is not None and cached[0] > self._loop.time():
            self._send(host, cached[1], port, data)
            return
        if self.unresolved_count >= MAX_UNRESOLVED:
            self.dropped["resolving"] += 1
            return
        waiting = self.unresolved.get(host)
        self.unresolved_count += 1
        if waiting is not None:
            waiting.append((port, data))
            return
        self.unresolved[host] = [(port, data)]
        self.tunnel.spawn(self._resolve(host))

    async def _resolve(self, host: str) -> None:
        addresses: list[IPAddress] = []
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                infos = await self._loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            for family, _t, _p, _c, sockaddr in infos:
                if family in (socket.AF_INET, socket.AF_INET6):
                    ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
                    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                        ip = ip.ipv4_mapped
                    if ip not in addresses:
                        addresses.append(ip)
        except (OSError, UnicodeError, ValueError, TimeoutError) as exc:
            log.info("udp association %d: cannot resolve %s: %s", self.stream_id, host, exc)
        waiting = self.unresolved.pop(host, [])
        self.unresolved_count -= len(waiting)
        if self.closed:
            return
        if len(self.names) >= MAX_NAMES:
            self.names.pop(next(iter(self.names)))
        if addresses:
            self.names[host] = (self._loop.time() + NAME_TTL_S, addresses)
        for port, data in waiting:
            if addresses:
                self._send(host, addresses, port, data)
            else:
                self.dropped["unresolved"] += 1

    def _send(self, host: str, addresses: list[IPAddress], port: int, data: bytes | memoryview) -> None:
        cfg = self.config
        if not cfg.allow_private:
            addresses = [ip for ip in addresses if not is_forbidden_address(ip)]
            if not addresses:
                self.dropped["policy"] += 1
                if host not in self.refused_logged and len(self.refused_logged) < 64:
                    self.refused_logged.add(host)
                    log.warning("udp association %d: datagram to %s refused: target address is private, "
                                "loopback or link-local", self.stream_id, host)
                return
        source = cfg.source_address  # read now: a rotation changes it in place
        if source:
            version = ipaddress.ip_address(source).version
            addresses = [ip for ip in addresses if ip.version == version]
            if not addresses:
                self.dropped["family"] += 1
                return
        ip = addresses[0]
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        try:
            sock = self._socket(source or None, family)
            sock.sendto(data, (str(ip), port))
        except (BlockingIOError, InterruptedError):
            self.dropped["socket_full"] += 1
            return
        except OSError as exc:
            self.dropped["send_error"] += 1
            log.debug("udp association %d: send to %s:%d failed: %s", self.stream_id, ip, port, exc)
            return
        self.sent += 1
        key = (str(ip), port)
        if key not in self.peers:
            if len(self.peers) >= MAX_PEERS:
                self.peers.pop(next(iter(self.peers)))
            self.peers[key] = None

    def _socket(self, source: str | None, family: int) -> socket.socket:
        key = (source, family)
        sock = self.sockets.get(key)
        if sock is not None:
            return sock
        if len(self.sockets) >= MAX_SOCKETS:  # the oldest (an earlier source address) goes
            old_key = next(iter(self.sockets))
            self._close_socket(self.sockets.pop(old_key))
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((source or ("0.0.0.0" if family == socket.AF_INET else "::"), 0))
        except OSError:
            sock.close()
            raise
        self.sockets[key] = sock
        self._loop.add_reader(sock.fileno(), self._readable, sock)
        return sock

    # -- target -> node -----------------------------------------------------------------------------
    def _readable(self, sock: socket.socket) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors surface here; UDP goes on
                continue
            ip = addr[0].split("%", 1)[0]
            if (ip, addr[1]) not in self.peers:
                self.dropped["unsolicited"] += 1
                continue
            stream = self.stream
            if stream is None or not stream.send_datagram(ip, addr[1], data):
                self.dropped["tunnel_full"] += 1
                continue
            self.received += 1

    # -- lifetime -----------------------------------------------------------------------------------
    def _close_socket(self, sock: socket.socket) -> None:
        try:
            self._loop.remove_reader(sock.fileno())
        except (ValueError, OSError):
            pass
        sock.close()

    def stream_closed(self, error: str | None) -> None:
        """The association ended (the client's control connection closed, or the tunnel went)."""
        if self.closed:
            return
        self.closed = True
        self.stream = None
        for sock in self.sockets.values():
            self._close_socket(sock)
        self.sockets.clear()
        self.unresolved.clear()
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        log.info("udp association %d closed: %d datagrams sent, %d received, dropped: %s",
                 self.stream_id, self.sent, self.received, drops)

    def stream_data(self, data: bytes) -> None:
        pass  # a UDP stream carries no DATA (the core resets such a stream)

    def stream_eof(self) -> None:
        pass

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass

    def sink_ready(self) -> bool:
        return True
