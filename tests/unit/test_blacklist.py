"""Blacklist normalisation and matching."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyorch.blacklist import Blacklist, first_match, normalize_host, parse_ip


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--BCHER-kva.example", "xn--bcher-kva.example"),
        ("example\u3002com", "example.com"),  # ideographic full stop is a label separator
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("\uff11\uff12\uff17.0.0.1", "127.0.0.1"),  # full-width digits map to ASCII under IDNA
        ("[2001:DB8:0:0::1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("[::ffff:7f00:1]", "127.0.0.1"),
    ],
)
def test_hosts_are_normalised(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "a..b",
        "exa mple.com",
        "example.com/x",
        "user@example.com",
        "example.com:80",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4) + ".com",
        "256.1.1.1",
        "1.2.3.4.5",
        "08.0.0.1",
        "[1.2.3.4]",
        "[::1",
        "fe80::1%eth0",
        "evil.com\uff0fx",  # full-width solidus becomes '/' under IDNA
    ],
)
def test_invalid_hosts_raise_value_error(host: str) -> None:
    with pytest.raises(ValueError):
        normalize_host(host)


def test_parse_ip_returns_addresses_for_literals_and_none_for_names() -> None:
    assert parse_ip("0x7f.1") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_ip("[::1]") == ipaddress.IPv6Address("::1")
    assert parse_ip("example.com") is None
    assert parse_ip("host1") is None


def test_domain_entry_blocks_itself_and_subdomains_on_whole_labels() -> None:
    blacklist = Blacklist.compile(["example.com"])
    for host in ["example.com", "a.example.com", "A.Example.COM.", "x.y.z.example.com"]:
        assert blacklist.match(host) == "example.com"
    for host in ["badexample.com", "example.com.evil.net", "example.co", "com", "xample.com"]:
        assert blacklist.match(host) is None


def test_wildcard_and_leading_dot_entries_mean_the_domain() -> None:
    blacklist = Blacklist.compile(["*.example.com", ".example.org"])
    assert blacklist.match("example.com") == "example.com"
    assert blacklist.match("www.example.org") == "example.org"
    assert blacklist.invalid == ()


def test_idn_entry_and_punycode_target_match_both_ways() -> None:
    assert Blacklist.compile(["bücher.example"]).match("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert (
        Blacklist.compile(["xn--bcher-kva.example"]).match("shop.BÜCHER.example") == "xn--bcher-kva.example"
    )


def test_cidr_and_exact_ip_entries_match_ip_literals() -> None:
    blacklist = Blacklist.compile(["10.0.0.0/8", "1.2.3.4", "2001:db8::/32", "192.168.1.7/24"])
    assert blacklist.match("10.200.0.1") == "10.0.0.0/8"
    assert blacklist.match("1.2.3.4") == "1.2.3.4"
    assert blacklist.match("1.2.3.5") is None
    assert blacklist.match("[2001:db8:ffff::1]") == "2001:db8::/32"
    assert blacklist.match("2001:db9::1") is None
    assert blacklist.match("192.168.1.200") == "192.168.1.0/24"
    assert blacklist.match("10.example.com") is None


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "127.1", "0177.0.0.1", "127.0.0.1.", "::ffff:127.0.0.1"]
)
def test_odd_ipv4_spellings_match_a_loopback_cidr(host: str) -> None:
    assert Blacklist.compile(["127.0.0.0/8"]).match(host) == "127.0.0.0/8"


def test_ipv4_mapped_ipv6_entries_and_targets_match_as_ipv4() -> None:
    blacklist = Blacklist.compile(["::ffff:10.0.0.0/104", "::ffff:8.8.8.8"])
    assert blacklist.match("10.1.2.3") == "10.0.0.0/8"
    assert blacklist.match("[::ffff:8.8.8.8]") == "8.8.8.8"


def test_domain_entries_do_not_match_ip_targets_and_ip_entries_do_not_match_names() -> None:
    blacklist = Blacklist.compile(["1.2.3.4", "example.com"])
    assert blacklist.match("4.3.2.1.in-addr.arpa") is None
    assert blacklist.match("1.2.3.4.example.net") is None


def test_invalid_entries_are_skipped_and_listed() -> None:
    entries = ["good.example", "bad entry", "10.0.0.0/33", "*.1.2.3.4", "a/b", "", "   ", "x" * 64 + ".com"]
    blacklist = Blacklist.compile(entries)
    assert len(blacklist) == 1
    assert blacklist.invalid == ("bad entry", "10.0.0.0/33", "*.1.2.3.4", "a/b", "x" * 64 + ".com")
    assert blacklist.match("good.example") == "good.example"


def test_duplicate_entries_count_once_and_empty_blacklist_matches_nothing() -> None:
    assert (
        len(Blacklist.compile(["Example.com", "example.com.", "*.example.com", "10.0.0.1", "10.0.0.1/32"]))
        == 2
    )
    assert len(Blacklist.EMPTY) == 0
    assert Blacklist.EMPTY.match("example.com") is None


def test_unnormalisable_host_matches_nothing() -> None:
    assert Blacklist.compile(["com"]).match("bad host.com") is None


def test_first_match_reports_the_first_scope_that_blocks() -> None:
    lists = [
        ("global", Blacklist.compile(["ads.example"])),
        ("device", Blacklist.compile(["example.com", "10.0.0.0/8"])),
        ("connection", Blacklist.compile(["www.example.com"])),
    ]
    assert first_match("WWW.example.com", lists) == ("device", "example.com")
    assert first_match("www.example.com", lists[2:]) == ("connection", "www.example.com")
    assert first_match("0x0a.1", lists) == ("device", "10.0.0.0/8")
    assert first_match("example.org", lists) is None
    assert first_match("not a host", lists) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_matching_arbitrary_text_never_raises(host: str) -> None:
    blacklist = Blacklist.compile(["example.com", "10.0.0.0/8", "::1"])
    blacklist.match(host)
    try:
        normalized = normalize_host(host)
    except ValueError:
        return
    assert normalize_host(normalized) == normalized  # idempotent


@settings(max_examples=300, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=5))
def test_every_subdomain_of_an_entry_matches(labels: list[str]) -> None:
    blacklist = Blacklist.compile(["example.com"])
    assert blacklist.match(".".join([*labels, "example", "com"])) == "example.com"
    assert blacklist.match(".".join(labels) + "example.com") is None
