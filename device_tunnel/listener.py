"""A TCP listener that survives descriptor exhaustion: its own accept loop pauses on EMFILE.

``loop.create_server`` (uvloop's in particular) keeps the listening socket registered while
``accept`` fails with ``EMFILE``: the socket stays readable, so the loop calls accept again at
once and spins at a full core for as long as the process is at its descriptor limit. Here the
listening socket is non-blocking and read with ``loop.add_reader``; on ``EMFILE``/``ENFILE``/
``ENOBUFS``/``ENOMEM`` the reader is removed for a back-off period (0.1 s doubling to 1 s while
it keeps failing), so a process at its limit makes a few accept calls a second and no more. The
pending connections wait in the kernel's backlog and are served as soon as descriptors are free.
Accepted sockets are handed to ``loop.connect_accepted_socket`` (TLS too). Standard library only
(the proxy port and the tunnel port both use it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 1.0
ACCEPT_BATCH = 128  # accepts per readable callback before the loop serves others


class Listener:
    """Listen on ``host:port``; every accepted connection gets ``protocol_factory()``."""

    def __init__(self, protocol_factory: Callable[[], asyncio.BaseProtocol], *,
                 ssl: ssl_module.SSLContext | None = None, ssl_handshake_timeout: float | None = None) -> None:
        self.protocol_factory = protocol_factory
        self.ssl = ssl
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.sockets: list[socket.socket] = []
        self.accepted = 0
        self.exhausted_pauses = 0  # times accepting paused for lack of descriptors
        self.paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = BACKOFF_FIRST_S
        self._resume: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def start(self, host: str | None, port: int, backlog: int = 1024, reuse_port: bool = False) -> None:
        """Bind (every address ``host`` resolves to, as ``create_server`` does), listen, start accepting."""
        self._loop = loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: set[tuple] = set()
        try:
            for family, _type, proto, _name, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, socket.SOCK_STREAM, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:  # several worker processes share the port (serve --workers N)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in self.sockets:
                sock.close()
            self.sockets = []
            raise
        self._watch(True)

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop accepting and close the listening sockets (accepted connections stay)."""
        if self._closed:
            return
        if self._resume is not None:
            self._resume.cancel()
        if not self.paused:
            self._watch(False)
        self._closed = True
        for sock in self.sockets:
            sock.close()
        for task in list(self._tasks):
            task.cancel()

    def _watch(self, on: bool) -> None:
        assert self._loop is not None
        for sock in self.sockets:
            if on:
                self._loop.add_reader(sock.fileno(), self._on_readable, sock)
            else:
                self._loop.remove_reader(sock.fileno())

    def _on_readable(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    self._pause(exc)
                    return
                continue  # ECONNABORTED, EPROTO, ...: that connection is gone, the next may be fine
            self._backoff = BACKOFF_FIRST_S
            self.accepted += 1
            self._hand_over(conn)

    def _pause(self, exc: OSError) -> None:
        assert self._loop is not None
        self._watch(False)
        self.paused = True
        self.exhausted_pauses += 1
        if self.exhausted_pauses == 1 or self._backoff >= BACKOFF_MAX_S:
            log.warning("accept on :%d paused for %.1fs: %s", self.port, self._backoff, exc.strerror)
        self._resume = self._loop.call_later(self._backoff, self._resume_accepting)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._closed:
            return
        self.paused = False
        self._watch(True)

    def _hand_over(self, conn: socket.socket) -> None:
        assert self._loop is not None
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs = {"ssl": self.ssl, "ssl_handshake_timeout": self.ssl_handshake_timeout}
        try:
            coro = self._loop.connect_accepted_socket(self.protocol_factory, conn, **kwargs)
        except Exception:
            conn.close()
            raise
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._handed_over)

    def _handed_over(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # a TLS handshake that failed or timed out; the transport closed the socket
            log.debug("connection set-up failed: %r", exc)
