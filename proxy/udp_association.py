"""The decisions of one SOCKS5 UDP association on the node (RFC 1928 section 7), sans-I/O.

:class:`UdpAssociation` is asked about every datagram: one from the client (is it from the TCP
client's address, a whole datagram, to a target the blacklists allow?) and one from the device
(the header to put in front of it for the client). It counts what it relayed and dropped; the
adapter (``proxy/udp_relay.py``) moves the datagrams and tells it what the tunnel did with them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .session_policy import Attempt, Refusal, check_target
from .socks5.udp import MAX_UDP_PAYLOAD, UdpHeaderError, build_udp_header, parse_udp_packet

if TYPE_CHECKING:
    from .auth_cache.cache import CredentialRecord

# Why a datagram was not relayed (the label of proxyorch_udp_datagrams_dropped_total).
DROP_REASONS = ("foreign_source", "malformed", "fragment", "oversize", "blocked", "tunnel_full",
                "client_full", "no_client")
VERDICT_CACHE = 1024  # per association: targets whose blacklist verdict is remembered


@dataclass
class UdpMetrics:
    """Node-wide UDP counters exported on ``/metrics``."""

    associations_total: int = 0
    associations_active: int = 0
    datagrams_out: int = 0   # client -> device, handed to the tunnel
    datagrams_in: int = 0    # device -> client, sent to the client
    dropped: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        """Prometheus lines (every drop reason, zeros included, so dashboards see the series)."""
        out = [f"proxyorch_udp_associations_total {self.associations_total}",
               f"proxyorch_udp_associations_active {self.associations_active}",
               f"proxyorch_udp_datagrams_out_total {self.datagrams_out}",
               f"proxyorch_udp_datagrams_in_total {self.datagrams_in}",
               f"proxyorch_udp_fragments_dropped_total {self.dropped['fragment']}"]
        out += [f'proxyorch_udp_datagrams_dropped_total{{reason="{r}"}} {self.dropped[r]}' for r in DROP_REASONS]
        return out


def _plain_ip(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip.split("%", 1)[0]


class UdpAssociation:
    """One association: the client's address, the policy per target, byte and drop counts."""

    def __init__(self, record: CredentialRecord, client_ip: str, announced_port: int, metrics: UdpMetrics,
                 attempt: Attempt | None = None) -> None:
        self.record = record
        self.attempt = attempt  # the session's attempt: its target becomes the first one relayed (live views)
        self.client_ip = _plain_ip(client_ip)
        self.client_port: int | None = announced_port or None  # 0 announced: the first port seen
        self.metrics = metrics
        self.first_target: tuple[str, int] | None = None   # of the first datagram relayed
        self.first_blocked: tuple[str, int, Refusal] | None = None
        self.resolved_ip = ""     # the source of the first reply (the device resolved the name)
        self.bytes_out = 0        # payload bytes client -> target
        self.bytes_in = 0         # payload bytes target -> client
        self.relayed_out = 0
        self.relayed_in = 0
        self.dropped: Counter[str] = Counter()
        self._verdicts: dict[str, Refusal | None] = {}

    @property
    def client_addr(self) -> tuple[str, int] | None:
        return (self.client_ip, self.client_port) if self.client_port else None

    def update_record(self, record: CredentialRecord) -> None:
        """A fresher credential record (blacklists changed while the association lives)."""
        if record is not self.record:
            self.record = record
            self._verdicts.clear()

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.metrics.dropped[reason] += 1

    def from_client(self, datagram: bytes | memoryview, addr: tuple) -> tuple[str, int, memoryview] | None:
        """A datagram the relay socket received from ``addr``: (host, port, payload) to send to the
        device, or None when it is dropped (the reason is counted)."""
        if _plain_ip(addr[0]) != self.client_ip:
            self.drop("foreign_source")
            return None
        if self.client_port is None:
            self.client_port = addr[1]
        elif addr[1] != self.client_port:
            self.drop("foreign_source")
            return None
        try:
            packet = parse_udp_packet(datagram)
        except UdpHeaderError:
            self.drop("malformed")
            return None
        if packet.frag:
            self.drop("fragment")
            return None
        if len(packet.data) > MAX_UDP_PAYLOAD or not 0 < packet.port:
            self.drop("oversize" if packet.port else "malformed")
            return None
        host = packet.host
        verdict = self._verdicts.get(host, False)
        if verdict is False:
            verdict = check_target(self.record, host, needs_no_device=True)
            if len(self._verdicts) >= VERDICT_CACHE:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        if verdict is not None:
            if self.first_blocked is None:
                self.first_blocked = (host, packet.port, verdict)
            self.drop("malformed" if not verdict.blocked else "blocked")
            return None
        return host, packet.port, packet.data

    def sent_to_device(self, host: str, port: int, n: int) -> None:
        """The tunnel took a datagram of ``n`` payload bytes."""
        if self.first_target is None:
            self.first_target = (host, port)
            if self.attempt is not None:
                self.attempt.host, self.attempt.port = host, port
        self.bytes_out += n
        self.relayed_out += 1
        self.metrics.datagrams_out += 1

    def from_device(self, host: str, port: int, n: int) -> bytes | None:
        """The header for a reply of ``n`` bytes from ``host:port``, or None (dropped: no client
        address known yet, or an address the header cannot carry)."""
        if self.client_port is None:
            self.drop("no_client")
            return None
        try:
            head = build_udp_header(host, port)
        except ValueError:
            self.drop("malformed")
            return None
        if not self.resolved_ip:
            self.resolved_ip = host
        return head

    def sent_to_client(self, n: int) -> None:
        self.bytes_in += n
        self.relayed_in += 1
        self.metrics.datagrams_in += 1

    def summary(self) -> str:
        """What went wrong, for the row's ``error`` column ('' when nothing was dropped)."""
        if not self.dropped:
            return ""
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items()))
        return f"datagrams dropped: {parts}"
