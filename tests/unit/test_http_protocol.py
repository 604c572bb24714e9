"""Byte-level tests of HTTP proxy request parsing and the absolute-form forwarder."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http_connect.forward import (
    CloseClient,
    CloseUpstream,
    ForwardSession,
    NeedAuth,
    OpenUpstream,
    SendClient,
    SendUpstream,
)
from proxy.http_connect.protocol import (
    HOP_BY_HOP,
    HttpParseError,
    RequestHead,
    RequestHeadParser,
    build_response,
    error_response,
    parse_absolute_url,
    parse_connect_target,
    parse_proxy_authorization,
    proxy_auth_required,
    strip_hop_by_hop,
)

CONNECT_HEAD = (
    b"CONNECT example.com:443 HTTP/1.1\r\n"
    b"Host: example.com:443\r\n"
    b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
    b"User-Agent:   curl/8.0  \r\n"
    b"\r\n"
)


def parse(data: bytes, **kwargs: int) -> RequestHead | None:
    return RequestHeadParser(**kwargs).receive_data(data)


def parse_error(data: bytes, **kwargs: int) -> HttpParseError:
    with pytest.raises(HttpParseError) as info:
        parse(data, **kwargs)
    return info.value


# -- RequestHeadParser ------------------------------------------------------------------------------


def test_connect_head_is_parsed_with_original_case_and_stripped_values() -> None:
    parser = RequestHeadParser()
    head = parser.receive_data(CONNECT_HEAD + b"\x16\x03\x01")
    assert head == RequestHead(
        "CONNECT",
        "example.com:443",
        "HTTP/1.1",
        [
            ("Host", "example.com:443"),
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("User-Agent", "curl/8.0"),
        ],
    )
    assert head.get("proxy-authorization") == "Basic dXNlcjpwYXNz"
    assert head.get("X-Missing") is None
    assert parser.take_remaining() == b"\x16\x03\x01"
    assert parser.take_remaining() == b""


def test_absolute_form_head_is_parsed() -> None:
    head = parse(b"GET http://example.com/a?b=1 HTTP/1.0\r\nAccept: */*\r\n\r\n")
    assert head is not None and (head.method, head.target, head.version) == (
        "GET",
        "http://example.com/a?b=1",
        "HTTP/1.0",
    )


def test_bare_lf_line_endings_and_leading_empty_lines_are_tolerated() -> None:
    head = parse(b"\r\n\nCONNECT a:1 HTTP/1.1\nHost: a:1\n\n")
    assert head is not None and head.headers == [("Host", "a:1")]


def test_incomplete_head_needs_more_data() -> None:
    parser = RequestHeadParser()
    assert parser.receive_data(CONNECT_HEAD[:-1]) is None
    assert parser.take_remaining() == b""
    assert parser.receive_data(CONNECT_HEAD[-1:]) is not None


def test_head_split_at_every_byte_boundary_parses_identically() -> None:
    data = CONNECT_HEAD + b"payload"
    expected = parse(data)
    for cut in range(len(data) + 1):
        parser = RequestHeadParser()
        first = parser.receive_data(data[:cut])
        second = parser.receive_data(data[cut:])
        assert (second or first) == expected
        assert parser.take_remaining() == b"payload"


def test_oversized_head_is_rejected_with_431() -> None:
    data = b"GET http://a/ HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert parse_error(data).status == 431
    parser = RequestHeadParser(max_head_bytes=1024)
    with pytest.raises(HttpParseError) as info:
        for index in range(0, len(data), 100):
            parser.receive_data(data[index : index + 100])
    assert info.value.status == 431


def test_overlong_request_line_is_rejected_with_414() -> None:
    assert parse_error(b"GET http://a/" + b"a" * 20000).status == 414


def test_too_many_headers_is_rejected_with_431() -> None:
    data = b"GET http://a/ HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n"
    assert parse_error(data).status == 431


@pytest.mark.parametrize(
    "data",
    [
        b"GET http://a/ HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",  # obs-fold
        b"GET http://a/ HTTP/1.1\r\nX 1\r\n\r\n",  # missing colon
        b"GET http://a/ HTTP/1.1\r\nX Y: 1\r\n\r\n",  # space in name
        b"GET http://a/ HTTP/1.1\r\nX : 1\r\n\r\n",  # space before colon
        b"GET http://a/ HTTP/1.1\r\nX: a\x00b\r\n\r\n",  # control character
        b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n",  # bare CR
        b"G@T http://a/ HTTP/1.1\r\n\r\n",  # non-token method
        b"GET http://a/ HTTP/1.1 extra\r\n\r\n",
        b"GET  http://a/ HTTP/1.1\r\n\r\n",
        b"GET http://a/\r\n\r\n",
        b"GET http://a/\x80 HTTP/1.1\r\n\r\n",
        b"GET http://a/ FTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",  # a TLS ClientHello is not HTTP
    ],
)
def test_malformed_heads_are_rejected_with_400(data: bytes) -> None:
    assert parse_error(data).status == 400


def test_unsupported_http_version_is_rejected_with_505() -> None:
    assert parse_error(b"GET http://a/ HTTP/2.0\r\n\r\n").status == 505


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cut=st.integers(min_value=0, max_value=600))
def test_arbitrary_bytes_either_parse_need_more_or_raise_http_parse_error(data: bytes, cut: int) -> None:
    parser = RequestHeadParser(max_head_bytes=256)
    try:
        parser.receive_data(data[:cut])
        parser.receive_data(data[cut:])
    except HttpParseError as exc:
        assert 400 <= exc.status < 600


# -- targets and authorization --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("example.com:443", ("example.com", 443)),
        ("1.2.3.4:1", ("1.2.3.4", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[2001:db8::1]:80", ("2001:db8::1", 80)),
    ],
)
def test_connect_target_is_parsed(target: str, expected: tuple[str, int]) -> None:
    assert parse_connect_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "example.com",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:+80",
        "example.com:8x",
        ":443",
        "::1:443",
        "[::1]",
        "[::1:443",
        "[nothex]:443",
        "[fe80::1%25eth0]:443",
        "user@example.com:443",
        "exa mple.com:443",
        "http://example.com:443",
    ],
)
def test_invalid_connect_target_is_rejected_with_400(target: str) -> None:
    with pytest.raises(HttpParseError) as info:
        parse_connect_target(target)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pw@Host:8080/p?q", ("Host", 8080, "/p?q")),
        ("HTTP://example.com", ("example.com", 80, "/")),
        ("http://example.com:/x", ("example.com", 80, "/x")),
        ("http://example.com?q=1", ("example.com", 80, "/?q=1")),
        ("http://example.com/a#frag", ("example.com", 80, "/a")),
        ("http://[::1]:8080/", ("::1", 8080, "/")),
        ("http://[2001:db8::1]/x", ("2001:db8::1", 80, "/x")),
        ("http://a@b@example.com/", ("example.com", 80, "/")),
    ],
)
def test_absolute_url_is_split_into_host_port_and_origin_form(
    url: str, expected: tuple[str, int, str]
) -> None:
    assert parse_absolute_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/",
        "ftp://example.com/",
        "/path",
        "example.com/",
        "http:///x",
        "http://host:0/",
        "http://host:99999/",
        "http://[::1/",
        "http://::1/",
    ],
)
def test_invalid_absolute_url_is_rejected_with_400(url: str) -> None:
    with pytest.raises(HttpParseError) as info:
        parse_absolute_url(url)
    assert info.value.status == 400


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_basic_proxy_authorization_is_decoded() -> None:
    assert parse_proxy_authorization(basic("user:pa:ss")) == ("user", "pa:ss")
    assert parse_proxy_authorization("bAsIc " + basic("u:p")[6:]) == ("u", "p")
    assert parse_proxy_authorization(basic(":")) == ("", "")


@pytest.mark.parametrize(
    "value",
    [None, "", "Basic", "Bearer abc", "Basic !!!", "Basic dXNlcg==", basic("user")[:-2] + "@@", "Basic /w=="],
)
def test_malformed_proxy_authorization_gives_none(value: str | None) -> None:
    assert parse_proxy_authorization(value) is None


def test_hop_by_hop_headers_and_connection_tokens_are_stripped_but_framing_survives() -> None:
    headers = [
        ("Host", "a"),
        ("Connection", "keep-alive, X-Private, Content-Length, Host"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("x-private", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "5"),
        ("Accept", "*/*"),
    ]
    assert strip_hop_by_hop(headers) == [
        ("Host", "a"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "5"),
        ("Accept", "*/*"),
    ]
    assert "transfer-encoding" not in HOP_BY_HOP


def test_canned_responses() -> None:
    assert (
        build_response(200, "OK", [("X", "1")], b"hi")
        == b"HTTP/1.1 200 OK\r\nX: 1\r\nContent-Length: 2\r\n\r\nhi"
    )
    challenge = proxy_auth_required("bad credentials")
    head, _, body = challenge.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="proxyorch"' in head and b"\r\nConnection: close" in head
    assert json.loads(body) == {"error": "bad credentials"}
    error = error_response(403, "blocked by blacklist")
    head, _, body = error.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"Content-Type: application/json" in head
    assert json.loads(body) == {"error": "blocked by blacklist"}


# -- ForwardSession ---------------------------------------------------------------------------------

GET = b"GET http://example.com/index.html HTTP/1.1\r\nHost: example.com\r\nProxy-Authorization: Basic dTpw\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhello"


def sent_upstream(actions: list[object]) -> bytes:
    return b"".join(action.data for action in actions if isinstance(action, SendUpstream))


def sent_client(actions: list[object]) -> bytes:
    return b"".join(action.data for action in actions if isinstance(action, SendClient))


def kinds(actions: list[object]) -> list[type]:
    return [type(action) for action in actions]


def open_session(request: bytes = GET) -> tuple[ForwardSession, list[object]]:
    """Feed a request, authorise it, open the upstream; return the actions of the last step."""
    session = ForwardSession()
    [need] = session.client_data(request)
    assert isinstance(need, NeedAuth)
    [opened] = session.auth_ok()
    assert isinstance(opened, OpenUpstream)
    return session, session.upstream_opened()


def test_get_is_authorised_rewritten_to_origin_form_and_relayed_with_keep_alive() -> None:
    session = ForwardSession()
    [need] = session.client_data(GET)
    assert isinstance(need, NeedAuth) and need.head.get("Proxy-Authorization") == "Basic dTpw"
    assert session.auth_ok() == [OpenUpstream("example.com", 80)]
    request = sent_upstream(session.upstream_opened())
    assert request == b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n"
    actions = session.upstream_data(OK)
    response = sent_client(actions)
    assert response == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert CloseClient not in kinds(actions) and CloseUpstream not in kinds(actions)


def test_host_header_is_replaced_by_the_authority_of_the_url() -> None:
    _, actions = open_session(b"GET http://u:p@example.com:8080/x HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert sent_upstream(actions) == b"GET /x HTTP/1.1\r\nHost: example.com:8080\r\n\r\n"


def test_http10_request_without_host_gets_one() -> None:
    _, actions = open_session(b"GET http://[::1]:81/ HTTP/1.0\r\n\r\n")
    assert sent_upstream(actions) == b"GET / HTTP/1.1\r\nHost: [::1]:81\r\n\r\n"


def test_chunked_response_is_relayed() -> None:
    session, _ = open_session()
    actions = session.upstream_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert (
        sent_client(actions)
        == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert CloseClient not in kinds(actions)


def test_second_request_to_the_same_host_reuses_the_upstream() -> None:
    session, _ = open_session()
    session.upstream_data(OK)
    [need] = session.client_data(b"GET http://EXAMPLE.com/two HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert isinstance(need, NeedAuth)
    actions = session.auth_ok()
    assert kinds(actions) == [SendUpstream]
    assert sent_upstream(actions).startswith(b"GET /two HTTP/1.1\r\n")


def test_second_request_to_another_host_closes_and_reopens_the_upstream() -> None:
    session, _ = open_session()
    session.upstream_data(OK)
    [need] = session.client_data(
        b"GET http://other.example:8080/ HTTP/1.1\r\nHost: other.example:8080\r\n\r\n"
    )
    assert session.auth_ok() == [CloseUpstream(), OpenUpstream("other.example", 8080)]
    assert sent_upstream(session.upstream_opened()).startswith(
        b"GET / HTTP/1.1\r\nHost: other.example:8080\r\n"
    )


def test_pipelined_request_waits_for_the_previous_response() -> None:
    session = ForwardSession()
    assert kinds(session.client_data(GET + GET)) == [NeedAuth]
    session.auth_ok()
    session.upstream_opened()
    actions = session.upstream_data(OK)
    assert kinds(actions)[-1] is NeedAuth


def test_post_body_sent_before_the_upstream_opens_is_forwarded() -> None:
    session = ForwardSession()
    session.client_data(
        b"POST http://example.com/f HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello"
    )
    assert session.client_data(b" wor") == []
    session.auth_ok()
    assert session.client_backlog == 4
    session.client_data(b"ld")
    upstream = sent_upstream(session.upstream_opened())
    assert upstream == b"POST /f HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world"


def test_chunked_request_body_is_forwarded() -> None:
    session, actions = open_session(
        b"POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    actions += session.client_data(b"3\r\nabc\r\n0\r\n\r\n")
    upstream = sent_upstream(actions)
    assert upstream.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n") and b"Transfer-Encoding: chunked" in upstream


def test_head_response_has_no_body() -> None:
    session, _ = open_session(b"HEAD http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    actions = session.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert sent_client(actions) == b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    assert CloseClient not in kinds(actions)
    assert kinds(session.client_data(GET)) == [NeedAuth]


def test_close_delimited_response_ends_at_upstream_eof() -> None:
    session, _ = open_session()
    response = sent_client(session.upstream_data(b"HTTP/1.0 200 OK\r\n\r\nbody"))
    actions = session.upstream_eof()
    assert (
        response + sent_client(actions)
        == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
    )
    assert kinds(actions)[-1] is CloseUpstream


def test_connection_close_from_the_client_closes_after_the_response() -> None:
    session, _ = open_session(
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
    )
    actions = session.upstream_data(OK)
    assert b"Connection: close" in sent_client(actions)
    assert kinds(actions)[-2:] == [CloseUpstream, CloseClient]


def test_malformed_upstream_response_gives_502() -> None:
    session, _ = open_session()
    actions = session.upstream_data(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert sent_client(actions).startswith(b"HTTP/1.1 502 ")
    assert kinds(actions)[-2:] == [CloseUpstream, CloseClient]


def test_upstream_closing_before_responding_gives_502() -> None:
    session, _ = open_session()
    actions = session.upstream_eof()
    assert sent_client(actions).startswith(b"HTTP/1.1 502 ")
    assert kinds(actions)[-1] is CloseClient


def test_upstream_closing_mid_body_closes_the_client_without_an_error_response() -> None:
    session, _ = open_session()
    session.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    actions = session.upstream_eof()
    assert sent_client(actions) == b""
    assert kinds(actions) == [CloseUpstream, CloseClient]


def test_upstream_failure_answers_the_given_status() -> None:
    session = ForwardSession()
    session.client_data(GET)
    session.auth_ok()
    actions = session.upstream_failed(403, "blocked: example.com")
    assert sent_client(actions).startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert kinds(actions) == [SendClient, CloseClient]
    assert session.upstream_opened() == [CloseUpstream()]


def test_origin_form_request_gets_400() -> None:
    session = ForwardSession()
    actions = session.client_data(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert sent_client(actions).startswith(b"HTTP/1.1 400 ")
    assert kinds(actions) == [SendClient, CloseClient]


def test_https_absolute_url_gets_400() -> None:
    actions = ForwardSession().client_data(b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert sent_client(actions).startswith(b"HTTP/1.1 400 ")


def test_oversized_request_head_gets_431() -> None:
    session = ForwardSession(max_head_bytes=1024)
    actions = session.client_data(b"GET http://example.com/ HTTP/1.1\r\nX: " + b"a" * 2000)
    assert sent_client(actions).startswith(b"HTTP/1.1 431 ")


def test_client_eof_between_requests_closes_both_sides() -> None:
    session, _ = open_session()
    session.upstream_data(OK)
    assert session.client_eof() == [CloseUpstream(), CloseClient()]
    assert session.client_data(GET) == []


def test_excess_data_held_while_waiting_is_bounded() -> None:
    session = ForwardSession(max_buffered=1000)
    session.client_data(
        b"POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5000\r\n\r\n"
    )
    actions = session.client_data(b"x" * 1001)
    assert sent_client(actions).startswith(b"HTTP/1.1 413 ")
    assert kinds(actions)[-1] is CloseClient


@settings(max_examples=300, deadline=None)
@given(
    client=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from([GET, b"\r\n", b"0\r\n\r\n", b"CONNECT a:1 HTTP/1.1\r\n\r\n"]),
        ),
        max_size=6,
    ),
    upstream=st.lists(
        st.one_of(st.binary(max_size=80), st.sampled_from([OK, b"HTTP/1.1 100 Continue\r\n\r\n"])), max_size=4
    ),
    eofs=st.booleans(),
)
def test_arbitrary_bytes_from_either_side_never_raise(
    client: list[bytes], upstream: list[bytes], eofs: bool
) -> None:
    session = ForwardSession(max_head_bytes=512, max_buffered=4096)

    def run(actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, NeedAuth):
                run(session.auth_ok())
            elif isinstance(action, OpenUpstream):
                run(session.upstream_opened())

    for chunk in client:
        run(session.client_data(chunk))
    for chunk in upstream:
        run(session.upstream_data(chunk))
    if eofs:
        run(session.upstream_eof())
        run(session.client_eof())
    assert session.client_backlog <= 4096
