"""The node-to-node relay: the HMAC handshake as bytes in / bytes out, the device id riding in the
OPEN, and (in-process, real loopback sockets) a relayed stream whose client never reads, the TLS link
pinned to the shared certificate, and CONTROL messages relayed to a device on the peer."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from tunnel_pair import Pair

from device_tunnel.agent import AgentConfig, DeviceAgent
from device_tunnel.connection import TunnelConfig
from device_tunnel.events import StreamOpenRequested
from device_tunnel.relay import RelayMetrics, RelayPool, RelayServer, relay_config
from device_tunnel.relay_auth import MAX_LINE, DialerAuth, ListenerAuth, RelayAuthError
from device_tunnel.server import OpenResult, TunnelServer
from device_tunnel.windows import MemoryBudget


def run_handshake(listener: ListenerAuth, dialer: DialerAuth, split: int | None = None) -> bytes:
    """Drive both sides; ``split`` feeds every message one byte at a time (all boundaries)."""
    def feed(side, data: bytes):
        if split is None:
            return side.receive(data)
        out, done, rest = b"", False, b""
        for i in range(len(data)):
            done, o, r = side.receive(data[i:i + 1])
            out, rest = out + o, rest + r
        return done, out, rest

    done, line2, _ = feed(dialer, listener.start())
    assert not done and line2
    done, line3, rest = feed(listener, line2 + b"TUNNEL")
    assert done and rest == b"TUNNEL"
    done, out, rest = feed(dialer, line3 + b"HELLO")
    assert done and out == b""
    return rest


@pytest.mark.parametrize("split", [None, 1])
def test_nodes_with_the_same_secret_authenticate_each_other_at_every_byte_boundary(split):
    listener, dialer = ListenerAuth("y", "s3cret"), DialerAuth("x", "s3cret")
    rest = run_handshake(listener, dialer, split)
    assert rest == b"HELLO"   # what follows the handshake is tunnel bytes, handed on untouched
    assert listener.peer == "x" and dialer.peer == "y"


def test_a_dialer_with_another_secret_is_refused_and_never_learns_anything():
    listener, dialer = ListenerAuth("y", "right"), DialerAuth("x", "wrong")
    _d, line2, _ = dialer.receive(listener.start())
    with pytest.raises(RelayAuthError, match="did not prove"):
        listener.receive(line2)
    with pytest.raises(RelayAuthError, match="secret differs"):
        dialer.receive(ListenerAuth.refusal())


def test_a_listener_with_another_secret_is_refused_by_the_dialer():
    listener, dialer = ListenerAuth("y", "other"), DialerAuth("x", "right")
    _d, line2, _ = dialer.receive(listener.start())
    # the fake listener cannot verify (different secret) but pretends: it answers ok with its proof
    fake = ListenerAuth("y", "right")
    fake.nonce = listener.nonce
    with pytest.raises(RelayAuthError):
        listener.receive(line2)
    _done, line3, _ = fake.receive(line2)
    forged = line3.replace(line3[line3.index(b'"proof":"') + 9:line3.index(b'"proof":"') + 13], b"0000")
    with pytest.raises(RelayAuthError, match="did not prove"):
        dialer.receive(forged)


def test_a_recorded_proof_does_not_work_against_a_fresh_challenge():
    first, dialer = ListenerAuth("y", "s"), DialerAuth("x", "s")
    _d, line2, _ = dialer.receive(first.start())
    assert first.receive(line2)[0]
    replay = ListenerAuth("y", "s")   # new nonce
    replay.start()
    with pytest.raises(RelayAuthError):
        replay.receive(line2)


def test_an_empty_secret_never_authenticates():
    listener, dialer = ListenerAuth("y", ""), DialerAuth("x", "")
    _d, line2, _ = dialer.receive(listener.start())
    with pytest.raises(RelayAuthError):
        listener.receive(line2)


@pytest.mark.parametrize("garbage", [b"\x05\x01\x00\n", b"[1,2]\n", b"{}\n", b"x" * (MAX_LINE + 1)])
def test_garbage_instead_of_a_handshake_is_an_error(garbage):
    with pytest.raises(RelayAuthError):
        ListenerAuth("y", "s").receive(garbage)
    with pytest.raises(RelayAuthError):
        DialerAuth("x", "s").receive(garbage)


def test_the_open_of_a_relay_link_carries_the_device_and_a_plain_open_does_not():
    pair = Pair()
    pair.handshake()
    pair.node.conn.open_stream("example.com", 443, relay={"device": "d-1", "connection": "c-1"})
    pair.node.conn.open_stream("example.com", 443)
    pair.pump()
    reqs = pair.agent.of(StreamOpenRequested)
    assert reqs[0].relay == {"device": "d-1", "connection": "c-1"}
    assert reqs[1].relay is None


class StalledClient:
    """A client at X that never reads: it takes the OpenResult and withholds every credit."""

    def __init__(self) -> None:
        self.result: asyncio.Future[OpenResult] = asyncio.get_running_loop().create_future()
        self.received = 0
        self.connection_id = "c-1"

    def open_result(self, result: OpenResult) -> None:
        self.result.set_result(result)

    def stream_data(self, data) -> None:
        self.received += len(data)

    def stream_eof(self) -> None:
        pass

    def stream_closed(self, error) -> None:
        pass

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass

    def sink_ready(self) -> bool:
        return False


async def test_a_relayed_client_that_never_reads_stalls_the_whole_path_within_the_windows():
    sent = 0

    async def blast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        block = b"x" * 65536
        try:
            while True:
                writer.write(block)
                await writer.drain()
                sent += len(block)
        except (ConnectionError, OSError):
            pass

    target = await asyncio.start_server(blast, "127.0.0.1", 0)

    async def authenticate(device_id: str, token: str, meta: dict) -> bool:
        return True

    async def presence(device_id: str, online: bool, meta: dict) -> None:
        pass

    y_tunnels = TunnelServer(node_name="y", authenticate=authenticate, presence=presence, memory_budget=16 << 20,
                             window=64 << 10, max_window=256 << 10)
    await y_tunnels.start("127.0.0.1", 0)
    metrics = RelayMetrics()
    y_relay = RelayServer(node_name="y", secret="s", registry=y_tunnels.registry,
                          config=relay_config(y_tunnels.config), budget=y_tunnels.budget, metrics=metrics)
    await y_relay.start("127.0.0.1", 0)
    agent = DeviceAgent(AgentConfig(plaintext=True, host="127.0.0.1", port=y_tunnels.port, device_id="dev", token="t",
                                    allow_private=True, window=64 << 10, max_window=256 << 10))
    run = asyncio.create_task(agent.run())
    for _ in range(200):
        if y_tunnels.registry.pick("dev") is not None:
            break
        await asyncio.sleep(0.02)
    x_pool = RelayPool(node_name="x", secret="s", config=relay_config(y_tunnels.config), budget=MemoryBudget(16 << 20))
    link = await x_pool.link("y", f"127.0.0.1:{y_relay.port}")
    client = StalledClient()
    link.open_stream("127.0.0.1", target.sockets[0].getsockname()[1], client, "dev", "c-1")
    result = await asyncio.wait_for(client.result, 10)
    assert result.rep == 0 and result.node == "y"
    last = -1
    for _ in range(50):
        await asyncio.sleep(0.2)
        if sent == last:
            break
        last = sent
    assert sent == last, "the target never stalled: credit is not end to end"
    peer = next(iter(y_relay.connections))
    y_held = peer.conn.buffered_bytes + sum(t.conn.held_bytes for t in y_tunnels.connections)
    print(f"\n[relay, stalled client] target pushed {sent >> 10} KiB; X holds {client.received >> 10} KiB, "
          f"Y holds {y_held >> 10} KiB")
    assert client.received <= 512 << 10          # X got at most its stream window (it never acknowledged)
    assert y_held <= 2 * (256 << 10) + (192 << 10)  # Y: the device leg window plus the link queue
    # a kill on Y ends the relayed stream on both legs
    assert y_relay.terminate_connection("c-1", "deleted") == 1
    await asyncio.sleep(0.1)
    assert not any(t.conn.streams for t in y_tunnels.connections)
    agent.stop()
    await asyncio.wait_for(run, 10)
    x_pool.close()
    y_relay.stop_accepting()
    y_relay.close_all()
    y_tunnels.stop_accepting()
    y_tunnels.close_all()
    await y_tunnels.wait_tasks()
    target.close()


@pytest.mark.parametrize("value,expected", [
    ("10.0.0.1:7000", [("10.0.0.1", 7000)]),
    ("a:1, b:2,", [("a", 1), ("b", 2)]),
    ("[::1]:7000,:7001", [("::1", 7000), ("127.0.0.1", 7001)]),
])
def test_the_server_list_parses_in_order(value, expected):
    from device_tunnel.servers import parse_servers

    assert parse_servers(value) == expected


@pytest.mark.parametrize("value", ["", ",", "host", "host:", "host:0", "host:70000", "a:1,b:x"])
def test_a_bad_server_list_is_a_clear_error(value):
    from device_tunnel.servers import parse_servers

    with pytest.raises(ValueError):
        parse_servers(value)


async def test_the_agent_moves_past_a_dead_server_to_the_next_of_its_list():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    seen: list[str] = []

    async def authenticate(device_id: str, token: str, meta: dict) -> bool:
        return True

    async def presence(device_id: str, online: bool, meta: dict) -> None:
        seen.append(f"{device_id}:{online}")

    node = TunnelServer(node_name="n2", authenticate=authenticate, presence=presence, memory_budget=8 << 20)
    await node.start("127.0.0.1", 0)
    agent = DeviceAgent(AgentConfig(plaintext=True, host="127.0.0.1", port=dead, device_id="dev", token="t",
                                    servers=[("127.0.0.1", dead), ("127.0.0.1", node.port)]))
    run = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 10)
    assert next(iter(agent.tunnels)).server == ("127.0.0.1", node.port)
    agent.stop()
    await asyncio.wait_for(run, 10)
    node.stop_accepting()
    node.close_all()
    await node.wait_tasks()


# -- TLS on the link and CONTROL over it (in-process, real loopback sockets) ------------------------
def make_cert(folder):  # noqa: ANN001, ANN201
    from proxyorch.config import load_settings
    from proxyorch.tunnel_cert import load_or_create

    return load_or_create(load_settings({"DATA_DIR": str(folder), "NODE_NAME": "n"}))


class YNode:
    """Node Y in-process: a tunnel server with one device agent (whose runner answers CONTROL) and a
    relay listener (TLS with ``cert`` unless None)."""

    def __init__(self, cert, auth_timeout: float = 10.0, runner=None) -> None:  # noqa: ANN001
        self.cert, self.auth_timeout = cert, auth_timeout
        self.runner = runner or self._echo

    @staticmethod
    async def _echo(body: dict) -> dict:
        return {"result": f"ran {body.get('command')}"}

    async def __aenter__(self) -> YNode:
        async def authenticate(device_id: str, token: str, meta: dict) -> bool:
            return True

        async def presence(device_id: str, online: bool, meta: dict) -> None:
            pass

        self.tunnels = TunnelServer(node_name="y", authenticate=authenticate, presence=presence)
        await self.tunnels.start("127.0.0.1", 0)
        self.metrics = RelayMetrics()
        self.relay = RelayServer(node_name="y", secret="s", registry=self.tunnels.registry,
                                 config=relay_config(self.tunnels.config), budget=self.tunnels.budget,
                                 metrics=self.metrics, auth_timeout=self.auth_timeout)
        await self.relay.start("127.0.0.1", 0, ssl=self.cert.context() if self.cert else None)
        self.agent = DeviceAgent(AgentConfig(plaintext=True, host="127.0.0.1", port=self.tunnels.port,
                                             device_id="dev", token="t", allow_private=True, runner=self.runner))
        self.run = asyncio.create_task(self.agent.run())
        for _ in range(250):
            if self.tunnels.registry.pick("dev") is not None:
                break
            await asyncio.sleep(0.02)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.relay.port}"

    async def __aexit__(self, *exc) -> None:  # noqa: ANN002
        self.agent.stop()
        await asyncio.wait_for(self.run, 10)
        self.relay.stop_accepting()
        self.relay.close_all()
        self.tunnels.stop_accepting()
        self.tunnels.close_all()
        await self.tunnels.wait_tasks()


def tls_pool(cert, metrics: RelayMetrics | None = None) -> RelayPool:  # noqa: ANN001
    """X's pool pinning ``cert`` (what a node does with its own certificate)."""
    from device_tunnel.tls import client_context, pin_verifier

    return RelayPool(node_name="x", secret="s", config=relay_config(TunnelConfig()), budget=MemoryBudget(16 << 20),
                     metrics=metrics, ssl=client_context(pin=cert.fingerprint), verify=pin_verifier(cert.fingerprint))


