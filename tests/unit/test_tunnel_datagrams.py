"""UDP streams and DATAGRAM frames in the sans-I/O tunnel core: two in-memory endpoints, a fake clock."""

from __future__ import annotations

import pytest
from tunnel_pair import Pair

from device_tunnel import frames
from device_tunnel.connection import TunnelConfig
from device_tunnel.errors import ErrorCode, LocalUsageError
from device_tunnel.events import (
    ConnectionTerminated,
    DatagramReceived,
    HelloReceived,
    StreamOpened,
    StreamOpenRequested,
    StreamReset,
)
from device_tunnel.frames import FrameType


def udp_pair(config: TunnelConfig | None = None) -> Pair:
    p = Pair(node_config=config, agent_config=config)
    p.agent.conn.send_hello("dev-1", "tok", {}, features=(frames.FEATURE_UDP,))
    p.pump()
    assert "udp" in p.node.of(HelloReceived)[-1].features
    p.node.conn.accept("node-a")
    p.pump()
    return p


def open_udp(p: Pair) -> int:
    sid = p.node.conn.open_udp_stream()
    p.pump()
    req = p.agent.of(StreamOpenRequested)[-1]
    assert (req.stream_id, req.udp) == (sid, True)
    assert p.agent.conn.accept_stream(sid, "0.0.0.0", 0, "")
    p.pump()
    assert p.node.of(StreamOpened)[-1].stream_id == sid
    return sid


def datagrams(side) -> list[tuple[int, str, int, bytes]]:
    return [(e.stream_id, e.host, e.port, bytes(e.data)) for e in side.of(DatagramReceived)]


def raw_datagram(sid: int, host: str, port: int, payload: bytes) -> bytes:
    return frames.encode(FrameType.DATAGRAM, sid, frames.encode_address(host, port) + payload)


def test_datagrams_flow_both_ways_with_every_address_type():
    p = udp_pair()
    sid = open_udp(p)
    for host in ("93.184.216.34", "2001:db8::1", "example.com"):
        assert p.node.conn.send_datagram(sid, host, 53, b"query " + host.encode())
    assert p.node.conn.send_datagram(sid, "example.com", 9, b"")  # empty UDP payloads exist
    p.pump()
    assert datagrams(p.agent) == [(sid, "93.184.216.34", 53, b"query 93.184.216.34"),
                                  (sid, "2001:db8::1", 53, b"query 2001:db8::1"),
                                  (sid, "example.com", 53, b"query example.com"), (sid, "example.com", 9, b"")]
    assert p.agent.conn.send_datagram(sid, "93.184.216.34", 53, b"answer")
    p.pump()
    assert datagrams(p.node) == [(sid, "93.184.216.34", 53, b"answer")]


def test_a_device_that_did_not_announce_udp_gets_no_udp_stream():
    p = Pair()
    p.handshake()  # HELLO without features: an older agent
    with pytest.raises(LocalUsageError):
        p.node.conn.open_udp_stream()


def test_datagrams_are_not_limited_by_stream_credit():
    p = udp_pair()
    sid = open_udp(p)
    payload = bytes(60_000)
    for _ in range(100):  # 6 MB on a stream whose window is 16 KiB
        assert p.node.conn.send_datagram(sid, "10.0.0.1", 9, payload)
        p.pump()
    assert len(datagrams(p.agent)) == 100
    assert not p.agent.of(StreamReset)


def test_a_stalled_tunnel_queues_at_most_256_datagrams_then_drops():
    p = udp_pair()
    sid = open_udp(p)
    p.node.conn.send_paused = True   # the transport is full
    accepted = sum(p.node.conn.send_datagram(sid, "10.0.0.1", 9, b"%05d" % i) for i in range(300))
    assert accepted == 256 and p.node.conn.datagrams_dropped == 44
    assert p.node.conn.data_to_send() == b""  # nothing leaves while paused
    p.node.conn.send_paused = False
    p.pump()
    assert [d[3] for d in datagrams(p.agent)] == [b"%05d" % i for i in range(256)]  # in order
    assert p.node.conn.buffered_bytes == 0


