"""Target blacklists: host normalisation, whole-label suffix matching and IP/CIDR matching.

A :class:`Blacklist` is compiled once from its entries and then only read, so it can be shared by
every session. Domain entries block the domain and all its subdomains (``example.com`` blocks
``a.example.com`` but not ``badexample.com``); IP and CIDR entries block IP-literal targets.
Shared by the data plane (matching) and RMS (validating entries on write), so it lives here.
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import ClassVar

from device_tunnel.target_policy import parse_ipv4_loose

__all__ = ["Blacklist", "first_match", "normalize_host", "parse_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")
# Full stops that IDNA (and so the resolver on the device) treats as label separators.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def _ip_text(address: IPAddress) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


@lru_cache(maxsize=16384)  # pure; every session's target passes here twice (policy, blacklist match)
def normalize_host(host: str) -> str:
    """Canonical form of a target host, the form blacklist entries are compared in.

    Lower case, one trailing dot removed, IDNA labels as punycode, IPv6 compressed without brackets,
    IPv4-mapped IPv6 as IPv4, and inet_aton spellings of IPv4 (``2130706433``, ``0x7f.1``, ``127.1``,
    ``0177.0.0.1``) as a dotted quad. Raises ValueError for empty or invalid hosts.
    """
    if not host:
        raise ValueError("empty host")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unterminated IPv6 literal {host!r}")
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"invalid IPv6 literal {host!r}")
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not accepted")
        return _ip_text(ipaddress.IPv6Address(host))  # ValueError if invalid
    labels = host.translate(_DOTS).split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    ascii_labels = []
    for label in labels:
        if not label.isascii():
            try:
                label = encodings.idna.ToASCII(label).decode("ascii")
            except UnicodeError as exc:
                raise ValueError(f"invalid internationalised label {label!r}: {exc}") from None
        ascii_labels.append(label.lower())
    name = ".".join(ascii_labels)
    address = parse_ipv4_loose(name)  # ValueError for numeric hosts out of range
    if address is not None:
        return str(address)
    if len(name) > 253:
        raise ValueError("host name longer than 253 characters")
    for label in ascii_labels:
        if not _LABEL.match(label):
            raise ValueError(f"invalid label {label!r} in host name")
    return name


def parse_ip(host: str) -> IPAddress | None:
    """The IP address of an IP-literal host (after :func:`normalize_host`), None for a domain name.

    Raises ValueError for invalid hosts, like :func:`normalize_host`.
    """
    return _address_of(normalize_host(host))


@lru_cache(maxsize=16384)
def _address_of(normalized: str) -> IPAddress | None:
    if ":" in normalized or normalized[-1].isdigit():
        try:
            return ipaddress.ip_address(normalized)
        except ValueError:
            return None
    return None


def _network_of(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    network = ipaddress.ip_network(entry, strict=False)
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


class Blacklist:
    """Compiled, immutable. Domain entries: whole-label suffix match in O(labels). IP/CIDR entries
    match IP-literal targets in O(distinct prefix lengths)."""

    __slots__ = ("_domains", "_networks", "_size", "invalid")

    EMPTY: ClassVar[Blacklist]

    def __init__(
        self,
        domains: frozenset[str],
        networks: dict[tuple[int, int], dict[int, str]],
        invalid: tuple[str, ...] = (),
    ) -> None:
        self._domains = domains
        # (ip version, prefix length) -> {network address >> host bits: entry}
        self._networks = networks
        self._size = len(domains) + sum(len(table) for table in networks.values())
        self.invalid = invalid

    @classmethod
    def compile(cls, entries: Iterable[str]) -> Blacklist:
        """Build from entries: domains (``example.com``, ``*.example.com``, ``.example.com``), IPs or CIDRs.

        Blank entries are ignored; invalid ones are skipped and listed in ``.invalid``.
        """
        domains: set[str] = set()
        networks: dict[tuple[int, int], dict[int, str]] = {}
        invalid: list[str] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                if "/" in entry:
                    network = _network_of(entry)
                    text = str(network)
                else:
                    wildcard = entry.startswith(("*.", "."))
                    text = normalize_host(entry[2:] if entry.startswith("*.") else entry.lstrip("."))
                    address = _address_of(text)
                    if address is None:
                        domains.add(text)
                        continue
                    if wildcard:
                        raise ValueError("wildcard on an IP address")
                    network = ipaddress.ip_network(address)
            except ValueError:
                invalid.append(raw)
                continue
            bits = network.max_prefixlen - network.prefixlen
            table = networks.setdefault((network.version, network.prefixlen), {})
            table.setdefault(int(network.network_address) >> bits, text)
        return cls(frozenset(domains), networks, tuple(invalid))

    def match(self, host: str) -> str | None:
        """The (normalised) entry blocking ``host``, or None. Hosts that cannot be normalised give None."""
        try:
            normalized = normalize_host(host)
        except ValueError:
            return None
        return self._match_normalized(normalized, _address_of(normalized))

    def _match_normalized(self, normalized: str, address: IPAddress | None) -> str | None:
        if address is not None:
            value, width = int(address), address.max_prefixlen
            for (version, prefixlen), table in self._networks.items():
                if version == address.version:
                    entry = table.get(value >> (width - prefixlen))
                    if entry is not None:
                        return entry
            return None
        domains = self._domains
        if not domains:
            return None
        if normalized in domains:
            return normalized
        index = normalized.find(".")
        while index >= 0:
            suffix = normalized[index + 1 :]
            if suffix in domains:
                return suffix
            index = normalized.find(".", index + 1)
        return None

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"<Blacklist {self._size} entries, {len(self.invalid)} invalid>"


Blacklist.EMPTY = Blacklist(frozenset(), {})


def first_match(host: str, lists: Iterable[tuple[str, Blacklist]]) -> tuple[str, str] | None:
    """(scope, entry) from the first list blocking ``host``, or None; ``host`` is normalised once."""
    try:
        normalized = normalize_host(host)
    except ValueError:
        return None
    address = _address_of(normalized)
    for scope, blacklist in lists:
        entry = blacklist._match_normalized(normalized, address)
        if entry is not None:
            return scope, entry
    return None
