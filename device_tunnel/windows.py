"""Flow-control windows: per stream, per tunnel connection, and a process-wide memory budget.

Receive side (what this module decides): a stream's *window* is how many bytes the peer may have
sent that this side has not yet acknowledged (handed to a local socket that took them). Credit goes
back with WINDOW frames. Every window is reserved from two pools:

* the tunnel's **connection window** (``conn_window``): the sum of all stream windows of one tunnel
  never exceeds it, so a tunnel holds at most ``conn_window`` received bytes, and the sender's
  connection credit (returned as the same bytes are acknowledged) can never deadlock the tunnel;
* a shared :class:`MemoryBudget` (``TUNNEL_MEMORY_BUDGET``, one per node / per agent process).

Policy (auto-tuning): when a quarter window was consumed in less than two round trips the measured
bandwidth-delay product exceeds an eighth of the window, so the window doubles (up to
``max_window``) while both pools have room. Under pressure (a pool over 3/4 full) windows above
the fair share shrink as credit is returned, never below ``min_window``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FlowControlError, StreamError

PRESSURE_NUM, PRESSURE_DEN = 3, 4


class MemoryBudget:
    """Bytes of receive window granted across every tunnel of one process (node or agent)."""

    __slots__ = ("limit", "used", "streams")

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self.used = 0
        self.streams = 0

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def under_pressure(self) -> bool:
        return self.used * PRESSURE_DEN > self.limit * PRESSURE_NUM

    def fair_share(self) -> int:
        return self.limit // max(1, self.streams)


@dataclass(slots=True)
class WindowSettings:
    initial_window: int = 256 * 1024
    max_window: int = 8 * 1024 * 1024
    min_window: int = 16 * 1024
    conn_window: int = 64 * 1024 * 1024
    max_streams: int = 1024

    def __post_init__(self) -> None:
        self.min_window = max(1024, self.min_window)
        self.max_window = max(self.min_window, self.max_window)
        self.initial_window = min(max(self.min_window, self.initial_window), self.max_window)
        # Every possible stream can always get its minimum window out of the connection window.
        self.conn_window = max(self.conn_window, self.max_streams * self.min_window)


class ReceiveWindow:
    """Receive side of one stream: absolute offsets of received / acknowledged / allowed bytes."""

    __slots__ = ("stream_id", "window", "limit", "received", "acked", "reserved", "last_update")

    def __init__(self, stream_id: int, window: int, now: float) -> None:
        self.stream_id = stream_id
        self.window = window      # the size we aim to keep open
        self.limit = window       # the peer may send up to this offset
        self.received = 0
        self.acked = 0
        self.reserved = 0         # bytes reserved in the pools: max(window, limit - acked)
        self.last_update = now

    @property
    def held(self) -> int:
        """Received and not yet acknowledged (in our buffers or the local socket's)."""
        return self.received - self.acked


class WindowManager:
    """The receive windows of one tunnel connection, drawing on the connection window and budget."""

    def __init__(self, settings: WindowSettings, budget: MemoryBudget | None) -> None:
        self.s = settings
        self.budget = budget
        self.conn_used = 0              # sum of stream reservations on this tunnel
        self.streams = 0
        # connection-level receive accounting
        self.conn_limit = settings.conn_window
        self.conn_received = 0
        self.conn_acked = 0

    # -- pools ----------------------------------------------------------------------------------
    def _headroom(self) -> int:
        """Bytes a stream may grow by without taking the minimum window of a future stream."""
        s = self.s
        conn = s.conn_window - self.conn_used - max(0, s.max_streams - self.streams) * s.min_window
        if self.budget is not None:
            conn = min(conn, self.budget.free)
        return max(0, conn)

    def _under_pressure(self) -> bool:
        if self.conn_used * PRESSURE_DEN > self.s.conn_window * PRESSURE_NUM:
            return True
        return self.budget is not None and self.budget.under_pressure

    def _fair_share(self) -> int:
        share = self.s.conn_window // max(1, self.streams)
        if self.budget is not None:
            share = min(share, self.budget.fair_share())
        return max(self.s.min_window, share)

    def _reserve(self, rw: ReceiveWindow) -> None:
        want = max(rw.window, rw.limit - rw.acked)
        delta = want - rw.reserved
        if delta:
            rw.reserved = want
            self.conn_used += delta
            if self.budget is not None:
                self.budget.used += delta

    # -- streams --------------------------------------------------------------------------------
    @property
    def can_open(self) -> bool:
        return self.streams < self.s.max_streams

    def open(self, stream_id: int, now: float, minimal: bool = False) -> ReceiveWindow:
        """A new stream's receive window (the ``window`` announced in OPEN / OPEN_OK); ``minimal``
        (a UDP stream, which carries no DATA) reserves only the minimum."""
        s = self.s
        # the new stream's own minimum is among those _headroom still sets aside
        grant = s.min_window + (0 if minimal else min(s.initial_window - s.min_window, self._headroom()))
        self.streams += 1
        if self.budget is not None:
            self.budget.streams += 1
        if self._under_pressure():
            grant = min(grant, self._fair_share())
        rw = ReceiveWindow(stream_id, max(s.min_window, grant), now)
        self._reserve(rw)
        return rw

    def close(self, rw: ReceiveWindow) -> int:
        """Forget a stream; returns its unacknowledged bytes (credited back to the connection)."""
        held = rw.held
        rw.window = rw.limit = rw.acked = rw.received = 0
        self._reserve(rw)
        self.streams -= 1
        if self.budget is not None:
            self.budget.streams -= 1
        return held

    def on_data(self, rw: ReceiveWindow | None, n: int) -> None:
        """Account ``n`` received bytes; raises FlowControlError / StreamError beyond a window."""
        self.conn_received += n
        if self.conn_received > self.conn_limit:
            raise FlowControlError(f"{self.conn_received - self.conn_limit} bytes beyond the connection window")
        if rw is None:
            return
        if rw.received + n > rw.limit:
            self.conn_acked += n  # dropped with the stream: credited back to the connection
            raise StreamError(rw.stream_id, f"{rw.received + n - rw.limit} bytes beyond the stream window",
                              FlowControlError.code)
        rw.received += n

    def consume(self, rw: ReceiveWindow, n: int) -> None:
        """Acknowledge ``n`` bytes without granting new stream credit (the peer finished sending)."""
        n = min(n, rw.held)
        rw.acked += n
        self.conn_acked += n
        rw.window = min(rw.window, max(0, rw.limit - rw.acked))
        self._reserve(rw)

    def acknowledge(self, rw: ReceiveWindow, n: int, now: float, rtt: float, force: bool) -> int:
        """``n`` bytes left the local socket: the WINDOW increment to send now (0 = not yet)."""
        n = min(n, rw.held)
        rw.acked += n
        self.conn_acked += n
        s = self.s
        target = rw.window
        pending = rw.acked + target - rw.limit
        if not force and pending < (target >> 2):
            self._reserve(rw)
            return 0
        if self._under_pressure():
            target = min(target, max(s.min_window, self._fair_share()))
        elif now - rw.last_update < 2 * rtt and target < s.max_window:
            target += min(target, s.max_window - target, self._headroom())
        rw.window = target
        rw.last_update = now
        increment = rw.acked + target - rw.limit
        if increment <= 0 or (increment < (target >> 3) and not force):
            self._reserve(rw)
            return 0
        rw.limit += increment
        self._reserve(rw)
        return increment

    def discard(self, n: int) -> None:
        """Bytes received for a stream that is gone: acknowledged at the connection level at once."""
        self.conn_acked += n

    def connection_increment(self, force: bool = False) -> int:
        """Connection-level WINDOW increment to send now (0 = not yet)."""
        increment = self.conn_acked + self.s.conn_window - self.conn_limit
        if increment <= 0 or (not force and increment < (self.s.conn_window >> 3)):
            return 0
        self.conn_limit += increment
        return increment
