"""The SOCKS5 UDP request header (RFC 1928 section 7), byte by byte."""

from __future__ import annotations

import pytest

from proxy.socks5.udp import UdpHeaderError, build_udp_header, parse_udp_packet

IPV4 = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35"
IPV6 = b"\x00\x00\x00\x04" + bytes(15) + b"\x01" + b"\x01\xbb"
DOMAIN = b"\x00\x00\x00\x03\x0bexample.com\x00\x50"


@pytest.mark.parametrize(("header", "host", "port"), [
    (IPV4, "127.0.0.1", 53), (IPV6, "::1", 443), (DOMAIN, "example.com", 80)])
def test_each_address_type_parses_and_the_payload_follows(header: bytes, host: str, port: int) -> None:
    packet = parse_udp_packet(header + b"payload")
    assert (packet.frag, packet.host, packet.port, bytes(packet.data)) == (0, host, port, b"payload")
    assert build_udp_header(host, port) == header


@pytest.mark.parametrize("header", [IPV4, IPV6, DOMAIN])
def test_an_empty_payload_is_a_valid_datagram(header: bytes) -> None:
    assert bytes(parse_udp_packet(header).data) == b""


@pytest.mark.parametrize("header", [IPV4, IPV6, DOMAIN])
def test_every_truncation_of_the_header_is_an_error(header: bytes) -> None:
    for n in range(len(header)):
        with pytest.raises(UdpHeaderError):
            parse_udp_packet(header[:n])


def test_fragment_number_is_reported() -> None:
    assert parse_udp_packet(b"\x00\x00\x01" + IPV4[3:]).frag == 1
    assert parse_udp_packet(b"\x00\x00\x81" + IPV4[3:] + b"x").frag == 0x81


@pytest.mark.parametrize("datagram", [
    b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x35",   # RSV not zero
    b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x35",
    b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35",   # unknown ATYP
    b"\x00\x00\x00\x05" + bytes(20),
    b"\x00\x00\x00\x03\x00\x00\x50",               # empty domain
    b"\x00\x00\x00\x03\x02\xff\xfe\x00\x50",       # not UTF-8
])
def test_malformed_headers_are_errors(datagram: bytes) -> None:
    with pytest.raises(UdpHeaderError):
        parse_udp_packet(datagram)


def test_payload_is_a_view_not_a_copy() -> None:
    data = bytearray(IPV4 + b"abc")
    packet = parse_udp_packet(data)
    data[-1] = ord("z")
    assert bytes(packet.data) == b"abz"


def test_reply_header_for_ipv6_with_brackets_and_bad_values() -> None:
    assert build_udp_header("[::1]", 443) == IPV6
    with pytest.raises(ValueError):
        build_udp_header("127.0.0.1", 70000)
    with pytest.raises(ValueError):
        build_udp_header("a" * 256, 1)
    with pytest.raises(ValueError):
        build_udp_header("", 1)


def test_random_input_only_ever_raises_the_header_error() -> None:
    import random

    from device_tunnel.frames import decode_address

    rng = random.Random(1928)
    for _ in range(5_000):
        n = rng.randrange(0, 40)
        data = bytes(rng.randrange(256) for _ in range(n))
        if rng.random() < 0.5 and n >= 4:  # bias towards a plausible prefix
            data = b"\x00\x00" + data[2:3] + bytes((rng.choice((1, 3, 4)),)) + data[4:]
        try:
            parse_udp_packet(data)
        except UdpHeaderError:
            pass
        result = decode_address(data[3:])
        assert result is None or result[2] <= len(data) - 3
