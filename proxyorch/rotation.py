"""Node side of IP rotation: ask the device over the tunnel, hold its new sessions meanwhile, record it.

One :class:`RotationManager` per node. :meth:`RotationManager.rotate` checks the device can rotate
(online here, ``can_rotate`` in its HELLO meta, not inside ``ROTATE_MIN_INTERVAL_S`` of the end of
its previous rotation), closes the device's open sessions, parks new ones in the proxy's
:class:`proxy.rotation_gate.RotationGate` (they wait up to ``ROTATE_WAIT_S``), sends CONTROL
``{"command": "rotate"}`` and records the answer (``devices.public_ip``/``last_rotated_at`` and a
``device_rotations`` row). The timer task rotates devices with ``rotation_interval_s`` set.
A device whose tunnel is on another live node (presence) is rotated by that node: the whole call is
forwarded there (:mod:`proxyorch.rotation_forward`) and its answer returned as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 150.0  # the agent gives its command 120 s, then re-checks the IP
TIMER_SWEEP_S = 1.0
CLOSE_REASON = "device is rotating its IP"


class RotationError(Exception):
    """A refused or failed rotation: HTTP status, message, and Retry-After seconds for a 429."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class RotationManager:
    """Rotations of the devices whose tunnels this node holds (API and timer)."""

    def __init__(self, node: Any, forwarder: Any = None) -> None:
        self.node = node
        self.forwarder = forwarder  # proxyorch.rotation_forward.RotationForwarder (in a cluster)
        self.running: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._timer_runs: set[asyncio.Task[Any]] = set()

    @property
    def _settings(self):  # noqa: ANN202
        return self.node.settings

    def start(self) -> None:
        self._task = asyncio.create_task(self._timer_loop())

    async def stop(self) -> None:
        """Cancel the timer and the rotations it started."""
        for t in [self._task, *self._timer_runs]:
            if t is not None:
                t.cancel()
        for t in [self._task, *self._timer_runs]:
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        for device_id in list(self.running):
            self.node.proxy.gate.end(device_id)
        if self.forwarder is not None:
            await self.forwarder.close()

    async def rotate(self, device_id: str, trigger: str = "api", forwarded: bool = False) -> dict:
        """Rotate now; ``{old_ip, new_ip, changed, took_ms}`` or RotationError. A device held by another
        node is rotated there, unless ``forwarded`` (the call came from a peer: never forward again)."""
        s = self._settings
        if device_id in self.running:
            raise RotationError(429, "a rotation of this device is in progress", math.ceil(s.rotate_min_interval_s))
        tunnel = self.node.tunnels.registry.pick(device_id)
        if tunnel is None and not forwarded:
            peer = await self._peer_of(device_id)
            if peer is not None:
                return await self.forwarder.rotate(peer[0], peer[1], device_id)
        row = await self.node.pool.fetchrow(
            "SELECT public_ip, node, online, EXTRACT(EPOCH FROM now() - last_rotated_at) AS since "
            "FROM devices WHERE remote_device_id = $1", device_id)
        if tunnel is None:
            raise RotationError(409, "device is offline")
        if not tunnel.meta.get("can_rotate"):
            raise RotationError(409, "device cannot rotate: its agent runs without --rotate-command")
        if trigger == "api" and row is not None and row["since"] is not None:
            left = s.rotate_min_interval_s - float(row["since"])
            if left > 0:
                raise RotationError(429, f"the previous rotation ended less than {s.rotate_min_interval_s:g}s ago",
                                    max(1, math.ceil(left)))
        if device_id in self.running:  # another request got here during the query
            raise RotationError(429, "a rotation of this device is in progress", math.ceil(s.rotate_min_interval_s))
        self.running.add(device_id)
        gate = self.node.proxy.gate
        gate.begin(device_id)
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        closed = 0
        for session in self.node.proxy.sessions.of_device(device_id):
            session.terminate(CLOSE_REASON)  # they would break anyway when the address changes
            closed += 1
        cluster = getattr(self.node, "cluster", None)
        relay = cluster.relay_server if cluster is not None else None
        if relay is not None:  # sessions other nodes relay to this device end too (their node sees a reset)
            closed += relay.terminate_device(device_id, CLOSE_REASON)
        try:
            reply = await self._ask(device_id, tunnel)
        except RotationError as exc:
            await self._record(device_id, trigger, started_at, t0, row["public_ip"] if row else None, None, exc.message)
            raise
        finally:
            self.running.discard(device_id)
            waiting = gate.end(device_id)
        took_ms = int((time.monotonic() - t0) * 1000)
        old_ip = reply.get("old_ip") or (row["public_ip"] if row else None)
        new_ip = reply.get("new_ip")
        changed = bool(new_ip) and new_ip != old_ip
        await self._record(device_id, trigger, started_at, t0, old_ip, new_ip, None, changed)
        log.info("device %s rotated (%s): %s -> %s in %d ms; %d sessions closed, %d waited", device_id, trigger,
                 old_ip, new_ip, took_ms, closed, waiting)
        return {"old_ip": old_ip, "new_ip": new_ip, "changed": changed, "took_ms": took_ms}

    async def _peer_of(self, device_id: str) -> tuple[str, str] | None:
        """(node, API URL) of the other live node holding the device's tunnel, or None (offline)."""
        cluster = getattr(self.node, "cluster", None)
        presence = cluster.presence if cluster is not None else None
        if presence is None or self.forwarder is None:
            return None
        try:
            found = await presence.locate(device_id)
            if found is None or found[0] == self._settings.node_name:
                return None
            url = (await presence.api_addresses()).get(found[0])
        except Exception as exc:  # the presence store is unreachable: as good as offline here
            log.warning("rotation of %s: presence lookup failed: %s", device_id, exc)
            return None
        if url is None:  # the node died between the two lookups
            return None
        return found[0], url

    async def _ask(self, device_id: str, tunnel: Any) -> dict:
        try:
            reply = await tunnel.control({"command": "rotate"}, timeout=CONTROL_TIMEOUT_S)
        except TimeoutError:
            raise RotationError(504, "the device did not finish the rotation in time") from None
        except (ConnectionError, OSError):
            reply = await self._after_reconnect(device_id)
        if not reply.get("ok"):
            error = reply.get("error") or "unknown error"
            if reply.get("can_rotate") is False:
                raise RotationError(409, str(error))
            raise RotationError(502, f"the device could not rotate: {error}")
        return reply

    async def _after_reconnect(self, device_id: str) -> dict:
        """The tunnel dropped mid-rotation (a phone toggling airplane mode): wait for the device to come
        back (up to ROTATE_WAIT_S) and ask its public IP."""
        deadline = time.monotonic() + self._settings.rotate_wait_s
        while time.monotonic() < deadline:
            tunnel = self.node.tunnels.registry.pick(device_id)
            if tunnel is not None:
                try:
                    answer = await tunnel.control({"command": "public_ip"}, timeout=30)
                except (TimeoutError, ConnectionError, OSError):
                    continue
                return {"ok": True, "new_ip": answer.get("public_ip")}
            await asyncio.sleep(0.2)
        raise RotationError(504, "the device did not come back after rotating")

    async def _record(self, device_id: str, trigger: str, started_at: datetime, t0: float, old_ip: str | None,
                      new_ip: str | None, error: str | None, changed: bool = False) -> None:
        took_ms = int((time.monotonic() - t0) * 1000)
        try:
            async with self.node.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE devices SET last_rotated_at = now(), public_ip = COALESCE($2, public_ip) "
                    "WHERE remote_device_id = $1", device_id, new_ip)
                await conn.execute(
                    """INSERT INTO device_rotations(remote_device_id, old_ip, new_ip, changed, trigger, started_at,
                                                    took_ms, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                    device_id, old_ip, new_ip, changed, trigger, started_at, took_ms, error)
        except Exception:
            log.exception("could not record the rotation of %s", device_id)

    # -- the timer ------------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        while True:
            try:
                await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rotation timer sweep failed")
            await asyncio.sleep(TIMER_SWEEP_S)

    async def _sweep(self) -> None:
        devices = self.node.tunnels.registry.device_ids()
        if not devices:
            return
        rows = await self.node.pool.fetch(
            """SELECT remote_device_id FROM devices
               WHERE remote_device_id = ANY($1::uuid[]) AND rotation_interval_s IS NOT NULL
                 AND GREATEST(COALESCE(last_rotated_at, rotation_since), rotation_since)
                     + rotation_interval_s * interval '1 second' <= now()""", devices)
        for r in rows:
            device_id = str(r["remote_device_id"])
            if device_id in self.running:
                continue
            task = asyncio.create_task(self._timer_rotate(device_id))
            self._timer_runs.add(task)
            task.add_done_callback(self._timer_runs.discard)

    async def _timer_rotate(self, device_id: str) -> None:
        try:
            await self.rotate(device_id, trigger="timer")
        except RotationError as exc:
            log.info("timer rotation of %s not done: %s", device_id, exc.message)
            if exc.status == 409 and "cannot rotate" in exc.message:
                # never rotatable as it runs now: wait a whole interval before asking again
                await self.node.pool.execute(
                    "UPDATE devices SET rotation_since = now() WHERE remote_device_id = $1", device_id)
