"""Which targets a device agent refuses to dial: loopback, private, link-local and other special ranges.

Checking the literal the client sent is not enough on its own: a domain can resolve to 127.0.0.1.
The agent checks both the literal (:func:`parse_ip_literal`) and every address DNS returns
(:func:`is_forbidden_address`). Literals are parsed the way resolvers do, so ``2130706433``,
``0x7f.1``, ``127.1``, ``[::1]`` and ``::ffff:127.0.0.1`` are all recognised as loopback.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

__all__ = ["is_forbidden_address", "parse_ip_literal", "parse_ipv4_loose"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NUMERIC_PART = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)\Z")

_FORBIDDEN_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
    )
)
_FORBIDDEN_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/96",  # unspecified, loopback, deprecated IPv4-compatible
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, benchmarking, ...)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)
# Prefixes whose addresses carry an IPv4 address in their low 32 bits.
_EMBEDS_V4_LOW32 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::ffff:0:0/96",  # IPv4-mapped
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b::/96",  # NAT64 well-known prefix
    )
)
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def parse_ipv4_loose(text: str) -> ipaddress.IPv4Address | None:
    """Parse the IPv4 spellings inet_aton(3) accepts: 1 to 4 parts, decimal, octal (0…) or hex (0x…).

    Returns None if ``text`` is not all numeric parts (so it is a name, not an address). Raises
    ValueError when it is all numeric parts but out of range (``256.1.1.1``, ``1.2.3.4.5``, ``08``).
    """
    parts = text.split(".")
    if not all(_NUMERIC_PART.match(part) for part in parts):
        return None
    if len(parts) > 4:
        raise ValueError(f"too many parts in IPv4 address {text!r}")
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            values.append(int(part, 8))  # raises ValueError on 8 or 9
        else:
            values.append(int(part))
    *head, last = values
    if any(value > 0xFF for value in head) or last >= 1 << (8 * (4 - len(head))):
        raise ValueError(f"IPv4 address {text!r} out of range")
    number = last
    for index, value in enumerate(head):
        number |= value << (24 - 8 * index)
    return ipaddress.IPv4Address(number)


@lru_cache(maxsize=16384)  # pure (addresses are immutable); called for every OPEN
def parse_ip_literal(host: str) -> IPAddress | None:
    """The IP address ``host`` denotes as a literal, or None if it is a name (or invalid).

    Accepts bracketed or bare IPv6 (IPv4-mapped ones give their IPv4), the loose IPv4 spellings of
    :func:`parse_ipv4_loose`, one trailing dot, and Unicode digits and dots that IDNA maps to ASCII.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            address = ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
        return address.ipv4_mapped or address
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")  # what socket.getaddrinfo() does with str hosts
        except UnicodeError:
            return None
    if text.endswith("."):
        text = text[:-1]
    try:
        return parse_ipv4_loose(text) if text else None
    except ValueError:
        return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if any(address in net for net in _EMBEDS_V4_LOW32):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    return None


@lru_cache(maxsize=16384)  # pure; a dozen network checks per call otherwise
def is_forbidden_address(ip: IPAddress) -> bool:
    """True for addresses a proxy must not reach: anything not globally routable unicast.

    Loopback, private (RFC 1918, CGNAT 100.64/10, ULA fc00::/7), link-local (incl. 169.254.169.254,
    fe80::/10), multicast, unspecified, reserved, broadcast, documentation; IPv6 forms that embed an
    IPv4 address (mapped, translated, NAT64 64:ff9b::/96, 6to4) are judged by that IPv4 address.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(int(ip))
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_forbidden_address(embedded)
        networks: tuple[ipaddress.IPv6Network, ...] | tuple[ipaddress.IPv4Network, ...] = _FORBIDDEN_V6
    else:
        networks = _FORBIDDEN_V4
    if any(ip in net for net in networks):
        return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )
