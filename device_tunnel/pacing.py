"""How many bytes one side of a tunnel keeps in flight (sans-I/O; every ``now`` is passed in).

Everything a side has written and the peer has not yet read is *in flight*: the TLS buffers, the
kernel send buffer, the network's queues. A 64-byte reply written behind that waits for all of it, so
on a slow link the in-flight bytes must stay near the path's bandwidth-delay product (BDP) and every
other byte must wait in the core's per-stream queues, where the scheduler can let small streams
overtake bulk ones.

The peer tells us what it has read with nothing but PING: TCP keeps order, so the pong of a PING
queued after byte offset ``o`` proves the peer has read every byte before ``o``. While data flows
the core sends such *probes* every ``interval`` (at most 1/8 of the path's minimum RTT, and no more
often than the peer's PING flood limit allows), and the pongs give

* an exact (if up to one interval late) acknowledged offset,
* round-trip samples: the windowed minimum is the path's RTT, the excess the queueing delay,
* delivery-rate samples: the windowed maximum is the bottleneck rate (as in BBR).

The limit (``cwnd``) starts at ``INITIAL`` and doubles per round trip (start-up) until the lowest
probe RTT of a round trip exceeds the minimum by max(``TARGET_MIN``, RTT/4): the link is full. From
then on it follows FAST TCP's update, ``cwnd += GAMMA × (cwnd × minRTT / RTT + alpha − cwnd)`` with
RTT the lowest of the last round trip (a standing queue, not a CPU hiccup) and alpha the bytes of
``TARGET_MIN`` at the measured rate, which converges on about ``TARGET_MIN`` of queueing; it never
drops below ``GAIN ×`` the best recent rate × (minimum RTT + probe interval), so a delay that is not
queueing (a busy CPU at either end) cannot starve the stream. The limit is updated only from probes
sent while data waited for it (otherwise the application, not the path, set the pace). Bytes are
released at ``cwnd`` per minimum RTT (twice that in start-up) in bursts of at most ``BURST_TIME`` or
one small frame, so they do not leave in bursts that queue. Paths with a minimum RTT under
``ACTIVE_RTT`` (a LAN, loopback) are not limited: their buffers drain in well under a millisecond.
"""

from __future__ import annotations

from collections import deque

ACTIVE_RTT = 0.003            # paths faster than this are never limited
INITIAL = 256 * 1024          # in-flight limit before the first measurements
FLOOR = 32 * 1024             # never below (two full TLS records plus headers)
CEILING = 64 * 1024 * 1024
TARGET_MIN = 0.005            # standing queue aimed at (FAST TCP's alpha, as time at the measured rate)
RTT_WINDOW = 10.0             # seconds the minimum RTT is remembered
RATE_WINDOW = 2.0             # seconds the maximum delivery rate is remembered
BURST = 16 * 1024 + 10        # bytes released at once at least (one small DATA frame) ...
BURST_TIME = 0.002            # ... or this long at the pacing rate
GAIN = 1.0                    # the limit keeps at least this x the best rate x (RTT + interval) in flight
GAMMA = 0.25                  # FAST TCP's smoothing of the limit per probe interval
PROBE_BIT = 1 << 63           # probe opaques (keep-alive opaques are monotonic ns: bit 63 clear)


