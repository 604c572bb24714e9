"""Optimistic open (OPTIMISTIC_OPEN) in both sans-I/O cores, fake clock: the session core answers the
client at once and passes its first bytes on; the tunnel core sends them right behind OPEN."""

from __future__ import annotations

from test_session_core import CID, DEV, at, connect_head, core, only, record, sent, socks_connect, socks_creds
from tunnel_pair import Pair

from device_tunnel.connection import EARLY_DATA_MAX
from device_tunnel.events import (
    DataReceived,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
)
from device_tunnel.frames import FrameDecoder, FrameType
from device_tunnel.replies import ReplyCode
from proxy.session_core import (
    OPTIMISTIC_BUFFER,
    ArmTimer,
    CancelOpen,
    Close,
    DisarmTimer,
    EarlyData,
    LogRow,
    OpenStream,
    PauseReading,
    Phase,
    Register,
    ResumeReading,
    SessionCore,
    StartRelay,
)

SOCKS_OK = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


# -- session core ------------------------------------------------------------------------------------
def socks_opening(c: SessionCore, pipelined: bytes = b"") -> list:
    c.receive_data(socks_creds(), at(0))
    c.auth_result(record(), "", at(0.1))
    return c.receive_data(socks_connect() + pipelined, at(0.2))


def test_optimistic_socks_answers_once_the_open_is_under_way_and_passes_bytes_on() -> None:
    c = core(optimistic=True, open_timeout=7.0)
    acts = socks_opening(c, pipelined=b"GET / HTTP/1.1\r\n")
    assert acts == [ArmTimer(7.0), OpenStream(DEV, "example.com", 443, optimistic=True)]
    assert PauseReading() not in acts and sent(acts) == b""
    acts = c.open_sent(at(0.2))  # the adapter got the open going
    assert sent(acts) == SOCKS_OK and only(acts, EarlyData) == [EarlyData(b"GET / HTTP/1.1\r\n")]
    assert c.open_sent(at(0.2)) == []  # once
    assert c.receive_data(b"Host: x\r\n\r\n", at(0.21)) == [EarlyData(b"Host: x\r\n\r\n")]
    acts = c.open_result(0, "", "93.184.216.34", "10.0.0.2", 4242, True, at(0.5))
    assert sent(acts) == b""  # answered already
    assert acts[-2:] == [StartRelay(b""), ResumeReading()] and Register() in acts and DisarmTimer() in acts
    assert c.phase is Phase.RELAY and c.metrics.sessions_established == 1
    (row,) = [a.row for a in only(c.client_lost(at(1), 10, 20), LogRow)]
    assert (row.reply_code, row.action, row.resolved_ip) == (0, "allowed", "93.184.216.34")


def test_optimistic_failure_resets_the_client_and_logs_the_real_reply_code() -> None:
    c = core(optimistic=True)
    socks_opening(c)
    c.open_sent(at(0.2))
    acts = c.open_result(ReplyCode.CONNECTION_REFUSED, "refused", "192.0.2.1", "", 0, False, at(0.4))
    assert acts == [DisarmTimer(), Close(abort=True, reset=True)]  # no second reply: a reset
    assert c.metrics.sessions_failed == 1
    (row,) = [a.row for a in only(c.client_lost(at(0.5)), LogRow)]
    assert (row.reply_code, row.action, row.error, row.resolved_ip) == (5, "allowed", "refused", "192.0.2.1")


def test_optimistic_device_policy_refusal_is_logged_blocked() -> None:
    c = core(optimistic=True)
    socks_opening(c)
    c.open_sent(at(0.2))
    assert c.open_result(ReplyCode.NOT_ALLOWED, "private target", "10.0.0.1", "", 0, False, at(0.3))[-1] == \
        Close(abort=True, reset=True)
    (row,) = [a.row for a in only(c.client_lost(at(0.5)), LogRow)]
    assert (row.action, row.reply_code) == ("blocked", 2)


def test_optimistic_device_offline_still_gets_its_reply_code() -> None:
    c = core(optimistic=True)
    socks_opening(c)
    acts = c.open_unavailable(at(0.2))  # no tunnel: known before any answer was sent
    assert sent(acts) == b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00" and Close() in acts


def test_optimistic_timeout_cancels_and_resets() -> None:
    c = core(optimistic=True)
    socks_opening(c)
    c.open_sent(at(0.2))
    acts = c.timer_fired(at(15.5))
    assert acts == [CancelOpen(), Close(abort=True, reset=True)]
    (row,) = [a.row for a in only(c.client_lost(at(16)), LogRow)]
    assert row.reply_code == ReplyCode.TTL_EXPIRED


