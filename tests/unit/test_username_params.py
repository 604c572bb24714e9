"""The proxy-username grammar (``CONNECTION_ID[-session-T][-ttl-S][-country-CC]``), byte by byte."""

from __future__ import annotations

import pytest

from proxy.username_params import (
    DEFAULT_SESSION_TTL,
    NOT_A_CONNECTION,
    RouteParams,
    UsernameError,
    parse_username,
)

CID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def test_plain_connection_id_in_both_spellings_and_any_case():
    assert parse_username(CID) == RouteParams(CID)
    assert parse_username(CID.upper()) == RouteParams(CID)
    assert parse_username(CID.replace("-", "")) == RouteParams(CID)
    assert parse_username(CID).plain


def test_every_parameter_in_any_order():
    p = parse_username(f"{CID}-session-abc_12-ttl-30-country-us")
    assert p == RouteParams(CID, "abc_12", 30, "US")
    assert parse_username(f"{CID}-country-DE-session-Z") == RouteParams(CID, "Z", DEFAULT_SESSION_TTL, "DE")
    assert parse_username(f"{CID}-country-fr") == RouteParams(CID, None, DEFAULT_SESSION_TTL, "FR")
    assert parse_username(f"{CID.replace('-', '')}-session-x") == RouteParams(CID, "x")
    assert not parse_username(f"{CID}-country-fr").plain


@pytest.mark.parametrize(("suffix", "reason"), [
    ("-session-", "empty value"),
    ("-session", "has no value"),
    ("-", "has no value"),
    ("-session-a-b", "has no value"),
    ("-session-a-b-c", "unknown parameter"),
    ("-ttl-60", "only valid with a session"),
    ("-session-a-ttl-0", "between 1 and"),
    ("-session-a-ttl-86401", "between 1 and"),
    ("-session-a-ttl-1234567", "whole number"),
    ("-session-a-ttl-+5", "whole number"),
    ("-session-a-ttl-٣", "whole number"),  # a non-ASCII digit
    ("-session-a-ttl-5x", "whole number"),
    ("-country-USA", "two-letter"),
    ("-country-U1", "two-letter"),
    ("-country-ÜS", "two-letter"),
    ("-foo-bar", "unknown parameter"),
    ("-SESSION-a", "unknown parameter"),
    ("-session-a-session-b", "given twice"),
    ("-session-a.b", "letters, digits"),
    ("-session-" + "a" * 65, "letters, digits"),
    ("-session-é", "letters, digits"),
    ("--session-a", "has no value"),
    ("--session-a-x", "unknown parameter"),
])
def test_malformed_parameters_are_refused_with_a_reason(suffix, reason):
    result = parse_username(CID + suffix)
    assert isinstance(result, UsernameError) and reason in result.reason, result


@pytest.mark.parametrize("username", ["", "x", "not-a-uuid", CID[:-1], CID + "x", "session-" + CID, "a" * 300,
                                      CID.replace("-", "")[:-1] + "-session-a"])
def test_no_connection_id_is_refused(username):
    result = parse_username(username)
    assert isinstance(result, UsernameError)
    if username and len(username) <= 255:
        assert result.reason == NOT_A_CONNECTION


def test_every_prefix_of_a_full_username_parses_or_refuses_without_raising():
    full = f"{CID}-session-tok_9-ttl-120-country-gb"
    for n in range(len(full) + 1):
        result = parse_username(full[:n])
        assert isinstance(result, RouteParams | UsernameError)
        if n == len(full):
            assert result == RouteParams(CID, "tok_9", 120, "GB")


def test_every_single_byte_change_parses_or_refuses_without_raising():
    full = f"{CID}-session-tok-ttl-9-country-gb"
    for i in range(len(full)):
        for b in range(256):
            mutated = full[:i] + chr(b) + full[i + 1:]
            result = parse_username(mutated)
            assert isinstance(result, RouteParams | UsernameError)
            if isinstance(result, RouteParams):  # whatever parses obeys the grammar's limits
                assert len(result.connection_id) == 36 and result.connection_id == result.connection_id.lower()
                if i >= len(CID):
                    assert result.connection_id == CID
                assert 1 <= result.ttl <= 86400
                assert result.country is None or (len(result.country) == 2 and result.country.isupper())
                assert result.session is None or result.session.replace("_", "").isalnum()
