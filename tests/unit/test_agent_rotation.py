"""The agent's parsing of its rotate command's output and of IP-echo answers."""

from __future__ import annotations

import pytest

from device_tunnel.rotation import parse_echo_body, parse_source_address


def test_source_address_line_is_found_and_the_last_valid_one_wins():
    assert parse_source_address("toggling\nsource_address=10.1.2.3\n") == "10.1.2.3"
    assert parse_source_address("source_address=10.0.0.1\n  source_address = 2001:db8::1 \n") == "2001:db8::1"
    assert parse_source_address("source_address=10.0.0.1\nsource_address=not-an-ip\n") == "10.0.0.1"
    assert parse_source_address("nothing here\nsource_address\n") is None
    assert parse_source_address("") is None


def test_echo_body_is_an_address_or_json_with_ip():
    assert parse_echo_body(b"203.0.113.9\n") == "203.0.113.9"
    assert parse_echo_body(b'{"ip": "2001:db8::5", "country": "US"}') == "2001:db8::5"
    for bad in (b"", b"hello", b'{"ip": 5}', b'{"address": "1.2.3.4"}', b"{broken", b'["1.2.3.4"]'):
        with pytest.raises(ValueError):
            parse_echo_body(bad)
