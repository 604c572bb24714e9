"""Node side of the device tunnel: accept devices, authenticate, open streams, send control."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Protocol

from . import frames
from .frames import PROTOCOL_VERSION, Frame, FrameError, FrameType
from .mux import Mux, MuxStream, StreamHandler
from .registry import DeviceRegistry

log = logging.getLogger(__name__)

# (device_id, token, meta) -> True if the device may connect
DeviceAuthenticator = Callable[[str, str, dict], Awaitable[bool]]
# (device_id, online, meta) -> None: presence changes (first tunnel up / last tunnel down)
PresenceHook = Callable[[str, bool, dict], Awaitable[None]]

HELLO_TIMEOUT = 10.0


class OpenHandler(StreamHandler, Protocol):
    """A stream handler that also learns how its OPEN went."""

    def open_result(self, result: OpenResult) -> None: ...


@dataclass(slots=True)
class OpenResult:
    """Outcome of opening a stream: ``rep`` is a SOCKS5 reply code (0 = success)."""

    rep: int
    reason: str = ""
    bound_host: str = "0.0.0.0"
    bound_port: int = 0
    resolved_ip: str = ""
    stream: MuxStream | None = None


class NodeTunnel(Mux):
    """One tunnel connection from a device agent."""

    def __init__(self, server: TunnelServer) -> None:
        s = server.settings
        super().__init__(ping_interval=s["ping_interval"], dead_after=s["dead_after"],
                         initial_window=s["window"], max_window=s["max_window"])
        self.server = server
        self.device_id: str | None = None
        self.meta: dict = {}
        self._ids = itertools.count(1)
        self._opening: dict[int, OpenHandler] = {}
        self._control: dict[str, asyncio.Future[dict]] = {}
        self._hello_timer: asyncio.TimerHandle | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.server.connections.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_timeout)

    def _hello_timeout(self) -> None:
        if self.device_id is None:
            log.info("tunnel %s sent no HELLO in time", self.peer)
            self.abort()

    def on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t == FrameType.HELLO:
            if self.device_id is not None or self.meta.get("_hello"):
                raise FrameError("duplicate HELLO")
            self.meta["_hello"] = True
            asyncio.get_running_loop().create_task(self._handle_hello(frame.json()))
        elif self.device_id is None:
            raise FrameError("frame before HELLO")
        elif t in (FrameType.OPEN_OK, FrameType.OPEN_FAIL):
            self._handle_open_reply(frame)
        elif t == FrameType.CONTROL_REPLY:
            body = frame.json()
            fut = self._control.pop(str(body.get("id")), None)
            if fut is not None and not fut.done():
                fut.set_result(body)
        else:
            raise FrameError(f"unexpected {FrameType(t).name} from device")

    async def _handle_hello(self, hello: dict) -> None:
        device_id = str(hello.get("device_id", ""))
        token = str(hello.get("token", ""))
        meta = hello.get("meta") if isinstance(hello.get("meta"), dict) else {}
        ok = False
        if hello.get("version") == PROTOCOL_VERSION and device_id and token:
            try:
                ok = await self.server.authenticate(device_id, token, meta)
            except Exception:  # store down: refuse, the agent retries with back-off
                log.exception("device authentication failed for %s", device_id)
        if self.closed:
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if not ok:
            self.send(frames.encode_json(FrameType.WELCOME, 0, {"ok": False, "error": "authentication failed"}))
            log.info("device %s from %s refused", device_id, self.peer)
            if self.transport is not None:
                self.transport.close()
            return
        if self.server.closing:
            self.send(frames.encode_json(FrameType.WELCOME, 0, {"ok": False, "error": "node shutting down"}))
            if self.transport is not None:
                self.transport.close()
            return
        self.device_id = device_id
        self.meta = meta
        self.send(frames.encode_json(FrameType.WELCOME, 0, {
            "ok": True, "node": self.server.node_name, "ping_interval": self.ping_interval,
        }))
        await self.server._tunnel_up(self)

    def open_stream(self, host: str, port: int, handler: OpenHandler) -> int:
        """Ask the device to connect to host:port; ``handler.open_result`` is called with the outcome
        (synchronously from the frame that carries it, before any DATA of the stream). Returns the id."""
        sid = next(self._ids)
        self._opening[sid] = handler
        self.send(frames.encode_json(FrameType.OPEN, sid, {"host": host, "port": port,
                                                            "window": self.initial_window}))
        return sid

    def cancel_open(self, stream_id: int) -> None:
        """The client gave up while opening: forget it and RST the device's attempt."""
        if self._opening.pop(stream_id, None) is not None:
            self.send(frames.encode(FrameType.RST, stream_id, b"cancelled"))

    def _handle_open_reply(self, frame: Frame) -> None:
        handler = self._opening.pop(frame.stream_id, None)
        body = frame.json()
        if handler is None:
            if frame.type == FrameType.OPEN_OK:  # nobody waits any more
                self.send(frames.encode(FrameType.RST, frame.stream_id, b"cancelled"))
            return
        if frame.type == FrameType.OPEN_FAIL:
            result = OpenResult(rep=int(body.get("rep", 1)), reason=str(body.get("reason", "")),
                                resolved_ip=str(body.get("resolved_ip", "")))
        else:
            window = int(body.get("window", self.initial_window))
            stream = MuxStream(self, frame.stream_id, handler, send_window=window,
                               recv_window=self.initial_window)
            self.streams[frame.stream_id] = stream
            result = OpenResult(rep=0, bound_host=str(body.get("bound_host", "0.0.0.0")),
                                bound_port=int(body.get("bound_port", 0)),
                                resolved_ip=str(body.get("resolved_ip", "")), stream=stream)
        handler.open_result(result)

    async def control(self, body: dict, timeout: float = 10.0) -> dict:
        """Send a CONTROL message and wait for the device's CONTROL_REPLY."""
        cid = str(next(self._ids))
        fut: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._control[cid] = fut
        self.send(frames.encode_json(FrameType.CONTROL, 0, {**body, "id": cid}))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._control.pop(cid, None)

    def on_closed(self) -> None:
        self.server.connections.discard(self)
        opening, self._opening = self._opening, {}
        for handler in opening.values():
            handler.open_result(OpenResult(rep=3, reason="device disconnected"))
        for fut in self._control.values():
            if not fut.done():
                fut.set_exception(ConnectionError("device disconnected"))
        if self.device_id is not None:
            asyncio.get_running_loop().create_task(self.server._tunnel_down(self))


class TunnelServer:
    """Accepts device tunnels and keeps the registry and the store's presence in step."""

    def __init__(self, *, node_name: str, authenticate: DeviceAuthenticator, presence: PresenceHook,
                 registry: DeviceRegistry | None = None, ping_interval: float = 5.0,
                 dead_after: float = 15.0, window: int = 256 * 1024, max_window: int = 8 * 1024 * 1024) -> None:
        self.node_name = node_name
        self.authenticate = authenticate
        self.presence = presence
        self.registry = registry or DeviceRegistry()
        self.settings = {"ping_interval": ping_interval, "dead_after": dead_after, "window": window,
                         "max_window": max_window}
        self.connections: set[NodeTunnel] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, ssl: SSLContext | None = None) -> None:
        """Listen for agents; ``ssl`` (see ``device_tunnel.tls.server_context``) makes it a TLS port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: NodeTunnel(self), host, port, reuse_address=True,
                                                backlog=1024, ssl=ssl)

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
