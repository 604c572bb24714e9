"""Byte- and event-level tests of the sans-I/O proxy session core (no sockets, no loop, no clock)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from device_tunnel.replies import ReplyCode
from proxy.auth_cache.cache import CredentialRecord
from proxy.session_core import (
    DEVICE_POLICY,
    ArmTimer,
    Authenticate,
    CancelOpen,
    Close,
    CloseUpstreamStream,
    DisarmTimer,
    Instant,
    LeaveHandshake,
    LogRow,
    OpenStream,
    PauseReading,
    Phase,
    ProxyMetrics,
    Register,
    ResumeReading,
    Send,
    SessionCore,
    StartRelay,
    Unregister,
    UpstreamWrite,
)
from proxyorch.blacklist import Blacklist

CID = "0b0e6f9a-5a1c-4a43-9d0e-3c0f3f6f4c11"
DEV = "7d1a8f0e-2b64-4d2f-8b1e-5a7c9e0d1f22"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> Instant:
    return Instant(100.0 + seconds, T0 + timedelta(seconds=seconds))


def record(device: str | None = DEV, blocked: tuple[str, ...] = ()) -> CredentialRecord:
    lists = (("connection", Blacklist.compile(blocked)),) if blocked else ()
    return CredentialRecord(CID, b"", device, lists)


def core(**kw: object) -> SessionCore:
    return SessionCore(metrics=ProxyMetrics(), client_addr="192.0.2.7", **kw)  # type: ignore[arg-type]


def sent(actions: list) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def only(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def socks_creds(user: str = CID, password: str = "pw") -> bytes:
    u, p = user.encode(), password.encode()
    return b"\x05\x01\x02" + bytes((1, len(u))) + u + bytes((len(p),)) + p


def socks_connect(host: str = "example.com", port: int = 443, cmd: int = 1) -> bytes:
    h = host.encode()
    return bytes((5, cmd, 0, 3, len(h))) + h + port.to_bytes(2, "big")


def connect_head(target: str = "example.com:443", creds: tuple[str, str] | None = (CID, "pw")) -> bytes:
    auth = ""
    if creds is not None:
        auth = "Proxy-Authorization: Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() + "\r\n"
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode()


def socks_until_open(c: SessionCore, rec: CredentialRecord, host: str = "example.com") -> list:
    acts = c.receive_data(socks_creds(), at(0))
    assert sent(acts) == b"\x05\x02" and only(acts, Authenticate) == [Authenticate(CID, "pw")]
    assert c.phase is Phase.AUTHENTICATING
    acts = c.auth_result(rec, "", at(0.1))
    assert sent(acts) == b"\x01\x00"
    return acts + c.receive_data(socks_connect(host), at(0.2))


# -- SOCKS5 ---------------------------------------------------------------------------------------
def test_socks_success_opens_the_device_and_logs_the_row() -> None:
    c = core(open_timeout=7.0)
    assert c.start() == [ArmTimer(15.0)]
    acts = socks_until_open(c, record())
    assert OpenStream(DEV, "example.com", 443) in acts and ArmTimer(7.0) in acts and PauseReading() in acts
    assert c.phase is Phase.OPENING
    c.receive_data(b"early", at(0.25))  # client payload sent ahead of our reply is held
    acts = c.open_result(0, "", "93.184.216.34", "10.0.0.2", 4242, True, at(0.5))
    assert sent(acts) == b"\x05\x00\x00\x01\x0a\x00\x00\x02" + (4242).to_bytes(2, "big")
    assert StartRelay(b"early") in acts and Register() in acts and LeaveHandshake() in acts
    assert acts[-1] == ResumeReading() and DisarmTimer() in acts
    assert c.phase is Phase.RELAY and c.metrics.sessions_established == 1
    acts = c.client_lost(at(2.5), bytes_in=1000, bytes_out=50)
    assert Unregister() in acts
    (row,) = [a.row for a in only(acts, LogRow)]
    assert (row.connection_id, row.device_id, row.target, row.target_type, row.port) == (
        CID, DEV, "example.com:443", "domain", 443)
    assert (row.action, row.block_reason, row.reply_code, row.resolved_ip) == ("allowed", None, 0, "93.184.216.34")
    assert (row.bytes_in, row.bytes_out, row.protocol, row.client_addr) == (1000, 50, "socks5", "192.0.2.7")
    assert row.timestamp == at(0.2).wall and abs(row.duration_ms - 2300) <= 1
    assert c.client_lost(at(3), 1, 1) == [DisarmTimer()]  # one row per attempt


def test_socks_auth_failure_answers_0x01_and_closes_without_a_row() -> None:
    c = core()
    c.receive_data(socks_creds(password="wrong"), at(0))
    acts = c.auth_result(None, "invalid credentials", at(0.1))
    assert acts == [Send(b"\x01\x01"), Close()]
    assert c.metrics.auth_failures == 1
    assert only(c.client_lost(at(1)), LogRow) == []


def test_socks_offers_no_usable_method_gets_0xff() -> None:
    c = core()
    assert c.receive_data(b"\x05\x01\x00", at(0)) == [Send(b"\x05\xff"), Close()]


def test_socks_blacklisted_target_is_blocked_with_0x02_and_logged_blocked() -> None:
    c = core()
    acts = socks_until_open(c, record(blocked=("example.com",)), host="a.example.com")
    assert sent(acts).endswith(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00") and Close() in acts
    assert only(acts, OpenStream) == []
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.action, row.block_reason, row.reply_code) == ("blocked", "connection blacklist: example.com", 2)
    assert c.metrics.sessions_blocked == 1


def test_socks_no_device_is_0x03_and_device_offline_is_0x03() -> None:
    c = core()
    acts = socks_until_open(c, record(device=None))
    assert sent(acts).endswith(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.action, row.reply_code, row.error) == ("allowed", 3, "no device associated with this connection")

    c = core()
    socks_until_open(c, record())
    acts = c.open_unavailable(at(0.3))
    assert acts == [Send(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"), Close()]
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.reply_code, row.error) == (3, "device offline")


def test_socks_no_device_is_fine_for_an_exit_that_needs_none() -> None:
    c = core(needs_no_device=True)
    acts = socks_until_open(c, record(device=None))
    assert OpenStream(None, "example.com", 443) in acts


@pytest.mark.parametrize("rep", [ReplyCode.GENERAL_FAILURE, ReplyCode.NETWORK_UNREACHABLE, ReplyCode.HOST_UNREACHABLE,
                                 ReplyCode.CONNECTION_REFUSED, ReplyCode.TTL_EXPIRED])
def test_socks_open_failure_passes_the_device_code_through(rep: ReplyCode) -> None:
    c = core()
    socks_until_open(c, record())
    acts = c.open_result(rep, "nope", "198.51.100.1", "", 0, False, at(0.4))
    assert sent(acts) == bytes((5, rep, 0, 1, 0, 0, 0, 0, 0, 0)) and Close() in acts
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.action, row.block_reason, row.reply_code, row.error, row.resolved_ip) == (
        "allowed", None, int(rep), "nope", "198.51.100.1")
    assert c.metrics.sessions_failed == 1


def test_device_policy_refusal_is_logged_blocked_with_reply_code_kept() -> None:
    c = core()
    socks_until_open(c, record())
    acts = c.open_result(ReplyCode.NOT_ALLOWED, "target address is private", "10.1.2.3", "", 0, False, at(0.4))
    assert sent(acts) == b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.action, row.block_reason, row.reply_code, row.error) == (
        "blocked", DEVICE_POLICY, 2, "target address is private")
    assert c.metrics.sessions_blocked == 1 and c.metrics.sessions_failed == 0


def test_open_timeout_cancels_the_open_and_answers_0x06() -> None:
    c = core()
    socks_until_open(c, record())
    acts = c.timer_fired(at(15.5))
    assert acts[0] == CancelOpen() and sent(acts) == b"\x05\x06\x00\x01\x00\x00\x00\x00\x00\x00"
    assert c.open_result(0, "", "", "", 0, True, at(16)) == []  # too late: the adapter drops the stream


def test_handshake_timeout_aborts_a_silent_client() -> None:
    c = core()
    c.receive_data(b"\x05\x01", at(0))  # half a greeting
    assert c.timer_fired(at(15)) == [Close(abort=True)]


def test_socks_bind_command_is_0x07_without_a_row() -> None:
    c = core()
    c.receive_data(socks_creds(), at(0))
    c.auth_result(record(), "", at(0))
    acts = c.receive_data(socks_connect(cmd=2), at(0.1))
    assert acts == [Send(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"), Close()]
    assert only(c.client_lost(at(1)), LogRow) == []


def test_client_gone_while_opening_cancels_the_open() -> None:
    c = core()
    socks_until_open(c, record())
    acts = c.client_lost(at(1))
    assert CancelOpen() in acts and Unregister() not in acts
    (row,) = [a.row for a in only(acts, LogRow)]
    assert row.reply_code == 0 and row.action == "allowed"


def test_store_down_is_a_clear_refusal() -> None:
    c = core()
    c.receive_data(socks_creds(), at(0))
    assert c.auth_unavailable() == [Send(b"\x01\x01"), Close()]


# -- HTTP CONNECT -----------------------------------------------------------------------------------
def test_connect_success_answers_200_and_relays_bytes_sent_after_the_head() -> None:
    c = core()
    acts = c.receive_data(connect_head() + b"\x16\x03tls", at(0))
    assert only(acts, Authenticate) == [Authenticate(CID, "pw")] and sent(acts) == b""
    acts = c.auth_result(record(), "", at(0.1))
    assert OpenStream(DEV, "example.com", 443) in acts
    acts = c.open_result(0, "", "93.184.216.34", "", 0, True, at(0.2))
    assert sent(acts) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert StartRelay(b"\x16\x03tls") in acts
    (row,) = [a.row for a in only(c.client_lost(at(1), 10, 20), LogRow)]
    assert (row.protocol, row.reply_code, row.target) == ("http", 0, "example.com:443")


def test_connect_without_credentials_gets_407() -> None:
    c = core()
    acts = c.receive_data(connect_head(creds=None), at(0))
    assert sent(acts).startswith(b"HTTP/1.1 407 ") and b"Proxy-Authenticate: Basic" in sent(acts)
    assert acts[-1] == Close()


def test_connect_bad_password_gets_407_and_blacklist_403_and_offline_502() -> None:
    c = core()
    c.receive_data(connect_head(), at(0))
    assert sent(c.auth_result(None, "invalid credentials", at(0))).startswith(b"HTTP/1.1 407 ")

    c = core()
    c.receive_data(connect_head("bad.test:443"), at(0))
    acts = c.auth_result(record(blocked=("bad.test",)), "", at(0))
    assert sent(acts).startswith(b"HTTP/1.1 403 ")
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.action, row.reply_code) == ("blocked", 2)

    c = core()
    c.receive_data(connect_head(), at(0))
    c.auth_result(record(), "", at(0))
    assert sent(c.open_unavailable(at(0.1))).startswith(b"HTTP/1.1 502 ")

    c = core()
    c.receive_data(connect_head(), at(0))
    assert sent(c.auth_result(record(device=None), "", at(0))).startswith(b"HTTP/1.1 403 ")


@pytest.mark.parametrize(("rep", "status"), [(2, b"403"), (3, b"502"), (4, b"502"), (5, b"502"), (6, b"504"),
                                             (1, b"502")])
def test_connect_open_failure_maps_the_reply_code_to_a_status(rep: int, status: bytes) -> None:
    c = core()
    c.receive_data(connect_head(), at(0))
    c.auth_result(record(), "", at(0))
    assert sent(c.open_result(rep, "x", "", "", 0, False, at(0.1))).startswith(b"HTTP/1.1 " + status)


def test_invalid_target_host_is_0x04_for_socks_and_400_for_connect() -> None:
    c = core()
    acts = socks_until_open(c, record(), host="bad host")
    assert sent(acts).endswith(b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00") and only(acts, OpenStream) == []
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.action, row.reply_code, row.error) == ("allowed", 4, "invalid target host")

    c = core()
    c.receive_data(connect_head("a..b:443"), at(0))
    assert sent(c.auth_result(record(), "", at(0))).startswith(b"HTTP/1.1 400 ")


# -- absolute-form forwarding ---------------------------------------------------------------------
def forward_head(url: str = "http://example.com/a", creds: tuple[str, str] | None = (CID, "pw")) -> bytes:
    auth = ""
    if creds is not None:
        auth = "Proxy-Authorization: Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() + "\r\n"
    return f"GET {url} HTTP/1.1\r\nHost: example.com\r\n{auth}\r\n".encode()


def test_forward_request_is_authenticated_opened_and_rewritten_with_one_row_per_upstream() -> None:
    c = core()
    acts = c.receive_data(forward_head(), at(0))
    assert LeaveHandshake() in acts and DisarmTimer() in acts
    assert only(acts, Authenticate) == [Authenticate(CID, "pw")] and c.phase is Phase.FORWARD
    acts = c.auth_result(record(), "", at(0.1))
    assert Register() in acts
    (op,) = only(acts, OpenStream)
    assert (op.device_id, op.host, op.port) == (DEV, "example.com", 80) and op.upstream is not None
    acts = c.upstream_open_result(op.upstream, 0, "", "93.184.216.34", True, at(0.2))
    (w,) = only(acts, UpstreamWrite)
    assert w.data.startswith(b"GET /a HTTP/1.1\r\n") and b"Proxy-Authorization" not in w.data
    acts = c.upstream_data(op.upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", at(0.3))
    assert sent(acts).endswith(b"hi")
    # the same credentials on the next request of the connection: no second authentication
    acts = c.receive_data(forward_head("http://example.com/b"), at(0.4))
    assert only(acts, Authenticate) == [] and only(acts, UpstreamWrite)[0].data.startswith(b"GET /b ")
    acts = c.client_lost(at(1))
    assert CloseUpstreamStream(op.upstream) in acts and Unregister() in acts
    (row,) = [a.row for a in only(acts, LogRow)]
    assert (row.protocol, row.target, row.action, row.reply_code, row.resolved_ip) == (
        "http", "example.com:80", "allowed", 0, "93.184.216.34")
    assert row.bytes_in == len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi") and row.bytes_out > 0


def test_forward_blacklisted_and_device_policy_targets_are_blocked_403() -> None:
    c = core()
    c.receive_data(forward_head("http://bad.test/"), at(0))
    acts = c.auth_result(record(blocked=("bad.test",)), "", at(0))
    assert sent(acts).startswith(b"HTTP/1.1 403 ") and only(acts, OpenStream) == []
    (row,) = [a.row for a in only(acts, LogRow)]
    assert (row.action, row.block_reason, row.reply_code) == ("blocked", "connection blacklist: bad.test", 2)

    c = core()
    c.receive_data(forward_head(), at(0))
    (op,) = only(c.auth_result(record(), "", at(0)), OpenStream)
    acts = c.upstream_open_result(op.upstream, 2, "private target", "10.0.0.1", False, at(0.1))
    assert sent(acts).startswith(b"HTTP/1.1 403 ")
    (row,) = [a.row for a in only(acts, LogRow)]
    assert (row.action, row.block_reason, row.reply_code) == ("blocked", DEVICE_POLICY, 2)


def test_forward_offline_device_is_502_and_no_credentials_407() -> None:
    c = core()
    c.receive_data(forward_head(), at(0))
    (op,) = only(c.auth_result(record(), "", at(0)), OpenStream)
    acts = c.upstream_unavailable(op.upstream, at(0.1))
    assert sent(acts).startswith(b"HTTP/1.1 502 ")
    (row,) = [a.row for a in only(acts, LogRow)]
    assert (row.reply_code, row.error) == (3, "device offline")

    c = core()
    acts = c.receive_data(forward_head(creds=None), at(0))
    assert sent(acts).startswith(b"HTTP/1.1 407 ") and acts[-1] == Close()


# -- input split anywhere -------------------------------------------------------------------------
def _feed_split(c: SessionCore, data: bytes, cut: int, now: Instant) -> list:
    return c.receive_data(data[:cut], now) + (c.receive_data(data[cut:], now) if data[cut:] else [])


@pytest.mark.parametrize("cut", range(1, len(socks_creds()) + 1))
def test_socks_greeting_and_credentials_split_at_every_byte(cut: int) -> None:
    c = core()
    acts = _feed_split(c, socks_creds(), cut, at(0))
    assert sent(acts) == b"\x05\x02" and only(acts, Authenticate) == [Authenticate(CID, "pw")]


@pytest.mark.parametrize("cut", range(1, len(socks_connect()) + 1))
def test_socks_request_split_at_every_byte(cut: int) -> None:
    c = core()
    c.receive_data(socks_creds(), at(0))
    c.auth_result(record(), "", at(0))
    acts = _feed_split(c, socks_connect(), cut, at(0.1))
    assert only(acts, OpenStream) == [OpenStream(DEV, "example.com", 443)]


@pytest.mark.parametrize("cut", range(1, len(connect_head()) + 1, 7))
def test_connect_head_split_anywhere(cut: int) -> None:
    c = core()
    acts = _feed_split(c, connect_head(), cut, at(0))
    assert only(acts, Authenticate) == [Authenticate(CID, "pw")] and sent(acts) == b""


def test_pipelined_socks_handshake_in_one_write_waits_for_the_auth_answer() -> None:
    c = core()
    acts = c.receive_data(socks_creds() + socks_connect() + b"GET / HTTP/1.1\r\n\r\n", at(0))
    assert only(acts, OpenStream) == []  # the request waits for the credential check
    acts = c.auth_result(record(), "", at(0.1))
    assert only(acts, OpenStream) == [OpenStream(DEV, "example.com", 443)]
    acts = c.open_result(0, "", "1.2.3.4", "0.0.0.0", 0, True, at(0.2))
    assert StartRelay(b"GET / HTTP/1.1\r\n\r\n") in acts
