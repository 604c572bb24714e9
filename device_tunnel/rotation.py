"""Device side of IP rotation: run the rotate command, learn the public IP (stdlib only).

``--rotate-command CMD`` is a shell command that changes the device's public address (toggle
airplane mode or mobile data on a rooted phone, switch the uplink of a multi-modem box). A line
``source_address=IP`` in its output makes new target connections bind to that address from then on:
it is written into ``AgentConfig.source_address`` in place, which every TCP (and UDP) open reads.

``--ip-echo-url URL`` is fetched through the current egress (bound to the source address) at start
and after each rotation; the body is the address, or JSON with an ``ip`` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .agent import AgentConfig

log = logging.getLogger(__name__)

MAX_ECHO_BODY = 64 * 1024
COMMAND_TIMEOUT_S = 120.0


class RotationFailed(Exception):
    """The rotate command failed (its reason goes back to the node)."""


def parse_source_address(output: str) -> str | None:
    """The last ``source_address=IP`` line of the command's output (a valid IP), else None."""
    found = None
    for line in output.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "source_address":
            try:
                found = str(ipaddress.ip_address(value.strip()))
            except ValueError:
                log.warning("rotate command printed an invalid source_address %r (ignored)", value.strip())
    return found


def parse_echo_body(body: bytes) -> str:
    """The IP address in an echo answer: the plain body, or JSON ``{"ip": ...}``."""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text).get("ip", "")).strip()
        except (ValueError, AttributeError):
            raise ValueError("echo answer is not valid JSON") from None
    return str(ipaddress.ip_address(text))


async def fetch_public_ip(url: str, source_address: str | None, timeout: float = 10.0) -> str:
    """GET ``url`` from ``source_address`` (HTTP/1.1, one connection) and parse the address it reports."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"ip echo URL must be http(s)://host/...: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    ctx = ssl.create_default_context() if parts.scheme == "https" else None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=ctx, local_addr=(source_address, 0) if source_address else None)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: proxyorch-agent\r\n"
                         "Accept: */*\r\nConnection: close\r\n\r\n".encode())
            raw = await reader.read(MAX_ECHO_BODY)
            while len(raw) < MAX_ECHO_BODY and (more := await reader.read(MAX_ECHO_BODY - len(raw))):
                raw += more
        finally:
            writer.close()
    head, sep, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or status[1] != b"200":
        raise ValueError(f"ip echo answered {head[:60]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size.strip() or b"0", 16)]
    return parse_echo_body(body)


class Rotator:
    """One per agent (shared by its tunnels): rotations run one at a time, never twice per request.

    A rotation runs in a task of its own (not the tunnel's): the tunnel that asked may drop while
    the command runs (the network goes away), and the rotation must still finish.
    """

    def __init__(self, config: AgentConfig, command: str | None, echo_url: str | None,
                 recheck_after: float = 5.0) -> None:
        self.config = config
        self.command = command
        self.echo_url = echo_url
        self.recheck_after = recheck_after
        self.public_ip: str | None = None
        self._running: asyncio.Task[dict] | None = None

    async def check_ip(self) -> str | None:
        """Fetch the public IP through the current egress (None without an echo URL or on failure)."""
        if not self.echo_url:
            return None
        try:
            ip = await fetch_public_ip(self.echo_url, self.config.source_address)
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("could not learn the public IP from %s: %s", self.echo_url, exc)
            return None
        self.public_ip = ip
        self.config.meta["public_ip"] = ip  # the next HELLO reports it
        return ip

    async def rotate(self) -> dict:
        """Run the command once, then check the IP (once more after ``recheck_after`` if unchanged).
        A request while a rotation runs joins it (the command is not run again)."""
        if not self.command:
            raise RotationFailed("device cannot rotate: no --rotate-command")
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._rotate())
            self._running.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if no one waits
        return await asyncio.shield(self._running)

    def close(self) -> None:
        """Cancel a rotation in flight (the agent is stopping)."""
        if self._running is not None:
            self._running.cancel()

    async def _rotate(self) -> dict:
        started = time.monotonic()
        old_ip = self.public_ip if self.public_ip is not None else await self.check_ip()
        proc = await asyncio.create_subprocess_shell(self.command, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RotationFailed(f"rotate command did not finish within {COMMAND_TIMEOUT_S:.0f}s") from None
        text = out.decode("utf-8", "replace")
        if proc.returncode != 0:
            raise RotationFailed(f"rotate command exited with status {proc.returncode}: {text.strip()[-200:]}")
        source = parse_source_address(text)
        if source is not None:
            self.config.source_address = source  # every new target connection binds here from now on
            log.info("rotation: new connections bind to %s", source)
        new_ip = await self.check_ip()
        if new_ip is not None and new_ip == old_ip and self.recheck_after > 0:
            await asyncio.sleep(self.recheck_after)  # the carrier may hand out the new address late
            new_ip = await self.check_ip()
        took_ms = int((time.monotonic() - started) * 1000)
        changed = new_ip is not None and new_ip != old_ip
        log.info("rotation: %s -> %s (%s, %d ms)", old_ip, new_ip, "changed" if changed else "unchanged", took_ms)
        return {"old_ip": old_ip, "new_ip": new_ip, "changed": changed, "took_ms": took_ms}

    async def handle(self, body: dict) -> dict:
        """A CONTROL ``rotate`` or ``public_ip`` message: the reply fields besides ``id``."""
        if body.get("command") == "public_ip":
            running = self._running
            if running is not None and not running.done():  # asked mid-rotation: the address after it
                with contextlib.suppress(Exception):
                    await asyncio.shield(running)
            ip = await self.check_ip() if self.echo_url else self.public_ip
            return {"ok": True, "public_ip": ip, "can_rotate": bool(self.command)}
        try:
            return {"ok": True, **(await self.rotate())}
        except (RotationFailed, OSError) as exc:  # OSError: the shell could not be started
            return {"ok": False, "error": str(exc), "can_rotate": bool(self.command)}
