"""Tunnel frame codec (sans-I/O). The wire format is documented in ``PROTOCOL.md``.

Every frame is a 10-byte header followed by ``length`` payload bytes::

    type:u8  flags:u8  stream_id:u32  length:u32      (network byte order)
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

try:  # orjson when present (the full install); the agent distribution runs on the standard library
    import orjson

    _loads, _dumps, _JSONError = orjson.loads, orjson.dumps, orjson.JSONDecodeError
except ImportError:  # pragma: no cover - exercised by the agent-distribution test
    import json

    def _dumps(obj: object) -> bytes:  # type: ignore[misc]  # orjson's signature differs
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def _loads(data: bytes | memoryview) -> object:  # type: ignore[misc]
        return json.loads(bytes(data))

    _JSONError = ValueError  # type: ignore[assignment]

from .errors import ErrorCode, TunnelError

HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 256 * 1024          # a DATA frame never carries more; larger = protocol error
MAX_CONTROL_PAYLOAD = 64 * 1024   # JSON frames (HELLO, OPEN, ...)
MAX_UDP_PAYLOAD = 65_507          # the largest UDP payload (IPv4) a DATAGRAM carries
MAX_DATAGRAM_PAYLOAD = 1 + 1 + 255 + 2 + MAX_UDP_PAYLOAD  # longest address (a domain) + port + payload
PROTOCOL_VERSION = 2
U32 = struct.Struct("!I")
U64 = struct.Struct("!Q")
PORT = struct.Struct("!H")


class FrameType(IntEnum):
    HELLO = 0          # device -> node, stream 0, JSON {version, device_id, token, meta}
    WELCOME = 1        # node -> device, stream 0, JSON {ok, node, error?, ping_interval}
    OPEN = 2           # node -> device, JSON {host, port, window}
    OPEN_OK = 3        # device -> node, JSON {bound_host, bound_port, resolved_ip, window}
    OPEN_FAIL = 4      # device -> node, JSON {rep, reason, resolved_ip?}
    DATA = 5           # either way, raw bytes, counts against the receiver's window
    WINDOW = 6         # either way, u32 increment of the sender's window (stream 0: the connection window)
    FIN = 7            # either way, half-close: the sender will send no more DATA
    RST = 8            # either way, abort the stream (payload: u32 error code + optional UTF-8 reason)
    PING = 9           # either way, stream 0, u64 opaque; flags ACK = pong
    GOAWAY = 10        # either way, stream 0, JSON {code, reason}: no new streams; reconnect elsewhere
    CONTROL = 11       # node -> device, stream 0, JSON {id, command, ...}
    CONTROL_REPLY = 12  # device -> node, stream 0, JSON {id, ...}
    DATAGRAM = 13      # either way, a UDP stream's datagram: address (SOCKS5 form) + port + payload


FLAG_UDP = 0x02    # on OPEN: a UDP association stream (DATAGRAM frames, no DATA)
FEATURE_UDP = "udp"  # HELLO ``features``: the device takes UDP streams
FEATURE_PACE = "pace"  # HELLO / WELCOME ``features``: takes in-flight probes (PINGs) up to 100/s
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4


FLAG_ACK = 0x01
JSON_TYPES = frozenset({FrameType.HELLO, FrameType.WELCOME, FrameType.OPEN, FrameType.OPEN_OK,
                        FrameType.OPEN_FAIL, FrameType.GOAWAY, FrameType.CONTROL, FrameType.CONTROL_REPLY})


KNOWN_TYPES = frozenset(int(t) for t in FrameType)
STREAM_ZERO_TYPES = frozenset({FrameType.HELLO, FrameType.WELCOME, FrameType.PING, FrameType.GOAWAY,
                               FrameType.CONTROL, FrameType.CONTROL_REPLY})


class FrameError(TunnelError):
    """The peer violated the framing; the connection must be closed."""


@dataclass(slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes | memoryview

    def json(self) -> dict:
        """Decode a JSON payload; raises FrameError when it is not a JSON object."""
        try:
            value = _loads(self.payload)
        except (_JSONError, UnicodeDecodeError) as exc:
            raise FrameError(f"bad JSON in {FrameType(self.type).name}") from exc
        if not isinstance(value, dict):
            raise FrameError(f"{FrameType(self.type).name} payload is not an object")
        return value


def encode(ftype: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame as bytes."""
    return HEADER.pack(ftype, flags, stream_id, len(payload)) + payload


def header(ftype: int, stream_id: int, length: int, flags: int = 0) -> bytes:
    """Just the header, for writing a DATA payload without copying it (``writelines``)."""
    return HEADER.pack(ftype, flags, stream_id, length)


def encode_json(ftype: int, stream_id: int, obj: dict, flags: int = 0) -> bytes:
    return encode(ftype, stream_id, _dumps(obj), flags)


def encode_window(stream_id: int, increment: int) -> bytes:
    return encode(FrameType.WINDOW, stream_id, U32.pack(increment))


def encode_rst(stream_id: int, code: int, reason: str = "") -> bytes:
    return encode(FrameType.RST, stream_id, U32.pack(int(code)) + reason.encode()[:200])


def decode_rst(payload: bytes | memoryview) -> tuple[ErrorCode, str]:
    """(code, reason) of an RST payload (validated to be at least 4 bytes)."""
    from .errors import error_code

    return error_code(U32.unpack_from(payload)[0]), bytes(payload[4:]).decode("utf-8", "replace")


