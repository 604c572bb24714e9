"""Limits and access modes of a connection, as both the control plane and the data plane see them.

Shared (like :mod:`proxyorch.blacklist`) because RMS validates what the nodes enforce: the
:class:`Limits` record, address normalisation (IPv4-mapped IPv6 is IPv4), and the usage periods a
relayed byte is counted in (UTC days and months, ``total`` from 1970 or from when a ``total`` quota
was set). Pure: no clock is read, times are passed in.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ACCESS_MODES = ("password", "password_and_ip", "ip_only")
QUOTA_PERIODS = ("day", "month", "total")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def normalize_address(text: str) -> IPAddress | None:
    """The client address as an IP (IPv4-mapped IPv6 as IPv4, scope dropped), or None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_network(text: str) -> IPNetwork:
    """An ``allowed_ips`` entry (address or CIDR; host bits must be zero) normalised; ValueError if bad."""
    if not isinstance(text, str) or not text.strip() or len(text) > 64:
        raise ValueError("not an IP address or CIDR")
    raw = text.strip()
    addr, _, prefix = raw.partition("/")
    if "%" in addr and ":" in addr:  # an IPv6 zone ("fe80::1%eth0"): dropped, as normalize_address drops it from clients
        addr = addr.split("%", 1)[0]
        raw = addr + ("/" + prefix if prefix else "")
    net = ipaddress.ip_network(addr if not prefix else raw, strict=True)
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        if net.prefixlen < 96:
            raise ValueError("an IPv4-mapped range must have a prefix of at least /96")
        return ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


def networks_overlap(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


def address_allowed(addr: str, networks: tuple[IPNetwork, ...]) -> bool:
    ip = normalize_address(addr)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a connection may do. ``None`` = no limit; ``quota_start`` is when a ``total`` quota was set."""

    download_bytes_per_s: int | None = None
    upload_bytes_per_s: int | None = None
    max_concurrent_sessions: int | None = None
    quota_bytes: int | None = None
    quota_period: str | None = None
    quota_start: datetime | None = None
    access_mode: str = "password"
    allowed_ips: tuple[IPNetwork, ...] = ()

    @property
    def any_limit(self) -> bool:
        return (self.download_bytes_per_s is not None or self.upload_bytes_per_s is not None
                or self.max_concurrent_sessions is not None or self.quota_bytes is not None)


NO_LIMITS = Limits()


def period_start(period: str | None, quota_start: datetime | None, now: datetime) -> tuple[str, datetime]:
    """The usage row (period, start) the quota of ``period`` is measured in at wall time ``now``."""
    now = now.astimezone(UTC)
    if period == "day":
        return "day", now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return "month", now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if period == "total" and quota_start is not None:
        return "total", quota_start.astimezone(UTC)
    return "total", EPOCH


def usage_rows(limits: Limits, now: datetime) -> list[tuple[str, datetime]]:
    """Every usage row a relayed byte is added to: day, month, lifetime, and a ``total`` quota's own row."""
    rows = [period_start("day", None, now), period_start("month", None, now), ("total", EPOCH)]
    if limits.quota_period == "total" and limits.quota_start is not None:
        rows.append(("total", limits.quota_start.astimezone(UTC)))
    return rows
