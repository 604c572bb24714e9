"""Routing parameters in the proxy username (sans-I/O): ``CONNECTION_ID[-KEY-VALUE]...``.

The convention of rotating-proxy products::

    username  = connection-id *( "-" key "-" value )
    key       = "session" / "ttl" / "country"      ; each at most once, any order, lower case
    session   = 1*64( ALPHA / DIGIT / "_" )          ; the sticky-session token
    ttl       = 1*6DIGIT                             ; 1 .. 86400 seconds, only with "session"
    country   = 2ALPHA                               ; ISO 3166-1 alpha-2, case-insensitive

``connection-id`` is the connection's UUID (36 characters with hyphens, or 32 hex digits). A
username that does not follow the grammar is an authentication failure with the reason
:attr:`UsernameError.reason`; nothing here raises.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

DEFAULT_SESSION_TTL = 600
MAX_SESSION_TTL = 86400
MAX_TOKEN = 64
MAX_USERNAME = 255
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_KEYS = ("session", "ttl", "country")
NOT_A_CONNECTION = "username does not start with a connection id"


@dataclass(frozen=True, slots=True)
class RouteParams:
    """A parsed username: the connection and how its sessions are routed."""

    connection_id: str
    session: str | None = None  # sticky-session token
    ttl: int = DEFAULT_SESSION_TTL  # seconds the stickiness outlives the token's last session
    country: str | None = None  # upper-case ISO code narrowing the pool

    @property
    def plain(self) -> bool:
        return self.session is None and self.country is None


@dataclass(frozen=True, slots=True)
class UsernameError:
    """Why a username was refused (for the log line; the client only sees an auth failure)."""

    reason: str


def _uuid_prefix(text: str) -> tuple[str, str] | None:
    """(canonical connection id, rest) when ``text`` starts with a UUID in either spelling."""
    for size in (36, 32):
        head = text[:size]
        if len(head) != size or (size == 32 and "-" in head):
            continue
        try:
            parsed = uuid.UUID(head)
        except ValueError:
            continue
        rest = text[size:]
        if rest == "" or rest.startswith("-"):
            return str(parsed), rest
    return None


def parse_username(username: str) -> RouteParams | UsernameError:
    """Split a proxy username into the connection id and its routing parameters."""
    if not username:
        return UsernameError("empty username")
    if len(username) > MAX_USERNAME:
        return UsernameError("username too long")
    prefix = _uuid_prefix(username)
    if prefix is None:
        return UsernameError(NOT_A_CONNECTION)
    connection_id, rest = prefix
    if not rest:
        return RouteParams(connection_id)
    parts = rest[1:].split("-")
    if len(parts) % 2:
        return UsernameError(f"parameter {parts[-1]!r} has no value")
    values: dict[str, str] = {}
    for key, value in zip(parts[0::2], parts[1::2], strict=True):
        if key not in _KEYS:
            return UsernameError(f"unknown parameter {key!r} (expected session, ttl or country)")
        if key in values:
            return UsernameError(f"parameter {key!r} given twice")
        if not value:
            return UsernameError(f"parameter {key!r} has an empty value")
        values[key] = value
    session = values.get("session")
    if session is not None and (len(session) > MAX_TOKEN or not set(session) <= _TOKEN_CHARS):
        return UsernameError(f"session token must be 1-{MAX_TOKEN} letters, digits or '_'")
    ttl = DEFAULT_SESSION_TTL
    if "ttl" in values:
        raw = values["ttl"]
        if session is None:
            return UsernameError("ttl is only valid with a session")
        if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
            return UsernameError("ttl must be a whole number of seconds")
        ttl = int(raw)
        if not 1 <= ttl <= MAX_SESSION_TTL:
            return UsernameError(f"ttl must be between 1 and {MAX_SESSION_TTL} seconds")
    country = values.get("country")
    if country is not None:
        if len(country) != 2 or not country.isascii() or not country.isalpha():
            return UsernameError("country must be a two-letter code")
        country = country.upper()
    return RouteParams(connection_id, session, ttl, country)
