"""Which ``ip_only`` connection a client address belongs to (sans-I/O; node-local copy of the store).

``ip_only`` ranges of different connections never overlap (RMS refuses it with 409), so an
address names at most one connection. The node reloads the index from the store at start, after
every ``conn:``/``kill:``/``flush`` bus event and about once a second (``proxy/usage_flush.py``).
An address that matches no range is treated as before: a no-auth greeting gets ``0xFF``.
"""

from __future__ import annotations

from proxyorch.limits_model import IPNetwork, normalize_address, parse_network


class AccessIndex:
    """``match(addr)`` → the connection id whose ``ip_only`` ranges contain ``addr``, else None."""

    def __init__(self) -> None:
        self._ranges: list[tuple[IPNetwork, str]] = []

    def replace(self, rows: list[tuple[str, list[str]]]) -> None:
        """Load ``(connection_id, [CIDR, ...])`` rows (bad entries are skipped)."""
        ranges = []
        for cid, entries in rows:
            for e in entries:
                try:
                    ranges.append((parse_network(e), cid))
                except ValueError:
                    continue
        ranges.sort(key=lambda r: -r[0].prefixlen)
        self._ranges = ranges

    def match(self, addr: str) -> str | None:
        if not self._ranges:
            return None
        ip = normalize_address(addr)
        if ip is None:
            return None
        for net, cid in self._ranges:
            if net.version == ip.version and ip in net:
                return cid
        return None

    def __len__(self) -> int:
        return len(self._ranges)
