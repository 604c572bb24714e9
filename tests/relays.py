"""TCP relays placed between a device agent and its node: one that can silently stop forwarding (a
network change that leaves a dead TCP connection without FIN), and one that records every byte."""

from __future__ import annotations

import asyncio


class BlackholeRelay:
    """A TCP relay between agent and node that can silently stop forwarding (no FIN, no RST).

    Every byte that crosses it is also recorded per connection (``up``: agent → node, ``down``:
    node → agent), so a test can check what an observer on the path sees.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.blackholed = False
        self.port = 0
        self.up: list[bytearray] = []     # one buffer per accepted connection
        self.down: list[bytearray] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> BlackholeRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def connections(self) -> int:
        return len(self.up)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await reader.read(65536):
                if not self.blackholed:
                    record += data
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        if not self.blackholed:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        up, down = bytearray(), bytearray()
        self.up.append(up)
        self.down.append(down)
        await asyncio.gather(self._pipe(reader, uw, up), self._pipe(ur, writer, down))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def tls_records(data: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each complete TLS record in a byte stream (stops at the first gap)."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if major != 3 or ctype not in (20, 21, 22, 23):
            break
        if pos + 5 + length > len(data):
            break
        out.append((ctype, length))
        pos += 5 + length
    return out
