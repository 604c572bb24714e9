"""Node-to-node relay: a client authenticated at node X for a device whose tunnel is on node Y.

An X-Y link is a tunnel connection (the same sans-I/O core and adapter as a device tunnel) after
the HMAC handshake of ``relay_auth``. X (the dialer, :class:`RelayLink`) plays the node role and
opens streams; Y (the listener, :class:`RelayPeer`) plays the device role, except that it satisfies
an OPEN by opening a stream on the device's real tunnel (:class:`_Bridge`). Credit flows end to end:
Y acknowledges bytes of one leg only once the other leg's queue took them below its high-water mark,
so a client that does not read stalls its own stream on X, Y and the device, and nothing grows.

A link also carries CONTROL messages for a device on Y (:meth:`RelayLink.control`): Y sends the
message on the device's tunnel and returns the device's CONTROL_REPLY (or why it could not).

TLS: with ``ssl`` the link is TLS 1.3 (Y serves the cluster's shared tunnel certificate) and X checks
the certificate with ``verify`` (a pin) before reading or sending a byte of the handshake; the HMAC
handshake runs inside it. Without ``ssl`` the link is plain TCP with only the HMAC handshake.

:class:`RelayPool` keeps the authenticated links of X per peer; :class:`RelayServer` accepts them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from .adapter import TunnelProtocol, TunnelStream
from .connection import Role, TunnelConfig
from .errors import LocalUsageError
from .events import (
    ControlReceived,
    ControlReplyReceived,
    DataReceived,
    Event,
    HelloReceived,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
    StreamReset,
    WelcomeReceived,
)
from .registry import DeviceRegistry
from .relay_auth import DialerAuth, ListenerAuth, RelayAuthError
from .replies import ReplyCode
from .server import OpenHandler, OpenResult
from .tls import TunnelTlsError, Verifier
from .windows import MemoryBudget

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 10.0     # a relay connection that has not proved the secret by then is closed (TLS included)
CONNECT_TIMEOUT = 3.0   # TCP connect and TLS handshake of a new link
CONTROL_MARGIN = 5.0    # X waits this much longer than the device's timeout for Y's answer
TLS_CHECK_MARGIN = 0.5  # a relay TLS handshake not done this long after its deadline failed
MAX_CONTROL_TIMEOUT = 600.0


class DeviceOffline(ConnectionError):
    """No live tunnel of the device where it was looked for (this node, or the peer asked)."""


class RelayMetrics:
    """Counters exported on ``/metrics`` (per peer node)."""

    def __init__(self) -> None:
        self.streams: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()      # DATA payload this node sent to the peer
        self.bytes_received: Counter[str] = Counter()  # DATA payload this node received from the peer
        self.failures: Counter[str] = Counter()        # links that could not be made, OPENs refused
        self.auth_failures = 0
        self.live: set[_LinkBase] = set()

    def totals(self) -> tuple[Counter[str], Counter[str]]:
        """(sent, received) by peer, closed links plus the live ones."""
        sent, received = Counter(self.bytes_sent), Counter(self.bytes_received)
        for link in self.live:
            sent[link.peer] += link.conn.data_bytes_sent
            received[link.peer] += link.rx_bytes
        return sent, received


class _LinkBase(TunnelProtocol):
    """Relay handshake before the tunnel core; byte counting; metrics bookkeeping."""

    queue_kind = "relay"

    def __init__(self, config: TunnelConfig, budget: MemoryBudget | None, metrics: RelayMetrics,
                 auth: DialerAuth | ListenerAuth) -> None:
        super().__init__(config, budget)
        self.metrics = metrics
        self.auth = auth
        self.peer = ""
        self.rx_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.auth.done:
            super().data_received(data)
            return
        try:
            done, out, rest = self.auth.receive(data)
        except RelayAuthError as exc:
            self.auth_failed(str(exc))
            return
        if out and self.transport is not None:
            self.transport.write(out)
        if done:
            self.peer = self.auth.peer
            self.metrics.live.add(self)
            self.authenticated()
            if rest and self.transport is not None and not self.transport.is_closing():
                super().data_received(rest)

    def dispatch(self, events: list[Event]) -> None:
        for ev in events:
            if type(ev) is DataReceived:
                self.rx_bytes += len(ev.data)  # type: ignore[attr-defined]
        super().dispatch(events)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self in self.metrics.live:
            self.metrics.live.discard(self)
            self.metrics.bytes_sent[self.peer] += self.conn.data_bytes_sent
            self.metrics.bytes_received[self.peer] += self.rx_bytes

    def auth_failed(self, reason: str) -> None:
        raise NotImplementedError

    def authenticated(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"relay link with {self.peer or 'unauthenticated peer'}"


# == X: the dialer ==================================================================================
class RelayLink(_LinkBase):
    """X's end of a link to peer Y: ``open_stream`` like a local :class:`NodeTunnel`."""

    role = Role.NODE

    def __init__(self, pool: RelayPool, expected_peer: str) -> None:
        super().__init__(pool.config, pool.budget, pool.metrics, DialerAuth(pool.node_name, pool.secret))
        self.pool = pool
        self.expected_peer = expected_peer
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._opening: dict[int, OpenHandler] = {}
        self._control: dict[str, asyncio.Future[dict]] = {}
        self._control_ids = 0
        self.refused = False

    def on_connected(self) -> None:
        """TLS is up (or plain TCP): check the peer's certificate before any handshake byte."""
        verify = self.pool.verify
        if verify is None:
            return
        assert self.transport is not None
        try:
            verify(self.transport)
        except TunnelTlsError as exc:
            log.warning("relay link to %s refused: %s", self.expected_peer, exc)
            if not self.ready.done():
                self.ready.set_exception(exc)
            self.refused = True
            self.abort()

    def data_received(self, data: bytes) -> None:
        if not self.refused:  # nothing from a peer whose certificate failed is read
            super().data_received(data)

    def auth_failed(self, reason: str) -> None:
        log.warning("relay link to %s refused: %s", self.expected_peer, reason)
        if not self.ready.done():
            self.ready.set_exception(ConnectionRefusedError(reason))
        self.abort()

    def authenticated(self) -> None:
        if self.peer != self.expected_peer:
            self.auth_failed(f"peer calls itself {self.peer!r}, expected {self.expected_peer!r}")

    def on_event(self, event: Event) -> None:
        cls = type(event)
        if cls is HelloReceived:
            self.conn.accept(self.pool.node_name)
            self.output_ready()
            if not self.ready.done():
                self.ready.set_result(None)
        elif cls is StreamOpened:
            handler = self._opening.pop(event.stream_id, None)  # type: ignore[attr-defined]
            if handler is None:
                self.conn.reset_stream(event.stream_id, reason="cancelled")  # type: ignore[attr-defined]
                return
            stream = self.handles[event.stream_id] = TunnelStream(self, event.stream_id, handler)  # type: ignore[attr-defined]
            handler.open_result(OpenResult(rep=ReplyCode.SUCCEEDED, bound_host=event.bound_host,  # type: ignore[attr-defined]
                                           bound_port=event.bound_port, resolved_ip=event.resolved_ip,  # type: ignore[attr-defined]
                                           stream=stream, node=self.peer))
        elif cls is StreamOpenFailed:
            handler = self._opening.pop(event.stream_id, None)  # type: ignore[attr-defined]
            if handler is not None:
                handler.open_result(OpenResult(rep=event.rep, reason=event.reason,  # type: ignore[attr-defined]
                                               resolved_ip=event.resolved_ip, node=self.peer))  # type: ignore[attr-defined]
        elif cls is ControlReplyReceived:
            fut = self._control.pop(str(event.body.get("id")), None)  # type: ignore[attr-defined]
            if fut is not None and not fut.done():
                fut.set_result(event.body)  # type: ignore[attr-defined]

    async def control(self, device_id: str, body: dict, timeout: float) -> dict:
        """Send CONTROL ``body`` to ``device_id``'s tunnel on the peer; the device's CONTROL_REPLY.

        Raises :class:`DeviceOffline` (no tunnel of the device on the peer), TimeoutError (the device
        did not answer within ``timeout``) or ConnectionError (the device or the link went away)."""
        self._control_ids += 1
        cid = str(self._control_ids)
        fut: asyncio.Future[dict] = self._loop.create_future()
        self._control[cid] = fut
        self.conn.send_control({"id": cid, "device": device_id, "timeout": timeout, "body": body})
        self.output_ready()
        try:
            answer = await asyncio.wait_for(fut, timeout + CONTROL_MARGIN)
        finally:
            self._control.pop(cid, None)
        error = answer.get("error")
        if error is None and isinstance(answer.get("reply"), dict):
            return answer["reply"]
        reason = str(answer.get("reason") or error)
        if error == "offline":
            raise DeviceOffline(reason)
        if error == "timeout":
            raise TimeoutError(reason)
        raise ConnectionError(reason)

    @property
    def usable(self) -> bool:
        return (self.ready.done() and not self.ready.exception() and not self.going_away
                and not self.closed and self.conn.windows.can_open)

    def open_stream(self, host: str, port: int, handler: OpenHandler, device_id: str,
                    connection_id: str | None = None) -> int:
        """Ask the peer to open host:port on ``device_id``'s tunnel; ``handler.open_result`` follows."""
        try:
            sid = self.conn.open_stream(host, port, relay={"device": device_id, "connection": connection_id or ""})
        except LocalUsageError as exc:
            self.metrics.failures[self.peer] += 1
            self._loop.call_soon(handler.open_result, OpenResult(rep=ReplyCode.GENERAL_FAILURE, reason=str(exc),
                                                                 node=self.peer))
            return 0
        self.metrics.streams[self.peer] += 1
        self._opening[sid] = handler
        self.output_ready()
        return sid

    def cancel_open(self, stream_id: int) -> None:
        if self._opening.pop(stream_id, None) is not None:
            self.conn.reset_stream(stream_id, reason="cancelled")
            self.output_ready()

    def on_closed(self) -> None:
        self.pool._link_closed(self)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("relay link closed during the handshake"))
        opening, self._opening = self._opening, {}
        for handler in opening.values():
            handler.open_result(OpenResult(rep=ReplyCode.NETWORK_UNREACHABLE, reason="relay link lost", node=self.peer))
        for fut in self._control.values():
            if not fut.done():
                fut.set_exception(ConnectionError("relay link lost"))


