"""HTTP proxy request heads, sans-I/O: parsing, target/auth helpers and canned responses.

:class:`RequestHeadParser` reads one request head (request line + header fields) from a stream of
bytes; what follows the head (a CONNECT tunnel's first bytes, a request body) is left for
:meth:`RequestHeadParser.take_remaining`.
"""

from __future__ import annotations

import base64
import binascii
import http
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "HOP_BY_HOP",
    "HttpParseError",
    "RequestHead",
    "RequestHeadParser",
    "build_response",
    "error_response",
    "parse_absolute_url",
    "parse_connect_target",
    "parse_proxy_authorization",
    "proxy_auth_required",
    "strip_hop_by_hop",
]

REALM = "proxyorch"

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
# Never dropped because a Connection header names them: the body framing and the target must survive.
_END_TO_END_REQUIRED = frozenset({"content-length", "transfer-encoding", "host"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]+")
_FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_HEAD_END = re.compile(rb"\n\r?\n")
_PORT = re.compile(r"[0-9]{1,5}")
_HOST_BAD = re.compile(r"[\x00-\x20\x7f/?#@\[\]\\]")


class HttpParseError(Exception):
    """A request the proxy refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass
class RequestHead:
    """A parsed request head. Header names keep their case; values are stripped."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class RequestHeadParser:
    """Incremental parser for one request head. Tolerates bare LF line endings."""

    def __init__(self, max_head_bytes: int = 16384, max_headers: int = 100) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self._buffer = bytearray()
        self._scanned = 0
        self._head: RequestHead | None = None

    def receive_data(self, data: bytes) -> RequestHead | None:
        """Feed bytes; return the head once complete (then and later), None while more is needed.

        Raises :class:`HttpParseError` on a malformed or oversized head. Bytes fed after the head
        are kept for :meth:`take_remaining`.
        """
        self._buffer += data
        if self._head is not None:
            return self._head
        # RFC 9112 section 2.2: ignore empty lines before the request line.
        if self._buffer[:1] in (b"\r", b"\n"):
            del self._buffer[: len(self._buffer) - len(self._buffer.lstrip(b"\r\n"))]
        match = _HEAD_END.search(self._buffer, max(0, self._scanned - 2))
        if match is None:
            self._scanned = len(self._buffer)
            if len(self._buffer) > self.max_head_bytes:
                if b"\n" not in self._buffer:
                    raise HttpParseError(414, "request line too long")
                raise HttpParseError(431, "request head too large")
            return None
        if match.end() > self.max_head_bytes:
            raise HttpParseError(431, "request head too large")
        raw = bytes(self._buffer[: match.start()])
        del self._buffer[: match.end()]
        self._head = _parse_head(raw.decode("latin-1"), self.max_headers)
        return self._head

    def take_remaining(self) -> bytes:
        """Return and clear the bytes received after the head."""
        if self._head is None:
            return b""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _parse_head(text: str, max_headers: int) -> RequestHead:
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpParseError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpParseError(400, "invalid method")
    if not _TARGET.fullmatch(target):
        raise HttpParseError(400, "invalid request target")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if _VERSION.fullmatch(version):
            raise HttpParseError(505, "HTTP version not supported")
        raise HttpParseError(400, "malformed HTTP version")
    if len(lines) - 1 > max_headers:
        raise HttpParseError(431, "too many header fields")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise HttpParseError(400, "obsolete line folding is not accepted")
        name, colon, value = line.partition(":")
        if not colon:
            raise HttpParseError(400, "header field without a colon")
        if not _TOKEN.fullmatch(name):
            raise HttpParseError(400, "invalid header field name")
        if _FIELD_VALUE_BAD.search(value):
            raise HttpParseError(400, "control character in header field value")
        headers.append((name, value.strip(" \t")))
    return RequestHead(method, target, version, headers)


def _parse_port(text: str) -> int:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise HttpParseError(400, f"invalid port {text!r}")
    return int(text)


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` / ``[v6][:port]``; ``default_port`` None means the port is required."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HttpParseError(400, "unterminated IPv6 literal")
        host, rest = authority[1:end], authority[end + 1 :]
        try:
            if "%" in host:
                raise ValueError("zone identifiers are not accepted")
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpParseError(400, "invalid IPv6 literal") from None
        if rest and not rest.startswith(":"):
            raise HttpParseError(400, "garbage after IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = authority.rpartition(":")
        if not colon:
            host, port_text = authority, None
        else:
            port_text = port_text_
        if not host or _HOST_BAD.search(host) or ":" in host:
            raise HttpParseError(400, "invalid host")
    if port_text is None or (port_text == "" and default_port is not None):
        if default_port is None:
            raise HttpParseError(400, "port required")
        return host, default_port
    return host, _parse_port(port_text)


def parse_connect_target(target: str) -> tuple[str, int]:
    """Parse a CONNECT authority-form target: ``host:port`` or ``[v6]:port`` (port 1..65535)."""
    return _split_authority(target, None)


def parse_absolute_url(url: str) -> tuple[str, int, str]:
    """Parse an absolute-form ``http://`` target into (host, port, origin-form path).

    Userinfo and fragment are discarded, the default port is 80, an empty path becomes ``/``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise HttpParseError(400, "only absolute http:// URLs can be forwarded")
    rest = rest.partition("#")[0]
    end = len(rest)
    for delimiter in "/?":
        index = rest.find(delimiter)
        if 0 <= index < end:
            end = index
    authority, path = rest[:end], rest[end:]
    authority = authority.rpartition("@")[2]
    host, port = _split_authority(authority, 80)
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def parse_proxy_authorization(value: str | None) -> tuple[str, str] | None:
    """Decode ``Basic base64(user:pass)`` into (user, pass); None if absent or malformed."""
    if not value:
        return None
    parts = value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(parts[1].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        return None
    return user, password


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and those named by Connection (except framing headers and Host)."""
    headers = list(headers)
    drop = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == "connection":
            drop.update(token.strip().lower() for token in value.split(","))
    drop -= _END_TO_END_REQUIRED
    return [(name, value) for name, value in headers if name.lower() not in drop]


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def build_response(
    status: int, reason: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """Serialize an HTTP/1.1 response, adding Content-Length."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def _json_error(reason: str) -> bytes:
    return json.dumps({"error": reason}).encode()


def error_response(status: int, reason: str, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """A ``Connection: close`` response with the JSON body ``{"error": reason}`` (plus ``extra`` headers)."""
    headers = [("Content-Type", "application/json"), ("Connection", "close"), *extra]
    return build_response(status, _phrase(status), headers, _json_error(reason))


def proxy_auth_required(reason: str) -> bytes:
    """The 407 challenge (``Basic realm="proxyorch"``) with a JSON body; closes the connection."""
    headers = [
        ("Proxy-Authenticate", f'Basic realm="{REALM}"'),
        ("Content-Type", "application/json"),
        ("Connection", "close"),
    ]
    return build_response(407, _phrase(407), headers, _json_error(reason))
