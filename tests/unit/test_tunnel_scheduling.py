"""Head-of-line behaviour of the sans-I/O tunnel core, byte by byte with a fake clock: urgent streams
before bulk ones, bulk never starved, the in-flight limit (pacing.py) and its probes, and on a
simulated slow link the interactive round trip under a bulk download."""

from __future__ import annotations

import heapq

from tunnel_pair import Pair

from device_tunnel import frames
from device_tunnel.connection import (
    PING_PER_S_PACE,
    PROBE_INTERVAL,
    PROBE_INTERVAL_PACE,
    URGENT_RUN,
    Role,
    TunnelConfig,
    TunnelConnection,
)
from device_tunnel.events import DataReceived, StreamResumed
from device_tunnel.frames import FrameType
from device_tunnel.pacing import PROBE_BIT, Pacer

KiB = 1024


def data_frames(raw: bytes) -> list[tuple[int, int]]:
    """(stream id, payload length) of every DATA frame in ``raw``."""
    return [(f.stream_id, len(f.payload)) for f in frames.FrameDecoder().feed(raw) if f.type == FrameType.DATA]


def handshaken() -> Pair:
    p = Pair()
    p.handshake()
    return p


def measure_rtt(p: Pair, rtt: float) -> None:
    """One keep-alive PING of the agent answered after ``rtt`` seconds (the pacer's first sample)."""
    p.agent.take(p.agent.conn.handle_timer(p.now))
    ping = p.agent.conn.data_to_send()
    p.now += rtt / 2
    p.node.take(p.node.conn.receive_data(ping, p.now))
    pong = p.node.conn.data_to_send()
    p.now += rtt / 2
    p.agent.take(p.agent.conn.receive_data(pong, p.now))


def test_a_small_streams_frame_goes_out_before_queued_bulk_frames():
    p = handshaken()
    bulk, small = p.open(), p.open()
    conn = p.agent.conn
    for _ in range(4):                            # a download: the first read goes out, the rest queues
        conn.send_data(bulk, b"B" * 64 * KiB)
    first = conn.data_to_send_list(True, p.now)   # the first batch carries bulk bytes only
    assert {sid for sid, _ in data_frames(b"".join(first))} == {bulk}
    assert conn.stream_buffered(bulk) > 0
    conn.send_data(small, b"hello")               # the interactive reply arrives while bulk is queued
    nxt = data_frames(b"".join(conn.data_to_send_list(True, p.now)))
    assert nxt[0] == (small, 5)                   # ... and leaves ahead of every queued bulk byte
    assert all(sid == bulk for sid, _ in nxt[1:])


def test_urgent_streams_share_round_robin_and_bulk_gets_a_turn_after_urgent_run():
    p = handshaken()
    bulk = p.open()
    conn = p.agent.conn
    conn.send_data(bulk, b"B" * 100 * KiB)        # this stream is bulk once it has sent 64 KiB
    p.pump()
    news = [p.open() for _ in range(10)]
    for sid in news:
        conn.send_data(sid, b"n" * 60 * KiB)      # new streams: urgent, 600 KiB together
    conn.send_data(bulk, b"B" * 150 * KiB)
    order = []
    while raw := b"".join(conn.data_to_send_list(True, p.now)):
        order += data_frames(raw)
    first_bulk = next(i for i, (sid, _) in enumerate(order) if sid == bulk)
    before = sum(n for sid, n in order[:first_bulk])
    assert 0 < before <= URGENT_RUN + 2 * 60 * KiB  # bulk waited for about one urgent run ...
    assert before < 10 * 60 * KiB                 # ... not for every urgent byte: never starved
    ahead = [sid for sid, _ in order[:first_bulk]]
    assert len(set(ahead)) == len(ahead) and set(ahead) <= set(news)  # urgent first, one frame each in turn


def test_an_unpaced_fast_path_sends_large_frames_and_a_slow_path_small_ones():
    p = handshaken()
    sid = p.open()
    conn = p.agent.conn
    conn.streams[sid].send_credit = 8 * 1024 * KiB
    conn.send_data(sid, b"x" * 256 * KiB)
    assert data_frames(conn.data_to_send()) == [(sid, 256 * KiB)]  # loopback / LAN: one frame
    slow = handshaken()
    sid = slow.open()
    measure_rtt(slow, 0.150)
    assert slow.agent.conn.pacer.active
    slow.agent.conn.send_data(sid, b"y" * 64 * KiB)
    sizes = [n for _, n in data_frames(slow.agent.conn.data_to_send())]
    assert sizes and all(n <= 16 * KiB for n in sizes)  # slow path: 16 KiB frames ...
    assert sum(sizes) < 64 * KiB                   # ... paced: the rest follows at the pacing rate,
    assert slow.agent.conn.get_timer() < slow.now + 0.05  # when the timer says


def test_on_a_slow_path_what_is_in_flight_stays_within_the_limit_until_a_probe_is_answered():
    p = handshaken()
    sid = p.open()
    conn = p.agent.conn
    measure_rtt(p, 0.150)
    conn.streams[sid].send_credit = 16 * 1024 * KiB
    conn.conn_send_credit = 16 * 1024 * KiB
    limit = conn.pacer.cwnd
    out = b""
    for _ in range(200):                           # a long stretch of time: only the limit binds
        conn.send_data(sid, b"z" * 64 * KiB)
        p.now += 0.05
        out += b"".join(conn.data_to_send_list(True, p.now))
    sent = sum(n for _, n in data_frames(out))
    assert limit - 32 * KiB <= sent <= limit       # no more than the limit in flight
    pings = [f for f in frames.FrameDecoder().feed(out) if f.type == FrameType.PING]
    assert pings and all(frames.U64.unpack(f.payload)[0] & PROBE_BIT for f in pings)
    # the node answers the probes: what they cover is no longer in flight, the rest of the queue moves
    p.node.take(p.node.conn.receive_data(out, p.now))
    p.agent.take(p.agent.conn.receive_data(p.node.conn.data_to_send(), p.now + 0.001))
    assert conn.in_flight < sent
    more = sum(n for _, n in data_frames(b"".join(conn.data_to_send_list(True, p.now + 0.1))))
    assert more > 0


