"""What one direction of a session could not relay yet, in order (the I/O side of ``proxy/limits.py``).

A limited session relays a chunk only as far as its connection's bucket has tokens and its quota lease
has bytes; the rest waits here with the sink it goes to, and the source is paused (reading the client
for uploads; ``sink_ready`` False, so the stream withholds credit or stops reading, for downloads).
Events that must follow those bytes (end of stream, close) wait behind them. So no read is relayed
past the limit, however large it was: a slow rate cannot overshoot by a socket read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

Sink = Callable[[bytes], None]


class Held:
    """Byte chunks (each with its sink) and events, waiting for a limit, in order."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: deque[tuple[Callable, memoryview | None]] = deque()

    def __bool__(self) -> bool:
        return bool(self.items)

    def push(self, sink: Sink, data: bytes | memoryview) -> None:
        self.items.append((sink, memoryview(data)))

    def push_event(self, fn: Callable[[], None]) -> None:
        self.items.append((fn, None))

    def first_size(self) -> int:
        """Bytes of the first waiting chunk (0 when an event is first or nothing waits)."""
        if not self.items:
            return 0
        data = self.items[0][1]
        return len(data) if data is not None else 0

    def drain(self, grant: Callable[[int], int]) -> bool:
        """Relay what ``grant(n)`` lets through, in order, running the events reached; True when
        nothing is left."""
        items = self.items
        while items:
            sink, data = items[0]
            if data is None:
                items.popleft()
                sink()
                continue
            n = grant(len(data))
            if n < len(data):
                if n:
                    items[0] = (sink, data[n:])
                    sink(bytes(data[:n]))
                return False
            items.popleft()
            sink(bytes(data))
        return True

    def clear(self) -> None:
        self.items.clear()
