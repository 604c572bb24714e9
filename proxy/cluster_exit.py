"""The exit of a cluster node: the device's local tunnel, else a relay to the node that holds it.

Same interface as :class:`proxy.exits.TunnelExit` (``open(device_id, host, port, handler)`` then one
``handler.open_result``), so sessions do not know whether their device is here or on a peer. A
relayed result carries the peer in ``OpenResult.node``. A device online nowhere answers
``NETWORK_UNREACHABLE`` ("device offline"), as a local offline device does.

:meth:`ClusterExit.control` does the same for CONTROL messages (``launchAutomation``): the local
tunnel, else the relay link to the device's node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from device_tunnel.relay import DeviceOffline, RelayLink, RelayPool
from device_tunnel.replies import ReplyCode
from device_tunnel.server import OpenHandler, OpenResult

from .exits import CancelOpen, TunnelExit

log = logging.getLogger(__name__)

Locate = Callable[[str], Awaitable[tuple[str, str] | None]]


class ClusterExit(TunnelExit):
    """Local tunnel first; otherwise presence lookup and a stream over a pooled relay link."""

    def __init__(self, registry: Any, pool: RelayPool, locate: Locate, forget: Callable[[str], None]) -> None:
        super().__init__(registry)
        self.pool = pool
        self.locate = locate
        self.forget = forget
        self.tasks: set[asyncio.Task[None]] = set()

    def open(self, device_id: str | None, host: str, port: int, handler: OpenHandler) -> CancelOpen | None:
        if device_id is None:
            return None
        local = super().open(device_id, host, port, handler)
        if local is not None:
            return local
        state: dict[str, Any] = {"cancelled": False, "link": None, "sid": 0}
        task = asyncio.get_running_loop().create_task(self._relay(device_id, host, port, handler, state))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

        def cancel() -> None:
            state["cancelled"] = True
            if state["link"] is not None:
                state["link"].cancel_open(state["sid"])
            else:
                task.cancel()
        return cancel

    async def _relay(self, device_id: str, host: str, port: int, handler: OpenHandler, state: dict) -> None:
        where = await self._where(device_id)
        if where is None:
            handler.open_result(OpenResult(rep=ReplyCode.NETWORK_UNREACHABLE, reason="device offline"))
            return
        node, address = where
        try:
            link = await self._link(device_id, node, address)
        except DeviceOffline:
            handler.open_result(OpenResult(rep=ReplyCode.NETWORK_UNREACHABLE, reason="device offline", node=node))
            return
        if state["cancelled"]:
            return
        state["link"] = link
        state["sid"] = link.open_stream(host, port, handler, device_id, getattr(handler, "connection_id", None))

    async def control(self, device_id: str, body: dict, timeout: float) -> dict:
        """Send CONTROL ``body`` to the device wherever its tunnel is; its CONTROL_REPLY.

        Raises :class:`DeviceOffline` when it is online nowhere (or its node cannot be reached),
        TimeoutError when the device does not answer within ``timeout``, ConnectionError when it or
        the link goes away meanwhile: the same as for a tunnel on this node."""
        tunnel = self.registry.pick(device_id)
        if tunnel is not None:
            return await tunnel.control(body, timeout=timeout)
        where = await self._where(device_id)
        if where is None:
            raise DeviceOffline("device offline")
        node, address = where
        link = await self._link(device_id, node, address)
        return await link.control(device_id, body, timeout)

    async def _where(self, device_id: str) -> tuple[str, str] | None:
        """(node, relay address) of the device's tunnel; None when it is online nowhere or the presence
        store cannot be asked (then it cannot be found either)."""
        try:
            return await self.locate(device_id)
        except Exception as exc:
            log.warning("presence lookup failed: %s", exc)
            return None

    async def _link(self, device_id: str, node: str, address: str) -> RelayLink:
        """A pooled link to the device's node; DeviceOffline (and the presence answer forgotten) when
        that node cannot be reached."""
        try:
            return await self.pool.link(node, address)
        except ConnectionError as exc:
            log.warning("%s", exc)
            self.forget(device_id)
            raise DeviceOffline(f"device offline (its node {node} cannot be reached)") from None

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.pool.close()
