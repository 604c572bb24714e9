"""Typed tunnel errors. Each carries a numeric :class:`ErrorCode` that travels in RST and GOAWAY.

A :class:`StreamError` ends one stream (the receiver answers RST with its code); every other
:class:`TunnelError` ends the whole tunnel connection (GOAWAY with its code, then close).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes on the wire (u32 in RST, ``code`` in GOAWAY). Unknown codes mean INTERNAL_ERROR."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1       # a frame that the state machine does not allow
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3   # DATA beyond the stream or connection window
    STREAM_CLOSED = 4        # DATA or FIN after the peer's FIN
    FRAME_SIZE_ERROR = 5     # length over the limit, or a fixed-size payload of the wrong size
    REFUSED_STREAM = 6       # the receiver will not take another stream (limit, shutting down)
    CANCEL = 7               # the stream is no longer wanted (client gone, OPEN abandoned)
    ENHANCE_YOUR_CALM = 8    # PING / WINDOW / CONTROL flood
    HANDSHAKE_FAILED = 9     # HELLO/WELCOME missing, late, duplicated or refused
    DEAD_PEER = 10           # nothing received for dead_after seconds (local only, never sent)
    LOCAL_CLOSED = 11        # the local socket of the stream (client or target) went away


def error_code(value: int) -> ErrorCode:
    """Decode a wire code; codes this side does not know are treated as INTERNAL_ERROR."""
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR


class TunnelError(Exception):
    """A violation that ends the tunnel connection."""

    code: ErrorCode = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class FrameSizeError(TunnelError):
    code = ErrorCode.FRAME_SIZE_ERROR


class FlowControlError(TunnelError):
    code = ErrorCode.FLOW_CONTROL_ERROR


class FloodError(TunnelError):
    code = ErrorCode.ENHANCE_YOUR_CALM


class HandshakeError(TunnelError):
    code = ErrorCode.HANDSHAKE_FAILED


class StreamError(TunnelError):
    """A violation confined to one stream: that stream is reset, the tunnel lives on."""

    def __init__(self, stream_id: int, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message, code)
        self.stream_id = stream_id


class LocalUsageError(Exception):
    """The local application called the connection in a way its state forbids (a bug, not the peer)."""
