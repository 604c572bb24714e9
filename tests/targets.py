"""Small target servers the tests reach through the proxy (all on 127.0.0.x)."""

from __future__ import annotations

import asyncio
import hashlib
import os

from aiohttp import web

BLOCK = os.urandom(1 << 20)  # 1 MiB of random bytes, repeated with a counter to make big bodies


def body_chunk(i: int) -> bytes:
    return i.to_bytes(8, "big") + BLOCK[8:]


def expected_digest(size: int) -> str:
    h = hashlib.sha256()
    sent = 0
    i = 0
    while sent < size:
        chunk = body_chunk(i)[: size - sent]
        h.update(chunk)
        sent += len(chunk)
        i += 1
    return h.hexdigest()


class TargetServers:
    """HTTP (bytes of any size, peer echo), raw TCP echo and a peer-address echo."""

    def __init__(self) -> None:
        self.http_port = 0
        self.echo_port = 0
        self.peer_port = 0
        self._runner: web.AppRunner | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self.progress: dict[str, int] = {}   # ?tag=... -> bytes the target has written so far
        self.source_port = 0
        self.source_sent = 0                 # bytes the blasting source has written in total
        self.bytes_requests = 0              # GET /bytes/ requests served

    async def start(self, host: str = "127.0.0.1") -> TargetServers:
        app = web.Application()
        app.router.add_get("/bytes/{size}", self._bytes)
        app.router.add_get("/peer", self._peer)
        app.router.add_post("/echo", self._echo_body)
        app.router.add_get("/hello", self._hello)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        echo = await asyncio.start_server(self._echo, host, 0)
        self.echo_port = echo.sockets[0].getsockname()[1]
        peer = await asyncio.start_server(self._peer_tcp, host, 0)
        self.peer_port = peer.sockets[0].getsockname()[1]
        source = await asyncio.start_server(self._source, host, 0)
        self.source_port = source.sockets[0].getsockname()[1]
        self._servers += [echo, peer, source]
        return self

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text="hello through the tunnel\n")

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        self.bytes_requests += 1  # requests that reached the target (a proxy may refuse to relay one)
        size = int(request.match_info["size"])
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        tag = request.query.get("tag")
        sent = 0
        i = 0
        while sent < size:
            chunk = body_chunk(i)[: size - sent]
            await resp.write(chunk)
            sent += len(chunk)
            i += 1
            if tag:
                self.progress[tag] = sent
        await resp.write_eof()
        return resp

    async def _peer(self, request: web.Request) -> web.Response:
        return web.Response(text=request.remote or "")

    async def _echo_body(self, request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _source(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Sends as fast as the peer takes it, from the first moment (no request needed)."""
        try:
            while True:
                writer.write(BLOCK)
                await writer.drain()
                self.source_sent += len(BLOCK)
        except (ConnectionError, OSError):
            pass
        writer.close()

    async def _peer_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Writes the peer's address at connect and again for every line received."""
        peer = writer.get_extra_info("peername")
        line = f"{peer[0]}\n".encode()
        try:
            writer.write(line)
            await writer.drain()
            while await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()
