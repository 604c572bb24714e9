"""SOCKS5 server side (RFC 1928 + RFC 1929 username/password), sans-I/O.

Bytes go in through :meth:`Socks5ServerConnection.receive_data`, events come out; the caller answers
each event with the bytes the matching method returns. No sockets, no clock, no asyncio.

The exchange::

    client: greeting          -> Greeting        -> select_method()  (only 0x02 is ever accepted)
    client: username/password -> Credentials     -> auth_reply(ok)
    client: request           -> Request         -> reply(code, bind_host, bind_port)
    client: pipelined payload -> take_remaining()

While an event waits for the caller's answer, further input is only buffered (bounded). After
:meth:`select_method` or :meth:`auth_reply`, call ``receive_data(b"")`` to parse input the client had
already pipelined (optimistic clients send greeting, credentials and request in one write).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from device_tunnel.replies import ReplyCode

__all__ = [
    "Credentials",
    "Greeting",
    "ProtocolError",
    "Request",
    "Socks5Reply",
    "Socks5ServerConnection",
    "State",
    "build_reply",
]

SOCKS_VERSION = 5
AUTH_VERSION = 1
METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

# The longest valid message is the RFC 1929 subnegotiation: 1 + 1 + 255 + 1 + 255 bytes.
MAX_MESSAGE = 513
# Input held before the Request has been parsed (greeting + credentials + request fit with slack).
MAX_HANDSHAKE_BUFFER = 4096
# Client payload held after the Request, until the caller replies and calls take_remaining().
MAX_PIPELINED = 65536


# The reply codes have one home (shared with the HTTP mapping, the tunnel and the agent).
Socks5Reply = ReplyCode


class State(Enum):
    GREETING = "greeting"
    AWAIT_METHOD = "await_method"  # Greeting emitted; select_method() not called yet
    AUTH = "auth"
    AWAIT_AUTH = "await_auth"  # Credentials emitted; auth_reply() not called yet
    REQUEST = "request"
    DONE = "done"  # Request emitted; the caller replies and relays
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Greeting:
    """Version identifier/method selection message; ``methods`` holds the offered method bytes."""

    methods: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """RFC 1929 username/password (either may be empty: the caller rejects those)."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Request:
    """A SOCKS request. ``host`` is dotted IPv4, compressed IPv6 (no brackets) or the domain as sent."""

    command: int
    address_type: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The client broke the protocol: send ``reply`` (may be empty), then close."""

    reason: str
    reply: bytes


Event = Greeting | Credentials | Request | ProtocolError


def build_reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """Build a reply to a request. ``bind_host`` may be IPv4/IPv6 text or a domain; invalid -> 0.0.0.0."""
    if not 0 <= bind_port <= 0xFFFF:
        bind_port = 0
    code &= 0xFF
    port = bind_port.to_bytes(2, "big")
    text = bind_host.strip("[]") if bind_host.startswith("[") else bind_host
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if isinstance(addr, ipaddress.IPv4Address):
        return bytes((SOCKS_VERSION, code, 0, ATYP_IPV4)) + addr.packed + port
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is None:
        return bytes((SOCKS_VERSION, code, 0, ATYP_IPV6)) + addr.packed + port
    try:
        name = bind_host.encode("ascii")
    except UnicodeEncodeError:
        name = b""
    if addr is None and 0 < len(name) <= 255:
        return bytes((SOCKS_VERSION, code, 0, ATYP_DOMAIN, len(name))) + name + port
    return bytes((SOCKS_VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0)) + port


def decode_address(atyp: int, raw: bytes | memoryview) -> str:
    """DST.ADDR / BND.ADDR as text: ``raw`` is the 4 or 16 address bytes, or length byte + name.
    Raises UnicodeDecodeError for a name that is not UTF-8 (callers map it to their own error)."""
    if atyp == ATYP_IPV4:
        return str(ipaddress.IPv4Address(bytes(raw)))
    if atyp == ATYP_IPV6:
        return ipaddress.IPv6Address(bytes(raw)).compressed
    return bytes(raw[1:]).decode("utf-8")


def _request_error(reason: str, code: Socks5Reply) -> ProtocolError:
    return ProtocolError(reason, build_reply(code))


class Socks5ServerConnection:
    """State machine for one client connection: GREETING -> AUTH -> REQUEST -> DONE, or ERROR."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed client bytes; return the events that are now complete (never raises on bad input)."""
        if self.state is State.ERROR:
            return []
        self._buffer += data
        events: list[Event] = []
        event: Event | None
        while True:
            if self.state is State.GREETING:
                event = self._parse_greeting()
            elif self.state is State.AUTH:
                event = self._parse_credentials()
            elif self.state is State.REQUEST:
                event = self._parse_request()
            else:
                break
            if event is None:
                break
            events.append(event)
            if isinstance(event, ProtocolError):
                self._fail()
                return events
        limit = MAX_PIPELINED if self.state is State.DONE else MAX_HANDSHAKE_BUFFER
        if len(self._buffer) > limit:
            self._fail()
            events.append(ProtocolError(f"client sent more than {limit} bytes ahead of the server", b""))
        return events

    def select_method(self, greeting: Greeting, no_auth: bool = False) -> bytes:
        """Answer a greeting: accept username/password (0x02) if offered; else, only when the caller
        allows it (``no_auth``: the client's address is on an ``ip_only`` list), no authentication
        (0x00, straight to the request); else 0xFF and ERROR."""
        if self.state is State.ERROR:
            return bytes((SOCKS_VERSION, METHOD_NO_ACCEPTABLE))
        self._expect(State.AWAIT_METHOD, "select_method")
        if METHOD_USERNAME_PASSWORD in greeting.methods:
            self.state = State.AUTH
            return bytes((SOCKS_VERSION, METHOD_USERNAME_PASSWORD))
        if no_auth and METHOD_NO_AUTH in greeting.methods:
            self.state = State.REQUEST
            return bytes((SOCKS_VERSION, METHOD_NO_AUTH))
        self._fail()
        return bytes((SOCKS_VERSION, METHOD_NO_ACCEPTABLE))

    def auth_reply(self, ok: bool) -> bytes:
        """Answer credentials (RFC 1929 status): success moves to REQUEST, failure to ERROR."""
        if self.state is State.ERROR:
            return bytes((AUTH_VERSION, 1))
        self._expect(State.AWAIT_AUTH, "auth_reply")
        if ok:
            self.state = State.REQUEST
            return bytes((AUTH_VERSION, 0))
        self._fail()
        return bytes((AUTH_VERSION, 1))

    def reply(self, code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """Build the reply to the Request (see :func:`build_reply`); does not change state."""
        return build_reply(code, bind_host, bind_port)

    def take_remaining(self) -> bytes:
        """Return and clear bytes received after the Request (client data sent before our reply)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    # -- internals ---------------------------------------------------------------------------------

    def _expect(self, state: State, method: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{method}() called in state {self.state.value}")

    def _fail(self) -> None:
        self.state = State.ERROR
        self._buffer.clear()

    def _consume(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def _parse_greeting(self) -> Greeting | ProtocolError | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            return ProtocolError(f"unsupported SOCKS version {buf[0]}", b"")
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            return ProtocolError("greeting offers no authentication methods", b"")
        if len(buf) < 2 + count:
            return None
        message = self._consume(2 + count)
        self.state = State.AWAIT_METHOD
        return Greeting(message[2:])

    def _parse_credentials(self) -> Credentials | ProtocolError | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != AUTH_VERSION:
            return ProtocolError(f"unsupported username/password version {buf[0]}", b"")
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return None
        message = self._consume(3 + ulen + plen)
        try:
            username = message[2 : 2 + ulen].decode("utf-8")
            password = message[3 + ulen :].decode("utf-8")
        except UnicodeDecodeError:
            return ProtocolError("username or password is not valid UTF-8", bytes((AUTH_VERSION, 1)))
        self.state = State.AWAIT_AUTH
        return Credentials(username, password)

    def _parse_request(self) -> Request | ProtocolError | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            return _request_error(
                f"unsupported SOCKS version {buf[0]} in request", Socks5Reply.GENERAL_FAILURE
            )
        if len(buf) < 4:
            return None
        command, atyp = buf[1], buf[3]
        if atyp == ATYP_IPV4:
            size = 4 + 4 + 2
        elif atyp == ATYP_IPV6:
            size = 4 + 16 + 2
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            if buf[4] == 0:
                return _request_error("empty domain name", Socks5Reply.GENERAL_FAILURE)
            size = 5 + buf[4] + 2
        else:
            return _request_error(f"unknown address type {atyp}", Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        if len(buf) < size:
            return None
        message = self._consume(size)
        raw, port = message[4:-2], int.from_bytes(message[-2:], "big")
        try:
            host = decode_address(atyp, raw)
        except UnicodeDecodeError:
            return _request_error("domain name is not valid UTF-8", Socks5Reply.GENERAL_FAILURE)
        self.state = State.DONE
        return Request(command, atyp, host, port)