class RelayPool:
    """X's authenticated links, pooled per peer node (a new link when every one is full)."""

    def __init__(self, *, node_name: str, secret: str, config: TunnelConfig, budget: MemoryBudget | None,
                 metrics: RelayMetrics | None = None, ssl: ssl_module.SSLContext | None = None,
                 server_hostname: str | None = None, verify: Verifier | None = None) -> None:
        """``ssl``: dial links over TLS; ``verify(transport)`` then checks the peer (raises
        :class:`~device_tunnel.tls.TunnelTlsError`), e.g. ``tls.pin_verifier(shared_fingerprint)``."""
        self.node_name, self.secret = node_name, secret
        self.config, self.budget = config, budget
        self.metrics = metrics or RelayMetrics()
        self.ssl, self.server_hostname, self.verify = ssl, server_hostname, verify
        self.links: dict[str, list[RelayLink]] = {}
        self._connecting: dict[str, asyncio.Task[RelayLink]] = {}

    async def link(self, peer: str, address: str) -> RelayLink:
        """A usable link to ``peer`` at ``host:port`` (connects and authenticates when needed)."""
        for link in self.links.get(peer, ()):
            if link.usable:
                return link
        task = self._connecting.get(peer)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(peer, address))
            self._connecting[peer] = task
            task.add_done_callback(lambda _t: self._connecting.pop(peer, None))
        return await asyncio.shield(task)

    async def _connect(self, peer: str, address: str) -> RelayLink:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            _tr, link = await asyncio.wait_for(loop.create_connection(
                lambda: RelayLink(self, peer), host.strip("[]"), int(port), ssl=self.ssl,
                server_hostname=self.server_hostname if self.ssl is not None else None,
                ssl_handshake_timeout=CONNECT_TIMEOUT if self.ssl is not None else None), CONNECT_TIMEOUT)
            try:
                await asyncio.wait_for(link.ready, AUTH_TIMEOUT)
            except BaseException:
                link.abort()
                raise
        except (OSError, TimeoutError, ValueError, ConnectionError) as exc:
            self.metrics.failures[peer] += 1
            raise ConnectionError(f"relay to {peer} at {address}: {exc}") from exc
        self.links.setdefault(peer, []).append(link)
        log.info("relay link up to %s at %s", peer, address)
        return link

    def _link_closed(self, link: RelayLink) -> None:
        links = self.links.get(link.expected_peer)
        if links and link in links:
            links.remove(link)
            if not links:
                del self.links[link.expected_peer]

    def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        for links in list(self.links.values()):
            for link in list(links):
                link.abort()


