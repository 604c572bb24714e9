"""Registrable domains (public suffix list) and the session registry's live view, without sockets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy.request_log.domains import registrable_domain
from proxy.sessions import SessionRegistry


@pytest.mark.parametrize(("target", "domain"), [
    ("a.b.example.co.uk:443", "example.co.uk"),
    ("example.co.uk:80", "example.co.uk"),
    ("WWW.Example.COM.:443", "example.com"),
    ("a.b.c.kawasaki.jp:443", "b.c.kawasaki.jp"),      # *.kawasaki.jp is an ICANN wildcard rule
    ("www.city.kawasaki.jp:443", "city.kawasaki.jp"),  # !city.kawasaki.jp is an exception rule
    ("x.y.blogspot.com:443", "blogspot.com"),          # blogspot.com is in the PRIVATE section: ignored
    ("a.b.shop.test:8080", "shop.test"),                # private-use TLD: last two labels
    ("deep.name.internal:1", "name.internal"),
    ("localhost:8000", "localhost"),
    ("co.uk:443", "co.uk"),                             # a bare public suffix groups by itself
    ("10.1.2.3:443", "10.1.2.3"),
    ("[2001:DB8::1]:443", "2001:db8::1"),
])
def test_targets_group_by_registrable_domain(target: str, domain: str) -> None:
    assert registrable_domain(target) == domain


class FakeSession:
    def __init__(self, cid: str, did: str, started: float) -> None:
        self.connection_id, self.device_id = cid, did
        self.client_addr, self.protocol = "127.0.0.9", "socks5"
        self.target_host, self.target_port = "example.com", 443
        self.started, self.started_wall = started, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        self.bytes_in = self.bytes_out = 0

    def terminate(self, reason: str) -> None:
        pass


def test_rates_are_over_the_last_five_seconds_of_samples() -> None:
    reg = SessionRegistry()
    s = FakeSession("c1", "d1", started=100.0)
    reg.add(s)
    for t in range(101, 121):  # 1 MB/s down for 10 s, then 100 kB/s down; 1 kB/s up throughout
        s.bytes_in += 1_000_000 if t <= 110 else 100_000
        s.bytes_out += 1_000
        reg.sample(float(t))
    [row] = reg.snapshot(120.0, "n1")
    assert row["bytesIn"] == 11_000_000 and row["bytesOut"] == 20_000
    assert row["rateIn"] == 100_000.0 and row["rateOut"] == 1_000.0
    assert row["target"] == "example.com:443" and row["startedAt"] == "2026-01-02T03:04:05.000Z"
    assert row["node"] == "n1" and row["clientAddress"] == "127.0.0.9" and row["protocol"] == "socks5"


def test_young_session_rate_counts_from_its_start() -> None:
    reg = SessionRegistry()
    s = FakeSession("c1", "d1", started=10.0)
    reg.add(s)
    s.bytes_in = 4_000
    reg.sample(12.0)
    [row] = reg.snapshot(12.0, "n1")
    assert row["rateIn"] == 2_000.0


def test_snapshot_filters_by_connection_or_device_and_forgets_closed_sessions() -> None:
    reg = SessionRegistry()
    a, b, c = FakeSession("c1", "d1", 1.0), FakeSession("c2", "d1", 1.0), FakeSession("c3", "d2", 1.0)
    for s in (a, b, c):
        reg.add(s)
    reg.sample(2.0)
    assert {r["connectionId"] for r in reg.snapshot(3.0, "n")} == {"c1", "c2", "c3"}
    assert {r["connectionId"] for r in reg.snapshot(3.0, "n", connection_ids={"c3"}, device_ids=set())} == {"c3"}
    assert {r["connectionId"] for r in reg.snapshot(3.0, "n", connection_ids={"c3"}, device_ids={"d1"})} == \
        {"c1", "c2", "c3"}
    assert reg.snapshot(3.0, "n", connection_ids=set(), device_ids=set()) == []
    reg.remove(a)
    assert a not in reg._samples and len(reg.snapshot(3.0, "n")) == 2