async def test_a_tls_link_pinned_to_the_shared_certificate_relays_and_carries_control(tmp_path):
    cert = make_cert(tmp_path / "shared")
    async with YNode(cert) as y:
        pool = tls_pool(cert)
        link = await pool.link("y", y.address)
        ssl_object = link.transport.get_extra_info("ssl_object")
        assert ssl_object is not None and ssl_object.version() == "TLSv1.3"
        reply = await link.control("dev", {"command": "start", "code": "x"}, 5)
        assert reply["ok"] is True and reply["result"] == "ran start"
        pool.close()


async def test_a_peer_with_another_certificate_is_refused_before_the_handshake_and_counted(tmp_path):
    shared, other = make_cert(tmp_path / "shared"), make_cert(tmp_path / "other")
    async with YNode(other) as y:
        metrics = RelayMetrics()
        pool = tls_pool(shared, metrics)
        with pytest.raises(ConnectionError, match="does not match"):
            await pool.link("y", y.address)
        assert metrics.failures["y"] == 1 and not pool.links
        await asyncio.sleep(0.2)
        assert y.metrics.streams == {} and not any(p.auth.done for p in y.relay.connections)
        pool.close()


async def test_a_plaintext_dialer_gets_no_relay_handshake_from_a_tls_listener(tmp_path):
    cert = make_cert(tmp_path / "shared")
    async with YNode(cert, auth_timeout=2.0) as y:
        reader, writer = await asyncio.open_connection("127.0.0.1", y.relay.port)
        writer.write(b'{"node":"x","nonce":"00","proof":"00"}\n')  # what a plaintext dialer sends
        t0 = asyncio.get_running_loop().time()
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            answer = b""
        assert b'"relay"' not in answer and b"nonce" not in answer  # at most a TLS alert, never line 1
        # and one that sends nothing is closed within the auth timeout (the TLS handshake's half of it)
        reader, writer2 = await asyncio.open_connection("127.0.0.1", y.relay.port)
        t0 = asyncio.get_running_loop().time()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert asyncio.get_running_loop().time() - t0 <= 2.0 + 0.5
        writer.close()
        writer2.close()


