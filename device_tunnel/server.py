"""Node side of the device tunnel: accept devices, authenticate, open streams, send control.

A thin asyncio adapter over :class:`~device_tunnel.connection.TunnelConnection` (see adapter.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl as ssl_module
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from .adapter import StreamHandler, TunnelProtocol, TunnelStream
from .connection import Role, TunnelConfig
from .errors import LocalUsageError
from .events import (
    ConnectionTerminated,
    ControlReplyReceived,
    Event,
    HelloReceived,
    StreamOpened,
    StreamOpenFailed,
)
from .frames import PROTOCOL_VERSION
from .registry import DeviceRegistry
from .replies import ReplyCode
from .windows import MemoryBudget, WindowSettings

log = logging.getLogger(__name__)

# (device_id, token, meta) -> True if the device may connect
DeviceAuthenticator = Callable[[str, str, dict], Awaitable[bool]]
# (device_id, online, meta) -> None: presence changes (first tunnel up / last tunnel down)
PresenceHook = Callable[[str, bool, dict], Awaitable[None]]

HELLO_TIMEOUT = 10.0
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024


class OpenHandler(StreamHandler, Protocol):
    """A stream handler that also learns how its OPEN went."""

    def open_result(self, result: OpenResult) -> None: ...


@dataclass(slots=True)
class OpenResult:
    """Outcome of opening a stream: ``rep`` is a ReplyCode value (0 = success)."""

    rep: int
    reason: str = ""
    bound_host: str = "0.0.0.0"
    bound_port: int = 0
    resolved_ip: str = ""
    stream: TunnelStream | None = None


class NodeTunnel(TunnelProtocol):
    """One tunnel connection from a device agent."""

    role = Role.NODE

    def __init__(self, server: TunnelServer) -> None:
        super().__init__(server.config, server.budget)
        self.server = server
        self.device_id: str | None = None
        self.meta: dict = {}
        self._ids = itertools.count(1)
        self._opening: dict[int, OpenHandler] = {}
        self._control: dict[str, asyncio.Future[dict]] = {}
        self.peer = ""

    def on_connected(self) -> None:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server.connections.add(self)

    def describe(self) -> str:
        return f"{self.device_id or 'unauthenticated'} from {self.peer}"

    def on_event(self, event: Event) -> None:
        cls = type(event)
        if cls is StreamOpened:
            self._opened(event)  # type: ignore[arg-type]
        elif cls is StreamOpenFailed:
            handler = self._opening.pop(event.stream_id, None)  # type: ignore[attr-defined]
            if handler is not None:
                handler.open_result(OpenResult(rep=event.rep, reason=event.reason,  # type: ignore[attr-defined]
                                               resolved_ip=event.resolved_ip))  # type: ignore[attr-defined]
        elif cls is ControlReplyReceived:
            fut = self._control.pop(str(event.body.get("id")), None)  # type: ignore[attr-defined]
            if fut is not None and not fut.done():
                fut.set_result(event.body)  # type: ignore[attr-defined]
        elif cls is HelloReceived:
            self.spawn(self._handle_hello(event))  # type: ignore[arg-type]
        elif cls is ConnectionTerminated:
            self.server.errors[event.code.name] += 1  # type: ignore[attr-defined]

    async def _handle_hello(self, hello: HelloReceived) -> None:
        ok = False
        if hello.version == PROTOCOL_VERSION and hello.device_id and hello.token:
            try:
                ok = await self.server.authenticate(hello.device_id, hello.token, hello.meta)
            except Exception:  # store down: refuse, the agent retries with back-off
                log.exception("device authentication failed for %s", hello.device_id)
        if self.closed:
            return
        if not ok or self.server.closing:
            error = "node shutting down" if ok else (
                "authentication failed" if hello.version == PROTOCOL_VERSION else "unsupported protocol version")
            log.info("device %s from %s refused: %s", hello.device_id, self.peer, error)
            self.conn.refuse(error)  # WELCOME is flushed before the close
            self.output_ready()
            return
        self.device_id = hello.device_id
        self.meta = hello.meta
        self.conn.accept(self.server.node_name)
        self.output_ready()
        await self.server._tunnel_up(self)

    def open_stream(self, host: str, port: int, handler: OpenHandler) -> int:
        """Ask the device to connect to host:port; ``handler.open_result`` is called with the outcome
        (from the frame that carries it, before any DATA of the stream). Returns the stream id."""
        try:
            sid = self.conn.open_stream(host, port)
        except LocalUsageError as exc:
            self._loop.call_soon(handler.open_result, OpenResult(rep=ReplyCode.GENERAL_FAILURE, reason=str(exc)))
            return 0
        self._opening[sid] = handler
        self.output_ready()
        return sid

    def cancel_open(self, stream_id: int) -> None:
        """The client gave up while opening: forget it and RST the device's attempt."""
        if self._opening.pop(stream_id, None) is not None:
            self.conn.reset_stream(stream_id, reason="cancelled")
            self.output_ready()

    def _opened(self, ev: StreamOpened) -> None:
        handler = self._opening.pop(ev.stream_id, None)
        if handler is None:
            self.conn.reset_stream(ev.stream_id, reason="cancelled")
            return
        stream = self.handles[ev.stream_id] = TunnelStream(self, ev.stream_id, handler)
        handler.open_result(OpenResult(rep=ReplyCode.SUCCEEDED, bound_host=ev.bound_host, bound_port=ev.bound_port,
                                       resolved_ip=ev.resolved_ip, stream=stream))

    async def control(self, body: dict, timeout: float = 10.0) -> dict:
        """Send a CONTROL message and wait for the device's CONTROL_REPLY."""
        cid = str(next(self._ids))
        fut: asyncio.Future[dict] = self._loop.create_future()
        self._control[cid] = fut
        self.conn.send_control({**body, "id": cid})
        self.output_ready()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._control.pop(cid, None)

    def send_goaway(self, reason: str) -> None:
        self.conn.send_goaway(reason)
        self.output_ready()

    def on_closed(self) -> None:
        self.server.connections.discard(self)
        opening, self._opening = self._opening, {}
        for handler in opening.values():
            handler.open_result(OpenResult(rep=ReplyCode.NETWORK_UNREACHABLE, reason="device disconnected"))
        for fut in self._control.values():
            if not fut.done():
                fut.set_exception(ConnectionError("device disconnected"))
        if self.device_id is not None:
            self.server.spawn(self.server._tunnel_down(self))


