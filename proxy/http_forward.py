"""I/O of absolute-form HTTP forwarding: the ``OpenHandler`` of one upstream stream.

Every decision (authentication, blacklists, routing, rows) is made by
:class:`proxy.session_core.SessionCore`; an :class:`Upstream` only hands its stream's events to
its owner (the client session) and writes/closes the stream when told to. This module does not
import the listener: the owner is anything with the :class:`UpstreamOwner` methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from device_tunnel.server import OpenResult

__all__ = ["Upstream", "UpstreamOwner"]


class UpstreamOwner(Protocol):
    """What an upstream reports to (the client session)."""

    def upstream_open_result(self, up: Upstream, result: OpenResult) -> None: ...
    def upstream_data(self, uid: int, data: bytes) -> None: ...
    def upstream_eof(self, uid: int) -> None: ...
    def upstream_closed(self, uid: int, error: str | None) -> None: ...
    def pause_source(self) -> None: ...
    def resume_reading(self) -> None: ...
    def sink_ready(self) -> bool: ...


class Upstream:
    """One upstream stream of a forwarding client connection, known to the core as ``uid``."""

    def __init__(self, owner: UpstreamOwner, uid: int) -> None:
        self.owner = owner
        self.uid = uid
        self.stream = None
        self.cancel: Callable[[], None] | None = None

    # OpenHandler
    def open_result(self, result: OpenResult) -> None:
        self.cancel = None
        self.owner.upstream_open_result(self, result)

    def stream_data(self, data: bytes) -> None:
        self.owner.upstream_data(self.uid, data)

    def stream_eof(self) -> None:
        self.owner.upstream_eof(self.uid)

    def stream_closed(self, error: str | None) -> None:
        self.stream = None
        self.owner.upstream_closed(self.uid, error)

    def pause_source(self) -> None:
        self.owner.pause_source()

    def resume_source(self) -> None:
        self.owner.resume_reading()

    def sink_ready(self) -> bool:
        return self.owner.sink_ready()

    # told by the owner
    def write(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.write(data)

    def close(self) -> None:
        """Cancel the open in flight, or close the stream."""
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            cancel()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close_quietly()