async def test_failed_tls_handshakes_are_counted_once_and_good_links_not_at_all(tmp_path):
    cert = make_cert(tmp_path / "shared")
    async with YNode(cert, auth_timeout=2.0) as y:
        pool = tls_pool(cert)
        await pool.link("y", y.address)  # TLS and the relay handshake succeed: never counted
        reader, plain = await asyncio.open_connection("127.0.0.1", y.relay.port)
        plain.write(b'{"node":"x","nonce":"00","proof":"00"}\n')  # not TLS: the handshake fails at once
        _r2, silent = await asyncio.open_connection("127.0.0.1", y.relay.port)  # no TLS handshake at all
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        await asyncio.sleep(1.0 + 0.5 + 0.5)  # counted at the TLS handshake's deadline (1 s here) + 0.5 s
        assert y.metrics.auth_failures == 2
        await asyncio.sleep(1.0)
        assert y.metrics.auth_failures == 2 and len(pool.links) == 1  # once each; the good link is up
        plain.close()
        silent.close()
        pool.close()


async def test_relayed_control_answers_like_a_local_one(tmp_path):
    from device_tunnel.relay import DeviceOffline

    async def slow(body: dict) -> dict:
        if body.get("command") == "slow":
            await asyncio.sleep(30)
        return {"result": "fast"}

    async with YNode(None, runner=slow) as y:
        pool = RelayPool(node_name="x", secret="s", config=relay_config(y.tunnels.config), budget=MemoryBudget(16 << 20))
        link = await pool.link("y", y.address)
        assert (await link.control("dev", {"command": "go"}, 5))["result"] == "fast"
        with pytest.raises(DeviceOffline, match="not on node y"):
            await link.control("nobody", {"command": "go"}, 5)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await link.control("dev", {"command": "slow"}, 0.5)
        assert asyncio.get_running_loop().time() - t0 < 3  # Y's answer, not X's margin
        pending = asyncio.create_task(link.control("dev", {"command": "slow"}, 10))
        await asyncio.sleep(0.2)
        y.relay.close_all()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(pending, 5)
        pool.close()
