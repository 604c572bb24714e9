"""A byte-level SOCKS5 client for tests that need the exact reply codes."""

from __future__ import annotations

import asyncio
import ipaddress
import struct


class SocksReplyError(Exception):
    def __init__(self, stage: str, code: int) -> None:
        super().__init__(f"{stage} failed with code {code:#04x}")
        self.stage = stage
        self.code = code


async def socks5_open(proxy_port: int, user: str, password: str, host: str, port: int,
                      proxy_host: str = "127.0.0.1", timeout: float = 10.0, local_addr: str | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int]]:
    """Handshake + CONNECT; returns the stream and the bound address, or raises SocksReplyError."""
    reader, writer = await asyncio.open_connection(proxy_host, proxy_port,
                                                   local_addr=(local_addr, 0) if local_addr else None)
    try:
        writer.write(b"\x05\x01\x02")
        ver, method = await asyncio.wait_for(reader.readexactly(2), timeout)
        if method != 2:
            raise SocksReplyError("method", method)
        u, p = user.encode(), password.encode()
        writer.write(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        _v, status = await asyncio.wait_for(reader.readexactly(2), timeout)
        if status != 0:
            raise SocksReplyError("auth", status)
        try:
            ip = ipaddress.ip_address(host)
            addr = (b"\x01" + ip.packed) if ip.version == 4 else (b"\x04" + ip.packed)
        except ValueError:
            addr = b"\x03" + bytes([len(host.encode())]) + host.encode()
        writer.write(b"\x05\x01\x00" + addr + struct.pack("!H", port))
        head = await asyncio.wait_for(reader.readexactly(4), timeout)
        atyp = head[3]
        if atyp == 1:
            raw = await reader.readexactly(4)
            bound = str(ipaddress.IPv4Address(raw))
        elif atyp == 4:
            raw = await reader.readexactly(16)
            bound = str(ipaddress.IPv6Address(raw))
        else:
            n = (await reader.readexactly(1))[0]
            bound = (await reader.readexactly(n)).decode()
        bport = struct.unpack("!H", await reader.readexactly(2))[0]
        if head[1] != 0:
            raise SocksReplyError("connect", head[1])
        return reader, writer, (bound, bport)
    except BaseException:
        writer.close()
        raise


async def socks5_code(proxy_port: int, user: str, password: str, host: str, port: int,
                      local_addr: str | None = None) -> int:
    """The CONNECT reply code (0 = success); auth failures come back as 0x100 + status."""
    try:
        _r, w, _b = await socks5_open(proxy_port, user, password, host, port, local_addr=local_addr)
    except SocksReplyError as exc:
        return exc.code + (0x100 if exc.stage == "auth" else 0)
    w.close()
    return 0