class Pacer:
    """In-flight limit of one tunnel's sending side. The core asks :meth:`allowance`, queues the
    PINGs :meth:`probe` asks for, and reports their pongs to :meth:`on_pong`."""

    __slots__ = ("min_interval", "cwnd", "acked", "min_rtt", "_rtts", "_rates", "_acks", "_probes",
                 "_seq", "last_probe_at", "last_probe_offset", "startup", "rtt", "queue_delay", "probes_sent", "_last_pong",
                 "tokens", "_refill_at", "_recent")

    def __init__(self, min_interval: float = 0.05) -> None:
        self.min_interval = min_interval   # the peer's PING flood limit decides it (see TunnelConnection)
        self.cwnd = INITIAL
        self.acked = 0                     # every byte before this offset was read by the peer
        self.min_rtt = 0.0                 # 0 = no sample yet (not limiting)
        self._rtts: deque[tuple[float, float]] = deque()     # (when, rtt), increasing rtt (monotonic deque)
        self._rates: deque[tuple[float, float]] = deque()    # (when, bytes/s), decreasing rate
        self._acks: deque[tuple[float, int]] = deque()       # (when, acked offset) for rate samples
        self._recent: deque[tuple[float, float]] = deque()   # probe RTTs of the last round trip (min first)
        self._probes: dict[int, tuple[float, int, bool]] = {}  # opaque -> (sent at, offset, backlogged)
        self._seq = 0
        self.last_probe_at = -1e18
        self.last_probe_offset = 0
        self.startup = True
        self.rtt = 0.0
        self.queue_delay = 0.0
        self.probes_sent = 0
        self._last_pong = 0.0
        self.tokens = float(BURST)
        self._refill_at = 0.0

    # -- what the core asks ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.min_rtt >= ACTIVE_RTT

    @property
    def interval(self) -> float:
        return max(self.min_interval, self.min_rtt / 8)

    @property
    def target(self) -> float:
        return TARGET_MIN

    @property
    def pacing_rate(self) -> float:
        """Bytes per second released: the limit per minimum RTT (twice that in start-up), so the
        limit is spread over the round trip instead of leaving in bursts that queue."""
        return (2.0 if self.startup else 1.0) * self.cwnd / max(self.min_rtt, 1e-3)

    def allowance(self, sent: int, now: float) -> int:
        """Bytes that may be written now given ``sent`` (the offset written so far): within the
        in-flight limit and the pacing rate; huge when the path is too fast to need a limit."""
        if not self.active:
            return CEILING
        rate = self.pacing_rate
        if now > self._refill_at:
            self.tokens = min(max(BURST, rate * BURST_TIME), self.tokens + rate * (now - self._refill_at))
            self._refill_at = now
        return min(self.cwnd - (sent - self.acked), int(self.tokens))

    def spend(self, n: int) -> None:
        """``n`` bytes were released (may go negative by one frame)."""
        self.tokens -= n

    def next_release(self) -> float:
        """When the pacing rate allows the next small frame."""
        need = BURST / 2 - self.tokens
        return self._refill_at + max(0.0, need) / self.pacing_rate

    def probe_due(self, now: float, sent: int) -> bool:
        """A probe should be queued now: bytes written since the last one, and its interval passed."""
        return sent > self.last_probe_offset and now - self.last_probe_at >= self.interval

    def next_probe(self, sent: int) -> float | None:
        """When a probe will be due (for the timer), None while nothing needs one."""
        if sent <= self.last_probe_offset or sent <= self.acked:
            return None
        return self.last_probe_at + self.interval

    def probe(self, now: float, sent: int, backlogged: bool) -> int:
        """Record a probe PING queued at offset ``sent`` (``backlogged``: data was waiting for the
        limit, so the limit, not the application, set the pace); returns its opaque value."""
        self._seq += 1
        opaque = PROBE_BIT | self._seq
        self._probes[opaque] = (now, sent, backlogged)
        if len(self._probes) > 64:  # a peer that stopped answering: forget the oldest
            del self._probes[next(iter(self._probes))]
        self.last_probe_at, self.last_probe_offset = now, sent
        self.probes_sent += 1
        return opaque

    # -- what the peer says ----------------------------------------------------------------------
    def on_rtt(self, now: float, rtt: float) -> None:
        """An RTT sample (a probe's or a keep-alive's) for the windowed minimum."""
        rtts = self._rtts
        while rtts and rtts[-1][1] >= rtt:
            rtts.pop()
        rtts.append((now, rtt))
        while rtts[0][0] < now - RTT_WINDOW:
            rtts.popleft()
        self.min_rtt = rtts[0][1]

    def on_pong(self, now: float, opaque: int) -> bool:
        """A pong: True when it answered one of our probes (then the limit was updated)."""
        entry = self._probes.pop(opaque, None)
        if entry is None:
            return False
        sent_at, offset, was_limited = entry
        for old in [k for k, (_, off, _b) in self._probes.items() if off <= offset]:
            del self._probes[old]  # answered in order: earlier probes are lost or late
        rtt = max(1e-6, now - sent_at)
        self.rtt = rtt
        self.on_rtt(now, rtt)
        recent = self._recent
        while recent and recent[-1][1] >= rtt:
            recent.pop()
        recent.append((now, rtt))
        while recent[0][0] < now - max(self.min_rtt, 2 * self.interval):
            recent.popleft()
        rtt = recent[0][1]  # the lowest of the last round trip: a standing queue, not a CPU hiccup
        if offset <= self.acked:
            return True
        delivered = offset - self.acked
        self.acked = offset
        self._rate_sample(now, offset)
        dt = min(rtt, now - self._last_pong) if self._last_pong else self.interval
        self._last_pong = now
        if not self.active:
            return True
        self.queue_delay = rtt - self.min_rtt
        alpha = max(FLOOR / 2, self.bandwidth * self.target)  # the bytes we let stand in the queue
        if not was_limited:
            return True  # the application set the pace: nothing learnt about the path
        if self.startup:
            if self.queue_delay > max(self.target, self.min_rtt / 4) and self._rates:
                self.startup = False  # a standing queue: the link is full
            else:
                self.cwnd += delivered  # doubles per round trip
        if not self.startup:
            # FAST TCP's update: converge to alpha bytes queued (queueing delay ~ target) ...
            goal = self.cwnd * self.min_rtt / rtt + alpha
            self.cwnd = int(self.cwnd + GAMMA * (goal - self.cwnd) * min(1.0, dt / max(self.interval, 1e-3)))
            # ... but never below what keeps the best recent rate (x GAIN) flowing: a delay that is not
            # queueing (a busy CPU at either end) cannot starve the stream, and the rate can still grow
            self.cwnd = max(self.cwnd, int(GAIN * self.bandwidth * (self.min_rtt + self.interval)))
        self.cwnd = min(CEILING, max(FLOOR, self.cwnd))
        return True

    def _rate_sample(self, now: float, offset: int) -> None:
        acks = self._acks
        acks.append((now, offset))
        span = max(0.05, self.min_rtt)
        while len(acks) > 2 and acks[1][0] <= now - span:
            acks.popleft()
        t0, o0 = acks[0]
        if now - t0 < span * 0.5:
            return
        rate = (offset - o0) / (now - t0)
        rates = self._rates
        while rates and rates[-1][1] <= rate:
            rates.pop()
        rates.append((now, rate))
        while rates[0][0] < now - RATE_WINDOW:
            rates.popleft()

    @property
    def bandwidth(self) -> float:
        """The windowed maximum delivery rate (bytes/s), 0 before a sample."""
        return self._rates[0][1] if self._rates else 0.0
