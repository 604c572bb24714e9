"""Registry of live proxy sessions, by connection and by device, so changes can terminate them.

It also answers "who is connected right now, how fast": :meth:`SessionRegistry.sample` (called
about once a second with a clock) keeps a few (time, bytesIn, bytesOut) samples per session, and
:meth:`SessionRegistry.snapshot` turns them into rows with byte totals and rates over the last
``RATE_WINDOW_S`` seconds. The hot path pays nothing extra: the sessions already count their
bytes with integer adds (``bytes_in`` = target -> client as written to the client socket,
``bytes_out`` = client -> target), and the sampler only reads those counters.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any, Protocol

RATE_WINDOW_S = 5.0
_SAMPLES_KEPT = 8  # at one sample a second: a little more than the rate window


class Terminable(Protocol):
    connection_id: str | None
    device_id: str | None

    def terminate(self, reason: str) -> None: ...


def _counters(session: Any) -> tuple[int, int]:
    """(bytes in, bytes out) so far; an HTTP forward session counts its current upstream request."""
    fwd = getattr(session, "http_forward", None)
    up = getattr(fwd, "upstream", None) if fwd is not None else None
    if up is not None:
        return up.bytes_in, up.bytes_out
    return getattr(session, "bytes_in", 0), getattr(session, "bytes_out", 0)


def _target(session: Any) -> str:
    fwd = getattr(session, "http_forward", None)
    up = getattr(fwd, "upstream", None) if fwd is not None else None
    host, port = (up.host, up.port) if up is not None else (getattr(session, "target_host", ""),
                                                           getattr(session, "target_port", 0))
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _started_wall(session: Any) -> datetime | None:
    wall = getattr(session, "started_wall", None)
    if wall is None:
        fwd = getattr(session, "http_forward", None)
        wall = getattr(getattr(fwd, "upstream", None), "started_wall", None)
    return wall


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SessionRegistry:
    """Node-local. ``terminate_connection`` closes every live session of a connection."""

    def __init__(self) -> None:
        self._by_connection: dict[str, set[Terminable]] = {}
        self._by_device: dict[str, set[Terminable]] = {}
        self._samples: dict[Terminable, _Live] = {}
        self.all: set[Terminable] = set()

    def add(self, session: Terminable) -> None:
        self.all.add(session)
        if session.connection_id:
            self._by_connection.setdefault(session.connection_id, set()).add(session)
        if session.device_id:
            self._by_device.setdefault(session.device_id, set()).add(session)

    def remove(self, session: Terminable) -> None:
        self.all.discard(session)
        self._samples.pop(session, None)
        for index, key in ((self._by_connection, session.connection_id), (self._by_device, session.device_id)):
            if key:
                group = index.get(key)
                if group is not None:
                    group.discard(session)
                    if not group:
                        del index[key]

    def of_connection(self, connection_id: str) -> list[Terminable]:
        return list(self._by_connection.get(connection_id, ()))

    def of_device(self, device_id: str) -> list[Terminable]:
        return list(self._by_device.get(device_id, ()))

    def terminate_connection(self, connection_id: str, reason: str) -> int:
        sessions = self.of_connection(connection_id)
        for s in sessions:
            s.terminate(reason)
        return len(sessions)

    def __len__(self) -> int:
        return len(self.all)

    # -- live view ---------------------------------------------------------------------------------
    def _live(self, s: Terminable, now: float) -> _Live:
        live = self._samples.get(s)
        if live is None:
            live = self._samples[s] = _Live(s)
            started = getattr(s, "started", 0.0)  # monotonic start of the relay: zero bytes then
            if started and started < now:
                live.ring.append((started, 0, 0))
        return live

    def sample(self, now: float) -> None:
        """Record every open session's byte counters at monotonic time ``now`` (call ~1/s)."""
        for s in self.all:
            b_in, b_out = _counters(s)
            self._live(s, now).ring.append((now, b_in, b_out))

    def snapshot(self, now: float, node: str, *, connection_ids: set[str] | None = None,
                 device_ids: set[str] | None = None) -> list[dict[str, Any]]:
        """The open sessions as API rows, optionally only those of some connections or devices.

        ``None`` for a filter means "any"; when both are given a session matching either is kept
        (a caller sees its own connections and the connections routed through its devices).
        Rates are bytes/s against the newest sample at least RATE_WINDOW_S old (else the oldest).
        """
        if connection_ids is None and device_ids is None:
            chosen: Any = self.all
        else:
            picked: set[Terminable] = set()
            for cid in connection_ids or ():
                picked.update(self._by_connection.get(cid, ()))
            for did in device_ids or ():
                picked.update(self._by_device.get(did, ()))
            chosen = picked
        rows = []
        horizon = now - RATE_WINDOW_S
        for s in chosen:
            live = self._live(s, now)
            b_in, b_out = _counters(s)
            r_in = r_out = 0.0
            ring = live.ring
            if ring:
                base = ring[0]
                for smp in ring:
                    if smp[0] > horizon:
                        break
                    base = smp
                dt = now - base[0]
                if dt > 0:
                    r_in = round(max(0.0, (b_in - base[1]) / dt), 1)
                    r_out = round(max(0.0, (b_out - base[2]) / dt), 1)
            row = live.static(s, node)
            row["bytesIn"], row["bytesOut"], row["rateIn"], row["rateOut"] = b_in, b_out, r_in, r_out
            rows.append(row)
        rows.sort(key=lambda r: (r["startedAt"] or "", r["sessionId"]))
        return rows


class _Live:
    """Per open session: its recent byte samples and the row fields that do not change."""

    __slots__ = ("ring", "_static")

    def __init__(self, session: Any) -> None:
        self.ring: deque[tuple[float, int, int]] = deque(maxlen=_SAMPLES_KEPT)
        self._static: dict[str, Any] | None = None

    def static(self, s: Any, node: str) -> dict[str, Any]:
        """A fresh row dict with the fixed fields (cached; HTTP forward rows follow their current request)."""
        cached = self._static
        if cached is None or getattr(s, "http_forward", None) is not None:
            cached = {
                "sessionId": f"{node}:{id(s):x}", "connectionId": s.connection_id, "deviceId": s.device_id,
                "node": node, "clientAddress": getattr(s, "client_addr", ""), "target": _target(s),
                "protocol": getattr(s, "protocol", ""), "startedAt": _iso(_started_wall(s)),
            }
            if getattr(s, "http_forward", None) is None:
                self._static = cached
        return dict(cached)
