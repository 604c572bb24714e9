"""Which devices have live tunnels on this node (node-local state behind a small interface)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import NodeTunnel

PresenceCallback = Callable[[str, bool, dict], Awaitable[None]]


class DeviceRegistry:
    """device id -> live tunnel connections. ``pick`` spreads streams over a device's tunnels."""

    def __init__(self) -> None:
        self._tunnels: dict[str, list[NodeTunnel]] = {}

    def add(self, device_id: str, tunnel: NodeTunnel) -> bool:
        """Register a tunnel; True when it is the device's first (device came online)."""
        tunnels = self._tunnels.setdefault(device_id, [])
        tunnels.append(tunnel)
        return len(tunnels) == 1

    def remove(self, device_id: str, tunnel: NodeTunnel) -> bool:
        """Unregister a tunnel; True when it was the device's last (device went offline)."""
        tunnels = self._tunnels.get(device_id)
        if not tunnels or tunnel not in tunnels:
            return False
        tunnels.remove(tunnel)
        if not tunnels:
            del self._tunnels[device_id]
            return True
        return False

    def pick(self, device_id: str) -> NodeTunnel | None:
        """The usable tunnel of ``device_id`` with the fewest open streams, or None (offline here)."""
        tunnels = self._tunnels.get(device_id)
        if not tunnels:
            return None
        best = None
        for t in tunnels:
            if t.going_away or t.closed:
                continue
            if best is None or len(t.streams) < len(best.streams):
                best = t
        return best

    def is_online(self, device_id: str) -> bool:
        return self.pick(device_id) is not None

    def tunnels(self, device_id: str) -> list[NodeTunnel]:
        return list(self._tunnels.get(device_id, ()))

    def all_tunnels(self) -> list[NodeTunnel]:
        return [t for ts in self._tunnels.values() for t in ts]

    def device_ids(self) -> list[str]:
        return list(self._tunnels)
