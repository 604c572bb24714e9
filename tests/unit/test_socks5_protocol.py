"""Byte-level tests of the sans-I/O SOCKS5 server (RFC 1928 + RFC 1929)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.socks5.protocol import (
    MAX_HANDSHAKE_BUFFER,
    MAX_PIPELINED,
    Credentials,
    Greeting,
    ProtocolError,
    Request,
    Socks5Reply,
    Socks5ServerConnection,
    State,
)

GREETING = b"\x05\x01\x02"
CREDENTIALS = b"\x01\x04user\x08password"
CONNECT_IPV4 = b"\x05\x01\x00\x01\x01\x02\x03\x04\x01\xbb"
FULL_EXCHANGE = GREETING + CREDENTIALS + CONNECT_IPV4 + b"GET / HTTP/1.1\r\n\r\n"


def authenticated() -> Socks5ServerConnection:
    conn = Socks5ServerConnection()
    [greeting] = conn.receive_data(GREETING)
    assert conn.select_method(greeting) == b"\x05\x02"
    [creds] = conn.receive_data(CREDENTIALS)
    assert conn.auth_reply(True) == b"\x01\x00"
    assert conn.state is State.REQUEST
    return conn


def drive(chunks: list[bytes]) -> tuple[list[object], list[bytes], bytes]:
    """Run a whole exchange the way a listener does: answer each event, then drain pipelined input."""
    conn = Socks5ServerConnection()
    events: list[object] = []
    sent: list[bytes] = []

    def handle(new_events: list[object]) -> None:
        for event in new_events:
            events.append(event)
            if isinstance(event, Greeting):
                sent.append(conn.select_method(event))
                handle(conn.receive_data(b""))
            elif isinstance(event, Credentials):
                sent.append(conn.auth_reply(event.username == "user" and event.password == "password"))
                handle(conn.receive_data(b""))
            elif isinstance(event, Request):
                sent.append(conn.reply(Socks5Reply.SUCCEEDED))

    for chunk in chunks:
        handle(conn.receive_data(chunk))
    return events, sent, conn.take_remaining()


def test_greeting_offering_username_password_selects_method_0x02() -> None:
    conn = Socks5ServerConnection()
    events = conn.receive_data(b"\x05\x02\x00\x02")
    assert events == [Greeting(b"\x00\x02")]
    assert conn.select_method(events[0]) == b"\x05\x02"
    assert conn.state is State.AUTH


def test_greeting_offering_only_no_auth_is_refused_with_0xff() -> None:
    conn = Socks5ServerConnection()
    [greeting] = conn.receive_data(b"\x05\x01\x00")
    assert conn.select_method(greeting) == b"\x05\xff"
    assert conn.state is State.ERROR
    assert conn.receive_data(b"\x01\x04user\x08password") == []


def test_greeting_with_zero_methods_is_a_protocol_error_without_reply() -> None:
    conn = Socks5ServerConnection()
    [error] = conn.receive_data(b"\x05\x00")
    assert isinstance(error, ProtocolError) and error.reply == b""
    assert conn.state is State.ERROR


@pytest.mark.parametrize("first_byte", [0x04, 0x00, 0x16, ord("G")])
def test_greeting_with_wrong_version_is_a_protocol_error(first_byte: int) -> None:
    conn = Socks5ServerConnection()
    [error] = conn.receive_data(bytes([first_byte, 1, 2]))
    assert isinstance(error, ProtocolError) and error.reply == b""


def test_credentials_are_parsed_and_auth_reply_follows_rfc1929() -> None:
    conn = Socks5ServerConnection()
    conn.select_method(conn.receive_data(GREETING)[0])
    assert conn.receive_data(CREDENTIALS) == [Credentials("user", "password")]
    assert conn.auth_reply(False) == b"\x01\x01"
    assert conn.state is State.ERROR


def test_empty_username_and_password_parse_as_empty_strings() -> None:
    conn = Socks5ServerConnection()
    conn.select_method(conn.receive_data(GREETING)[0])
    assert conn.receive_data(b"\x01\x00\x00") == [Credentials("", "")]


def test_maximum_length_credentials_parse() -> None:
    conn = Socks5ServerConnection()
    conn.select_method(conn.receive_data(GREETING)[0])
    message = b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255
    assert conn.receive_data(message) == [Credentials("u" * 255, "p" * 255)]


def test_credentials_with_wrong_subnegotiation_version_are_a_protocol_error() -> None:
    conn = Socks5ServerConnection()
    conn.select_method(conn.receive_data(GREETING)[0])
    [error] = conn.receive_data(b"\x05\x04user\x08password")
    assert isinstance(error, ProtocolError)


def test_credentials_that_are_not_utf8_are_a_protocol_error_answered_as_auth_failure() -> None:
    conn = Socks5ServerConnection()
    conn.select_method(conn.receive_data(GREETING)[0])
    [error] = conn.receive_data(b"\x01\x02\xff\xfe\x01p")
    assert isinstance(error, ProtocolError) and error.reply == b"\x01\x01"


def test_ipv4_connect_request() -> None:
    conn = authenticated()
    assert conn.receive_data(CONNECT_IPV4) == [Request(1, 1, "1.2.3.4", 443)]
    assert conn.state is State.DONE


def test_ipv6_connect_request_gives_compressed_host_without_brackets() -> None:
    conn = authenticated()
    address = bytes.fromhex("20010db8000000000000000000000001")
    assert conn.receive_data(b"\x05\x01\x00\x04" + address + b"\x00\x50") == [
        Request(1, 4, "2001:db8::1", 80)
    ]


def test_domain_connect_request_keeps_the_name_as_sent() -> None:
    conn = authenticated()
    events = conn.receive_data(b"\x05\x01\x00\x03\x0bExample.COM\x00\x50")
    assert events == [Request(1, 3, "Example.COM", 80)]


def test_port_zero_parses() -> None:
    conn = authenticated()
    assert conn.receive_data(b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00") == [Request(1, 1, "1.2.3.4", 0)]


@pytest.mark.parametrize("command", [2, 3, 9])
def test_bind_udp_and_unknown_commands_still_give_a_request(command: int) -> None:
    conn = authenticated()
    [request] = conn.receive_data(bytes([5, command, 0, 1, 1, 2, 3, 4, 0, 80]))
    assert isinstance(request, Request) and request.command == command
    assert conn.reply(Socks5Reply.COMMAND_NOT_SUPPORTED) == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"


def test_unknown_address_type_gets_reply_0x08() -> None:
    conn = authenticated()
    [error] = conn.receive_data(b"\x05\x01\x00\x02\x01\x02\x03\x04\x00\x50")
    assert isinstance(error, ProtocolError)
    assert error.reply == b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"
    assert conn.state is State.ERROR


def test_empty_domain_gets_general_failure() -> None:
    conn = authenticated()
    [error] = conn.receive_data(b"\x05\x01\x00\x03\x00\x00\x50")
    assert isinstance(error, ProtocolError) and error.reply[1] == Socks5Reply.GENERAL_FAILURE


def test_request_with_wrong_version_gets_general_failure() -> None:
    conn = authenticated()
    [error] = conn.receive_data(b"\x04\x01\x00\x01\x01\x02\x03\x04\x00\x50")
    assert isinstance(error, ProtocolError) and error.reply == b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0, "10.1.2.3", 8080), b"\x05\x00\x00\x01\x0a\x01\x02\x03\x1f\x90"),
        ((0, "::1", 1), b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01"),
        ((0, "[::1]", 1), b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01"),
        ((4, "example.com", 80), b"\x05\x04\x00\x03\x0bexample.com\x00\x50"),
        ((5, "", 0), b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((1, "bücher", 70000), b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((1, "x" * 256, 1), b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x01"),
    ],
)
def test_reply_encodes_bind_address(args: tuple[int, str, int], expected: bytes) -> None:
    assert Socks5ServerConnection().reply(*args) == expected


def test_take_remaining_returns_bytes_pipelined_after_the_request() -> None:
    events, sent, remaining = drive([FULL_EXCHANGE])
    assert [type(event) for event in events] == [Greeting, Credentials, Request]
    assert sent == [b"\x05\x02", b"\x01\x00", b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"]
    assert remaining == b"GET / HTTP/1.1\r\n\r\n"


def test_input_waiting_for_the_caller_is_only_buffered() -> None:
    conn = Socks5ServerConnection()
    assert conn.receive_data(GREETING + CREDENTIALS) == [Greeting(b"\x02")]
    assert conn.receive_data(CONNECT_IPV4) == []  # select_method() not called yet
    conn.select_method(Greeting(b"\x02"))
    assert conn.receive_data(b"") == [Credentials("user", "password")]
    conn.auth_reply(True)
    assert conn.receive_data(b"") == [Request(1, 1, "1.2.3.4", 443)]


def test_exchange_split_at_every_byte_boundary_gives_identical_events() -> None:
    expected = drive([FULL_EXCHANGE])
    for cut in range(len(FULL_EXCHANGE) + 1):
        assert drive([FULL_EXCHANGE[:cut], FULL_EXCHANGE[cut:]]) == expected
    assert drive([bytes([byte]) for byte in FULL_EXCHANGE]) == expected


def test_buffering_while_awaiting_the_caller_is_bounded() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING)
    events = conn.receive_data(b"\x00" * (MAX_HANDSHAKE_BUFFER + 1))
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert conn.state is State.ERROR
    assert conn.receive_data(b"x" * 100_000) == []
    assert conn.take_remaining() == b""


def test_pipelined_payload_after_the_request_is_bounded() -> None:
    conn = authenticated()
    conn.receive_data(CONNECT_IPV4)
    assert conn.receive_data(b"x" * MAX_PIPELINED) == []
    [error] = conn.receive_data(b"x")
    assert isinstance(error, ProtocolError)


def test_caller_answering_out_of_order_is_a_programming_error() -> None:
    conn = Socks5ServerConnection()
    with pytest.raises(RuntimeError):
        conn.auth_reply(True)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"", GREETING, GREETING + CREDENTIALS, GREETING + CREDENTIALS + b"\x05\x01\x00"]),
    garbage=st.binary(max_size=1200),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_arbitrary_bytes_in_arbitrary_chunks_never_raise_and_stay_bounded(
    prefix: bytes, garbage: bytes, cuts: list[int]
) -> None:
    data = prefix + garbage
    events, _, remaining = drive(_chunked(data, cuts))
    assert all(isinstance(event, Greeting | Credentials | Request | ProtocolError) for event in events)
    assert len(remaining) <= MAX_PIPELINED
    errors = [event for event in events if isinstance(event, ProtocolError)]
    assert len(errors) <= 1 and (not errors or events[-1] is errors[0])
