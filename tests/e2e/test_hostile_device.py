"""A hostile device against a real node: a small adversarial agent built on the sans-I/O core sends
what an honest agent never would. Each gets its defined answer (stream RST or tunnel closed with a
GOAWAY code), and an honest device's sessions on the same node are unaffected."""

from __future__ import annotations

import asyncio
import struct

import pytest
from socks_client import socks5_code, socks5_open

from device_tunnel import frames
from device_tunnel.connection import Role, TunnelConnection
from device_tunnel.errors import ErrorCode
from device_tunnel.events import StreamOpenRequested, StreamReset, WelcomeReceived
from device_tunnel.frames import FrameDecoder, FrameType

pytestmark = pytest.mark.asyncio(loop_scope="session")


class HostileAgent:
    """Speaks the handshake through the core, then writes whatever bytes a test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = TunnelConnection(Role.AGENT, 0.0)
        self.decoder = FrameDecoder()

    @classmethod
    async def connect(cls, node, device_id: str, token: str, version: int | None = None) -> HostileAgent:
        """Dial ``node``'s tunnel port the way a real agent does (TLS with the node's pin by default)."""
        from device_tunnel.tls import client_context, pin_verifier

        ctx = client_context(pin=node.fingerprint) if node.tls else None
        reader, writer = await asyncio.open_connection("127.0.0.1", node.tunnel_port, ssl=ctx)
        if node.tls:
            pin_verifier(node.fingerprint)(writer.transport)
        agent = cls(reader, writer)
        if version is None:
            agent.conn.send_hello(device_id, token, {})
            writer.write(agent.conn.data_to_send())
        else:
            writer.write(frames.encode_json(FrameType.HELLO, 0, {"version": version, "device_id": device_id,
                                                                 "token": token, "window": 1 << 20}))
        return agent

    async def events(self, timeout: float = 10.0) -> list:
        data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
        if not data:
            raise EOFError
        out = self.conn.receive_data(data, 0.0)
        self.writer.write(self.conn.data_to_send())
        return out

    async def welcome(self) -> WelcomeReceived:
        while True:
            for ev in await self.events():
                if isinstance(ev, WelcomeReceived):
                    return ev

    async def goaway_code(self, timeout: float = 10.0) -> int | None:
        """Read raw frames until the node closes; the code of its last GOAWAY."""
        code = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), deadline - loop.time())
            except (ConnectionError, OSError):
                break
            if not data:
                return code
            for f in self.decoder.feed(data):
                if f.type == FrameType.GOAWAY:
                    code = f.json().get("code")
        raise AssertionError("the node did not close the tunnel")

    def close(self) -> None:
        self.writer.close()


@pytest.fixture(scope="module")
def honest():
    return {}


async def _honest_device(deployment, honest):
    if not honest:
        _uid, token = await deployment.user("honest")
        device = await deployment.device(token)
        await deployment.agent(device, "--allow-private")
        honest["conn"] = await deployment.connection(token, device["remote_device_id"])
    return honest["conn"]


async def _hostile_device(deployment, name: str):
    _uid, token = await deployment.user(name)
    device = await deployment.device(token)
    return token, device


async def _honest_still_served(deployment, honest, targets) -> None:
    conn = await _honest_device(deployment, honest)
    assert await socks5_code(deployment.node.proxy_port, conn["connectionId"], conn["password"], "127.0.0.1",
                             targets.echo_port) == 0


@pytest.mark.parametrize("name,payload,code", [
    ("ping flood", frames.encode_ping(1) * 400, ErrorCode.ENHANCE_YOUR_CALM),
    ("window flood", frames.encode_window(0, 1) * 2000, ErrorCode.ENHANCE_YOUR_CALM),
    ("unknown-frame flood", struct.pack("!BBII", 99, 0, 0, 0) * 1000, ErrorCode.ENHANCE_YOUR_CALM),
    ("data for a stream never opened", frames.encode(FrameType.DATA, 77, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("open_ok for a stream never opened", frames.encode_json(FrameType.OPEN_OK, 77, {"window": 9}),
     ErrorCode.PROTOCOL_ERROR),
    ("huge control frame", struct.pack("!BBII", FrameType.CONTROL_REPLY, 0, 0, 1 << 30), ErrorCode.FRAME_SIZE_ERROR),
    ("frame the node never accepts", frames.encode_json(FrameType.OPEN, 5, {"host": "h", "port": 1}),
     ErrorCode.PROTOCOL_ERROR),
])
async def test_hostile_frames_close_only_that_tunnel_with_a_goaway_code(deployment, targets, honest, name, payload,
                                                                         code):
    await _honest_device(deployment, honest)
    _token, device = await _hostile_device(deployment, f"hostile-{name.split()[0]}")
    bad = await HostileAgent.connect(deployment.node, device["remote_device_id"], device["device_token"])
    assert (await bad.welcome()).ok
    bad.writer.write(payload)
    assert await bad.goaway_code() == code
    bad.close()
    await _honest_still_served(deployment, honest, targets)


async def test_data_after_fin_resets_the_stream_and_the_tunnel_lives(deployment, targets, honest):
    token, device = await _hostile_device(deployment, "hostile-window")
    bad = await HostileAgent.connect(deployment.node, device["remote_device_id"], device["device_token"])
    assert (await bad.welcome()).ok
    await deployment.wait_online(device["remote_device_id"])
    conn = await deployment.connection(token, device["remote_device_id"])
    client = asyncio.create_task(socks5_open(deployment.node.proxy_port, conn["connectionId"], conn["password"],
                                             "example.com", 80))
    sid = None
    while sid is None:
        for ev in await bad.events():
            if isinstance(ev, StreamOpenRequested):
                sid = ev.stream_id
    bad.conn.accept_stream(sid, "0.0.0.0", 1, "93.184.216.34")
    bad.writer.write(bad.conn.data_to_send())
    reader, writer, _ = await client
    bad.writer.write(frames.encode(FrameType.DATA, sid, b"before") + frames.encode(FrameType.FIN, sid)
                     + frames.encode(FrameType.DATA, sid, b"after the FIN"))
    got = b""
    while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):  # EOF: the node ended the session
        got += chunk
    assert got == b"before"
    rst = None
    while rst is None:  # the node answered the violation with RST STREAM_CLOSED
        for ev in await bad.events():
            if isinstance(ev, StreamReset) and ev.stream_id == sid:
                rst = ev.code
    assert rst == ErrorCode.STREAM_CLOSED
    writer.close()
    # the tunnel itself is still up: the node still answers a ping
    bad.writer.write(frames.encode_ping(42))
    pong = False
    for _ in range(20):
        if pong:
            break
        data = await asyncio.wait_for(bad.reader.read(1 << 16), 10)
        assert data, "the node closed the tunnel"
        pong = any(f.type == FrameType.PING and f.flags & frames.FLAG_ACK for f in bad.decoder.feed(data))
    assert pong
    bad.close()
    await _honest_still_served(deployment, honest, targets)


@pytest.mark.parametrize("version,token_ok,error", [
    (1, True, "unsupported protocol version"),
    (None, False, "authentication failed"),
])
async def test_refused_device_receives_a_flushed_welcome_not_ok(deployment, version, token_ok, error):
    _token, device = await _hostile_device(deployment, f"refused-{version}")
    token = device["device_token"] if token_ok else "wrong-token"
    bad = await HostileAgent.connect(deployment.node, device["remote_device_id"], token, version)
    welcome = await bad.welcome()
    assert not welcome.ok and welcome.error == error
    assert await asyncio.wait_for(bad.reader.read(), 10) == b""  # then the node closes
    bad.close()
