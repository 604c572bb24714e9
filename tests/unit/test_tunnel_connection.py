"""Deterministic tests of the sans-I/O tunnel core: two in-memory endpoints, a fake clock."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest
from tunnel_pair import Pair

from device_tunnel import frames
from device_tunnel.connection import PENDING_HIGH, PING_PER_S_PACE, Role, TunnelConfig, TunnelConnection
from device_tunnel.errors import ErrorCode, LocalUsageError
from device_tunnel.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    HelloReceived,
    PingAcknowledged,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
    StreamReset,
    StreamResumed,
    WelcomeReceived,
)
from device_tunnel.frames import FrameType
from device_tunnel.replies import ReplyCode
from device_tunnel.stream import TRANSITIONS, StreamState, Transition, next_state
from device_tunnel.windows import MemoryBudget, WindowSettings

KiB, MiB = 1024, 1024 * 1024


_PATTERN = bytes((i * 31) & 0xFF for i in range(251))  # a prime length: no alignment with frame sizes


def blob(n: int, seed: int = 0) -> bytes:
    k = seed % 251
    base = _PATTERN[k:] + _PATTERN[:k]
    return (base * (n // 251 + 1))[:n]


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    p.handshake()
    return p


def terminated(side) -> ConnectionTerminated | None:
    ends = side.of(ConnectionTerminated)
    return ends[-1] if ends else None


# -- handshake ---------------------------------------------------------------------------------------
def test_handshake_reports_hello_and_welcome_with_connection_windows():
    p = Pair()
    p.agent.conn.send_hello("dev-1", "tok", {"model": "m"})
    p.pump()
    hello = p.node.of(HelloReceived)[0]
    assert (hello.device_id, hello.token, hello.version, hello.meta) == ("dev-1", "tok", frames.PROTOCOL_VERSION,
                                                                         {"model": "m"})
    p.node.conn.accept("node-a")
    p.pump()
    welcome = p.agent.of(WelcomeReceived)[0]
    assert welcome.ok and welcome.node == "node-a"
    assert p.agent.conn.conn_send_credit == p.node.conn.config.windows.conn_window
    assert p.node.conn.conn_send_credit == p.agent.conn.config.windows.conn_window


def test_refused_device_gets_welcome_not_ok_before_the_close():
    p = Pair()
    p.agent.conn.send_hello("dev-1", "bad", {})
    p.pump()
    p.node.conn.refuse("authentication failed")
    p.node.take(p.node.conn.pop_events())
    assert terminated(p.node).code == ErrorCode.HANDSHAKE_FAILED
    p.pump()
    welcome = p.agent.of(WelcomeReceived)[0]
    assert not welcome.ok and welcome.error == "authentication failed"


def test_no_hello_within_the_handshake_timeout_closes_the_tunnel():
    p = Pair()
    assert p.node.conn.get_timer() == pytest.approx(10.0)
    p.advance(9.9)
    assert terminated(p.node) is None
    p.advance(0.2)
    assert terminated(p.node).code == ErrorCode.HANDSHAKE_FAILED


def test_frames_before_the_handshake_close_the_tunnel():
    node = TunnelConnection(Role.NODE, 0.0)
    events = node.receive_data(frames.encode_ping(1), 0.0)
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].code == ErrorCode.HANDSHAKE_FAILED


def test_a_tls_client_hello_on_a_plaintext_node_fails_at_the_first_byte_not_at_the_deadline():
    """A ClientHello whose bytes parse as an unknown frame with a payload under 64 KiB would otherwise
    sit in the decoder until the 10 s HELLO deadline; the first byte alone decides."""
    node = TunnelConnection(Role.NODE, 0.0)
    events = node.receive_data(b"\x16\x03\x01\x00", 0.0)  # TLS handshake record, 4 bytes only
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].code == ErrorCode.HANDSHAKE_FAILED
    assert "TLS ClientHello" in events[-1].reason
    other = TunnelConnection(Role.NODE, 0.0)
    events = other.receive_data(b"GET / HTTP/1.1\r\n", 0.0)
    assert isinstance(events[-1], ConnectionTerminated) and "not HELLO" in events[-1].reason


def test_duplicate_hello_closes_the_tunnel(pair):
    events = pair.node.conn.receive_data(frames.encode_json(FrameType.HELLO, 0, {"window": 1000}), 0.0)
    assert events[-1].code == ErrorCode.HANDSHAKE_FAILED


# -- open --------------------------------------------------------------------------------------------
def test_open_ok_reports_bound_and_resolved_addresses(pair):
    sid = pair.open("example.com", 443)
    req = pair.agent.of(StreamOpenRequested)[0]
    assert (req.host, req.port) == ("example.com", 443)
    ok = pair.node.of(StreamOpened)[0]
    assert (ok.stream_id, ok.bound_host, ok.bound_port, ok.resolved_ip) == (sid, "10.0.0.2", 5555, "93.184.216.34")
    assert pair.node.conn.streams[sid].state is StreamState.OPEN


def test_open_fail_carries_the_reply_code_and_forgets_the_stream(pair):
    sid = pair.node.conn.open_stream("nowhere", 80)
    pair.pump()
    pair.agent.conn.reject_stream(sid, ReplyCode.CONNECTION_REFUSED, "refused", "1.2.3.4")
    pair.pump()
    fail = pair.node.of(StreamOpenFailed)[0]
    assert (fail.stream_id, fail.rep, fail.reason, fail.resolved_ip) == (sid, 5, "refused", "1.2.3.4")
    assert sid not in pair.node.conn.streams and sid not in pair.agent.conn.streams


def test_node_cancelling_an_open_resets_the_agents_attempt_and_a_late_open_ok_is_answered_with_rst(pair):
    sid = pair.node.conn.open_stream("slow", 80)
    pair.pump()
    pair.node.conn.reset_stream(sid, ErrorCode.CANCEL, "cancelled")
    pair.pump()
    reset = pair.agent.of(StreamReset)[0]
    assert reset.code == ErrorCode.CANCEL and reset.remote
    # a hostile/late agent answers anyway: the node answers RST, the tunnel lives
    events = pair.node.conn.receive_data(frames.encode_json(FrameType.OPEN_OK, sid, {"window": 1000}), 0.0)
    assert events == []
    out = frames.FrameDecoder().feed(pair.node.conn.data_to_send())
    assert [(f.type, f.stream_id) for f in out] == [(FrameType.RST, sid)]
    assert frames.decode_rst(out[0].payload)[0] == ErrorCode.CANCEL


def test_agent_refuses_opens_beyond_its_stream_limit():
    cfg = TunnelConfig(windows=WindowSettings(max_streams=2, min_window=16 * KiB, initial_window=16 * KiB))
    p = Pair(agent_config=cfg)
    p.handshake()
    sids = [p.node.conn.open_stream("h", 1) for _ in range(3)]
    p.pump()
    assert [e.stream_id for e in p.agent.of(StreamOpenRequested)] == sids[:2]
    failed = p.node.of(StreamOpenFailed)
    assert [f.stream_id for f in failed] == [sids[2]]


def test_node_cannot_open_after_goaway_either_way(pair):
    pair.agent.conn.send_goaway("bye")
    pair.pump()
    assert pair.node.of(GoAwayReceived)[0].reason == "bye"
    with pytest.raises(LocalUsageError):
        pair.node.conn.open_stream("h", 1)


# -- data, half-close, reset ---------------------------------------------------------------------
def test_bytes_flow_both_ways_identically(pair):
    sid = pair.open()
    up, down = blob(300 * KiB, 1), blob(700 * KiB, 2)
    pair.node.conn.send_data(sid, up)
    pair.agent.conn.send_data(sid, down)
    pair.pump()
    assert bytes(pair.agent.data[sid]) == up and bytes(pair.node.data[sid]) == down


@pytest.mark.parametrize("first", ["node", "agent"])
def test_half_close_in_either_order_finishes_the_stream_on_both_sides(pair, first):
    sid = pair.open()
    a, b = (pair.node, pair.agent) if first == "node" else (pair.agent, pair.node)
    a.conn.send_eof(sid)
    pair.pump()
    assert [e.stream_id for e in b.of(StreamEnded)] == [sid]
    assert sid in a.conn.streams and a.conn.streams[sid].state is StreamState.HALF_CLOSED_LOCAL
    b.conn.send_data(sid, b"after the other side's FIN")  # the other direction still flows
    b.conn.send_eof(sid)
    pair.pump()
    assert bytes(a.data[sid]) == b"after the other side's FIN"
    assert a.of(StreamClosed) and b.of(StreamClosed)
    assert not pair.node.conn.streams and not pair.agent.conn.streams


def test_fin_waits_behind_queued_data(pair):
    sid = pair.open()
    pair.agent.conn.send_data(sid, blob(2 * MiB))   # more than one window
    pair.agent.conn.send_eof(sid)
    pair.pump()
    assert len(pair.node.data[sid]) == 2 * MiB
    assert pair.node.of(StreamEnded)[0].stream_id == sid


@pytest.mark.parametrize("who", ["node", "agent"])
def test_rst_from_either_side_ends_the_stream_with_its_code(pair, who):
    sid = pair.open()
    a, b = (pair.node, pair.agent) if who == "node" else (pair.agent, pair.node)
    a.conn.reset_stream(sid, ErrorCode.LOCAL_CLOSED, "client went away")
    pair.pump()
    reset = b.of(StreamReset)[0]
    assert (reset.stream_id, reset.code, reset.reason, reset.remote) == (sid, ErrorCode.LOCAL_CLOSED,
                                                                          "client went away", True)
    assert not pair.node.conn.streams and not pair.agent.conn.streams
    # late DATA for the gone stream is dropped, not an error
    b.conn.send_data(sid, b"late")
    pair.pump()
    assert terminated(a) is None and terminated(b) is None


# -- flow control ----------------------------------------------------------------------------------
def test_window_exhaustion_stops_the_sender_and_credit_resumes_it(pair):
    sid = pair.open()
    pair.node.stalled.add(sid)
    window = pair.node.conn.streams[sid].recv.window
    paused = pair.agent.conn.send_data(sid, blob(4 * MiB))
    assert paused  # far more than PENDING_HIGH queued: the source must pause
    pair.pump()
    assert len(pair.node.data[sid]) == window          # exactly one window crossed
    assert pair.agent.conn.stream_buffered(sid) == 4 * MiB - window
    assert pair.node.conn.held_bytes == window
    pair.node.unstall(sid)
    pair.pump()
    assert len(pair.node.data[sid]) == 4 * MiB
    assert bytes(pair.node.data[sid]) == blob(4 * MiB)
    assert [e.stream_id for e in pair.agent.of(StreamResumed)] == [sid]


def test_sender_never_exceeds_the_connection_window_and_resumes_on_connection_credit(pair):
    sid = pair.open()
    pair.agent.conn.conn_send_credit = 10_000   # as if the node had announced a 10 000-byte connection window
    pair.agent.conn.send_data(sid, blob(50_000))
    pair.pump()
    assert len(pair.node.data[sid]) == 10_000
    pair.agent.take(pair.agent.conn.receive_data(frames.encode_window(0, 40_000), 0.0))
    pair.pump()
    assert bytes(pair.node.data[sid]) == blob(50_000)


def test_stream_windows_of_one_tunnel_never_add_up_beyond_its_connection_window():
    cfg = TunnelConfig(windows=WindowSettings(initial_window=256 * KiB, min_window=16 * KiB,
                                              conn_window=1 * MiB, max_streams=16))
    p = Pair(node_config=cfg)
    p.handshake()
    sids = [p.open() for _ in range(16)]
    for sid in sids:
        p.node.stalled.add(sid)
        p.agent.conn.send_data(sid, blob(1 * MiB))
    p.pump()
    held = p.node.conn.held_bytes
    assert held <= 1 * MiB
    assert p.node.conn.windows.conn_used <= 1 * MiB
    assert all(len(p.node.data[s]) >= 16 * KiB for s in sids)  # every stream got at least its minimum


def test_receive_windows_grow_toward_the_bandwidth_delay_product_when_consumed_fast(pair):
    sid = pair.open()
    rw = pair.node.conn.streams[sid].recv
    assert rw.window == 256 * KiB
    pair.agent.conn.send_data(sid, blob(40 * MiB))
    pair.pump()   # the clock does not move: each quarter window is consumed in ~0 s << 2 RTT
    assert rw.window == 8 * MiB
    assert len(pair.node.data[sid]) == 40 * MiB


def test_windows_do_not_grow_for_a_slow_consumer(pair):
    sid = pair.open()
    rw = pair.node.conn.streams[sid].recv
    pair.node.stalled.add(sid)
    for _ in range(20):
        pair.agent.conn.send_data(sid, blob(64 * KiB))
        pair.pump()
        pair.now += 1.0     # one quarter window per second: far slower than 2 RTT
        pair.node.unstall(sid)
        pair.node.stalled.add(sid)
        pair.pump()
    assert rw.window == 256 * KiB


def test_memory_budget_caps_new_windows_and_shrinks_big_ones_under_pressure():
    budget = MemoryBudget(4 * MiB)
    p = Pair(node_budget=budget)
    p.handshake()
    big = p.open()
    p.agent.conn.send_data(big, blob(16 * MiB))
    p.pump()
    grown = p.node.conn.streams[big].recv.window
    assert grown > 1 * MiB
    others = [p.open() for _ in range(60)]
    assert budget.used <= 4 * MiB + 60 * 16 * KiB   # only minimum windows overcommit the budget
    assert budget.under_pressure
    p.agent.conn.send_data(big, blob(4 * MiB))
    p.pump()
    shrunk = p.node.conn.streams[big].recv.window
    assert shrunk < grown // 2   # gave memory back for the 60 newcomers
    assert budget.used <= 4 * MiB + 60 * 16 * KiB
    for sid in others + [big]:
        p.node.conn.reset_stream(sid)
    p.pump()
    assert budget.used == 0 and budget.streams == 0   # every reservation came back


def test_budget_is_shared_by_every_tunnel_of_the_process():
    budget = MemoryBudget(2 * MiB)
    pairs = [Pair(node_budget=budget) for _ in range(4)]
    for p in pairs:
        p.handshake()
    for p in pairs:
        for _ in range(8):
            sid = p.open()
            p.node.stalled.add(sid)
            p.agent.conn.send_data(sid, blob(1 * MiB))
        p.pump()
    held = sum(p.node.conn.held_bytes for p in pairs)
    assert held <= 2 * MiB + 32 * 16 * KiB


def test_eight_streams_queued_while_the_transport_is_paused_all_drain_when_it_resumes(pair):
    sids = [pair.open() for _ in range(8)]
    pair.agent.conn.send_paused = True
    payloads = {sid: blob(3 * MiB, sid) for sid in sids}
    for sid, data in payloads.items():
        for i in range(0, len(data), 100 * KiB):
            pair.agent.conn.send_data(sid, data[i:i + 100 * KiB])
    pair.pump()
    assert sum(len(pair.node.data[s]) for s in sids) == 0   # nothing moved while paused
    pair.agent.conn.send_paused = False
    pair.pump()
    for sid, data in payloads.items():
        assert hashlib.sha256(pair.node.data[sid]).digest() == hashlib.sha256(data).digest()


def test_talkative_target_before_the_node_reads_is_bounded_and_pauses_its_source(pair):
    sid = pair.node.conn.open_stream("chatty", 80)
    pair.pump()
    pair.agent.conn.accept_stream(sid, "0.0.0.0", 1, "1.1.1.1")
    pair.node.stalled.add(sid)
    paused = [pair.agent.conn.send_data(sid, blob(64 * KiB)) for _ in range(40)]  # the target blasts at once
    pair.pump()
    assert any(paused)
    window = pair.node.conn.streams[sid].recv.window
    assert len(pair.node.data[sid]) == window
    kinds = [type(e) for e in pair.node.events]
    assert kinds.index(StreamOpened) < kinds.index(DataReceived)  # OPEN_OK arrives before any DATA
    assert pair.node.conn.held_bytes <= window


def test_one_stalled_reader_among_200_streams_does_not_stop_the_others_and_memory_stays_bounded(pair):
    sids = [pair.open() for _ in range(200)]
    stalled = sids[17]
    pair.node.stalled.add(stalled)
    for sid in sids:
        pair.agent.conn.send_data(sid, blob(300 * KiB, sid))
        pair.agent.conn.send_eof(sid)
    pair.pump()
    done = {e.stream_id for e in pair.node.of(StreamEnded)}
    assert done == set(sids) - {stalled}
    assert all(len(pair.node.data[s]) == 300 * KiB for s in sids if s != stalled)
    window = pair.node.conn.streams[stalled].recv.window
    assert pair.node.conn.held_bytes == len(pair.node.data[stalled]) == window
    assert pair.agent.conn.buffered_bytes <= 300 * KiB


# -- keep-alive ------------------------------------------------------------------------------------
def test_ping_measures_the_round_trip_time(pair):
    # the first PING goes right after the handshake (its RTT decides whether to pace), then every 5 s
    assert pair.agent.conn.get_timer() == pytest.approx(0.0)
    pair.agent.take(pair.agent.conn.handle_timer(0.0))
    assert pair.agent.conn.data_to_send()[:1] == bytes([frames.FrameType.PING])
    assert pair.agent.conn.get_timer() == pytest.approx(5.0)
    pair.now = 5.0
    pair.agent.take(pair.agent.conn.handle_timer(5.0))
    ping = pair.agent.conn.data_to_send()
    pair.now = 5.03
    pair.node.take(pair.node.conn.receive_data(ping, 5.03))
    pong = pair.node.conn.data_to_send()
    pair.now = 5.06
    pair.agent.take(pair.agent.conn.receive_data(pong, 5.06))
    ack = pair.agent.of(PingAcknowledged)[0]
    assert ack.rtt == pytest.approx(0.06, abs=1e-6)
    assert pair.agent.conn.rtt == pytest.approx(0.06, abs=1e-6)


def test_a_pong_we_never_asked_for_gives_no_rtt_sample(pair):
    events = pair.agent.conn.receive_data(frames.encode_ping(12345, ack=True), 1.0)
    assert events == [] and pair.agent.conn.rtt_samples == 0


def test_peer_silent_for_dead_after_seconds_is_declared_dead(pair):
    for t in (5.0, 10.0):
        pair.now = t
        pair.agent.take(pair.agent.conn.handle_timer(t))   # pings go out, nothing comes back
        pair.agent.conn.data_to_send()
    assert terminated(pair.agent) is None
    pair.now = 15.0
    pair.agent.take(pair.agent.conn.handle_timer(15.0))
    end = terminated(pair.agent)
    assert end.code == ErrorCode.DEAD_PEER and not end.remote
    assert pair.agent.conn.get_timer() is None


def test_traffic_keeps_the_tunnel_alive(pair):
    for _ in range(9):
        pair.advance(4.0)
        pair.pump()
    assert terminated(pair.agent) is None and terminated(pair.node) is None


# -- GOAWAY and unknown frames -----------------------------------------------------------------------
def test_goaway_lets_live_streams_finish(pair):
    sid = pair.open()
    pair.node.conn.send_goaway("node shutting down")
    pair.pump()
    goaway = pair.agent.of(GoAwayReceived)[0]
    assert goaway.code == ErrorCode.NO_ERROR and goaway.reason == "node shutting down"
    pair.agent.conn.send_data(sid, b"still flowing")
    pair.pump()
    assert bytes(pair.node.data[sid]) == b"still flowing"
    with pytest.raises(LocalUsageError):
        pair.node.conn.open_stream("h", 1)


def test_unknown_frame_types_are_ignored(pair):
    sid = pair.open()
    raw = struct.pack("!BBII", 77, 0, sid, 5) + b"hello" + frames.encode(FrameType.DATA, sid, b"after")
    events = pair.node.conn.receive_data(raw, 0.0)
    assert [type(e) for e in events] == [DataReceived]
    assert terminated(pair.node) is None


def _norm(events) -> list:
    return [(type(e).__name__, e.stream_id, bytes(e.data)) if isinstance(e, DataReceived) else repr(e)
            for e in events]


def test_input_split_at_every_byte_boundary_gives_the_same_events():
    p = Pair()
    p.handshake()
    hello = p.wire[0][1]
    mark = len(p.wire)
    sid = p.open()
    p.agent.conn.send_data(sid, b"x" * 50)
    p.agent.conn.send_control_reply({"id": "1", "ok": True})
    p.agent.conn.send_eof(sid)
    p.pump()
    tail = b"".join(b for d, b in p.wire[mark:] if d == "to_node")

    def fresh() -> TunnelConnection:
        node = TunnelConnection(Role.NODE, 0.0)
        node.receive_data(hello, 0.0)
        node.accept("node-a")
        assert node.open_stream("example.com", 443) == sid
        node.data_to_send()
        return node

    want = _norm(fresh().receive_data(tail, 0.0))
    assert [w if isinstance(w, str) else w[0] for w in want][0].startswith("StreamOpened")
    assert len(want) == 4  # opened, data, control reply, ended
    for cut in range(len(tail) + 1):
        node = fresh()
        got = node.receive_data(tail[:cut], 0.0) + node.receive_data(tail[cut:], 0.0)
        assert _norm(got) == want, cut


# -- malformed and hostile input ---------------------------------------------------------------------
MALFORMED = [
    ("window payload 3 bytes", struct.pack("!BBII", FrameType.WINDOW, 0, 1, 3) + b"abc", ErrorCode.FRAME_SIZE_ERROR),
    ("ping payload 4 bytes", struct.pack("!BBII", FrameType.PING, 0, 0, 4) + b"abcd", ErrorCode.FRAME_SIZE_ERROR),
    ("ping on a stream", frames.encode(FrameType.PING, 3, b"12345678"), ErrorCode.PROTOCOL_ERROR),
    ("hello on a stream", frames.encode(FrameType.HELLO, 5, b"{}"), ErrorCode.PROTOCOL_ERROR),
    ("data on stream 0", frames.encode(FrameType.DATA, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("rst without code", frames.encode(FrameType.RST, 1, b"ab"), ErrorCode.FRAME_SIZE_ERROR),
    ("window of zero", frames.encode_window(1, 0), ErrorCode.PROTOCOL_ERROR),
    ("bad json", frames.encode(FrameType.CONTROL_REPLY, 0, b"{nope"), ErrorCode.PROTOCOL_ERROR),
    ("json array", frames.encode(FrameType.CONTROL_REPLY, 0, b"[1]"), ErrorCode.PROTOCOL_ERROR),
    ("oversized control", struct.pack("!BBII", FrameType.CONTROL_REPLY, 0, 0, frames.MAX_CONTROL_PAYLOAD + 1),
     ErrorCode.FRAME_SIZE_ERROR),
    ("oversized data", struct.pack("!BBII", FrameType.DATA, 0, 1, frames.MAX_PAYLOAD + 1), ErrorCode.FRAME_SIZE_ERROR),
    ("oversized unknown", struct.pack("!BBII", 99, 0, 1, frames.MAX_CONTROL_PAYLOAD + 1), ErrorCode.FRAME_SIZE_ERROR),
    ("open sent to the node", frames.encode_json(FrameType.OPEN, 9, {"host": "h", "port": 1, "window": 9}),
     ErrorCode.PROTOCOL_ERROR),
    ("control sent to the node", frames.encode_json(FrameType.CONTROL, 0, {"id": 1}), ErrorCode.PROTOCOL_ERROR),
    ("welcome sent to the node", frames.encode_json(FrameType.WELCOME, 0, {"ok": True}), ErrorCode.PROTOCOL_ERROR),
    ("data for a never-opened stream", frames.encode(FrameType.DATA, 99, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("fin for a never-opened stream", frames.encode(FrameType.FIN, 99), ErrorCode.PROTOCOL_ERROR),
    ("window for a never-opened stream", frames.encode_window(99, 5), ErrorCode.PROTOCOL_ERROR),
    ("open_ok for a never-opened stream", frames.encode_json(FrameType.OPEN_OK, 99, {"window": 5}),
     ErrorCode.PROTOCOL_ERROR),
    ("open_fail for a never-opened stream", frames.encode_json(FrameType.OPEN_FAIL, 99, {"rep": 1}),
     ErrorCode.PROTOCOL_ERROR),
    ("connection window overflow", frames.encode_window(0, 0xFFFFFFFF) * 5, ErrorCode.FLOW_CONTROL_ERROR),
]


@pytest.mark.parametrize("name,raw,code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_malformed_frame_closes_the_tunnel_with_its_code_and_a_goaway(pair, name, raw, code):
    sid = pair.open()
    assert sid == 1
    events = pair.node.conn.receive_data(raw, 1.0)
    end = events[-1]
    assert isinstance(end, ConnectionTerminated) and end.code == code and not end.remote
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in events)  # its streams ended
    out = frames.FrameDecoder().feed(pair.node.conn.data_to_send())
    assert out[-1].type == FrameType.GOAWAY and out[-1].json()["code"] == code
    assert pair.node.conn.receive_data(frames.encode_ping(1), 2.0) == []  # a closed tunnel reads nothing


def test_agent_rejects_malformed_opens_and_reused_ids(pair):
    sid = pair.open()
    events = pair.agent.conn.receive_data(frames.encode_json(FrameType.OPEN, sid, {"host": "h", "port": 1,
                                                                                   "window": 5}), 0.0)
    assert events[-1].code == ErrorCode.PROTOCOL_ERROR
    p = Pair()
    p.handshake()
    events = p.agent.conn.receive_data(frames.encode_json(FrameType.OPEN, 7, {"host": "h", "port": 1}), 0.0)
    assert events == []   # no window: refused with RST, the tunnel lives
    rst = frames.FrameDecoder().feed(p.agent.conn.data_to_send())[0]
    assert rst.type == FrameType.RST and frames.decode_rst(rst.payload)[0] == ErrorCode.PROTOCOL_ERROR


def test_hostile_data_beyond_the_stream_window_resets_only_that_stream(pair):
    sid, other = pair.open(), pair.open()
    window = pair.node.conn.streams[sid].recv.window
    raw = b"".join(frames.encode(FrameType.DATA, sid, b"x" * 60 * KiB) for _ in range(window // (60 * KiB) + 1))
    events = pair.node.conn.receive_data(raw, 0.0)
    reset = [e for e in events if isinstance(e, StreamReset)]
    assert [(r.stream_id, r.code, r.remote) for r in reset] == [(sid, ErrorCode.FLOW_CONTROL_ERROR, False)]
    assert terminated(pair.node) is None and other in pair.node.conn.streams
    out = frames.FrameDecoder().feed(pair.node.conn.data_to_send())
    assert any(f.type == FrameType.RST and f.stream_id == sid
               and frames.decode_rst(f.payload)[0] == ErrorCode.FLOW_CONTROL_ERROR for f in out)
    # the node's connection accounting took the dropped bytes back: the other stream still flows
    pair.agent.conn.send_data(other, blob(MiB))
    pair.pump()
    assert len(pair.node.data[other]) == MiB


def test_hostile_data_after_fin_resets_the_stream_with_stream_closed(pair):
    sid = pair.open()
    raw = frames.encode(FrameType.FIN, sid) + frames.encode(FrameType.DATA, sid, b"more")
    events = pair.node.conn.receive_data(raw, 0.0)
    assert isinstance(events[0], StreamEnded)
    assert (events[-1].stream_id, events[-1].code) == (sid, ErrorCode.STREAM_CLOSED)
    assert terminated(pair.node) is None


def test_hostile_data_before_open_ok_fails_the_open(pair):
    sid = pair.node.conn.open_stream("h", 1)
    events = pair.node.conn.receive_data(frames.encode(FrameType.DATA, sid, b"early"), 0.0)
    assert [type(e) for e in events] == [StreamOpenFailed]
    assert terminated(pair.node) is None


def test_hostile_second_open_ok_resets_the_stream(pair):
    sid = pair.open()
    events = pair.node.conn.receive_data(frames.encode_json(FrameType.OPEN_OK, sid, {"window": 100}), 0.0)
    assert [(type(e), e.code) for e in events] == [(StreamReset, ErrorCode.PROTOCOL_ERROR)]


@pytest.mark.parametrize("name,frame,limit_attr", [
    ("ping", frames.encode_ping(7), "ping_per_s"),
    ("control", frames.encode_json(FrameType.CONTROL_REPLY, 0, {"id": "x"}), "control_per_s"),
    ("unknown", struct.pack("!BBII", 120, 0, 0, 0), "control_per_s"),
    ("rst for a closed stream", frames.encode_rst(1, 0), "control_per_s"),
])
def test_a_flood_closes_the_tunnel_with_enhance_your_calm(name, frame, limit_attr):
    p = Pair()
    p.handshake()
    sid = p.open()
    p.node.conn.reset_stream(sid)
    p.pump()
    limit = getattr(p.node.conn.config, limit_attr)
    if limit_attr == "ping_per_s":  # the agent announced "pace": it may probe up to 100/s
        assert p.node.conn.ping_limit == PING_PER_S_PACE > limit
        limit = p.node.conn.ping_limit
    events = p.node.conn.receive_data(frame * limit, 0.5)
    assert terminated(p.node) is None and not any(isinstance(e, ConnectionTerminated) for e in events)
    events = p.node.conn.receive_data(frame, 1.6)  # a new second: budget back
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
    events = p.node.conn.receive_data(frame * limit, 1.7)
    assert events[-1].code == ErrorCode.ENHANCE_YOUR_CALM


def test_every_stream_is_released_when_the_transport_is_lost():
    budget = MemoryBudget(8 * MiB)
    p = Pair(node_budget=budget)
    p.handshake()
    sids = [p.open() for _ in range(5)]
    opening = p.node.conn.open_stream("h", 1)
    events = p.node.conn.connection_lost()
    assert {e.stream_id for e in events if isinstance(e, StreamReset)} == set(sids)
    assert [e.stream_id for e in events if isinstance(e, StreamOpenFailed)] == [opening]
    assert budget.used == 0 and budget.streams == 0


# -- the state table and the I/O-free core -------------------------------------------------------
def test_transition_table_allows_only_the_documented_moves():
    assert next_state(StreamState.OPEN, Transition.RECV_FIN) is StreamState.HALF_CLOSED_REMOTE
    assert next_state(StreamState.HALF_CLOSED_REMOTE, Transition.RECV_DATA) is None
    assert next_state(StreamState.OPENING, Transition.RECV_DATA) is None
    assert not any(state is StreamState.CLOSED for state, _ in TRANSITIONS)


def test_core_imports_neither_asyncio_nor_socket():
    code = ("import sys, device_tunnel.connection, device_tunnel.windows, device_tunnel.events;"
            "bad = [m for m in ('asyncio', 'socket', 'time') if m in sys.modules];"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("", "time"), out.stdout  # time may come with the stdlib; asyncio/socket never
    assert "asyncio" not in out.stdout and "socket" not in out.stdout


def test_pending_high_is_what_pauses_a_source(pair):
    sid = pair.open()
    pair.node.conn.send_paused = True
    assert not pair.node.conn.send_data(sid, blob(PENDING_HIGH))
    assert pair.node.conn.send_data(sid, b"x")


def test_a_window_flood_beyond_what_our_data_explains_closes_the_tunnel(pair):
    sid = pair.open()
    pair.node.conn.send_data(sid, blob(1 * MiB))   # 1 MiB sent: about 1024 more WINDOWs are plausible
    pair.pump()
    base = pair.node.conn.config.window_base
    allowed = base + (pair.node.conn.data_bytes_sent >> 10) + 4 * sid - pair.node.conn._windows_received
    events = pair.node.conn.receive_data(frames.encode_window(0, 1) * allowed, 1.0)
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
    events = pair.node.conn.receive_data(frames.encode_window(0, 1), 1.0)
    assert events[-1].code == ErrorCode.ENHANCE_YOUR_CALM


def test_legit_credit_for_much_data_over_small_windows_is_never_a_flood():
    cfg = TunnelConfig(windows=WindowSettings(initial_window=16 * KiB, max_window=16 * KiB, min_window=16 * KiB))
    p = Pair(node_config=cfg, agent_config=cfg)
    p.handshake()
    sids = [p.open() for _ in range(50)]
    for sid in sids:
        p.node.conn.send_data(sid, blob(256 * KiB))
    p.pump()
    assert all(len(p.agent.data[s]) == 256 * KiB for s in sids)
    assert terminated(p.node) is None
