"""The device agent: the program a phone (or any host) runs to lend its network to the proxy.

It dials out to a node (``--tunnels N`` connections), authenticates with its device token, and for
each OPEN connects to the requested target from this device's network, refusing private, loopback
and link-local destinations unless ``allow_private`` is set. DNS is resolved here, the resolved
address is checked, then exactly that checked address is connected (no DNS-rebinding window).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import platform
import random
import socket
import ssl as ssl_
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import frames
from .frames import PROTOCOL_VERSION, Frame, FrameError, FrameType
from .mux import Mux, MuxStream
from .target_policy import is_forbidden_address, parse_ip_literal
from .tls import explain_connect_error

log = logging.getLogger(__name__)

TARGET_WRITE_HIGH = 256 * 1024
TARGET_WRITE_LOW = 64 * 1024

# SOCKS5 reply codes the device reports
REP_GENERAL = 1
REP_NOT_ALLOWED = 2
REP_NET_UNREACHABLE = 3
REP_HOST_UNREACHABLE = 4
REP_REFUSED = 5
REP_TTL_EXPIRED = 6

AutomationRunner = Callable[[dict], Awaitable[dict]]


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
    meta: dict = field(default_factory=dict)
    runner: AutomationRunner | None = None
    # TLS: ``ssl``/``server_hostname`` go to create_connection; ``verify(transport)`` runs once the
    # handshake is done and before any HELLO byte (raise = refuse). ``ssl=None`` needs ``plaintext``.
    ssl: ssl_.SSLContext | None = None
    server_hostname: str | None = None
    verify: Callable[[asyncio.BaseTransport], None] | None = None
    plaintext: bool = False


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
        self.stream: MuxStream | None = None
        self.write_paused = False
        self.early: bytearray | None = bytearray()  # bytes that arrive before the stream is attached
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=TARGET_WRITE_HIGH, low=TARGET_WRITE_LOW)
        transport.pause_reading()  # until the stream is attached

    def attach(self, stream: MuxStream) -> None:
        self.stream = stream
        if self.transport is not None and not self.transport.is_closing():
            # Resume first: writing the early bytes may pause the source again (its queue is full),
            # and that pause must win.
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
        if stream is not None and not stream.closed:
            if stream.local_fin and not stream.pending:
                stream.close_quietly()
            else:
                stream.handler = None
                stream.reset("target connection lost")

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


def _errno_to_rep(exc: OSError) -> int:
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return REP_REFUSED
    if exc.errno == errno.ENETUNREACH:
        return REP_NET_UNREACHABLE
    if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return REP_HOST_UNREACHABLE
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return REP_TTL_EXPIRED
    return REP_GENERAL


class AgentTunnel(Mux):
    """One tunnel connection, device side."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(ping_interval=config.ping_interval, dead_after=config.dead_after,
                         initial_window=config.window, max_window=config.max_window)
        self.config = config
        self.welcome: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._opening: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.config.verify is not None:
            try:
                self.config.verify(transport)
            except Exception as exc:  # refused: not one byte of HELLO goes out
                self.welcome.set_exception(exc)
                self.closed = True
                transport.abort()
                return
        super().connection_made(transport)
        self.send(frames.encode_json(FrameType.HELLO, 0, {
            "version": PROTOCOL_VERSION, "device_id": self.config.device_id, "token": self.config.token,
            "meta": self.config.meta,
        }))

    def on_frame(self, frame: Frame) -> None:
        t = frame.type
        loop = asyncio.get_running_loop()
        if t == FrameType.WELCOME:
            if not self.welcome.done():
                self.welcome.set_result(frame.json())
        elif not self.welcome.done():
            raise FrameError("frame before WELCOME")
        elif t == FrameType.OPEN:
            body = frame.json()
            task = loop.create_task(self._open(frame.stream_id, body))
            self._opening[frame.stream_id] = task
            task.add_done_callback(lambda _t, sid=frame.stream_id: self._opening.pop(sid, None))
        elif t == FrameType.CONTROL:
            loop.create_task(self._control(frame.json()))
        else:
            raise FrameError(f"unexpected {FrameType(t).name} from node")

    def on_orphan_rst(self, stream_id: int) -> None:
        task = self._opening.pop(stream_id, None)
        if task is not None:
            task.cancel()

    def on_goaway(self, reason: str) -> None:
        log.info("node says go away: %s", reason)

    def on_closed(self) -> None:
        for task in self._opening.values():
            task.cancel()
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("tunnel closed before WELCOME"))

    def _fail(self, sid: int, rep: int, reason: str, resolved_ip: str = "") -> None:
        self.send(frames.encode_json(FrameType.OPEN_FAIL, sid, {"rep": rep, "reason": reason,
                                                                 "resolved_ip": resolved_ip}))

    async def _resolve(self, host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        literal = parse_ip_literal(host)
        if literal is not None:
            return [literal]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
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

    async def _open(self, sid: int, body: dict) -> None:
        cfg = self.config
        host = str(body.get("host", ""))
        try:
            port = int(body.get("port", 0))
            window = int(body.get("window", self.initial_window))
        except (TypeError, ValueError):
            self._fail(sid, REP_GENERAL, "bad OPEN")
            return
        if not host or not 0 < port < 65536:
            self._fail(sid, REP_GENERAL, "bad target")
            return
        try:
            literal = parse_ip_literal(host)
            if literal is not None:
                addresses = [literal]
            else:
                async with asyncio.timeout(cfg.connect_timeout):
                    addresses = await self._resolve(host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            self._fail(sid, REP_HOST_UNREACHABLE, f"cannot resolve {host}: {exc}")
            return
        except TimeoutError:
            self._fail(sid, REP_TTL_EXPIRED, f"resolving {host} timed out")
            return
        if not addresses:
            self._fail(sid, REP_HOST_UNREACHABLE, f"no address for {host}")
            return
        if not cfg.allow_private:
            allowed = [ip for ip in addresses if not is_forbidden_address(ip)]
            if not allowed:
                self._fail(sid, REP_NOT_ALLOWED, "target address is private, loopback or link-local",
                           str(addresses[0]))
                return
            addresses = allowed
        if cfg.source_address:
            family = ipaddress.ip_address(cfg.source_address).version
            addresses = [ip for ip in addresses if ip.version == family] or addresses
        loop = asyncio.get_running_loop()
        last_rep, last_reason, last_ip = REP_HOST_UNREACHABLE, "unreachable", str(addresses[0])
        for ip in addresses[:4]:
            last_ip = str(ip)
            local = (cfg.source_address, 0) if cfg.source_address else None
            try:
                async with asyncio.timeout(cfg.connect_timeout):
                    transport, proto = await loop.create_connection(TargetConnection, str(ip), port,
                                                                    local_addr=local)
            except TimeoutError:
                last_rep, last_reason = REP_TTL_EXPIRED, f"connect to {ip}:{port} timed out"
                continue
            except OSError as exc:
                last_rep, last_reason = _errno_to_rep(exc), f"connect to {ip}:{port}: {exc.strerror or exc}"
                continue
            if self.closed:
                transport.abort()
                return
            sock = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
            stream = MuxStream(self, sid, proto, send_window=window, recv_window=self.initial_window)
            self.streams[sid] = stream
            self.send(frames.encode_json(FrameType.OPEN_OK, sid, {
                "bound_host": sock[0], "bound_port": sock[1], "resolved_ip": str(ip),
                "window": self.initial_window,
            }))
            proto.attach(stream)
            return
        self._fail(sid, last_rep, last_reason, last_ip)

    async def _control(self, body: dict) -> None:
        reply: dict = {"id": body.get("id")}
        runner = self.config.runner
        if runner is None:
            reply.update(ok=False, error="this agent has no automation runner")
        else:
            try:
                reply.update(ok=True, **(await runner(body)))
            except Exception as exc:  # the runner's failure is reported, never crashes the agent
                log.exception("automation runner failed")
                reply.update(ok=False, error=str(exc))
        self.send(frames.encode_json(FrameType.CONTROL_REPLY, 0, reply))


class DeviceAgent:
    """Keeps ``config.tunnels`` tunnels up, reconnecting with jittered exponential back-off."""

    def __init__(self, config: AgentConfig) -> None:
        if config.ssl is None and not config.plaintext:
            raise ValueError("the tunnel is TLS unless plaintext is asked for explicitly")
        self.config = config
        self.tunnels: set[AgentTunnel] = set()
        self._stop = asyncio.Event()
        self.connected = asyncio.Event()

    async def run(self) -> None:
        loops = [asyncio.create_task(self._tunnel_loop(i)) for i in range(max(1, self.config.tunnels))]
        await self._stop.wait()
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for tunnel in list(self.tunnels):
            tunnel.abort()

    def stop(self) -> None:
        self._stop.set()

    async def _tunnel_loop(self, index: int) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        backoff = 0.2
        while not self._stop.is_set():
            tunnel: AgentTunnel | None = None
            try:
                _tr, tunnel = await asyncio.wait_for(
                    loop.create_connection(lambda: AgentTunnel(cfg), cfg.host, cfg.port, ssl=cfg.ssl,
                                           server_hostname=cfg.server_hostname if cfg.ssl else None), 10)
                welcome = await asyncio.wait_for(tunnel.welcome, 10)
                if not welcome.get("ok"):
                    log.error("node refused the device: %s", welcome.get("error"))
                    tunnel.abort()
                    raise ConnectionError(str(welcome.get("error")))
                log.info("tunnel %d up to %s:%d (node %s)", index, cfg.host, cfg.port, welcome.get("node"))
                self.tunnels.add(tunnel)
                self.connected.set()
                backoff = 0.2
                await tunnel.closed_future
                log.info("tunnel %d closed", index)
            except (OSError, TimeoutError, ConnectionError) as exc:
                hint = explain_connect_error(exc, tls=cfg.ssl is not None)
                if hint:
                    log.error("tunnel %d: %s; retrying in %.1fs", index, hint, backoff)
                else:
                    log.info("tunnel %d: %s; retrying in %.1fs", index, exc, backoff)
            finally:
                if tunnel is not None:
                    self.tunnels.discard(tunnel)
                    if not tunnel.closed:
                        tunnel.abort()
                if not self.tunnels:
                    self.connected.clear()
            if self._stop.is_set():
                break
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 30.0)
