"""The node's UDP relay socket of one SOCKS5 UDP association (the asyncio side).

One non-blocking UDP socket per association, read with ``add_reader``; every decision is the
session core's :class:`~proxy.udp_association.UdpAssociation`. Nothing is buffered here: a client
datagram goes to the tunnel stream (whose queue is bounded, full = dropped) and a reply goes to the
client socket with one ``sendmsg`` (socket buffer full = dropped). UDP semantics: loss, never growth.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any

from device_tunnel.server import OpenResult

if TYPE_CHECKING:
    from .udp_association import UdpAssociation

log = logging.getLogger(__name__)

RECV_SIZE = 65_535 + 512   # larger than any UDP datagram
READS_PER_WAKEUP = 256     # then yield to the loop (other sessions, the tunnel's writes)
REFRESH_S = 1.0            # blacklist changes reach a live association within about this (while it sends)


def relay_address(bind_host: str, local_ip: str) -> tuple[str, str]:
    """(address to bind, address to announce in the reply). A specific bind host is used as is;
    an unspecified one (0.0.0.0, ::, a name) binds the wildcard of the TCP connection's family and
    announces the TCP connection's local address, which the client is known to reach."""
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        ip = None
    if ip is not None and not ip.is_unspecified:
        return bind_host, bind_host
    local = local_ip.split("%", 1)[0]
    return ("::" if ":" in local else "0.0.0.0"), local


class UdpRelay:
    """The relay socket plus the tunnel stream of one association (a device-stream handler)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner                      # the ClientSession: open_result / stream_closed go there
        self.sock: socket.socket | None = None
        self.stream: Any = None                 # TunnelStream once the device accepted
        self.assoc: UdpAssociation | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._refreshed = self._loop.time()
        self._refresh: asyncio.Task[None] | None = None

    def bind(self, bind_host: str, local_ip: str) -> tuple[str, int]:
        """Bind the relay socket; (announced host, port). Raises OSError."""
        host, shown = relay_address(bind_host, local_ip)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, 0))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        return shown, sock.getsockname()[1]

    def start(self, assoc: UdpAssociation) -> None:
        """Relay from now on (the reply went to the client)."""
        self.assoc = assoc
        if self.sock is not None and not self.closed:
            self._loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        """End the association: the socket closes (the port stops answering), the stream is reset."""
        if self.closed:
            return
        self.closed = True
        if self._refresh is not None:
            self._refresh.cancel()
        if self.sock is not None:
            try:
                self._loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close_quietly()

    def _readable(self) -> None:
        sock, assoc, stream = self.sock, self.assoc, self.stream
        if sock is None or assoc is None or self.closed:
            return
        if self._refresh is None and self._loop.time() - self._refreshed > REFRESH_S:
            self._refresh = self._loop.create_task(self._refresh_record())
        for _ in range(READS_PER_WAKEUP):
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                continue
            target = assoc.from_client(data, addr)
            if target is None:
                continue
            host, port, payload = target
            if stream is not None and stream.send_datagram(host, port, payload):
                assoc.sent_to_device(host, port, len(payload))
                self.owner.bytes_out += len(payload)  # live views and interim bandwidth read these
            else:
                assoc.drop("tunnel_full")

    async def _refresh_record(self) -> None:
        """Re-read the credential record (the auth cache: at most its TTL old) so blacklist changes
        apply per datagram; only while datagrams flow, so an idle association runs no timer."""
        try:
            assoc = self.assoc
            cache = self.owner.server.auth_cache
            if assoc is not None:
                record = await cache.lookup(assoc.record.connection_id)
                if record is not None and not self.closed:
                    assoc.update_record(record)
        except Exception:  # store down: keep the record we have
            log.debug("udp association: credential refresh failed", exc_info=True)
        finally:
            self._refreshed = self._loop.time()
            self._refresh = None

    # -- the device stream's handler ----------------------------------------------------------------
    def open_result(self, result: OpenResult) -> None:
        self.stream = result.stream
        if self.closed and result.stream is not None:
            self.stream = None
            result.stream.close_quietly()
            return
        self.owner.udp_open_result(result)

    def stream_datagram(self, host: str, port: int, data: bytes | memoryview) -> None:
        assoc, sock = self.assoc, self.sock
        if assoc is None or sock is None or self.closed:
            return
        head = assoc.from_device(host, port, len(data))
        if head is None:
            return
        try:
            sock.sendmsg([head, data], [], 0, assoc.client_addr)
        except (BlockingIOError, InterruptedError):
            assoc.drop("client_full")
            return
        except OSError:
            assoc.drop("client_full")
            return
        assoc.sent_to_client(len(data))
        self.owner.bytes_in += len(data)

    def stream_closed(self, error: str | None) -> None:
        self.stream = None
        self.owner.udp_stream_closed(error)

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
