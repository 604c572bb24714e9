"""The SOCKS5 UDP request header (RFC 1928 section 7), sans-I/O: parse a client datagram, build a reply.

Every datagram between a client and the UDP relay starts with::

    +-----+------+------+----------+----------+----------+
    | RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
    +-----+------+------+----------+----------+----------+
    |  2  |  1   |  1   | Variable |    2     | Variable |

RSV is ``0x0000``; FRAG is the fragment number (0 = a whole datagram; this relay drops the others);
ATYP/DST.ADDR/DST.PORT are the target (client -> relay) or the source of a reply (relay -> client).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .protocol import ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, decode_address

__all__ = ["MAX_UDP_PAYLOAD", "UdpHeaderError", "UdpPacket", "build_udp_header", "parse_udp_packet"]

MAX_UDP_PAYLOAD = 65_507


class UdpHeaderError(ValueError):
    """The datagram is not a valid SOCKS5 UDP request (truncated, bad RSV, unknown ATYP, bad name)."""


@dataclass(frozen=True, slots=True)
class UdpPacket:
    """One parsed datagram: ``host`` is dotted IPv4, compressed IPv6 or the domain as sent."""

    frag: int
    address_type: int
    host: str
    port: int
    data: memoryview


def parse_udp_packet(datagram: bytes | memoryview) -> UdpPacket:
    """Split a client datagram into header fields and payload (no copy); raises UdpHeaderError."""
    buf = memoryview(datagram)
    n = len(buf)
    if n < 4:
        raise UdpHeaderError(f"datagram of {n} bytes is shorter than the header")
    if buf[0] or buf[1]:
        raise UdpHeaderError("RSV must be 0x0000")
    frag, atyp = buf[2], buf[3]
    if atyp == ATYP_IPV4:
        end = 8
    elif atyp == ATYP_IPV6:
        end = 20
    elif atyp == ATYP_DOMAIN:
        if n < 5:
            raise UdpHeaderError("truncated domain length")
        if buf[4] == 0:
            raise UdpHeaderError("empty domain name")
        end = 5 + buf[4]
    else:
        raise UdpHeaderError(f"unknown address type {atyp}")
    if n < end + 2:
        raise UdpHeaderError("truncated address or port")
    try:
        host = decode_address(atyp, buf[4:end])
    except UnicodeDecodeError:
        raise UdpHeaderError("domain name is not valid UTF-8") from None
    port = (buf[end] << 8) | buf[end + 1]
    return UdpPacket(frag, atyp, host, port, buf[end + 2:])


def build_udp_header(host: str, port: int) -> bytes:
    """The header of a datagram relayed to the client, from ``host:port`` (an IP, or a domain).
    Raises ValueError for a port out of range or a name that does not fit."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    p = port.to_bytes(2, "big")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.encode("utf-8")
        if not 0 < len(name) <= 255:
            raise ValueError("domain name must be 1..255 bytes") from None
        return bytes((0, 0, 0, ATYP_DOMAIN, len(name))) + name + p
    if ip.version == 4:
        return b"\x00\x00\x00\x01" + ip.packed + p
    return b"\x00\x00\x00\x04" + ip.packed + p