# == Y: the listener ================================================================================
class _End:
    """Handler of one leg of a relayed stream; what arrives on its leg is written to the other leg."""

    __slots__ = ("bridge", "stream", "other", "blocked")

    def __init__(self, bridge: _Bridge) -> None:
        self.bridge = bridge
        self.stream: TunnelStream | None = None
        self.other: _End = self
        self.blocked = False   # the other leg's send queue is full: withhold this leg's credit

    def stream_data(self, data: bytes) -> None:
        o = self.other.stream
        if o is not None:
            o.write(data)

    def stream_eof(self) -> None:
        o = self.other.stream
        if o is not None:
            o.write_eof()

    def stream_closed(self, error: str | None) -> None:
        self.stream = None
        o = self.other.stream
        if error and o is not None:
            o.reset(error)
        if self.other.stream is None:
            self.bridge.done()

    def pause_source(self) -> None:
        self.other.blocked = True

    def resume_source(self) -> None:
        self.other.blocked = False
        if self.other.stream is not None:
            self.other.stream.sink_drained()

    def sink_ready(self) -> bool:
        return not self.blocked

    def open_result(self, result: OpenResult) -> None:  # the device leg only
        self.bridge.device_opened(result)


class RotationWait(Protocol):
    """What the relay needs of the proxy's rotation gate (``proxy.rotation_gate.RotationGate``)."""

    def is_rotating(self, device_id: str | None) -> bool: ...

    def wait(self, device_id: str, resume: Callable[[], None]) -> Callable[[], None]: ...


