"""A hostile device that lies: another device's id in HELLO, an OPEN it never answers, OPEN_OK with a
malformed or private address, a login flood. Each gets its defined answer, is counted per kind in
``/metrics``, and other devices' sessions go on. Built on the adversarial agent of test_hostile_device."""

from __future__ import annotations

import asyncio
import resource
import socket
import time

import pytest
from conftest import fresh_deployment
from socks_client import socks5_code, socks5_open
from test_hostile_device import HostileAgent

from device_tunnel import frames
from device_tunnel.errors import ErrorCode
from device_tunnel.events import StreamOpenRequested, StreamReset

pytestmark = pytest.mark.asyncio(loop_scope="session")

MISBEHAVIOUR = "proxyorch_device_misbehaviour_total{kind=\"%s\"}"


async def dial(node, device_id: str, token: str, local_addr: str | None = None) -> HostileAgent:
    """HostileAgent.connect from a chosen source address."""
    from device_tunnel.tls import client_context, pin_verifier

    ctx = client_context(pin=node.fingerprint) if node.tls else None
    reader, writer = await asyncio.open_connection("127.0.0.1", node.tunnel_port, ssl=ctx,
                                                   local_addr=(local_addr, 0) if local_addr else None)
    if node.tls:
        pin_verifier(node.fingerprint)(writer.transport)
    agent = HostileAgent(reader, writer)
    agent.conn.send_hello(device_id, token, {})
    writer.write(agent.conn.data_to_send())
    return agent


async def login(node, device_id: str, token: str, local_addr: str | None = None) -> tuple[bool, str]:
    """One device login: (ok, error) of the WELCOME; a refused one must be followed by the close."""
    agent = await dial(node, device_id, token, local_addr)
    try:
        welcome = await agent.welcome()
        if not welcome.ok:
            assert await asyncio.wait_for(agent.reader.read(), 10) == b""
        return welcome.ok, welcome.error
    finally:
        agent.close()


async def echo(port: int, conn: dict, targets, payload: bytes = b"ping") -> bytes:
    reader, writer, _ = await socks5_open(port, conn["connectionId"], conn["password"], "127.0.0.1",
                                          targets.echo_port)
    writer.write(payload)
    data = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    writer.close()
    return data


async def next_open(agent: HostileAgent) -> int:
    while True:
        for ev in await agent.events():
            if isinstance(ev, StreamOpenRequested):
                return ev.stream_id


async def reset_code(agent: HostileAgent, sid: int) -> ErrorCode:
    while True:
        for ev in await agent.events():
            if isinstance(ev, StreamReset) and ev.stream_id == sid:
                return ev.code


async def raw_rst_code(agent: HostileAgent, sid: int) -> int:
    """The code of the next RST for ``sid``, read as raw frames."""
    while True:
        data = await asyncio.wait_for(agent.reader.read(1 << 16), 10)
        assert data, "the node closed the tunnel"
        for f in agent.decoder.feed(data):
            if f.type == frames.FrameType.RST and f.stream_id == sid:
                return int.from_bytes(f.payload[:4], "big")


async def still_answers_ping(agent: HostileAgent) -> bool:
    agent.writer.write(frames.encode_ping(7))
    for _ in range(20):
        data = await asyncio.wait_for(agent.reader.read(1 << 16), 10)
        if not data:
            return False
        if any(f.type == frames.FrameType.PING and f.flags & frames.FLAG_ACK for f in agent.decoder.feed(data)):
            return True
    return False


@pytest.fixture(scope="module")
def victim():
    return {}


async def _victim(deployment, victim) -> dict:
    """Device B with an honest agent and a connection (shared by the tests of this module)."""
    if not victim:
        _uid, token = await deployment.user("victim-b")
        device = await deployment.device(token)
        await deployment.agent(device, "--allow-private")
        victim["device"] = device
        victim["conn"] = await deployment.connection(token, device["remote_device_id"])
    return victim


async def test_hello_with_another_devices_id_is_refused_counted_and_b_goes_on(deployment, targets, victim):
    b = await _victim(deployment, victim)
    _uid, token = await deployment.user("liar-a")
    a = await deployment.device(token)
    port = deployment.node.proxy_port
    # B has a session open through its tunnel while A lies about being B
    reader, writer, _ = await socks5_open(port, b["conn"]["connectionId"], b["conn"]["password"], "127.0.0.1",
                                          targets.echo_port)
    before = (await deployment.metrics()).get(MISBEHAVIOUR % "login_failed", 0)
    assert await login(deployment.node, b["device"]["remote_device_id"], a["device_token"]) == (
        False, "authentication failed")
    m = await deployment.metrics()
    assert m[MISBEHAVIOUR % "login_failed"] == before + 1
    writer.write(b"B still relays")
    assert await asyncio.wait_for(reader.readexactly(14), 10) == b"B still relays"
    writer.close()
    assert await echo(port, b["conn"], targets) == b"ping"  # and opens new sessions
    online = await deployment.pool.fetchval("SELECT online FROM devices WHERE remote_device_id = $1",
                                            b["device"]["remote_device_id"])
    assert online is True