def test_a_stalled_tunnel_queues_at_most_1_mib_of_datagrams():
    p = udp_pair()
    sid = open_udp(p)
    p.node.conn.send_paused = True
    accepted = sum(p.node.conn.send_datagram(sid, "10.0.0.1", 9, bytes(60_000)) for _ in range(30))
    assert accepted == 17  # 17 x 60 000 <= 1 MiB < 18 x 60 000
    assert p.node.conn.buffered_bytes <= 1024 * 1024 + 17 * 64
    p.node.conn.send_paused = False
    p.pump()
    assert len(datagrams(p.agent)) == 17


def test_queue_bounds_are_configurable_and_streams_take_turns():
    p = udp_pair(TunnelConfig(dgram_queue_max=3))
    a, b = open_udp(p), open_udp(p)
    p.node.conn.send_paused = True
    for i in range(5):
        p.node.conn.send_datagram(a, "10.0.0.1", 9, b"a%d" % i)
        p.node.conn.send_datagram(b, "10.0.0.1", 9, b"b%d" % i)
    p.node.conn.send_paused = False
    p.pump()
    assert [d[3] for d in datagrams(p.agent)] == [b"a0", b"b0", b"a1", b"b1", b"a2", b"b2"]


def test_all_udp_streams_of_a_tunnel_share_one_queue_bound():
    p = udp_pair(TunnelConfig(dgram_tunnel_bytes=100_000))
    streams = [open_udp(p) for _ in range(4)]
    p.node.conn.send_paused = True
    accepted = sum(p.node.conn.send_datagram(sid, "10.0.0.1", 9, bytes(10_000)) for sid in streams for _ in range(5))
    assert accepted == 10 and p.node.conn.buffered_bytes <= 100_000 + 10 * 64
    p.node.conn.reset_stream(streams[0])
    p.node.conn.send_paused = False
    p.pump()
    assert p.node.conn.buffered_bytes == 0
    assert p.node.conn.send_datagram(streams[1], "10.0.0.1", 9, bytes(10_000))


def test_resetting_a_udp_stream_frees_its_queue():
    p = udp_pair()
    sid = open_udp(p)
    p.node.conn.send_paused = True
    for _ in range(10):
        p.node.conn.send_datagram(sid, "10.0.0.1", 9, bytes(1000))
    assert p.node.conn.buffered_bytes >= 10_000
    p.node.conn.reset_stream(sid, ErrorCode.LOCAL_CLOSED, "association ended")
    assert p.node.conn.buffered_bytes < 100
    p.node.conn.send_paused = False
    p.pump()
    assert datagrams(p.agent) == []
    assert p.agent.of(StreamReset)[-1].code is ErrorCode.LOCAL_CLOSED
    assert not p.agent.conn.streams


def test_send_datagram_refuses_what_it_cannot_send():
    p = udp_pair()
    opening = p.node.conn.open_udp_stream()
    assert not p.node.conn.send_datagram(opening, "10.0.0.1", 9, b"x")  # no OPEN_OK yet
    p.pump()
    p.agent.conn.accept_stream(opening, "0.0.0.0", 0, "")
    p.pump()
    assert not p.node.conn.send_datagram(opening, "10.0.0.1", 9, bytes(65_508))  # over the UDP maximum
    assert p.node.conn.send_datagram(opening, "10.0.0.1", 9, bytes(65_507))
    assert not p.node.conn.send_datagram(opening, "", 9, b"x")
    assert not p.node.conn.send_datagram(opening, "a" * 256, 9, b"x")
    assert not p.node.conn.send_datagram(99, "10.0.0.1", 9, b"x")
    tcp = p.open()
    assert not p.node.conn.send_datagram(tcp, "10.0.0.1", 9, b"x")
    with pytest.raises(LocalUsageError):
        p.node.conn.send_data(opening, b"data on a udp stream")


