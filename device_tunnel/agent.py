"""The device agent: the program a phone (or any host) runs to lend its network to the proxy.

It dials out to a node (``--tunnels N`` connections), authenticates with its device token, and for
each OPEN connects to the requested target from this device's network, refusing private, loopback
and link-local destinations unless ``allow_private`` is set. DNS is resolved here, the resolved
address is checked, then exactly that checked address is connected (no DNS-rebinding window).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import platform
import random
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .adapter import TunnelProtocol, TunnelStream
from .connection import Role, TunnelConfig
from .events import ControlReceived, Event, GoAwayReceived, StreamOpenRequested, StreamReset, WelcomeReceived
from .frames import FEATURE_UDP
from .replies import ReplyCode, reply_for_errno
from .target_policy import is_forbidden_address, parse_ip_literal
from .tls import explain_connect_error
from .udp import DeviceUdpAssociation
from .windows import MemoryBudget, WindowSettings

log = logging.getLogger(__name__)

TARGET_WRITE_HIGH = 256 * 1024
TARGET_WRITE_LOW = 64 * 1024

AutomationRunner = Callable[[dict], Awaitable[dict]]


@lru_cache(maxsize=4096)
def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``str(ip)`` (pure Python in ipaddress: a few µs per OPEN otherwise)."""
    return str(ip)
# Called with the connected transport (after TLS, before HELLO); raising refuses the node.
TransportVerifier = Callable[[asyncio.BaseTransport], None]


@dataclass
class AgentConfig:
    """Everything the agent needs; mirrors the ``proxyorch device-agent`` options."""

    host: str
    port: int
    device_id: str
    token: str
    tunnels: int = 1
    source_address: str | None = None
    allow_private: bool = False
    connect_timeout: float = 10.0
    ping_interval: float = 5.0
    dead_after: float = 15.0
    window: int = 256 * 1024
    max_window: int = 8 * 1024 * 1024
    conn_window: int = 64 * 1024 * 1024
    memory_budget: int = 256 * 1024 * 1024   # receive windows of all tunnels of this agent together
    meta: dict = field(default_factory=dict)
    runner: AutomationRunner | None = None
    ssl: ssl_module.SSLContext | None = None
    server_hostname: str | None = None
    verify: TransportVerifier | None = None  # runs after connect, before any HELLO byte (raise = refuse)
    plaintext: bool = False  # ssl=None is refused unless plaintext is asked for explicitly
    rotate_command: str | None = None  # shell command that changes the public IP (see rotation.py)
    ip_echo_url: str | None = None  # fetched through the egress to learn the public IP
    rotate_recheck_s: float = 5.0  # an unchanged IP is checked once more after this long
    rotator: Any = None  # the agent's Rotator (created by DeviceAgent); shared by its tunnels
    # Every node the agent may use (``--server h1:p1,h2:p2``); empty = just (host, port). The agent
    # stays on one and moves to the next when it is gone, refuses the device, or sends GOAWAY.
    servers: list[tuple[str, int]] = field(default_factory=list)
    stats_file: str | None = None  # every 100 ms: the tunnels' outbound queues by layer (JSON lines)

    def server_list(self) -> list[tuple[str, int]]:
        return list(self.servers) or [(self.host, self.port)]

    def tunnel_config(self) -> TunnelConfig:
        return TunnelConfig(ping_interval=self.ping_interval, dead_after=self.dead_after,
                            windows=WindowSettings(initial_window=self.window, max_window=self.max_window,
                                                   conn_window=self.conn_window))


def device_metadata(overrides: dict | None = None) -> dict:
    """Brand, model, OS version, country, network type, cores and RAM of this device."""

    def getprop(name: str) -> str:
        try:
            import subprocess

            return subprocess.run(["getprop", name], capture_output=True, text=True, timeout=2).stdout.strip()
        except (OSError, ValueError, Exception):
            return ""

    ram_mb = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram_mb = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    meta = {
        "brand": os.environ.get("DEVICE_BRAND") or getprop("ro.product.brand") or platform.system(),
        "model": os.environ.get("DEVICE_MODEL") or getprop("ro.product.model") or platform.machine(),
        "version": os.environ.get("DEVICE_OS_VERSION") or getprop("ro.build.version.release") or platform.release(),
        "sdkVersion": getprop("ro.build.version.sdk") or "",
        "country": os.environ.get("DEVICE_COUNTRY", ""),
        "networkType": os.environ.get("DEVICE_NETWORK_TYPE", "unknown"),
        "numberOfCores": os.cpu_count() or 1,
        "ramMb": ram_mb,
        "processor": platform.processor() or platform.machine(),
        "isEmulator": False,
    }
    meta.update(overrides or {})
    return meta


