"""What /healthz and /metrics add for a cluster: the live nodes, relay counters, tunnel errors."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any


async def live_nodes(cluster: Any, me: str) -> list[dict]:
    """The live nodes of the cluster (presence); a single node lists itself (``me``)."""
    presence = getattr(cluster, "presence", None)
    nodes: list[dict] = []
    if presence is not None:
        try:
            nodes = await asyncio.wait_for(presence.nodes(), 2)
        except Exception:
            nodes = []
    if not any(n["name"] == me for n in nodes):  # this node answers, so it is alive
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        relay = (cluster.relay_address() or None) if cluster is not None else None
        nodes.append({"name": me, "relay": relay, "last_seen": now})
        nodes.sort(key=lambda n: n["name"] or "")
    return nodes


def metric_lines(cluster: Any, tunnels: Any) -> list[str]:
    """Relay counters per peer node and tunnels closed by this node per error code."""
    lines = [f'proxyorch_tunnel_errors_total{{code="{code}"}} {n}' for code, n in sorted(tunnels.errors.items())]
    rm = getattr(cluster, "relay_metrics", None)
    if rm is None:
        return lines
    sent, received = rm.totals()
    for peer, n in sorted(rm.streams.items()):
        lines.append(f'proxyorch_relay_streams_total{{peer="{peer}"}} {n}')
    for peer in sorted(set(sent) | set(received)):
        lines.append(f'proxyorch_relay_bytes_total{{peer="{peer}",direction="out"}} {sent[peer]}')
        lines.append(f'proxyorch_relay_bytes_total{{peer="{peer}",direction="in"}} {received[peer]}')
    for peer, n in sorted(rm.failures.items()):
        lines.append(f'proxyorch_relay_failures_total{{peer="{peer}"}} {n}')
    lines.append(f"proxyorch_relay_auth_failures_total {rm.auth_failures}")
    lines.append(f"proxyorch_relay_links {len(rm.live)}")
    return lines
