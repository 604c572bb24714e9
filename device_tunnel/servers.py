"""The agent's ``--server`` list: ``h1:p1,h2:p2`` (IPv6 in brackets), tried in order on failure."""

from __future__ import annotations


def parse_servers(value: str) -> list[tuple[str, int]]:
    """``h1:p1,h2:p2`` -> [(h1, p1), (h2, p2)]; an empty host is 127.0.0.1. ValueError on bad input."""
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not HOST:PORT")
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    if not out:
        raise ValueError("no server given")
    return out
