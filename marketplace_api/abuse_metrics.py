"""``/metrics`` lines about abuse: hostile devices, login floods, descriptor exhaustion.

Aggregated only (``/metrics`` is unauthenticated: no device ids or client addresses in labels).
"""

from __future__ import annotations

from typing import Any

from device_tunnel.adapter import QUEUE_OVERFLOWS


def abuse_metrics(proxy: Any, tunnels: Any) -> list[str]:
    """Prometheus lines for the node's proxy server and tunnel server."""
    lines = [f'proxyorch_tunnel_protocol_errors_total{{code="{code}"}} {n}'
             for code, n in sorted(tunnels.errors.items())]
    lines += [f'proxyorch_device_misbehaviour_total{{kind="{kind}"}} {n}'
              for kind, n in sorted(tunnels.misbehaviour.items())]
    lines += [f'proxyorch_tunnel_queue_overflows_total{{kind="{kind}"}} {QUEUE_OVERFLOWS[kind]}'
              for kind in ("tunnel", "relay")]
    lines += [
        f"proxyorch_devices_marked {len(tunnels.marked)}",
        f"proxyorch_tunnel_streams {sum(len(t.streams) for t in tunnels.connections)}",
        f"proxyorch_tunnel_opening {sum(t.opening for t in tunnels.connections)}",
        f"proxyorch_unauth_refused_total {proxy.unauth_refused}",
        f"proxyorch_unauth_connections {sum(proxy.unauth.values())}",
    ]
    for name, listener in (("proxy", proxy.listener), ("tunnel", tunnels.listener)):
        if listener is not None:
            lines.append(f'proxyorch_accept_paused_total{{port="{name}"}} {listener.exhausted_pauses}')
            lines.append(f'proxyorch_accept_paused{{port="{name}"}} {int(listener.paused)}')
    return lines