def test_data_on_a_udp_stream_resets_it():
    p = udp_pair()
    sid = open_udp(p)
    p.agent.take(p.agent.conn.receive_data(frames.encode(FrameType.DATA, sid, b"nope"), p.now))
    reset = p.agent.of(StreamReset)[-1]
    assert (reset.stream_id, reset.code, reset.remote) == (sid, ErrorCode.PROTOCOL_ERROR, False)
    assert not p.agent.of(ConnectionTerminated)


def test_datagram_on_a_tcp_stream_resets_it():
    p = udp_pair()
    sid = p.open()
    p.agent.take(p.agent.conn.receive_data(raw_datagram(sid, "10.0.0.1", 9, b"x"), p.now))
    assert p.agent.of(StreamReset)[-1].code is ErrorCode.PROTOCOL_ERROR
    assert not datagrams(p.agent)


def test_malformed_datagram_address_resets_the_stream():
    for bad in (b"", b"\x01\x0a\x00", b"\x03\x00\x00\x35", b"\x07" + bytes(10)):
        p2 = udp_pair()
        sid = open_udp(p2)
        p2.agent.take(p2.agent.conn.receive_data(frames.encode(FrameType.DATAGRAM, sid, bad), p2.now))
        assert p2.agent.of(StreamReset)[-1].code is ErrorCode.PROTOCOL_ERROR, bad


def test_datagram_payload_over_the_udp_maximum_resets_the_stream():
    p = udp_pair()
    sid = open_udp(p)
    p.agent.take(p.agent.conn.receive_data(raw_datagram(sid, "10.0.0.1", 9, bytes(65_508)), p.now))
    assert p.agent.of(StreamReset)[-1].code is ErrorCode.FRAME_SIZE_ERROR


def test_datagram_frame_over_its_length_limit_closes_the_tunnel():
    p = udp_pair()
    sid = open_udp(p)
    head = frames.header(FrameType.DATAGRAM, sid, frames.MAX_DATAGRAM_PAYLOAD + 1)
    p.agent.take(p.agent.conn.receive_data(head, p.now))
    assert p.agent.of(ConnectionTerminated)[-1].code is ErrorCode.FRAME_SIZE_ERROR


def test_datagram_on_stream_zero_or_a_never_opened_stream_closes_the_tunnel():
    for sid in (0, 77):
        p = udp_pair()
        open_udp(p)
        p.agent.take(p.agent.conn.receive_data(raw_datagram(sid, "10.0.0.1", 9, b"x"), p.now))
        assert p.agent.of(ConnectionTerminated)[-1].code is ErrorCode.PROTOCOL_ERROR


def test_datagram_for_an_ended_association_is_ignored():
    p = udp_pair()
    sid = open_udp(p)
    p.agent.conn.reset_stream(sid, ErrorCode.CANCEL)
    p.agent.take(p.agent.conn.receive_data(raw_datagram(sid, "10.0.0.1", 9, b"late"), p.now))
    assert not datagrams(p.agent) and not p.agent.of(ConnectionTerminated)


def test_datagram_split_at_every_byte_boundary():
    frame = raw_datagram(1, "example.com", 5353, b"split me")
    for cut in range(1, len(frame)):
        p = udp_pair()
        sid = open_udp(p)
        assert sid == 1
        p.agent.take(p.agent.conn.receive_data(frame[:cut], p.now))
        p.agent.take(p.agent.conn.receive_data(frame[cut:], p.now))
        assert datagrams(p.agent) == [(1, "example.com", 5353, b"split me")], cut


def test_udp_stream_reserves_only_the_minimum_window():
    p = udp_pair()
    sid = open_udp(p)
    assert p.node.conn.streams[sid].recv.window == p.node.conn.config.windows.min_window
    assert p.agent.conn.streams[sid].recv.window == p.agent.conn.config.windows.min_window


@pytest.mark.parametrize(("host", "port"), [("1.2.3.4", 0), ("::ffff:1.2.3.4", 65535), ("xn--bcher-kva.example", 80)])
def test_address_codec_round_trips(host: str, port: int):
    enc = frames.encode_address(host, port)
    assert frames.decode_address(enc + b"tail") == (frames.decode_address(enc)[0], port, len(enc))
    for n in range(len(enc)):
        assert frames.decode_address(enc[:n]) is None