@pytest.mark.parametrize("name,body", [
    ("domain as bound address", {"bound_host": "evil.example", "bound_port": 1, "resolved_ip": "93.184.216.34"}),
    ("garbage resolved address", {"bound_host": "0.0.0.0", "bound_port": 1, "resolved_ip": "not-an-ip\r\nX: y"}),
    ("bound port out of range", {"bound_host": "198.51.100.1", "bound_port": 70000, "resolved_ip": ""}),
    ("bound port not a number", {"bound_host": "198.51.100.1", "bound_port": "80", "resolved_ip": ""}),
    ("bound address not a string", {"bound_host": 3232235777, "bound_port": 1, "resolved_ip": ""}),
    ("huge resolved address", {"bound_host": "0.0.0.0", "bound_port": 1, "resolved_ip": "1" * 60000}),
])
async def test_open_ok_with_a_malformed_address_resets_the_stream_and_the_client_gets_0x01(
        deployment, targets, victim, name, body):
    b = await _victim(deployment, victim)
    _uid, token = await deployment.user(f"liar-{name.split()[0]}")
    device = await deployment.device(token)
    bad = await dial(deployment.node, device["remote_device_id"], device["device_token"])
    assert (await bad.welcome()).ok
    await deployment.wait_online(device["remote_device_id"])
    conn = await deployment.connection(token, device["remote_device_id"])
    before = (await deployment.metrics()).get(MISBEHAVIOUR % "malformed_open_ok", 0)
    client = asyncio.create_task(socks5_code(deployment.node.proxy_port, conn["connectionId"], conn["password"],
                                             "example.com", 80))
    sid = await next_open(bad)
    bad.writer.write(frames.encode_json(frames.FrameType.OPEN_OK, sid, {**body, "window": 1 << 16}))
    assert await asyncio.wait_for(client, 10) == 0x01
    assert await reset_code(bad, sid) == ErrorCode.PROTOCOL_ERROR
    assert await still_answers_ping(bad)  # only the stream was reset
    m = await deployment.metrics()
    assert m[MISBEHAVIOUR % "malformed_open_ok"] == before + 1
    bad.close()
    assert await echo(deployment.node.proxy_port, b["conn"], targets) == b"ping"


async def test_private_addresses_in_open_ok_are_reported_as_the_device_gave_them(deployment):
    _uid, token = await deployment.user("private-reporter")
    device = await deployment.device(token)
    bad = await dial(deployment.node, device["remote_device_id"], device["device_token"])
    assert (await bad.welcome()).ok
    await deployment.wait_online(device["remote_device_id"])
    conn = await deployment.connection(token, device["remote_device_id"])
    client = asyncio.create_task(socks5_open(deployment.node.proxy_port, conn["connectionId"], conn["password"],
                                             "example.com", 80))
    sid = await next_open(bad)
    bad.conn.accept_stream(sid, "192.168.1.23", 40000, "10.0.0.7")
    bad.conn.send_data(sid, b"from the device")
    bad.writer.write(bad.conn.data_to_send())
    reader, writer, bound = await asyncio.wait_for(client, 10)
    assert bound == ("192.168.1.23", 40000)
    assert await asyncio.wait_for(reader.readexactly(15), 10) == b"from the device"
    writer.close()
    bad.close()


async def test_a_device_that_never_answers_open_gives_the_client_a_timeout_and_frees_the_stream(pg_root, tmp_path,
                                                                                                targets):
    dep = await fresh_deployment(pg_root, tmp_path, CONNECT_TIMEOUT_S="1")  # the node waits 1 + 5 s
    try:
        _uid, token = await dep.user("mute")
        device = await dep.device(token)
        bad = await dial(dep.node, device["remote_device_id"], device["device_token"])
        assert (await bad.welcome()).ok
        await dep.wait_online(device["remote_device_id"])
        conn = await dep.connection(token, device["remote_device_id"])
        t0 = time.monotonic()
        client = asyncio.create_task(socks5_code(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                                 "example.com", 80))
        sid = await next_open(bad)  # ... and never answered
        assert (await dep.metrics())["proxyorch_tunnel_opening"] == 1
        assert await asyncio.wait_for(client, 20) == 0x06  # TTL expired
        assert 5 <= time.monotonic() - t0 < 15
        assert await reset_code(bad, sid) == ErrorCode.CANCEL  # the node gave the stream up
        m = await dep.metrics()
        assert m["proxyorch_tunnel_opening"] == 0 and m["proxyorch_tunnel_streams"] == 0  # state freed
        assert m[MISBEHAVIOUR % "open_unanswered"] == 1
        # an answer that comes after all is refused with RST CANCEL; the tunnel lives on
        bad.writer.write(frames.encode_json(frames.FrameType.OPEN_OK, sid, {"window": 1 << 16}))
        assert await raw_rst_code(bad, sid) == ErrorCode.CANCEL  # (our core would swallow this RST)
        assert await still_answers_ping(bad)
        bad.close()
    finally:
        await dep.close()
        await dep.node.stop()


