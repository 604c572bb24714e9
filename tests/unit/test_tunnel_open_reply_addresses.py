"""The node core checks the addresses a device reports in OPEN_OK / OPEN_FAIL (sans-I/O, fake clock)."""

from __future__ import annotations

import pytest
from tunnel_pair import Pair

from device_tunnel import frames
from device_tunnel.errors import ErrorCode
from device_tunnel.events import StreamOpened, StreamOpenFailed, StreamOpenRequested
from device_tunnel.frames import FrameType
from device_tunnel.replies import ReplyCode


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    p.handshake()
    return p


def _answer(pair: Pair, ftype: FrameType, body: dict) -> tuple[int, bytes]:
    sid = pair.node.conn.open_stream("example.com", 80)
    pair.pump()
    assert pair.agent.of(StreamOpenRequested)[-1].stream_id == sid
    pair.node.take(pair.node.conn.receive_data(frames.encode_json(ftype, sid, body), pair.now))
    return sid, pair.node.conn.data_to_send()


@pytest.mark.parametrize("body", [
    {"bound_host": "evil.example"}, {"bound_host": "1.2.3.4\x00"}, {"bound_host": 5},
    {"bound_port": -1}, {"bound_port": 65536}, {"bound_port": "80"}, {"bound_port": True},
    {"resolved_ip": "999.1.1.1"}, {"resolved_ip": ["1.2.3.4"]}, {"resolved_ip": "1" * 65},
])
def test_malformed_open_ok_resets_the_stream_and_fails_the_open(pair, body):
    sid, out = _answer(pair, FrameType.OPEN_OK, {"bound_host": "0.0.0.0", "bound_port": 1, "resolved_ip": "",
                                                 "window": 65536, **body})
    failed = pair.node.of(StreamOpenFailed)[-1]
    assert failed.stream_id == sid and failed.rep == ReplyCode.GENERAL_FAILURE
    assert not pair.node.of(StreamOpened)
    rst = next(f for f in frames.FrameDecoder().feed(out) if f.type == FrameType.RST)
    assert rst.stream_id == sid and int.from_bytes(rst.payload[:4], "big") == ErrorCode.PROTOCOL_ERROR
    assert sid not in pair.node.conn.streams and not pair.node.conn.closed
    assert pair.node.conn.malformed_open_replies == 1 and pair.node.conn.stream_errors == 1


def test_private_and_canonicalised_addresses_are_reported(pair):
    sid, _ = _answer(pair, FrameType.OPEN_OK, {"bound_host": "192.168.1.23", "bound_port": 40000,
                                               "resolved_ip": "FE80::0001", "window": 65536})
    ok = pair.node.of(StreamOpened)[-1]
    assert (ok.stream_id, ok.bound_host, ok.bound_port, ok.resolved_ip) == (sid, "192.168.1.23", 40000, "fe80::1")


def test_open_ok_without_addresses_defaults_to_unspecified(pair):
    _sid, _ = _answer(pair, FrameType.OPEN_OK, {"window": 65536})
    ok = pair.node.of(StreamOpened)[-1]
    assert (ok.bound_host, ok.bound_port, ok.resolved_ip) == ("0.0.0.0", 0, "")


def test_open_fail_drops_a_malformed_resolved_ip_clamps_rep_and_cuts_the_reason(pair):
    _sid, _ = _answer(pair, FrameType.OPEN_FAIL, {"rep": 99, "reason": "x" * 5000, "resolved_ip": "junk"})
    failed = pair.node.of(StreamOpenFailed)[-1]
    assert (failed.rep, failed.resolved_ip, len(failed.reason)) == (ReplyCode.GENERAL_FAILURE, "", 200)
