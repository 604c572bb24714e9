"""UDP streams through the real node and agent adapters (in-process, loopback sockets): the agent
sends from its *current* ``source_address`` (changed in place, as a rotation does), resolves names,
and closes its sockets when the association ends; the node's relay announces a reachable address."""

from __future__ import annotations

import asyncio

from socks5_udp import start_udp_echo

from device_tunnel.agent import AgentConfig, DeviceAgent
from device_tunnel.server import OpenResult, TunnelServer
from device_tunnel.udp import DeviceUdpAssociation
from proxy.udp_relay import relay_address


class Collect:
    def __init__(self) -> None:
        self.result: asyncio.Future[OpenResult] = asyncio.get_running_loop().create_future()
        self.datagrams: asyncio.Queue[tuple[str, int, bytes]] = asyncio.Queue()
        self.closed: str | None = None

    def open_result(self, result: OpenResult) -> None:
        self.result.set_result(result)

    def stream_datagram(self, host: str, port: int, data: bytes) -> None:
        self.datagrams.put_nowait((host, port, bytes(data)))

    def stream_closed(self, error: str | None) -> None:
        self.closed = error or "closed"

    def stream_data(self, data: bytes) -> None:
        raise AssertionError("DATA on a UDP stream")

    def stream_eof(self) -> None:
        pass

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass

    def sink_ready(self) -> bool:
        return True


async def _ok(*_args: object) -> bool:
    return True


async def _nothing(*_args: object) -> None:
    return None


async def test_udp_stream_follows_the_agents_current_source_address_and_closes_its_sockets():
    echo = await start_udp_echo("127.0.0.1")
    node = TunnelServer(node_name="n1", authenticate=_ok, presence=_nothing, memory_budget=8 << 20)
    await node.start("127.0.0.1", 0, ssl=None)
    config = AgentConfig(host="127.0.0.1", port=node.port, device_id="dev", token="t", allow_private=True,
                         source_address="127.0.0.51", memory_budget=8 << 20, plaintext=True)
    agent = DeviceAgent(config)
    run = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 10)
        for _ in range(100):
            if node.registry.pick("dev") is not None:
                break
            await asyncio.sleep(0.02)
        tunnel = node.registry.pick("dev")
        assert tunnel is not None and "udp" in tunnel.conn.peer_features
        handler = Collect()
        tunnel.open_udp(handler)
        result = await asyncio.wait_for(handler.result, 10)
        assert result.rep == 0 and result.stream is not None
        stream = result.stream

        assert stream.send_datagram("127.0.0.1", echo.port, b"one")
        assert await asyncio.wait_for(handler.datagrams.get(), 10) == ("127.0.0.1", echo.port, b"one")
        assert echo.seen[-1][0][0] == "127.0.0.51"

        config.source_address = "127.0.0.52"  # what a rotation does, in place
        assert stream.send_datagram("localhost", echo.port, b"two")  # a name: resolved on the device
        assert await asyncio.wait_for(handler.datagrams.get(), 10) == ("127.0.0.1", echo.port, b"two")
        assert echo.seen[-1][0][0] == "127.0.0.52"

        [agent_tunnel] = agent.tunnels
        [assoc] = [h.handler for h in agent_tunnel.handles.values()]
        assert isinstance(assoc, DeviceUdpAssociation) and len(assoc.sockets) == 2
        sockets = list(assoc.sockets.values())
        stream.close_quietly()  # the client's control connection closed
        for _ in range(100):
            if assoc.closed:
                break
            await asyncio.sleep(0.02)
        assert assoc.closed and not agent_tunnel.handles
        assert all(s.fileno() == -1 for s in sockets)
        assert (assoc.sent, assoc.received) == (2, 2)
    finally:
        agent.stop()
        await asyncio.wait_for(run, 10)
        node.stop_accepting()
        node.close_all()
        await node.wait_tasks()
        echo.close()


async def test_strict_agent_drops_private_targets_and_counts_them():
    echo = await start_udp_echo("127.0.0.1")
    node = TunnelServer(node_name="n1", authenticate=_ok, presence=_nothing, memory_budget=8 << 20)
    await node.start("127.0.0.1", 0, ssl=None)
    agent = DeviceAgent(AgentConfig(host="127.0.0.1", port=node.port, device_id="dev", token="t",
                                    memory_budget=8 << 20, plaintext=True))
    run = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 10)
        for _ in range(100):
            if node.registry.pick("dev") is not None:
                break
            await asyncio.sleep(0.02)
        tunnel = node.registry.pick("dev")
        assert tunnel is not None
        handler = Collect()
        tunnel.open_udp(handler)
        result = await asyncio.wait_for(handler.result, 10)
        assert result.stream is not None
        for host in ("127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "::1"):
            assert result.stream.send_datagram(host, echo.port, b"no")
        [agent_tunnel] = agent.tunnels
        [assoc] = [h.handler for h in agent_tunnel.handles.values()]
        for _ in range(200):
            if assoc.dropped["policy"] == 5:
                break
            await asyncio.sleep(0.02)
        assert assoc.dropped["policy"] == 5 and assoc.sent == 0 and not assoc.sockets
        assert echo.payloads == []
    finally:
        agent.stop()
        await asyncio.wait_for(run, 10)
        node.stop_accepting()
        node.close_all()
        await node.wait_tasks()
        echo.close()


def test_relay_binds_the_proxy_host_or_answers_the_tcp_local_address():
    assert relay_address("127.0.0.1", "127.0.0.1") == ("127.0.0.1", "127.0.0.1")
    assert relay_address("0.0.0.0", "192.0.2.10") == ("0.0.0.0", "192.0.2.10")
    assert relay_address("::", "2001:db8::5") == ("::", "2001:db8::5")
    assert relay_address("", "192.0.2.10") == ("0.0.0.0", "192.0.2.10")
    assert relay_address("::", "fe80::1%eth0") == ("::", "fe80::1")