class _Bridge:
    """One relayed stream on Y: the link leg (to X) and the device leg (to the device's tunnel)."""

    def __init__(self, peer: RelayPeer, link_sid: int, connection_id: str, device_id: str = "") -> None:
        self.peer = peer
        self.link_sid = link_sid
        self.connection_id = connection_id
        self.device_id = device_id
        self.link_end, self.device_end = _End(self), _End(self)
        self.link_end.other, self.device_end.other = self.device_end, self.link_end
        self.cancel: Callable[[], None] | None = None

    def device_opened(self, result: OpenResult) -> None:
        peer = self.peer
        self.cancel = None
        if result.rep != 0 or result.stream is None:
            peer.opening.pop(self.link_sid, None)
            peer.conn.reject_stream(self.link_sid, result.rep or ReplyCode.GENERAL_FAILURE,
                                    result.reason or "device could not connect", result.resolved_ip)
            peer.output_ready()
            self.done()
            return
        peer.opening.pop(self.link_sid, None)
        device_stream = result.stream
        device_stream.handler = self.device_end
        self.device_end.stream = device_stream
        if peer.closed or not peer.conn.accept_stream(self.link_sid, result.bound_host, result.bound_port,
                                                      result.resolved_ip):
            self.device_end.stream = None
            device_stream.handler = None
            device_stream.close_quietly()
            self.done()
            return
        self.link_end.stream = peer.handles[self.link_sid] = TunnelStream(peer, self.link_sid, self.link_end)
        peer.output_ready()

    def terminate(self, reason: str) -> None:
        """End both legs now (connection deleted or dissociated)."""
        if self.cancel is not None:  # still opening on the device
            self.cancel()
            self.cancel = None
            self.peer.opening.pop(self.link_sid, None)
            self.peer.conn.reset_stream(self.link_sid, reason=reason)
            self.peer.output_ready()
        for end in (self.link_end, self.device_end):
            if end.stream is not None:
                end.stream.reset(reason)
        self.done()

    def done(self) -> None:
        self.peer.server._bridge_done(self)