class TargetConnection(asyncio.Protocol):
    """The device's socket to a target; the local end of one tunnel stream."""

    __slots__ = ("transport", "stream", "write_paused", "early", "early_eof")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.stream: TunnelStream | None = None
        self.write_paused = False
        self.early: bytearray | None = bytearray()  # bytes that arrive before the stream is attached
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=TARGET_WRITE_HIGH, low=TARGET_WRITE_LOW)
        transport.pause_reading()  # until the stream is attached

    def attach(self, stream: TunnelStream) -> None:
        self.stream = stream
        if self.transport is not None and not self.transport.is_closing():
            # Resume first: writing the early bytes may pause the source again, and that pause wins.
            self.transport.resume_reading()
        early, self.early = self.early, None
        if early:
            stream.write(bytes(early))
        if self.early_eof:
            stream.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.write(data)
        elif self.early is not None:
            self.early += data  # at most one read: reading is paused until attach

    def eof_received(self) -> bool:
        if self.stream is not None:
            self.stream.write_eof()
        else:
            self.early_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.handler = None
            stream.close_quietly()  # FIN already sent when the target closed cleanly; RST otherwise

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stream is not None:
            self.stream.sink_drained()

    # StreamHandler
    def stream_data(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def stream_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()

    def stream_closed(self, error: str | None) -> None:
        self.stream = None
        if self.transport is not None:
            if error:
                self.transport.abort()
            else:
                self.transport.close()

    def pause_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def sink_ready(self) -> bool:
        return not self.write_paused


class AgentTunnel(TunnelProtocol):
    """One tunnel connection, device side."""

    role = Role.AGENT

    def __init__(self, config: AgentConfig, budget: MemoryBudget | None = None,
                 server: tuple[str, int] | None = None) -> None:
        super().__init__(config.tunnel_config(), budget)
        self.config = config
        self.server = server or (config.host, config.port)
        self.welcome: asyncio.Future[WelcomeReceived] = self._loop.create_future()
        self.goaway = asyncio.Event()  # the node asked us to move (it is shutting down)
        self._opening: dict[int, asyncio.Task[None]] = {}
        self._early: dict[int, list[bytes]] = {}  # optimistic open: DATA that came before the target connected

    def on_connected(self) -> None:
        cfg = self.config
        if cfg.verify is not None:
            assert self.transport is not None
            try:
                cfg.verify(self.transport)  # before a single HELLO byte leaves
            except Exception as exc:
                log.error("node refused by the transport check: %s", exc)
                if not self.welcome.done():
                    # a ConnectionError (e.g. TunnelTlsError) keeps its type: the reconnect loop explains it
                    self.welcome.set_exception(exc if isinstance(exc, ConnectionError)
                                               else ConnectionError(f"node not verified: {exc}"))
                self.transport.abort()
                return
        self.conn.send_hello(cfg.device_id, cfg.token, cfg.meta, features=(FEATURE_UDP,))

    def describe(self) -> str:
        return f"to {self.server[0]}:{self.server[1]}"

    def on_event(self, event: Event) -> None:
        cls = type(event)
        if cls is StreamOpenRequested and event.udp:  # type: ignore[attr-defined]
            self._open_udp(event.stream_id)  # type: ignore[attr-defined]
        elif cls is StreamOpenRequested:
            sid = event.stream_id  # type: ignore[attr-defined]
            task = self.spawn(self._open(sid, event.host, event.port))  # type: ignore[attr-defined]
            self._opening[sid] = task
            task.add_done_callback(lambda _t, sid=sid: (self._opening.pop(sid, None), self._early.pop(sid, None)))
        elif cls is StreamReset:  # the node gave up on an OPEN still connecting
            task = self._opening.pop(event.stream_id, None)  # type: ignore[attr-defined]
            if task is not None:
                task.cancel()
        elif cls is ControlReceived:
            self.spawn(self._control(event.body))  # type: ignore[attr-defined]
        elif cls is GoAwayReceived:
            self.goaway.set()
        elif cls is WelcomeReceived:
            if not self.welcome.done():
                self.welcome.set_result(event)  # type: ignore[arg-type]

    def on_closed(self) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("tunnel closed before WELCOME"))

    def hold_early(self, stream_id: int, data: bytes) -> bool:
        if stream_id not in self._opening:
            return False
        self._early.setdefault(stream_id, []).append(data)  # bounded by the early_data we announced
        return True

    def _fail(self, sid: int, rep: int, reason: str, resolved_ip: str = "") -> None:
        self.conn.reject_stream(sid, rep, reason, resolved_ip)
        self.output_ready()

    async def _resolve(self, host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        seen: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip not in seen:
                seen.append(ip)
        return seen

    async def _open(self, sid: int, host: str, port: int) -> None:
        cfg = self.config
        if not host or not 0 < port < 65536:
            self._fail(sid, ReplyCode.GENERAL_FAILURE, "bad target")
            return
        try:
            literal = parse_ip_literal(host)
            if literal is not None:
                addresses = [literal]
            else:
                async with asyncio.timeout(cfg.connect_timeout):
                    addresses = await self._resolve(host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            self._fail(sid, ReplyCode.HOST_UNREACHABLE, f"cannot resolve {host}: {exc}")
            return
        except TimeoutError:
            self._fail(sid, ReplyCode.TTL_EXPIRED, f"resolving {host} timed out")
            return
        if not addresses:
            self._fail(sid, ReplyCode.HOST_UNREACHABLE, f"no address for {host}")
            return
        if not cfg.allow_private:
            allowed = [ip for ip in addresses if not is_forbidden_address(ip)]
            if not allowed:
                self._fail(sid, ReplyCode.NOT_ALLOWED, "target address is private, loopback or link-local",
                           str(addresses[0]))
                return
            addresses = allowed
        if cfg.source_address:
            family = ipaddress.ip_address(cfg.source_address).version
            addresses = [ip for ip in addresses if ip.version == family] or addresses
        last_rep, last_reason, last_ip = ReplyCode.HOST_UNREACHABLE, "unreachable", str(addresses[0])
        for ip in addresses[:4]:
            last_ip = ip_text = _ip_text(ip)
            local = (cfg.source_address, 0) if cfg.source_address else None
            try:
                async with asyncio.timeout(cfg.connect_timeout):
                    transport, proto = await self._loop.create_connection(TargetConnection, ip_text, port,
                                                                          local_addr=local)
            except TimeoutError:
                last_rep, last_reason = ReplyCode.TTL_EXPIRED, f"connect to {ip}:{port} timed out"
                continue
            except OSError as exc:
                last_rep, last_reason = reply_for_errno(exc), f"connect to {ip}:{port}: {exc.strerror or exc}"
                continue
            sock = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
            if self.closed or not self.conn.accept_stream(sid, sock[0], sock[1], ip_text):
                transport.abort()  # the tunnel or the node gave up meanwhile
                return
            stream = self.handles[sid] = TunnelStream(self, sid, proto)
            early = self._early.pop(sid, None)
            if early:  # after OPEN_OK, so the credit they return follows it
                for chunk in early:
                    proto.stream_data(chunk)
                if proto.sink_ready():
                    self.conn.acknowledge_received_data(sid, sum(map(len, early)))
            self.output_ready()
            proto.attach(stream)
            return
        self._fail(sid, last_rep, last_reason, last_ip)

    def _open_udp(self, sid: int) -> None:
        """A UDP association: nothing to connect; sockets open with the first datagram (device/udp.py)."""
        if not self.conn.accept_stream(sid, "0.0.0.0", 0, ""):
            return
        assoc = DeviceUdpAssociation(self, sid)
        assoc.stream = self.handles[sid] = TunnelStream(self, sid, assoc)
        self.output_ready()

    async def _control(self, body: dict) -> None:
        reply: dict = {"id": body.get("id")}
        runner = self.config.runner
        if body.get("command") in ("rotate", "public_ip") and self.config.rotator is not None:
            reply.update(await self.config.rotator.handle(body))
        elif runner is None:
            reply.update(ok=False, error="this agent has no automation runner")
        else:
            try:
                reply.update(ok=True, **(await runner(body)))
            except Exception as exc:  # the runner's failure is reported, never crashes the agent
                log.exception("automation runner failed")
                reply.update(ok=False, error=str(exc))
        self.conn.send_control_reply(reply)
        self.output_ready()


class DeviceAgent:
    """Keeps ``config.tunnels`` tunnels up, reconnecting with jittered exponential back-off."""

    def __init__(self, config: AgentConfig) -> None:
        if config.ssl is None and not config.plaintext:
            raise ValueError("the tunnel is TLS unless plaintext is asked for explicitly")
        self.config = config
        if config.rotator is None:
            from .rotation import Rotator

            config.rotator = Rotator(config, config.rotate_command, config.ip_echo_url, config.rotate_recheck_s)
        config.meta["can_rotate"] = bool(config.rotate_command)
        self.budget = MemoryBudget(config.memory_budget)
        self.tunnels: set[AgentTunnel] = set()
        self._stop = asyncio.Event()
        self.connected = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        if self.config.ip_echo_url:
            ip = await self.config.rotator.check_ip()  # reported in HELLO meta (public_ip)
            log.info("public IP %s (from %s)", ip, self.config.ip_echo_url)
        self.tasks = {asyncio.create_task(self._tunnel_loop(i)) for i in range(max(1, self.config.tunnels))}
        if self.config.stats_file:
            self.tasks.add(asyncio.create_task(self._write_stats(self.config.stats_file)))
        await self._stop.wait()
        self.config.rotator.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for tunnel in list(self.tunnels):
            tunnel.abort()

    def stop(self) -> None:
        self._stop.set()

    async def _write_stats(self, path: str) -> None:
        """Append one JSON line of queue sizes per tunnel every 100 ms (diagnostics, benchmarks)."""
        loop = asyncio.get_running_loop()
        with open(path, "a", buffering=1) as f:
            while True:
                await asyncio.sleep(0.1)
                rows = [t.queue_stats() for t in list(self.tunnels)]
                f.write(json.dumps({"t": round(loop.time(), 3), "tunnels": rows}) + "\n")

    async def connect(self, server: tuple[str, int] | None = None) -> AgentTunnel:
        """Dial a node once (``server`` or the first of the list; TLS when ``config.ssl``) and wait
        for its WELCOME."""
        cfg = self.config
        host, port = server or cfg.server_list()[0]
        loop = asyncio.get_running_loop()
        _tr, tunnel = await asyncio.wait_for(loop.create_connection(
            lambda: AgentTunnel(cfg, self.budget, (host, port)), host, port, ssl=cfg.ssl,
            server_hostname=cfg.server_hostname if cfg.ssl is not None else None), 10)
        try:
            welcome = await asyncio.wait_for(tunnel.welcome, 10)
        except BaseException:
            tunnel.abort()
            raise
        if not welcome.ok:
            log.error("node refused the device: %s", welcome.error)
            tunnel.abort()
            raise ConnectionError(welcome.error or "refused")
        return tunnel

    async def _tunnel_loop(self, index: int) -> None:
        servers = self.config.server_list()
        at = 0
        backoff = 0.2
        while not self._stop.is_set():
            tunnel: AgentTunnel | None = None
            moved = False
            server = servers[at]
            try:
                tunnel = await self.connect(server)
                log.info("tunnel %d up to %s:%d", index, *server)
                self.tunnels.add(tunnel)
                self.connected.set()
                backoff = 0.2
                moved = await self._until_closed_or_moved(tunnel, len(servers) > 1)
                log.info("tunnel %d %s", index, "told to go away: moving on" if moved else "closed")
            except (OSError, TimeoutError, ConnectionError) as exc:
                hint = explain_connect_error(exc, tls=self.config.ssl is not None)
                if hint:
                    log.error("tunnel %d to %s:%d: %s; retrying in %.1fs", index, *server, hint, backoff)
                else:
                    log.info("tunnel %d to %s:%d: %s; retrying in %.1fs", index, *server, exc, backoff)
            finally:
                if tunnel is not None and not moved:
                    self.tunnels.discard(tunnel)
                    if not tunnel.closed:
                        tunnel.abort()
                if not self.tunnels:
                    self.connected.clear()
            if self._stop.is_set():
                break
            at = (at + 1) % len(servers)  # gone, refused or going away: the next node of the list
            if not moved:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 30.0)

    async def _until_closed_or_moved(self, tunnel: AgentTunnel, can_move: bool) -> bool:
        """Wait for the tunnel to close; with other servers to go to, also for a GOAWAY (then the
        old tunnel drains on its own while the loop dials the next node). True = moved on."""
        if not can_move:
            await tunnel.closed_future
            return False
        goaway = asyncio.ensure_future(tunnel.goaway.wait())
        try:
            await asyncio.wait([tunnel.closed_future, goaway], return_when=asyncio.FIRST_COMPLETED)
        finally:
            goaway.cancel()
        if tunnel.closed:
            return False
        tunnel.closed_future.add_done_callback(lambda _f: self._drained(tunnel))
        return True

    def _drained(self, tunnel: AgentTunnel) -> None:
        self.tunnels.discard(tunnel)
        if not self.tunnels:
            self.connected.clear()
