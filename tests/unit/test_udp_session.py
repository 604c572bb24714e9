"""UDP ASSOCIATE in the sans-I/O session core and the association's per-datagram decisions."""

from __future__ import annotations

from test_session_core import CID, DEV, at, core, only, record, sent, socks_connect, socks_creds

from proxy.session_core import (
    ArmTimer,
    Close,
    LogRow,
    OpenStream,
    Phase,
    Register,
    StartUdp,
    Unregister,
)
from proxy.socks5.udp import build_udp_header
from proxy.udp_association import UdpAssociation, UdpMetrics

CLIENT = "192.0.2.7"


def associate(c, rec, announced_port: int = 40000) -> list:
    c.receive_data(socks_creds(), at(0))
    c.auth_result(rec, "", at(0.1))
    req = b"\x05\x03\x00\x01" + bytes((192, 0, 2, 7)) + announced_port.to_bytes(2, "big")
    return c.receive_data(req, at(0.2))


def test_udp_associate_opens_a_udp_stream_and_replies_with_the_relay_address() -> None:
    c = core(open_timeout=7.0)
    acts = associate(c, record())
    assert OpenStream(DEV, "192.0.2.7", 40000, udp=True) in acts and ArmTimer(7.0) in acts
    assert c.phase is Phase.OPENING
    acts = c.open_result(0, "", "", "127.0.0.1", 5300, True, at(0.3))
    assert sent(acts) == b"\x05\x00\x00\x01\x7f\x00\x00\x01" + (5300).to_bytes(2, "big")
    assert StartUdp() in acts and Register() in acts
    assert c.phase is Phase.UDP and c.udp is not None
    assert c.metrics.udp.associations_active == 1
    assert c.receive_data(b"junk on the control connection", at(0.4)) == []
    assert c.timer_fired(at(99)) == []


def test_udp_row_names_the_first_target_and_counts_payload_bytes() -> None:
    c = core()
    associate(c, record())
    c.open_result(0, "", "", "127.0.0.1", 5300, True, at(0.3))
    udp = c.udp
    assert udp is not None
    dg = build_udp_header("198.51.100.9", 53) + b"q" * 30
    host, port, payload = udp.from_client(dg, (CLIENT, 40000))
    udp.sent_to_device(host, port, len(payload))
    udp.sent_to_device("example.org", 443, 100)
    assert udp.from_device("198.51.100.9", 53, 70) is not None
    udp.sent_to_client(70)
    acts = c.client_lost(at(5), bytes_in=999, bytes_out=999)
    assert Unregister() in acts
    (row,) = [a.row for a in only(acts, LogRow)]
    assert (row.protocol, row.target, row.port, row.action, row.connection_id) == (
        "udp", "198.51.100.9:53", 53, "allowed", CID)
    assert (row.bytes_out, row.bytes_in, row.resolved_ip, row.error) == (130, 70, "198.51.100.9", "")
    assert c.metrics.udp.associations_active == 0


def test_udp_associate_without_a_device_is_refused_with_0x03() -> None:
    c = core()
    acts = associate(c, record(device=None))
    assert sent(acts)[-10:][:2] == b"\x05\x03" and Close() in acts


def test_device_without_udp_answers_0x07() -> None:
    c = core()
    associate(c, record())
    acts = c.open_result(7, "the device does not support UDP", "", "0.0.0.0", 0, False, at(0.3))
    assert sent(acts)[:2] == b"\x05\x07" and Close() in acts
    assert c.phase is Phase.CLOSED


def test_connect_still_works_beside_udp() -> None:
    c = core()
    c.receive_data(socks_creds(), at(0))
    c.auth_result(record(), "", at(0.1))
    assert OpenStream(DEV, "example.com", 443) in c.receive_data(socks_connect(), at(0.2))


def assoc(announced: int = 40000, blocked: tuple[str, ...] = ()) -> UdpAssociation:
    return UdpAssociation(record(blocked=blocked), CLIENT, announced, UdpMetrics())


def test_only_the_tcp_clients_ip_and_announced_port_are_accepted() -> None:
    a = assoc()
    dg = build_udp_header("198.51.100.9", 53) + b"x"
    assert a.from_client(dg, ("203.0.113.5", 40000)) is None
    assert a.from_client(dg, (CLIENT, 40001)) is None
    assert a.from_client(dg, (CLIENT, 40000)) is not None
    assert a.dropped["foreign_source"] == 2 and a.metrics.dropped["foreign_source"] == 2


def test_port_zero_locks_on_the_first_port_seen() -> None:
    a = assoc(announced=0)
    assert a.from_device("198.51.100.9", 53, 1) is None  # no client address yet
    dg = build_udp_header("198.51.100.9", 53) + b"x"
    assert a.from_client(dg, ("::ffff:" + CLIENT, 41000)) is not None  # v4-mapped is the same client
    assert a.client_addr == (CLIENT, 41000)
    assert a.from_client(dg, (CLIENT, 41001)) is None
    assert a.dropped["no_client"] == 1


def test_fragments_malformed_and_blocked_datagrams_are_dropped_and_counted() -> None:
    a = assoc(blocked=("blocked.test", "198.51.100.0/24"))
    ok = build_udp_header("203.0.113.9", 53) + b"x"
    frag = b"\x00\x00\x01" + ok[3:]
    cases = [(frag, "fragment"), (b"\x00\x00", "malformed"), (b"\x00\x00\x00\x09" + ok[4:], "malformed"),
             (build_udp_header("a.blocked.test", 53) + b"x", "blocked"),
             (build_udp_header("198.51.100.1", 53) + b"x", "blocked"),
             (build_udp_header("198.51.100.1", 0) + b"x", "malformed")]
    for datagram, reason in cases:
        before = a.dropped[reason]
        assert a.from_client(datagram, (CLIENT, 40000)) is None, reason
        assert a.dropped[reason] == before + 1, reason
    assert a.from_client(ok, (CLIENT, 40000)) is not None
    assert a.first_blocked is not None and a.first_blocked[:2] == ("a.blocked.test", 53)
    assert "fragment 1" in a.summary() and "blocked 2" in a.summary()
    assert "proxyorch_udp_fragments_dropped_total 1" in a.metrics.lines()


def test_an_association_that_only_hit_the_blacklist_logs_blocked() -> None:
    c = core()
    associate(c, record(blocked=("blocked.test",)))
    c.open_result(0, "", "", "127.0.0.1", 5300, True, at(0.3))
    assert c.udp is not None
    assert c.udp.from_client(build_udp_header("blocked.test", 53) + b"x", (CLIENT, 40000)) is None
    (row,) = [a.row for a in only(c.client_lost(at(1)), LogRow)]
    assert (row.action, row.target, row.block_reason) == ("blocked", "blocked.test:53", "connection blacklist: blocked.test")