class RelayPeer(_LinkBase):
    """Y's end of a link from peer X: OPENs are satisfied on the device's real tunnel."""

    role = Role.AGENT

    def __init__(self, server: RelayServer) -> None:
        super().__init__(server.config, server.budget, server.metrics, ListenerAuth(server.node_name, server.secret))
        self.server = server
        self.opening: dict[int, _Bridge] = {}
        self._auth_timer: asyncio.TimerHandle | None = None
        self.tls_done = False

    def tls_check(self) -> None:
        """The TLS handshake's deadline has passed (asyncio aborted it by then): a connection that never
        completed it (failed or timed out; asyncio does not tell the protocol) counts as refused."""
        if not self.tls_done:
            self.metrics.auth_failures += 1
            log.info("relay connection refused: no TLS handshake completed")

    def on_connected(self) -> None:
        assert self.transport is not None
        self.tls_done = True
        self.server.connections.add(self)
        self.transport.write(self.auth.start())  # type: ignore[union-attr]
        # with TLS, half the budget went to the TLS handshake (ssl_handshake_timeout of the listener)
        left = self.server.auth_timeout / 2 if self.server.tls else self.server.auth_timeout
        self._auth_timer = self._loop.call_later(left, self._auth_timeout)

    def _auth_timeout(self) -> None:
        self._auth_timer = None
        if not self.auth.done:
            self.auth_failed("no relay handshake in time")

    def auth_failed(self, reason: str) -> None:
        self.metrics.auth_failures += 1
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        log.warning("relay connection from %s refused: %s", peer, reason)
        if self.transport is not None and not self.closed:
            self.transport.write(ListenerAuth.refusal())
            self.transport.close()
            self._loop.call_later(2.0, self.abort)

    def authenticated(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self.conn.send_hello(self.server.node_name, "relay", {"relay": True})
        self.output_ready()

    def on_event(self, event: Event) -> None:
        cls = type(event)
        if cls is StreamOpenRequested:
            self._open(event)  # type: ignore[arg-type]
        elif cls is StreamReset:  # X gave up on an OPEN still waiting for the device
            bridge = self.opening.pop(event.stream_id, None)  # type: ignore[attr-defined]
            if bridge is not None and bridge.cancel is not None:
                bridge.cancel()
                bridge.cancel = None
                bridge.done()
        elif cls is ControlReceived:
            self.spawn(self._control(event.body))  # type: ignore[attr-defined]
        elif cls is WelcomeReceived and not event.ok:  # type: ignore[attr-defined]
            self.abort()

    async def _control(self, msg: dict) -> None:
        """A CONTROL for a device here: send it on the device's tunnel, answer with its reply."""
        answer: dict[str, Any] = {"id": msg.get("id")}
        device, body, timeout = msg.get("device"), msg.get("body"), msg.get("timeout")
        tunnel = self.server.registry.pick(device) if isinstance(device, str) and device else None
        if not isinstance(body, dict) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_CONTROL_TIMEOUT:
            answer.update(error="invalid", reason="malformed relayed CONTROL")
        elif tunnel is None:
            answer.update(error="offline", reason=f"device offline (not on node {self.server.node_name})")
        else:
            try:
                answer["reply"] = await tunnel.control(body, timeout=float(timeout))
            except TimeoutError:
                answer.update(error="timeout", reason="the device did not answer in time")
            except (ConnectionError, OSError) as exc:
                answer.update(error="disconnected", reason=f"device disconnected: {exc}")
        if not self.closed:
            self.conn.send_control_reply(answer)
            self.output_ready()

    def _open(self, ev: StreamOpenRequested) -> None:
        relay = ev.relay or {}
        device = relay.get("device")
        gate = self.server.gate
        if gate is not None and isinstance(device, str) and gate.is_rotating(device):
            # the device is changing its public IP: the open waits as a local one does (X's open timer
            # bounds the wait; X's RST or the link's end cancels it)
            conn_id = relay.get("connection")
            waiting = _Bridge(self, ev.stream_id, conn_id if isinstance(conn_id, str) else "", device)
            self.opening[ev.stream_id] = waiting

            def resume() -> None:
                if self.opening.get(ev.stream_id) is waiting:
                    del self.opening[ev.stream_id]
                    if not self.closed:
                        self._open(ev)
            waiting.cancel = gate.wait(device, resume)
            return
        tunnel = self.server.registry.pick(device) if isinstance(device, str) and device else None
        self.metrics.streams[self.peer] += 1
        if tunnel is None:
            self.metrics.failures[self.peer] += 1
            self.conn.reject_stream(ev.stream_id, ReplyCode.NETWORK_UNREACHABLE,
                                    f"device offline (not on node {self.server.node_name})")
            self.output_ready()
            return
        conn_id = relay.get("connection")
        bridge = _Bridge(self, ev.stream_id, conn_id if isinstance(conn_id, str) else "", device)
        self.opening[ev.stream_id] = bridge
        self.server._bridge_added(bridge)
        sid = tunnel.open_stream(ev.host, ev.port, bridge.device_end)  # type: ignore[arg-type]
        if ev.stream_id in self.opening:  # not answered synchronously
            bridge.cancel = lambda: tunnel.cancel_open(sid)

    def on_closed(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self.server.connections.discard(self)
        opening, self.opening = self.opening, {}
        for bridge in opening.values():
            if bridge.cancel is not None:
                bridge.cancel()
                bridge.cancel = None
            bridge.done()


class RelayServer:
    """Y's listener for links from the other nodes (``RELAY_PORT``)."""

    def __init__(self, *, node_name: str, secret: str, registry: DeviceRegistry, config: TunnelConfig,
                 budget: MemoryBudget | None, metrics: RelayMetrics | None = None,
                 auth_timeout: float = AUTH_TIMEOUT) -> None:
        self.node_name, self.secret = node_name, secret
        self.registry = registry
        self.config, self.budget = config, budget
        self.metrics = metrics or RelayMetrics()
        self.auth_timeout = auth_timeout
        self.tls = False
        self.connections: set[RelayPeer] = set()
        self._by_connection: dict[str, set[_Bridge]] = {}
        self._by_device: dict[str, set[_Bridge]] = {}
        # devices rotating their IP (``is_rotating(device)``, ``wait(device, resume) -> cancel``): relayed
        # opens for them wait like local ones; None = never wait
        self.gate: RotationWait | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, ssl: ssl_module.SSLContext | None = None) -> None:
        """Listen for relay links (``ssl``: TLS 1.3 with the tunnel certificate; None = plain TCP).

        With TLS, a connection gets ``auth_timeout / 2`` for the TLS handshake and the rest for the
        relay handshake, so one that sends nothing is closed within ``auth_timeout`` either way."""
        loop = asyncio.get_running_loop()
        self.tls = ssl is not None
        self._server = await loop.create_server(
            self._accepted, host, port, reuse_address=True, backlog=1024, ssl=ssl,
            ssl_handshake_timeout=self.auth_timeout / 2 if ssl is not None else None)

    def _accepted(self) -> RelayPeer:
        """A new connection (before its TLS handshake): with TLS, a failed handshake is counted in
        ``auth_failures`` once its deadline has passed (:meth:`RelayPeer.tls_check`)."""
        peer = RelayPeer(self)
        if self.tls:
            asyncio.get_running_loop().call_later(self.auth_timeout / 2 + TLS_CHECK_MARGIN, peer.tls_check)
        return peer

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def _bridge_added(self, bridge: _Bridge) -> None:
        if bridge.connection_id:
            self._by_connection.setdefault(bridge.connection_id, set()).add(bridge)
        if bridge.device_id:
            self._by_device.setdefault(bridge.device_id, set()).add(bridge)

    def _bridge_done(self, bridge: _Bridge) -> None:
        for index, key in ((self._by_connection, bridge.connection_id), (self._by_device, bridge.device_id)):
            group = index.get(key)
            if group is not None:
                group.discard(bridge)
                if not group:
                    del index[key]

    def terminate_device(self, device_id: str, reason: str) -> int:
        """End the streams relayed to a device on this node (its IP rotates: they would break anyway)."""
        bridges = list(self._by_device.get(device_id, ()))
        for bridge in bridges:
            bridge.terminate(reason)
        return len(bridges)

    def terminate_connection(self, connection_id: str, reason: str) -> int:
        """End the relayed streams of a connection on this node (the client's node ends its session too)."""
        bridges = list(self._by_connection.get(connection_id, ()))
        for bridge in bridges:
            bridge.terminate(reason)
        return len(bridges)

    def streams_open(self) -> int:
        return sum(len(group) for group in self._by_connection.values())

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def go_away(self) -> None:
        for peer in list(self.connections):
            peer.conn.send_goaway("node shutting down")
            peer.output_ready()

    def close_all(self) -> None:
        for peer in list(self.connections):
            if peer.transport is not None:
                peer.transport.close()


def relay_config(base: TunnelConfig) -> TunnelConfig:
    """Links use the node's tunnel settings (windows, pings, dead-peer detection)."""
    return TunnelConfig(ping_interval=base.ping_interval, dead_after=base.dead_after,
                        handshake_timeout=AUTH_TIMEOUT + base.handshake_timeout, windows=base.windows)


__all__: list[Any] = ["DeviceOffline", "RelayLink", "RelayMetrics", "RelayPeer", "RelayPool", "RelayServer", "relay_config"]
