"""Limits and access modes, sans-I/O: token buckets, session slots, quota, ip_only index, and the
session core's decisions with them (clock passed in, no sockets)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from test_session_core import CID, at, only, sent, socks_connect, socks_creds

from proxy.access import AccessIndex
from proxy.auth_cache.cache import CredentialRecord
from proxy.limits import LimitBook, TokenBucket
from proxy.session_core import Authenticate, Close, LogRow, OpenStream, Phase, ProxyMetrics, SessionCore
from proxyorch.limits_model import EPOCH, Limits, address_allowed, parse_network, period_start, usage_rows
from rms.limits import validate_access, validate_limits
from rms.service import RmsError

T0 = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)


def rec(**limits: object) -> CredentialRecord:
    return CredentialRecord(CID, b"", "dev", (), limits=Limits(**limits))  # type: ignore[arg-type]


# -- token bucket ----------------------------------------------------------------------------------
def test_bucket_burst_is_half_a_second_and_never_gives_more_than_its_tokens() -> None:
    b = TokenBucket(1000, now=0.0)
    assert b.take(262_144, 0.0) == 500         # a whole socket read gets only the burst: 0.5 s of the rate
    assert b.take(100, 0.0) == 0                # nothing more until tokens come back
    assert b.until(100, 0.0) == pytest.approx(0.1)
    sent_bytes, t = 500, 0.0
    while t < 10.0:                             # a source that always has 256 KiB waiting
        t += b.until(262_144, t) or 0.001
        sent_bytes += b.take(262_144, t)
    assert 1000 * 10 <= sent_bytes <= 1000 * 10 + 500 + 100  # the rate plus the burst, not plus a read


def test_bucket_wakes_a_waiting_source_for_a_grain_not_for_every_byte() -> None:
    b = TokenBucket(50_000, now=0.0)
    b.take(25_000, 0.0)
    assert b.grain() == 4096 and b.until(262_144, 0.0) == pytest.approx(4096 / 50_000)
    assert TokenBucket(10, 0.0).grain() == 5    # never more than the burst


def test_bucket_rate_change_applies_to_the_next_bytes() -> None:
    b = TokenBucket(1000, 0.0)
    b.take(500, 0.0)
    b.set_rate(100, 0.0)
    assert b.burst == 50 and b.take(100, 0.0) == 0 and b.until(50, 0.0) == pytest.approx(0.5)


def test_leased_bucket_only_fills_from_grants() -> None:
    b = TokenBucket(1000, 0.0, leased=True)
    assert b.tokens == 0 and b.want() == 100   # one 100 ms slice
    b.grant(10_000)
    assert b.tokens == 100                      # capped at a slice
    assert b.take(150, 5.0) == 100 and b.take(1, 10.0) == 0  # no refill by time
    assert b.until(50, 10.0) == pytest.approx(0.05)         # the next lease tick


# -- session slots and quota -----------------------------------------------------------------------
def test_session_cap_refuses_the_next_and_release_admits_one() -> None:
    book = LimitBook()
    r = rec(max_concurrent_sessions=2)
    assert book.admit(r, 0, T0) is None and book.admit(r, 0, T0) is None
    refusal = book.admit(r, 0, T0)
    assert refusal is not None and refusal.block_reason == "sessions" and refusal.retry_after and refusal.rep == 2
    book.release(CID)
    assert book.admit(r, 0, T0) is None


def test_quota_lets_through_exactly_what_is_left_then_refuses() -> None:
    book = LimitBook()
    r = CredentialRecord(CID, b"", "dev", (), limits=Limits(quota_bytes=1000, quota_period="total"), used_bytes=900)
    assert book.admit(r, 0, T0) is None
    st = book.states[CID]
    assert st.allow(250) == 100
    st.count(100)
    assert st.exhausted()
    refusal = book.admit(r, 0, T0)
    assert refusal is not None and refusal.block_reason == "quota" and refusal.http_status == 403


def test_flush_moves_bytes_once_and_reads_back_other_nodes() -> None:
    book = LimitBook()
    r = rec(quota_bytes=10_000, quota_period="day")
    book.admit(r, 0, T0)
    st = book.states[CID]
    st.count(300)
    [(same, delta)] = book.take_increments()
    assert same is st and delta == 300 and st.used() == 300
    st.count(50)                          # relayed while the flush is in flight
    book.flushed(st, 300, 300 + 1000)     # another node added 1000
    assert st.used() == 1350 and book.take_increments()[0][1] == 50


def test_leasing_relays_only_the_lease_and_stops_when_it_is_void() -> None:
    book = LimitBook()
    book.leasing = True
    r = rec(quota_bytes=1_000_000, quota_period="total")
    assert book.admit(r, 0.0, T0) is None
    st = book.states[CID]
    assert st.allow(100, 0.0) == 0 and st.wants_lease(0.0)   # nothing before a lease
    st.lease_asked = True
    assert not st.wants_lease(0.0)                           # one request at a time
    st.leased(granted=300, used=0, others=0, asked_at=0.0)
    assert st.allow(1000, 1.0) == 300 and not st.exhausted()
    st.count(300)
    assert st.allow(1, 1.0) == 0 and st.wants_lease(1.0)
    st.leased(granted=500, used=0, others=0, asked_at=1.0)
    assert st.allow(1000, 1.0 + 9.9) == 500
    assert st.allow(1000, 1.0 + 10.0) == 0                   # past LEASE_TTL_S without renewal: void


def test_no_grant_waits_while_another_node_holds_a_lease_and_is_spent_when_none_does() -> None:
    book = LimitBook()
    book.leasing = True
    book.admit(rec(quota_bytes=1000, quota_period="total"), 0.0, T0)
    st = book.states[CID]
    st.leased(granted=0, used=600, others=400, asked_at=0.0)  # another node holds the rest
    assert not st.spent and not st.exhausted()
    st.leased(granted=0, used=1000, others=0, asked_at=0.1)
    assert st.spent and st.exhausted()
    refusal = book.admit(rec(quota_bytes=1000, quota_period="total"), 0.2, T0)
    assert refusal is not None and refusal.block_reason == "quota"
    book.state(rec(quota_bytes=5000, quota_period="total"), 0.3, T0)  # a raised quota: ask again
    assert not st.spent and not st.exhausted()


def test_flush_gives_back_an_idle_or_expired_lease_and_renews_the_rest() -> None:
    book = LimitBook()
    book.leasing = True
    book.admit(rec(quota_bytes=10_000, quota_period="total"), 0.0, T0)
    st = book.states[CID]
    st.leased(granted=4000, used=0, others=0, asked_at=0.0)
    st.count(1000)
    [(_, delta)] = book.take_increments(1.0)       # in use: kept
    assert delta == 1000 and st.lease == 3000 and st.give_back == 0
    book.flushed(st, delta, 1000, 0, renewed_at=1.0)
    assert st.lease_until == pytest.approx(11.0)
    book.take_increments(2.0)                      # nothing relayed since: the lease goes back
    assert st.lease == 0 and st.give_back == 3000
    book.flushed(st, 0, 1000, 3000, renewed_at=2.0)
    assert st.give_back == 0


def test_usage_periods_are_utc_day_month_and_total() -> None:
    assert period_start("day", None, T0) == ("day", datetime(2026, 3, 15, tzinfo=UTC))
    assert period_start("month", None, T0) == ("month", datetime(2026, 3, 1, tzinfo=UTC))
    set_at = T0 - timedelta(days=3)
    assert period_start("total", set_at, T0) == ("total", set_at)
    assert period_start(None, None, T0) == ("total", EPOCH)
    rows = usage_rows(Limits(quota_bytes=1, quota_period="total", quota_start=set_at), T0)
    assert ("total", set_at) in rows and ("total", EPOCH) in rows and len(rows) == 4


# -- addresses -------------------------------------------------------------------------------------
def test_ipv4_mapped_forms_are_normalised_on_both_sides() -> None:
    assert str(parse_network("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    assert address_allowed("::ffff:10.1.2.3", (parse_network("10.0.0.0/8"),))
    assert address_allowed("10.1.2.3", (parse_network("::ffff:10.0.0.0/104"),))
    assert not address_allowed("11.0.0.1", (parse_network("10.0.0.0/8"),))
    assert address_allowed("2001:db8::5", (parse_network("2001:db8::/64"),))
    idx = AccessIndex()
    idx.replace([("c1", ["192.0.2.0/24"]), ("c2", ["2001:db8::/32", "bogus"])])
    assert idx.match("::ffff:192.0.2.9") == "c1" and idx.match("2001:db8::1") == "c2" and idx.match("10.0.0.1") is None


@pytest.mark.parametrize("body", [{"download_bytes_per_s": -1}, {"download_bytes_per_s": 0}, {"quota_bytes": "1"},
                                  {"quota_bytes": 1.0}, {"quota_period": "week"}, {"max_concurrent_sessions": True},
                                  {"nope": 1}])
def test_bad_limit_bodies_are_refused(body: dict) -> None:
    with pytest.raises(RmsError) as e:
        validate_limits(body)
    assert e.value.status == 400


@pytest.mark.parametrize("body", [{"mode": "ip_only", "allowed_ips": []}, {"mode": "x"}, {"mode": "ip_only",
                                  "allowed_ips": ["300.1.1.1"]}, {"mode": "ip_only", "allowed_ips": ["10.0.0.1/8"]},
                                  {"mode": "ip_only", "allowed_ips": [5]}, {"mode": "password", "more": 1}])
def test_bad_access_bodies_are_refused(body: dict) -> None:
    with pytest.raises(RmsError) as e:
        validate_access(body)
    assert e.value.status == 400


@pytest.mark.parametrize("ips", [["0.0.0.0/0"], ["::/0"], ["::ffff:0:0/96"], ["10.0.0.0/8", "11.0.0.0/8"],
                                 ["2001:db8::/31"], ["0.0.0.0/1", "128.0.0.0/1"]])
def test_an_ip_only_list_wider_than_a_slash_8_or_a_v6_slash_32_is_refused_as_an_open_proxy(ips: list) -> None:
    with pytest.raises(RmsError, match="open proxy") as e:
        validate_access({"mode": "ip_only", "allowed_ips": ips})
    assert e.value.status == 400


def test_ip_only_takes_up_to_a_slash_8_overlaps_counted_once_and_password_and_ip_any_width() -> None:
    assert validate_access({"mode": "ip_only", "allowed_ips": ["10.0.0.0/8", "10.1.0.0/16"]})[0] == "ip_only"
    assert validate_access({"mode": "ip_only", "allowed_ips": ["2001:db8::/32", "10.0.0.0/8"]})[0] == "ip_only"
    assert validate_access({"mode": "password_and_ip", "allowed_ips": ["0.0.0.0/0", "::/0"]})[1] == ["0.0.0.0/0", "::/0"]


# -- the session core with limits and access --------------------------------------------------------
def test_socks_no_auth_greeting_gets_0xff_unless_the_address_is_on_an_ip_only_list() -> None:
    idx = AccessIndex()
    idx.replace([(CID, ["192.0.2.0/24"])])
    outside = SessionCore(metrics=ProxyMetrics(), client_addr="198.51.100.1", access=idx)
    acts = outside.receive_data(b"\x05\x01\x00", at(0))
    assert sent(acts) == b"\x05\xff" and only(acts, Close)
    inside = SessionCore(metrics=ProxyMetrics(), client_addr="192.0.2.7", access=idx)
    acts = inside.receive_data(b"\x05\x01\x00" + socks_connect(), at(0))  # request sent ahead
    assert sent(acts) == b"\x05\x00" and only(acts, Authenticate) == [Authenticate(CID, "", True)]
    r = rec(access_mode="ip_only", allowed_ips=(parse_network("192.0.2.0/24"),))
    acts = inside.auth_result(r, "", at(0.1))
    assert sent(acts) == b"" and only(acts, OpenStream)  # no RFC 1929 reply after method 0x00


def test_session_limit_refusal_is_0x02_and_a_blocked_row_with_reason_sessions() -> None:
    book = LimitBook()
    r = rec(max_concurrent_sessions=1)
    first = SessionCore(metrics=ProxyMetrics(), client_addr="192.0.2.7", gate=book)
    first.receive_data(socks_creds(), at(0))
    assert only(first.auth_result(r, "", at(0)) + first.receive_data(socks_connect(), at(0)), OpenStream)
    second = SessionCore(metrics=ProxyMetrics(), client_addr="192.0.2.7", gate=book)
    second.receive_data(socks_creds(), at(0))
    acts = second.auth_result(r, "", at(0)) + second.receive_data(socks_connect(), at(0))
    assert sent(acts).endswith(bytes([5, 2, 0, 1, 0, 0, 0, 0, 0, 0])) and second.phase is Phase.CLOSED
    [row] = only(second.client_lost(at(1)), LogRow)
    assert (row.row.action, row.row.block_reason) == ("blocked", "sessions")
    first.client_lost(at(2))
    assert book.live_usage(CID) == (0, 0)


def test_http_session_limit_is_429_with_retry_after() -> None:
    from test_session_core import connect_head

    book = LimitBook()
    r = rec(max_concurrent_sessions=1)
    book.admit(r, 0, T0)
    c = SessionCore(metrics=ProxyMetrics(), client_addr="192.0.2.7", gate=book)
    c.receive_data(connect_head(), at(0))
    out = sent(c.auth_result(r, "", at(0)))
    assert out.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in out


def test_absolute_form_session_limit_is_429_with_retry_after() -> None:
    book = LimitBook()
    r = rec(max_concurrent_sessions=1)
    book.admit(r, 0, T0)
    c = SessionCore(metrics=ProxyMetrics(), client_addr="192.0.2.7", gate=book)
    import base64
    auth = base64.b64encode(f"{CID}:pw".encode()).decode()
    acts = c.receive_data(f"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
                          f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode(), at(0))
    assert only(acts, Authenticate)
    acts = c.auth_result(r, "", at(0))
    out = sent(acts)
    assert out.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in out
    [row] = [a for a in acts + c.client_lost(at(1)) if isinstance(a, LogRow)]
    assert (row.row.action, row.row.block_reason) == ("blocked", "sessions")
