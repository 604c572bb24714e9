"""Which targets the device agent refuses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_tunnel.target_policy import is_forbidden_address, parse_ip_literal, parse_ipv4_loose


def forbidden(host: str) -> bool:
    address = parse_ip_literal(host)
    assert address is not None, host
    return is_forbidden_address(address)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("[::ffff:169.254.169.254]", "169.254.169.254"),
        ("1.1.1.1", "1.1.1.1"),
    ],
)
def test_ip_literals_are_parsed_like_a_resolver_does(host: str, expected: str) -> None:
    assert parse_ip_literal(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host", ["example.com", "localhost", "256.0.0.1", "1.2.3.4.5", "09.1.1.1", "", "[::1", "1:2"]
)
def test_names_and_invalid_literals_are_not_ip_literals(host: str) -> None:
    assert parse_ip_literal(host) is None


def test_loose_ipv4_parser_separates_names_from_bad_numbers() -> None:
    assert parse_ipv4_loose("host") is None
    assert parse_ipv4_loose("1.2.3.x") is None
    with pytest.raises(ValueError):
        parse_ipv4_loose("1.2.3.256")
    with pytest.raises(ValueError):
        parse_ipv4_loose("4294967296")


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.255.255.254",
        "2130706433",
        "0x7f.1",
        "127.1",
        "[::1]",
        "::ffff:127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",  # CGNAT
        "169.254.169.254",  # cloud metadata
        "169.254.0.1",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.9",
        "198.18.0.1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "ff02::1",
        "2001:db8::1",
        "::127.0.0.1",  # deprecated IPv4-compatible
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::1",  # local-use NAT64
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
        "::ffff:0:a00:1",  # IPv4-translated 10.0.0.1
        "100::1",  # discard
    ],
)
def test_special_purpose_addresses_are_forbidden(host: str) -> None:
    assert forbidden(host)


@pytest.mark.parametrize(
    "host",
    [
        "1.1.1.1",
        "8.8.8.8",
        "93.184.216.34",
        "2606:4700::1111",
        "2a00:1450:4001::200e",
        "::ffff:1.1.1.1",
        "64:ff9b::101:101",
        "2002:101:101::1",
    ],
)
def test_public_addresses_are_allowed(host: str) -> None:
    assert not forbidden(host)


def test_scoped_link_local_is_forbidden() -> None:
    assert is_forbidden_address(ipaddress.IPv6Address("fe80::1%eth0"))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv4_mapped_and_nat64_forms_agree_with_the_ipv4_address(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    verdict = is_forbidden_address(v4)
    assert is_forbidden_address(ipaddress.IPv6Address((0xFFFF << 32) | value)) == verdict
    assert (
        is_forbidden_address(ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value))
        == verdict
    )
    assert parse_ip_literal(str(value)) == v4


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_arbitrary_text_never_raises(host: str) -> None:
    address = parse_ip_literal(host)
    if address is not None:
        is_forbidden_address(address)
