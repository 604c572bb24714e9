"""SOCKS5 UDP ASSOCIATE through a real node and real device agents, with real clients.

The clients are PySocks' UDP socket and the raw RFC 1928 client of ``tests/socks5_udp.py``; the
targets are UDP echo servers on 127.0.0.x that record who sent what. One agent exits from
``EXIT`` (127.0.0.41, ``--allow-private``), a strict one refuses private targets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from socks5_udp import RawUdpClient, start_udp_echo

pytestmark = pytest.mark.asyncio(loop_scope="session")
EXIT = "127.0.0.41"
MiB = 1024 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(deployment):
    dep = deployment
    _uid, token = await dep.user("udp")
    device = await dep.device(token)
    agent = await dep.agent(device, "--allow-private", "--source-address", EXIT)
    strict_device = await dep.device(token)
    strict = await dep.agent(strict_device)
    conn = await dep.connection(token, device["remote_device_id"], "udp")
    strict_conn = await dep.connection(token, strict_device["remote_device_id"], "udp-strict")
    echo = await start_udp_echo("127.0.0.1")
    echo2 = await start_udp_echo("127.0.0.2")
    yield {"dep": dep, "token": token, "agent": agent, "strict": strict, "device": device,
           "cid": conn["connectionId"], "pw": conn["password"],
           "strict_cid": strict_conn["connectionId"], "strict_pw": strict_conn["password"],
           "echo": echo, "echo2": echo2, "port": dep.node.proxy_port}
    echo.close()
    echo2.close()
    agent.kill(15)
    strict.kill(15)


def client(world, *, strict: bool = False, announce: bool = True, cid: str | None = None,
           pw: str | None = None) -> RawUdpClient:
    if strict:
        return RawUdpClient(world["port"], world["strict_cid"], world["strict_pw"], announce=announce)
    return RawUdpClient(world["port"], cid or world["cid"], pw or world["pw"], announce=announce)


async def metric(world, name: str) -> float:
    return (await world["dep"].metrics()).get(name, 0.0)


def dropped(reason: str) -> str:
    return f'proxyorch_udp_datagrams_dropped_total{{reason="{reason}"}}'


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def logs(world, cid: str, n: int, timeout: float = 30) -> list[dict]:
    now = datetime.now(UTC)
    params = {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat(),
              "connectionId": cid, "limit": "1000"}
    deadline = time.monotonic() + timeout
    while True:
        status, body = await world["dep"].call("GET", "/api/v2/proxy/logs", world["token"], params=params)
        assert status == 200, body
        if body["total"] >= n or time.monotonic() > deadline:
            return body["entries"]
        await asyncio.sleep(0.2)


def exchange(c: RawUdpClient, host: str, port: int, payloads: list[bytes]) -> list[tuple[str, int, bytes]]:
    """Send each payload and wait for its echo (one at a time, so nothing is lost to a race)."""
    out = []
    for p in payloads:
        c.send(host, port, p)
        out.append(c.recv())
    return out


async def test_raw_client_datagrams_exit_through_the_device_and_come_back(world):
    echo = world["echo"]
    c = client(world)
    try:
        assert await asyncio.to_thread(c.associate) == 0
        assert c.relay[0] == "127.0.0.1" and c.relay[1] not in (0, world["port"])
        before = len(echo.seen)
        payloads = [os.urandom(n) for n in (0, 1, 100, 1400, 9000, 60000)]
        replies = await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, payloads)
    finally:
        c.close()
    assert [r[2] for r in replies] == payloads
    assert all((h, p) == ("127.0.0.1", echo.port) for h, p, _ in replies)
    seen = echo.seen[before:]
    assert [n for _addr, n in seen] == [len(p) for p in payloads]
    assert {addr[0] for addr, _n in seen} == {EXIT}  # the agent's --source-address


async def test_a_name_is_resolved_on_the_device(world):
    echo = world["echo"]
    c = client(world)
    try:
        assert await asyncio.to_thread(c.associate) == 0
        replies = await asyncio.to_thread(exchange, c, "localhost", echo.port, [b"by name"] * 3)
    finally:
        c.close()
    assert [r[2] for r in replies] == [b"by name"] * 3
    assert replies[0][0] == "127.0.0.1"  # the reply carries the address the device resolved


async def test_pysocks_udp_socket_gets_the_echo(world):
    import socks

    echo = world["echo"]

    def run() -> list[tuple[bytes, tuple]]:
        s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
        s.set_proxy(socks.SOCKS5, "127.0.0.1", world["port"], username=world["cid"], password=world["pw"])
        s.settimeout(10)
        got = []
        try:
            for i in range(5):
                s.sendto(b"pysocks %d" % i, ("127.0.0.1", echo.port))
                got.append(s.recvfrom(4096))
        finally:
            s.close()
        return got

    before = len(echo.seen)
    got = await asyncio.to_thread(run)
    assert [data for data, _ in got] == [b"pysocks %d" % i for i in range(5)]
    assert all(addr == ("127.0.0.1", echo.port) for _, addr in got)
    assert {addr[0] for addr, _n in echo.seen[before:]} == {EXIT}


async def test_port_zero_locks_on_the_first_port_and_drops_other_senders(world):
    echo = world["echo"]
    c = client(world, announce=False)
    intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intruder.bind(("127.0.0.1", 0))
    try:
        assert await asyncio.to_thread(c.associate) == 0
        assert (await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, [b"first"]))[0][2] == b"first"
        foreign = await metric(world, dropped("foreign_source"))
        before = len(echo.payloads)
        intruder.sendto(b"\x00\x00\x00\x01\x7f\x00\x00\x01" + echo.port.to_bytes(2, "big") + b"intruder", c.relay)
        await wait_for(lambda: _gt(world, dropped("foreign_source"), foreign))
        assert (await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, [b"again"]))[0][2] == b"again"
        assert b"intruder" not in echo.payloads[before:]
    finally:
        intruder.close()
        c.close()


async def _gt(world, name: str, value: float) -> bool:
    return await metric(world, name) > value


async def test_fragments_are_dropped_and_counted(world):
    echo = world["echo"]
    c = client(world)
    try:
        assert await asyncio.to_thread(c.associate) == 0
        frags = await metric(world, "proxyorch_udp_fragments_dropped_total")
        before = len(echo.payloads)
        c.send("127.0.0.1", echo.port, b"fragment one", frag=1)
        c.send("127.0.0.1", echo.port, b"fragment last", frag=0x82)
        await wait_for(lambda: _at_least(world, "proxyorch_udp_fragments_dropped_total", frags + 2))
        assert (await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, [b"whole"]))[0][2] == b"whole"
        assert echo.payloads[before:] == [b"whole"]
    finally:
        c.close()


async def _at_least(world, name: str, value: float) -> bool:
    return await metric(world, name) >= value


async def test_strict_agent_refuses_private_targets(world):
    echo = world["echo"]
    c = client(world, strict=True)
    try:
        assert await asyncio.to_thread(c.associate) == 0
        before = len(echo.payloads)
        for _ in range(3):
            c.send("127.0.0.1", echo.port, b"to loopback")
            c.send("localhost", echo.port, b"to loopback by name")
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(c.recv, 1.5)
    finally:
        c.close()
    assert echo.payloads[before:] == []
    await world["strict"].wait_log("refused: target address is private")


async def test_blacklist_applies_per_datagram_target(world):
    dep, echo, echo2 = world["dep"], world["echo"], world["echo2"]
    conn = await dep.connection(world["token"], world["device"]["remote_device_id"], "udp-blacklist")
    cid, pw = conn["connectionId"], conn["password"]
    status, _ = await dep.call("POST", f"/api/v2/proxy/connections/{cid}/blacklist", world["token"],
                               json={"domains": ["127.0.0.2"]})
    assert status == 200
    await asyncio.sleep(0.3)  # the auth cache's TTL, should the push be late
    blocked = await metric(world, dropped("blocked"))
    c = client(world, cid=cid, pw=pw)
    try:
        assert await asyncio.to_thread(c.associate) == 0
        before2 = len(echo2.payloads)
        c.send("127.0.0.2", echo2.port, b"blocked target")
        await wait_for(lambda: _gt(world, dropped("blocked"), blocked))
        assert (await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, [b"allowed"]))[0][2] == b"allowed"
    finally:
        c.close()
    assert echo2.payloads[before2:] == []
    rows = await logs(world, cid, 1)
    assert len(rows) == 1
    assert rows[0]["protocol"] == "udp" and rows[0]["target"] == f"127.0.0.1:{echo.port}"
    assert rows[0]["action"] == "allowed" and "blocked 1" in rows[0]["error"]


async def test_association_ends_with_its_tcp_connection(world):
    echo = world["echo"]
    c = client(world)
    try:
        assert await asyncio.to_thread(c.associate) == 0
        assert (await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, [b"alive"]))[0][2] == b"alive"
        active = await metric(world, "proxyorch_udp_associations_active")
        assert active >= 1
        c.close_control()
        await wait_for(lambda: _below(world, "proxyorch_udp_associations_active", active))
        # The relay port is closed: a connected UDP socket gets ICMP port unreachable.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.settimeout(3)
        try:
            probe.connect(c.relay)
            with pytest.raises(ConnectionRefusedError):
                for _ in range(5):
                    probe.send(b"\x00\x00\x00\x01\x7f\x00\x00\x01" + echo.port.to_bytes(2, "big") + b"x")
                    await asyncio.sleep(0.1)
                probe.recv(100)
        finally:
            probe.close()
    finally:
        c.close()
    await world["agent"].wait_log("datagrams sent")  # the device closed its sockets of the association


async def _below(world, name: str, value: float) -> bool:
    return await metric(world, name) < value


async def test_one_log_row_per_association_with_exact_bytes(world):
    dep, echo = world["dep"], world["echo"]
    conn = await dep.connection(world["token"], world["device"]["remote_device_id"], "udp-rows")
    cid, pw = conn["connectionId"], conn["password"]
    sizes = [10, 200, 3000, 1, 4096]
    for _ in range(2):
        c = client(world, cid=cid, pw=pw)
        try:
            assert await asyncio.to_thread(c.associate) == 0
            payloads = [os.urandom(n) for n in sizes]
            replies = await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, payloads)
            assert [r[2] for r in replies] == payloads
            # a second target later in the association: the row names the first
            await asyncio.to_thread(exchange, c, "127.0.0.2", world["echo2"].port, [b"xy"])
        finally:
            c.close()
    rows = await logs(world, cid, 2)
    assert len(rows) == 2
    for row in rows:
        assert row["protocol"] == "udp"
        assert row["target"] == f"127.0.0.1:{echo.port}" and row["action"] == "allowed"
        assert row["bytesOut"] == sum(sizes) + 2 and row["bytesIn"] == sum(sizes) + 2
        assert row["deviceId"] == world["device"]["remote_device_id"]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_10000_datagrams_into_a_stalled_tunnel_keep_the_node_bounded(world):
    """The agent is stopped (SIGSTOP): the tunnel stalls, the association's queue fills (256
    datagrams / 1 MiB), the rest is dropped and counted; node memory does not follow the 80 MB sent."""
    dep, echo = world["dep"], world["echo"]
    agent = world["agent"]
    c = client(world)
    assert await asyncio.to_thread(c.associate) == 0
    assert (await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, [b"warm"]))[0][2] == b"warm"
    node_pid = dep.node.proc.pid
    full = await metric(world, dropped("tunnel_full"))
    rss0 = rss_mib(node_pid)
    payload = os.urandom(8000)
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        def blast() -> None:
            for _ in range(10_000):
                c.send("127.0.0.1", echo.port, payload)

        t0 = time.monotonic()
        await asyncio.to_thread(blast)
        took = time.monotonic() - t0
        await asyncio.sleep(1.0)
        rss1 = rss_mib(node_pid)
        drops = await metric(world, dropped("tunnel_full")) - full
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    print(f"\n[udp stalled tunnel] 10000 x 8000 B in {took:.2f}s; node RSS {rss0:.0f} -> {rss1:.0f} MiB "
          f"(+{rss1 - rss0:.0f}); dropped tunnel_full {drops:.0f}")
    assert drops >= 1000, drops
    assert rss1 - rss0 < 40, (rss0, rss1)
    # The tunnel recovers: the association works again once the agent runs.
    deadline = time.monotonic() + 20
    while True:
        try:
            await asyncio.to_thread(c.send, "127.0.0.1", echo.port, b"after")
            host, port, data = await asyncio.to_thread(c.recv, 1.0)
            if data == b"after":
                break
        except TimeoutError:
            pass
        assert time.monotonic() < deadline, "association did not recover"
    c.close()


async def test_association_ends_when_the_device_goes_away(world):
    dep, echo = world["dep"], world["echo"]
    device = await dep.device(world["token"])
    agent = await dep.agent(device, "--allow-private")
    conn = await dep.connection(world["token"], device["remote_device_id"], "udp-device-gone")
    c = client(world, cid=conn["connectionId"], pw=conn["password"])
    try:
        assert await asyncio.to_thread(c.associate) == 0
        assert (await asyncio.to_thread(exchange, c, "127.0.0.1", echo.port, [b"up"]))[0][2] == b"up"
        agent.kill(9)
        assert c.tcp is not None
        c.tcp.settimeout(20)
        assert await asyncio.to_thread(c.tcp.recv, 10) == b""  # the node closed the control connection
    finally:
        c.close()


async def test_a_blacklist_change_reaches_a_live_association(world):
    dep, echo2 = world["dep"], world["echo2"]
    conn = await dep.connection(world["token"], world["device"]["remote_device_id"], "udp-live-blacklist")
    cid, pw = conn["connectionId"], conn["password"]
    c = client(world, cid=cid, pw=pw)
    try:
        assert await asyncio.to_thread(c.associate) == 0
        assert (await asyncio.to_thread(exchange, c, "127.0.0.2", echo2.port, [b"before"]))[0][2] == b"before"
        status, _ = await dep.call("POST", f"/api/v2/proxy/connections/{cid}/blacklist", world["token"],
                                   json={"domains": ["127.0.0.0/8"]})
        assert status == 200
        blocked = await metric(world, dropped("blocked"))
        deadline = time.monotonic() + 10
        while await metric(world, dropped("blocked")) == blocked:
            assert time.monotonic() < deadline, "the blacklist change never reached the association"
            c.send("127.0.0.2", echo2.port, b"probe")
            await asyncio.sleep(0.2)
        seen = len(echo2.payloads)
        for _ in range(5):
            c.send("127.0.0.2", echo2.port, b"after")
        await asyncio.sleep(0.5)
        assert b"after" not in echo2.payloads[seen:]
    finally:
        c.close()
