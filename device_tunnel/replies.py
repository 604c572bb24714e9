"""Reply codes shared by every layer: SOCKS5 replies, HTTP status mapping, tunnel OPEN_FAIL, agent.

The numbers are RFC 1928's REP field; the tunnel carries them in OPEN_FAIL, the SOCKS5 server
sends them as they are, and the HTTP front-end maps them with :func:`http_status`. This module
is part of the device distribution, so it imports nothing from the server side.
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ReplyCode(IntEnum):
    """REP field of a SOCKS5 reply (RFC 1928 section 6), the outcome of every proxy attempt."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


_HTTP_STATUS = {
    ReplyCode.SUCCEEDED: 200,
    ReplyCode.NOT_ALLOWED: 403,
    ReplyCode.TTL_EXPIRED: 504,
}


def http_status(code: int) -> int:
    """HTTP status an HTTP proxy answers for a reply code (403 refused, 504 timeout, else 502)."""
    try:
        return _HTTP_STATUS.get(ReplyCode(code), 502)
    except ValueError:
        return 502


def reply_for_errno(exc: OSError) -> ReplyCode:
    """The reply code for a failed connect to a target (refused, unreachable, timed out, other)."""
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return ReplyCode.CONNECTION_REFUSED
    if exc.errno == errno.ENETUNREACH:
        return ReplyCode.NETWORK_UNREACHABLE
    if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return ReplyCode.TTL_EXPIRED
    return ReplyCode.GENERAL_FAILURE