class TunnelServer:
    """Accepts device tunnels and keeps the registry and the store's presence in step."""

    def __init__(self, *, node_name: str, authenticate: DeviceAuthenticator, presence: PresenceHook,
                 registry: DeviceRegistry | None = None, ping_interval: float = 5.0,
                 dead_after: float = 15.0, window: int = 256 * 1024, max_window: int = 8 * 1024 * 1024,
                 conn_window: int = 64 * 1024 * 1024, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 config: TunnelConfig | None = None) -> None:
        self.node_name = node_name
        self.authenticate = authenticate
        self.presence = presence
        self.registry = registry or DeviceRegistry()
        self.config = config or TunnelConfig(
            ping_interval=ping_interval, dead_after=dead_after, handshake_timeout=HELLO_TIMEOUT,
            windows=WindowSettings(initial_window=window, max_window=max_window, conn_window=conn_window))
        self.budget = MemoryBudget(memory_budget)
        self.connections: set[NodeTunnel] = set()
        self.errors: Counter[str] = Counter()  # tunnels closed by this side, by error code
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, ssl: ssl_module.SSLContext | None = None,
                    reuse_port: bool = False) -> None:
        """Listen for devices (``ssl``: terminate TLS here; None = plain TCP; ``reuse_port``: SO_REUSEPORT)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: NodeTunnel(self), host, port, reuse_address=True,
                                                backlog=1024, ssl=ssl, reuse_port=reuse_port or None)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _tunnel_up(self, tunnel: NodeTunnel) -> None:
        assert tunnel.device_id is not None
        first = self.registry.add(tunnel.device_id, tunnel)
        log.info("device %s tunnel up from %s (%d tunnels)", tunnel.device_id, tunnel.peer,
                 len(self.registry.tunnels(tunnel.device_id)))
        if first:
            await self._presence(tunnel.device_id, True, tunnel.meta)

    async def _tunnel_down(self, tunnel: NodeTunnel) -> None:
        assert tunnel.device_id is not None
        last = self.registry.remove(tunnel.device_id, tunnel)
        log.info("device %s tunnel down", tunnel.device_id)
        if last:
            await self._presence(tunnel.device_id, False, {})

    async def _presence(self, device_id: str, online: bool, meta: dict) -> None:
        try:
            await self.presence(device_id, online, meta)
        except Exception:
            log.exception("could not record presence of %s", device_id)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def go_away(self, reason: str = "node shutting down") -> None:
        """Tell every device to open no new streams here and reconnect (after a while) elsewhere."""
        self.closing = True
        for t in list(self.connections):
            t.send_goaway(reason)

    def close_all(self) -> None:
        for t in list(self.connections):
            if t.transport is not None:
                t.transport.close()

    async def wait_tasks(self) -> None:
        """Let presence updates of closed tunnels finish (then cancel what is left)."""
        if self.tasks:
            _done, pending = await asyncio.wait(list(self.tasks), timeout=5)
            for task in pending:
                task.cancel()
