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
from .errors import ErrorCode, LocalUsageError
from .events import (
    ConnectionTerminated,
    ControlReplyReceived,
    Event,
    HelloReceived,
    StreamOpened,
    StreamOpenFailed,
)
from .frames import FEATURE_UDP, PROTOCOL_VERSION
from .listener import Listener
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
MAX_ID_KEY = 64  # longer device ids (never valid) are not used as rate-limit keys
RATE_LIMITED = "too many failed logins, try again later"
# tunnel closes for the peer's fault (misbehaviour); DEAD_PEER and NO_ERROR are not
VIOLATIONS = frozenset({ErrorCode.PROTOCOL_ERROR, ErrorCode.FLOW_CONTROL_ERROR, ErrorCode.STREAM_CLOSED,
                        ErrorCode.FRAME_SIZE_ERROR, ErrorCode.ENHANCE_YOUR_CALM, ErrorCode.HANDSHAKE_FAILED})
MARKED_DEVICES_MAX = 10_000


class LoginLimiter(Protocol):
    """Failed-login limiter (the node passes ``proxy.ratelimit.FailureLimiter``): per address, and per
    device id except from addresses that recently logged in as that device."""

    def allowed(self, address: str, connection_id: str | None) -> bool: ...
    def record_success(self, address: str, connection_id: str) -> None: ...
    def record_failure(self, key: str) -> None: ...


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
    node: str = ""  # the node holding the device's tunnel when the stream is relayed ("" = this node)


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
        self.peer_ip = ""
        self.accepted_at = self._loop.time()  # made at accept, before the TLS handshake
        self._refused = False
        self.device_id_claimed = ""  # the id in HELLO (device_id once accepted)
        self._stream_errors_seen = 0
        self._malformed_seen = 0

    def on_connected(self) -> None:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.peer_ip = peer[0] if peer else ""
        self.conn.connected_at = self.accepted_at  # HELLO is due HELLO_TIMEOUT after accept, TLS included
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        conn = self.conn
        if conn.stream_errors != self._stream_errors_seen:
            malformed = conn.malformed_open_replies - self._malformed_seen
            other = conn.stream_errors - self._stream_errors_seen - malformed
            self._stream_errors_seen, self._malformed_seen = conn.stream_errors, conn.malformed_open_replies
            if malformed:
                self.server.misbehaved(self, "malformed_open_ok", malformed)
            if other:
                self.server.misbehaved(self, "stream_violation", other)

    @property
    def opening(self) -> int:
        """OPENs sent and not answered yet."""
        return len(self._opening)

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
            code = event.code  # type: ignore[attr-defined]
            if not event.remote and code is not ErrorCode.NO_ERROR:  # type: ignore[attr-defined]
                self.server.errors[code.name] += 1
                if code in VIOLATIONS and not self._refused:
                    self.server.misbehaved(self, code.name.lower())

    def _refuse(self, error: str, kind: str | None) -> None:
        log.info("device %s from %s refused: %s", self.server.printable(self.device_id_claimed), self.peer, error)
        self._refused = True
        if kind is not None:
            self.server.misbehaved(self, kind)
        self.conn.refuse(error)  # WELCOME is flushed before the close (adapter: close, not abort)
        self.output_ready()

    async def _handle_hello(self, hello: HelloReceived) -> None:
        self.device_id_claimed = hello.device_id
        limiter = self.server.limiter
        id_key = hello.device_id if 0 < len(hello.device_id) <= MAX_ID_KEY else None
        if hello.version != PROTOCOL_VERSION:
            self._refuse("unsupported protocol version", None)
            return
        if limiter is not None and not limiter.allowed(self.peer_ip, id_key):
            limiter.record_failure(self.peer_ip)
            self._refuse(RATE_LIMITED, "login_rate_limited")
            return
        ok = False
        if hello.device_id and hello.token:
            try:
                ok = await self.server.authenticate(hello.device_id, hello.token, hello.meta)
            except Exception:  # store down: refuse, the agent retries with back-off
                log.exception("device authentication failed for %s", self.server.printable(hello.device_id))
                if not self.closed:
                    self._refuse("authentication unavailable, try again later", None)
                return
        if self.closed:
            return
        if not ok:
            if limiter is not None:
                limiter.record_failure(self.peer_ip)
                if id_key is not None:
                    limiter.record_failure(id_key)
            self._refuse("authentication failed", "login_failed")
            return
        if limiter is not None and id_key is not None:
            limiter.record_success(self.peer_ip, id_key)
        if self.server.closing:
            self._refuse("node shutting down", None)
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

    def open_udp(self, handler: OpenHandler) -> int:
        """Open a UDP association stream (the device must have announced "udp"); like
        :meth:`open_stream`, ``handler.open_result`` gets the outcome (0x07 for an older device)."""
        if FEATURE_UDP not in self.conn.peer_features:
            self._loop.call_soon(handler.open_result, OpenResult(rep=ReplyCode.COMMAND_NOT_SUPPORTED,
                                                                 reason="the device does not support UDP"))
            return 0
        try:
            sid = self.conn.open_udp_stream()
        except LocalUsageError as exc:
            self._loop.call_soon(handler.open_result, OpenResult(rep=ReplyCode.GENERAL_FAILURE, reason=str(exc)))
            return 0
        self._opening[sid] = handler
        self.output_ready()
        return sid


    def open_stream_early(self, host: str, port: int, handler: OpenHandler) -> int:
        """``open_stream`` for an optimistic open: ``early_write`` / ``early_eof`` may follow before the
        outcome (the bytes go right behind OPEN when the agent takes early data, else after OPEN_OK)."""
        try:
            sid = self.conn.open_stream(host, port, early=True)
        except LocalUsageError as exc:
            self._loop.call_soon(handler.open_result, OpenResult(rep=ReplyCode.GENERAL_FAILURE, reason=str(exc)))
            return 0
        self._opening[sid] = handler
        self.output_ready()
        return sid

    def early_write(self, stream_id: int, data: bytes) -> None:
        """Client bytes of a stream still opening (``open_stream_early``)."""
        if stream_id in self._opening:
            self.conn.send_data(stream_id, data)
            self.output_ready()

    def early_eof(self, stream_id: int) -> None:
        """The client half-closed while its stream was still opening: FIN after OPEN_OK."""
        if stream_id in self._opening:
            self.conn.send_eof(stream_id)

    def cancel_open(self, stream_id: int) -> None:
        """The client gave up while opening: forget it and RST the device's attempt. An OPEN unanswered
        for ``open_timeout`` (the session's own limit) counts as the device's misbehaviour."""
        if self._opening.pop(stream_id, None) is not None:
            stream = self.conn.streams.get(stream_id)
            if stream is not None and self.now() - stream.recv.last_update >= self.server.open_timeout * 0.99:
                self.server.misbehaved(self, "open_unanswered")
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
                 config: TunnelConfig | None = None, limiter: LoginLimiter | None = None,
                 open_timeout: float = 15.0) -> None:
        self.node_name = node_name
        self.limiter = limiter
        self.open_timeout = open_timeout  # the proxy's wait for an OPEN answer (CONNECT_TIMEOUT_S + 5)
        self.authenticate = authenticate
        self.presence = presence
        self.registry = registry or DeviceRegistry()
        self.config = config or TunnelConfig(
            ping_interval=ping_interval, dead_after=dead_after, handshake_timeout=HELLO_TIMEOUT,
            windows=WindowSettings(initial_window=window, max_window=max_window, conn_window=conn_window))
        self.budget = MemoryBudget(memory_budget)
        self.connections: set[NodeTunnel] = set()
        self.errors: Counter[str] = Counter()  # tunnels closed by this side, by error code (not NO_ERROR)
        self.misbehaviour: Counter[str] = Counter()  # what devices did wrong, by kind (PROTOCOL.md)
        self.marked: dict[str, Counter[str]] = {}  # device id -> its misbehaviour (bounded, newest kept)
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.listener: Listener | None = None

    async def start(self, host: str, port: int, ssl: ssl_module.SSLContext | None = None,
                    reuse_port: bool = False) -> None:
        """Listen for devices (``ssl``: terminate TLS here; None = plain TCP). Accepting pauses while the
        process is out of descriptors; the TLS handshake counts against the HELLO timeout."""
        self.listener = Listener(lambda: NodeTunnel(self), ssl=ssl,
                                 ssl_handshake_timeout=self.config.handshake_timeout if ssl else None)
        await self.listener.start(host, port, backlog=1024, reuse_port=reuse_port)

    def misbehaved(self, tunnel: NodeTunnel, kind: str, n: int = 1) -> None:
        """Count a device's misbehaviour (``/metrics``) and mark the device it claimed to be."""
        self.misbehaviour[kind] += n
        who = tunnel.device_id or tunnel.device_id_claimed
        if who and len(who) <= MAX_ID_KEY:
            marks = self.marked.pop(who, None) or Counter()
            marks[kind] += n
            self.marked[who] = marks
            if len(self.marked) > MARKED_DEVICES_MAX:
                self.marked.pop(next(iter(self.marked)))
            seen = marks[kind]
        else:
            seen = self.misbehaviour[kind]
        if seen & (seen - 1) == 0:  # 1st, 2nd, 4th, 8th, ... time: a flood does not flood the log
            log.warning("device %s from %s misbehaved: %s (%d times)", self.printable(who), tunnel.peer, kind, seen)

    @staticmethod
    def printable(device_id: str) -> str:
        """A device id as it may appear in a log line (what a hostile device claims is arbitrary text)."""
        return repr(device_id[:MAX_ID_KEY]) if not device_id.isprintable() or len(device_id) > MAX_ID_KEY \
            else device_id or "-"

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

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
        if self.listener is not None:
            self.listener.close()

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
