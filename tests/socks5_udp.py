"""A raw RFC 1928 UDP ASSOCIATE client (blocking sockets; run it with ``asyncio.to_thread``) and a
UDP echo target that records who sent what."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct


def udp_header(host: str, port: int, frag: int = 0) -> bytes:
    """RSV RSV FRAG ATYP ADDR PORT."""
    try:
        ip = ipaddress.ip_address(host)
        addr = (b"\x01" + ip.packed) if ip.version == 4 else (b"\x04" + ip.packed)
    except ValueError:
        addr = b"\x03" + bytes([len(host.encode())]) + host.encode()
    return bytes((0, 0, frag)) + addr + struct.pack("!H", port)


def parse_header(data: bytes) -> tuple[str, int, bytes]:
    assert data[:3] == b"\x00\x00\x00", data[:3]
    atyp = data[3]
    if atyp == 1:
        host, rest = str(ipaddress.IPv4Address(data[4:8])), data[8:]
    elif atyp == 4:
        host, rest = str(ipaddress.IPv6Address(data[4:20])), data[20:]
    else:
        n = data[4]
        host, rest = data[5:5 + n].decode(), data[5 + n:]
    return host, struct.unpack("!H", rest[:2])[0], rest[2:]


class RawUdpClient:
    """Greeting, username/password, UDP ASSOCIATE; then datagrams with the SOCKS5 UDP header."""

    def __init__(self, proxy_port: int, user: str, password: str, *, announce: bool = True,
                 local_ip: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.proxy_port, self.user, self.password = proxy_port, user, password
        self.timeout = timeout
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((local_ip, 0))
        self.udp.settimeout(timeout)
        self.announce = announce
        self.tcp: socket.socket | None = None
        self.relay: tuple[str, int] = ("", 0)

    def _read(self, n: int) -> bytes:
        assert self.tcp is not None
        buf = b""
        while len(buf) < n:
            chunk = self.tcp.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("proxy closed the control connection")
            buf += chunk
        return buf

    def associate(self) -> int:
        """The reply code (0: ``self.relay`` is the relay address)."""
        self.tcp = socket.create_connection(("127.0.0.1", self.proxy_port), timeout=self.timeout)
        self.tcp.sendall(b"\x05\x01\x02")
        assert self._read(2) == b"\x05\x02"
        u, p = self.user.encode(), self.password.encode()
        self.tcp.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        status = self._read(2)[1]
        if status:
            return 0x100 + status
        host, port = self.udp.getsockname() if self.announce else ("0.0.0.0", 0)
        self.tcp.sendall(b"\x05\x03\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
        head = self._read(4)
        if head[3] == 1:
            bound = str(ipaddress.IPv4Address(self._read(4)))
        elif head[3] == 4:
            bound = str(ipaddress.IPv6Address(self._read(16)))
        else:
            bound = self._read(self._read(1)[0]).decode()
        self.relay = (bound, struct.unpack("!H", self._read(2))[0])
        return head[1]

    def send(self, host: str, port: int, payload: bytes, frag: int = 0) -> None:
        self.udp.sendto(udp_header(host, port, frag) + payload, self.relay)

    def send_raw(self, datagram: bytes) -> None:
        self.udp.sendto(datagram, self.relay)

    def recv(self, timeout: float | None = None) -> tuple[str, int, bytes]:
        """(source host, source port, payload) of the next reply; raises TimeoutError."""
        self.udp.settimeout(timeout or self.timeout)
        data, addr = self.udp.recvfrom(70000)
        assert addr[1] == self.relay[1], (addr, self.relay)
        return parse_header(data)

    def close_control(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
            self.tcp = None

    def close(self) -> None:
        self.close_control()
        self.udp.close()


class UdpEcho:
    """Echoes every datagram (empty ones too) to its sender and records (peer, payload length)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[tuple[str, int], int]] = []
        self.payloads: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(70000)
            except BlockingIOError:
                return
            except OSError:
                continue
            self.seen.append((addr, len(data)))
            self.payloads.append(data)
            try:
                self.sock.sendto(data, addr)
            except OSError:
                pass

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def start_udp_echo(host: str = "127.0.0.1") -> UdpEcho:
    return UdpEcho(host)