async def test_failed_device_logins_are_limited_per_address_and_per_id(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path)  # AUTH_FAIL_LIMIT=20 per AUTH_FAIL_WINDOW_S=60 (defaults)
    try:
        _uid, token = await dep.user("login-victim")
        device = await dep.device(token)
        did, good = device["remote_device_id"], device["device_token"]
        other = await dep.device(token)
        # the owner's real agent logs in from its address (127.0.0.1), which becomes a known one
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, did)
        t0 = time.monotonic()
        errors = [(await login(dep.node, did, "guess-" + str(i), "127.0.0.5"))[1] for i in range(100)]
        rate = 100 / (time.monotonic() - t0)
        print(f"100 failed device logins (TLS) at {rate:.0f}/s")
        assert errors[:20] == ["authentication failed"] * 20
        assert set(errors[20:]) == {"too many failed logins, try again later"}
        # the right token from the attacker's address: refused; from a fresh address: refused (the id is
        # under attack); from the known-good address: accepted; another device is not affected
        assert await login(dep.node, did, good, "127.0.0.5") == (False, "too many failed logins, try again later")
        assert await login(dep.node, did, good, "127.0.0.7") == (False, "too many failed logins, try again later")
        assert await login(dep.node, did, good, "127.0.0.1") == (True, "")
        assert await login(dep.node, other["remote_device_id"], other["device_token"], "127.0.0.8") == (True, "")
        m = await dep.metrics()
        assert m[MISBEHAVIOUR % "login_failed"] == 20
        assert m[MISBEHAVIOUR % "login_rate_limited"] == 82
        # the real agent's sessions went on throughout
        assert await echo(dep.node.proxy_port, conn, targets) == b"ping"
    finally:
        await dep.close()
        await dep.node.stop()


IDLE = 5000


@pytest.mark.slow  # ~35 s with its own node: RUN_SLOW=1
async def test_5000_idle_unauthenticated_tunnel_connections_do_not_stop_a_real_agent(pg_root, tmp_path, targets):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 1000 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (IDLE + 1000, hard))
    n = min(IDLE, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1000)  # 5 000 unless the hard limit forbids
    dep = await fresh_deployment(pg_root, tmp_path)
    idle: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        for i in range(n):  # TCP connected, then silent: no TLS ClientHello, no HELLO
            if i % 500 == 499:
                await asyncio.sleep(0.2)  # in bursts the listen backlog (1024) takes without dropping SYNs
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", dep.node.tunnel_port))
            except BlockingIOError:
                pass
            idle.append(s)
        opened = time.monotonic() - t0
        _uid, token = await dep.user("real-agent")
        device = await dep.device(token)
        t1 = time.monotonic()
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        assert await echo(dep.node.proxy_port, conn, targets) == b"ping"
        routed = time.monotonic() - t1
        print(f"{n} idle tunnel connections opened in {opened:.1f}s; a real agent connected and routed in "
              f"{routed:.1f}s")
        # they stop by themselves: closed by the node at the 10 s HELLO timeout (TLS handshake included)
        deadline = time.monotonic() + 10 + 20
        open_ = set(idle)
        while open_ and time.monotonic() < deadline:
            for s in list(open_):
                try:
                    if s.recv(1 << 12) == b"":
                        open_.discard(s)
                except BlockingIOError:
                    pass
                except OSError:
                    open_.discard(s)
            await asyncio.sleep(0.5)
        closed_after = time.monotonic() - t0
        print(f"all idle connections closed by the node {closed_after:.1f}s after the first")
        assert not open_, f"{len(open_)} idle connections still open"
        assert closed_after >= 9.5
        assert await echo(dep.node.proxy_port, conn, targets) == b"ping"
    finally:
        for s in idle:
            s.close()
        await dep.close()
        await dep.node.stop()