def test_optimistic_early_bytes_are_bounded() -> None:
    c = core(optimistic=True)
    socks_opening(c)
    c.open_sent(at(0.2))
    chunk = b"x" * (OPTIMISTIC_BUFFER // 2)
    assert c.receive_data(chunk, at(0.3)) == [EarlyData(chunk)]
    assert c.receive_data(chunk, at(0.3)) == [EarlyData(chunk)]
    assert c.receive_data(b"y", at(0.3)) == [EarlyData(b"y"), PauseReading()]  # until the outcome
    assert c.open_result(0, "", "", "", 0, True, at(0.4))[-1] == ResumeReading()


def test_optimistic_connect_answers_200_at_once() -> None:
    c = core(optimistic=True)
    c.receive_data(connect_head() + b"\x16\x03", at(0))
    assert only(c.auth_result(record(), "", at(0.1)), OpenStream) == [
        OpenStream(DEV, "example.com", 443, optimistic=True)]
    acts = c.open_sent(at(0.1))
    assert sent(acts) == b"HTTP/1.1 200 Connection established\r\n\r\n" and EarlyData(b"\x16\x03") in acts
    acts = c.open_result(ReplyCode.HOST_UNREACHABLE, "no route", "", "", 0, False, at(0.3))
    assert acts[-1] == Close(abort=True, reset=True)
    (row,) = [a.row for a in only(c.client_lost(at(0.4)), LogRow)]
    assert (row.protocol, row.reply_code) == ("http", 4)


def test_default_is_not_optimistic() -> None:
    c = core()
    acts = socks_opening(c)
    assert PauseReading() in acts and OpenStream(DEV, "example.com", 443) in acts
    assert CID == c.connection_id


# -- tunnel core -------------------------------------------------------------------------------------
def frame_types(wire: bytes) -> list[int]:
    return [f.type for f in FrameDecoder().feed(wire)]


def test_early_data_follows_open_before_open_ok_and_counts_against_the_window() -> None:
    p = Pair()
    p.handshake()
    assert p.node.conn.peer_early_data == p.agent.conn.config.windows.min_window  # announced in HELLO
    sid = p.node.conn.open_stream("example.com", 80, early=True)
    p.agent.stalled.add(sid)  # the agent holds early bytes until the target is connected
    p.node.conn.send_data(sid, b"GET / HTTP/1.1\r\n\r\n")
    wire = p.node.conn.data_to_send()
    assert frame_types(wire) == [FrameType.OPEN, FrameType.DATA]  # one write: OPEN and the bytes
    p.agent.take(p.agent.conn.receive_data(wire, p.now))
    assert isinstance(p.agent.events[-2], StreamOpenRequested) and isinstance(p.agent.events[-1], DataReceived)
    assert bytes(p.agent.data[sid]) == b"GET / HTTP/1.1\r\n\r\n"
    p.node.conn.send_eof(sid)  # the client half-closed: FIN waits for OPEN_OK
    assert p.node.conn.data_to_send() == b""
    assert p.agent.conn.accept_stream(sid, "0.0.0.0", 1, "93.184.216.34")
    p.pump()
    assert p.node.of(StreamOpened) and p.agent.of(StreamEnded)
    window = p.agent.conn.streams[sid].recv.window
    assert p.node.conn.streams[sid].send_credit == window - len(b"GET / HTTP/1.1\r\n\r\n")
    p.agent.unstall(sid)
    p.pump()
    assert p.agent.conn.streams[sid].recv.held == 0  # acknowledged after OPEN_OK (FIN seen: no stream credit)


def test_early_data_beyond_the_announced_limit_waits_for_open_ok() -> None:
    p = Pair()
    p.handshake()
    limit = min(p.node.conn.peer_early_data, EARLY_DATA_MAX)
    sid = p.node.conn.open_stream("example.com", 80, early=True)
    p.agent.stalled.add(sid)
    p.node.conn.send_data(sid, b"a" * (limit + 1000))
    p.pump()
    assert len(p.agent.data[sid]) == limit  # no flow-control error on the agent
    p.agent.conn.accept_stream(sid, "0.0.0.0", 1, "")
    p.pump()
    assert len(p.agent.data[sid]) == limit + 1000


def test_agent_without_early_data_gets_nothing_before_open_ok() -> None:
    p = Pair()
    p.agent.conn.config.windows.min_window = 16 * 1024
    p.handshake()
    p.node.conn.peer_early_data = 0  # an older agent: no "early_data" in its HELLO
    sid = p.node.conn.open_stream("example.com", 80, early=True)
    p.node.conn.send_data(sid, b"hello")
    p.pump()
    assert p.agent.data[sid] == b""
    p.agent.conn.accept_stream(sid, "0.0.0.0", 1, "")
    p.pump()
    assert bytes(p.agent.data[sid]) == b"hello"


def test_open_fail_drops_early_data_and_returns_the_connection_credit() -> None:
    p = Pair()
    p.handshake()
    credit0 = p.node.conn.conn_send_credit
    sid = p.node.conn.open_stream("example.com", 80, early=True)
    p.agent.stalled.add(sid)
    p.node.conn.send_data(sid, b"z" * 5000)
    p.pump()
    p.agent.conn.reject_stream(sid, ReplyCode.CONNECTION_REFUSED, "refused", "1.2.3.4")
    p.pump()
    (fail,) = p.node.of(StreamOpenFailed)
    assert fail.rep == ReplyCode.CONNECTION_REFUSED and sid not in p.node.conn.streams
    p.agent.conn.acknowledge_received_data(0, 0, p.now, force=True)
    p.pump()
    assert p.node.conn.conn_send_credit == credit0


def test_data_before_open_ok_without_early_is_still_a_usage_error() -> None:
    import pytest

    from device_tunnel.errors import LocalUsageError

    p = Pair()
    p.handshake()
    sid = p.node.conn.open_stream("example.com", 80)
    with pytest.raises(LocalUsageError):
        p.node.conn.send_data(sid, b"x")
