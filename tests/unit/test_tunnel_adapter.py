"""The asyncio adapters over real loopback sockets (in-process): the transport check runs before
any HELLO byte, and a node and an agent relay through the shared core."""

from __future__ import annotations

import asyncio

import pytest

from device_tunnel.agent import AgentConfig, DeviceAgent
from device_tunnel.server import OpenResult, TunnelServer


async def test_a_failing_verify_hook_refuses_the_node_before_any_hello_byte():
    received = bytearray()
    got_conn = asyncio.Event()

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got_conn.set()
        received.extend(await reader.read(1 << 16))
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen = []

    def verify(transport) -> None:
        seen.append(transport.get_extra_info("peername"))
        raise ValueError("certificate pin mismatch")

    agent = DeviceAgent(AgentConfig(host="127.0.0.1", port=port, device_id="d", token="t", verify=verify,
                                    plaintext=True))  # the hook runs on plain TCP too
    with pytest.raises(ConnectionError, match="pin mismatch"):
        await agent.connect()
    await asyncio.wait_for(got_conn.wait(), 5)
    await asyncio.sleep(0.1)
    assert seen and seen[0][1] == port
    assert received == b""   # not one byte of HELLO (and so no token) left the device
    server.close()


class Collect:
    def __init__(self) -> None:
        self.result: asyncio.Future[OpenResult] = asyncio.get_running_loop().create_future()
        self.data = bytearray()
        self.eof = asyncio.Event()

    def open_result(self, result: OpenResult) -> None:
        self.result.set_result(result)

    def stream_data(self, data) -> None:
        self.data += data

    def stream_eof(self) -> None:
        self.eof.set()

    def stream_closed(self, error) -> None:
        self.eof.set()

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass

    def sink_ready(self) -> bool:
        return True


async def test_node_and_agent_adapters_relay_a_stream_and_own_their_tasks():
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
        writer.write_eof()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    presence: list[tuple[str, bool]] = []

    async def authenticate(device_id: str, token: str, meta: dict) -> bool:
        return token == "good"

    async def on_presence(device_id: str, online: bool, meta: dict) -> None:
        presence.append((device_id, online))

    node = TunnelServer(node_name="n1", authenticate=authenticate, presence=on_presence, memory_budget=8 << 20)
    await node.start("127.0.0.1", 0, ssl=None)
    agent = DeviceAgent(AgentConfig(host="127.0.0.1", port=node.port, device_id="dev", token="good",
                                    allow_private=True, memory_budget=8 << 20, plaintext=True))
    run = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 10)
    for _ in range(100):
        if node.registry.pick("dev") is not None:
            break
        await asyncio.sleep(0.02)
    tunnel = node.registry.pick("dev")
    assert tunnel is not None
    handler = Collect()
    tunnel.open_stream("127.0.0.1", target_port, handler)
    result = await asyncio.wait_for(handler.result, 10)
    assert result.rep == 0 and result.stream is not None
    payload = bytes(range(256)) * 4096   # 1 MiB: several windows' worth of credit round trips
    result.stream.write(payload)
    result.stream.write_eof()
    await asyncio.wait_for(handler.eof.wait(), 10)
    assert bytes(handler.data) == payload
    assert node.budget.used <= node.budget.limit
    agent.stop()
    await asyncio.wait_for(run, 10)
    for _ in range(100):
        if ("dev", False) in presence:
            break
        await asyncio.sleep(0.02)
    assert presence == [("dev", True), ("dev", False)]
    assert not any(t.tasks for t in agent.tunnels)
    node.stop_accepting()
    node.close_all()
    await node.wait_tasks()
    assert not node.tasks
    target.close()