def test_probe_rate_and_ping_limit_follow_the_pace_feature():
    old_node = TunnelConnection(Role.NODE, 0.0)    # a v2 peer: HELLO without "pace"
    old_node.receive_data(frames.encode_json(FrameType.HELLO, 0, {"version": 2, "device_id": "d", "token": "t",
                                                                  "window": 1 << 20, "meta": {}}), 0.0)
    old_node.accept("n")
    assert old_node.ping_limit == TunnelConfig().ping_per_s == 50
    assert old_node.pacer.min_interval == PROBE_INTERVAL == 0.05  # at most 20 probes/s: within its limit
    p = handshaken()                               # both sides announce "pace"
    assert p.node.conn.ping_limit == p.agent.conn.ping_limit == PING_PER_S_PACE
    assert p.node.conn.pacer.min_interval == p.agent.conn.pacer.min_interval == PROBE_INTERVAL_PACE


def test_pacer_grows_in_start_up_and_settles_on_the_bdp_with_a_standing_queue():
    pc = Pacer(0.01)
    now, sent = 0.0, 0
    pc.on_rtt(now, 0.1)
    start = pc.cwnd
    for _ in range(10):                            # no queue: the limit doubles per round trip
        o = pc.probe(now, sent, True)
        sent += pc.cwnd
        now += 0.1
        pc.on_pong(now, o)
    assert pc.startup and pc.cwnd > 4 * start
    rate = 1_000_000
    for _ in range(400):                           # a 1 MB/s link: every probe sees a 50 ms queue
        o = pc.probe(now, sent, True)
        sent += int(rate * 0.01)
        now += 0.01
        pc.on_pong(now + 0.15, o)
    assert not pc.startup
    assert pc.cwnd < 0.5 * rate                    # backed off to about rate x RTT


def simulate(rtt: float, mbit: float, seconds: float) -> tuple[list[float], int]:
    """agent → link (one FIFO at ``mbit``, delay rtt/2) → node; the node sends a 64 B ping on a second
    stream every 20 ms and the agent echoes it while a bulk download fills the first stream.
    Returns (round-trip times of the pings, bulk bytes delivered)."""
    rate = mbit * 1e6 / 8
    p = handshaken()
    bulk, echo = p.open(), p.open()
    events: list = []
    seq = [0]
    busy = [0.0]
    paused = [False]
    sent_at: dict[bytes, float] = {}
    rtts: list[float] = []

    def at(t: float, fn) -> None:
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], fn))

    def agent_app() -> None:
        for ev in p.agent.events:
            if isinstance(ev, StreamResumed) and ev.stream_id == bulk:
                paused[0] = False
            elif isinstance(ev, DataReceived) and ev.stream_id == echo:
                p.agent.conn.send_data(echo, bytes(ev.data))
        p.agent.events.clear()
        while not paused[0]:
            paused[0] = p.agent.conn.send_data(bulk, b"x" * 64 * KiB)

    def flush() -> None:
        p.agent.take(p.agent.conn.pop_events())
        agent_app()
        a = b"".join(p.agent.conn.data_to_send_list(True, p.now))
        if a:
            busy[0] = max(p.now, busy[0]) + len(a) / rate
            at(busy[0] + rtt / 2, lambda a=a: (p.node.take(p.node.conn.receive_data(a, p.now)), flush()))
        b = b"".join(p.node.conn.data_to_send_list(True, p.now))
        if b:
            at(p.now + rtt / 2, lambda b=b: (p.agent.take(p.agent.conn.receive_data(b, p.now)), flush()))
        for ev in p.node.events:
            if isinstance(ev, DataReceived) and ev.stream_id == echo and bytes(ev.data) in sent_at:
                rtts.append(p.now - sent_at.pop(bytes(ev.data)))
        p.node.events.clear()

    def tick() -> None:
        for side in (p.node, p.agent):
            side.take(side.conn.handle_timer(p.now))
        flush()
        at(p.now + 0.005, tick)

    def ping(k: int = 0) -> None:
        key = b"%064d" % k
        sent_at[key] = p.now
        p.node.conn.send_data(echo, key)
        flush()
        at(p.now + 0.02, lambda: ping(k + 1))

    at(0.0, tick)
    at(2.0, ping)  # after start-up
    while events:
        t, _, fn = heapq.heappop(events)
        if t > seconds:
            break
        p.now = t
        fn()
    return sorted(rtts), len(p.node.data[bulk])


def test_on_a_150_ms_20_mbit_link_an_interactive_reply_waits_about_25_ms_at_most_behind_a_download():
    # without the in-flight limit every byte of the download's queue below the core (TLS, kernel,
    # link) is ahead of the reply: hundreds of milliseconds on this link
    rtts, delivered = simulate(0.150, 20, 5.0)
    assert len(rtts) > 100
    assert rtts[int(len(rtts) * 0.99)] < 0.150 + 0.030
    assert delivered > 0.8 * 20e6 / 8 * 5.0        # the download still fills the link


def test_on_a_40_ms_100_mbit_link_the_same_holds():
    rtts, delivered = simulate(0.040, 100, 4.0)
    assert rtts[int(len(rtts) * 0.99)] < 0.040 + 0.025
    assert delivered > 0.8 * 100e6 / 8 * 4.0