def encode_address(host: str, port: int) -> bytes:
    """``atyp | address | port`` (the SOCKS5 address form): IPv4/IPv6 literals packed, else a domain.
    Raises ValueError for an empty or over-long name or a port outside 0..65535."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.encode("idna") if not host.isascii() else host.encode()
        if not 0 < len(name) <= 255:
            raise ValueError("domain name must be 1..255 bytes") from None
        return bytes((ATYP_DOMAIN, len(name))) + name + PORT.pack(port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + ip.packed + PORT.pack(port)


def decode_address(buf: bytes | memoryview) -> tuple[str, int, int] | None:
    """(host, port, bytes used) of an address at the start of ``buf``; None when it is truncated or
    malformed (unknown type, empty name, a name that is not ASCII)."""
    if not buf:
        return None
    atyp = buf[0]
    if atyp == ATYP_IPV4:
        end = 5
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[1:end])))
    elif atyp == ATYP_IPV6:
        end = 17
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv6Address(bytes(buf[1:end])).compressed
    elif atyp == ATYP_DOMAIN:
        if len(buf) < 2 or buf[1] == 0:
            return None
        end = 2 + buf[1]
        if len(buf) < end + 2:
            return None
        try:
            host = bytes(buf[2:end]).decode("ascii")
        except UnicodeDecodeError:
            return None
    else:
        return None
    return host, PORT.unpack_from(buf, end)[0], end + 2


def encode_datagram_head(stream_id: int, address: bytes, length: int) -> bytes:
    """Frame header + encoded address of a DATAGRAM whose payload (``length`` bytes) follows."""
    return HEADER.pack(FrameType.DATAGRAM, 0, stream_id, len(address) + length) + address


def encode_ping(opaque: int, ack: bool = False) -> bytes:
    return encode(FrameType.PING, 0, U64.pack(opaque), FLAG_ACK if ack else 0)


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete frames. Buffering is bounded by one frame.

    Every payload is its own ``bytes`` object. (Zero-copy slices were tried: a slice handed to a
    socket that cannot send keeps the whole received chunk alive, frames of many streams share a
    chunk, and 200 slow readers then pinned over 1 GiB that no window accounted for.) Frames of
    unknown types are returned like control frames (at most ``MAX_CONTROL_PAYLOAD``) so the caller
    can ignore them: the extension point.
    """

    __slots__ = ("_head", "_type", "_flags", "_sid", "_need", "_parts", "_buffered")

    def __init__(self) -> None:
        self._head = bytearray()      # a partial header
        self._type = -1               # the frame whose payload is being collected (-1: none)
        self._flags = 0
        self._sid = 0
        self._need = 0
        self._parts: list[memoryview] = []
        self._buffered = 0

    def feed(self, data: bytes) -> list[Frame]:
        """Append ``data`` and return every complete frame; raises FrameError on a protocol violation."""
        frames: list[Frame] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        unpack = HEADER.unpack_from
        while pos < end:
            if self._type < 0:
                if self._head or end - pos < HEADER_SIZE:
                    take = min(HEADER_SIZE - len(self._head), end - pos)
                    self._head += view[pos:pos + take]
                    pos += take
                    if len(self._head) < HEADER_SIZE:
                        break
                    ftype, flags, sid, length = unpack(self._head)
                    self._head.clear()
                else:
                    ftype, flags, sid, length = unpack(view, pos)
                    pos += HEADER_SIZE
                limit = (MAX_PAYLOAD if ftype == FrameType.DATA else
                         MAX_DATAGRAM_PAYLOAD if ftype == FrameType.DATAGRAM else MAX_CONTROL_PAYLOAD)
                if length > limit:
                    raise FrameError(f"frame too large: {length} > {limit}", ErrorCode.FRAME_SIZE_ERROR)
                if end - pos >= length:  # the whole payload is here: slice it
                    payload: bytes | memoryview = view[pos:pos + length]
                    pos += length
                    frames.append(Frame(ftype, flags, sid, bytes(payload)))
                    continue
                self._type, self._flags, self._sid, self._need = ftype, flags, sid, length
                self._buffered = 0
            take = min(self._need, end - pos)
            self._parts.append(view[pos:pos + take])
            self._need -= take
            self._buffered += take
            pos += take
            if self._need == 0:
                parts, self._parts = self._parts, []
                payload = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
                frames.append(Frame(self._type, self._flags, self._sid, payload))  # type: ignore[arg-type]
                self._type = -1
                self._buffered = 0
        return frames

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._head) + self._buffered


def validate(frame: Frame) -> None:
    """Check the fixed-size payloads and stream-0 rules of a known frame type; raises FrameError."""
    t = frame.type
    if t not in KNOWN_TYPES:
        return  # ignored by the receiver
    if t == FrameType.WINDOW and len(frame.payload) != 4:
        raise FrameError("WINDOW payload must be 4 bytes", ErrorCode.FRAME_SIZE_ERROR)
    if t == FrameType.PING and len(frame.payload) != 8:
        raise FrameError("PING payload must be 8 bytes", ErrorCode.FRAME_SIZE_ERROR)
    if t == FrameType.RST and len(frame.payload) < 4:
        raise FrameError("RST payload must start with a 4-byte code", ErrorCode.FRAME_SIZE_ERROR)
    if t == FrameType.WINDOW:
        return  # stream 0 = connection window, any other = that stream
    stream_zero = t in STREAM_ZERO_TYPES
    if stream_zero != (frame.stream_id == 0):
        raise FrameError(f"{FrameType(t).name} on wrong stream {frame.stream_id}")
