"""Two in-memory sans-I/O tunnel endpoints (node and agent) passing bytes, with a fake clock."""

from __future__ import annotations

from collections import defaultdict

from device_tunnel.connection import Role, TunnelConfig, TunnelConnection
from device_tunnel.events import (
    DataReceived,
    Event,
    HelloReceived,
    StreamOpenRequested,
)
from device_tunnel.windows import MemoryBudget


class Side:
    """One endpoint plus what its application saw; acknowledges data unless the stream is stalled."""

    def __init__(self, conn: TunnelConnection, pair: Pair) -> None:
        self.conn = conn
        self.pair = pair
        self.events: list[Event] = []
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.stalled: set[int] = set()
        self.unacked: dict[int, int] = defaultdict(int)

    def take(self, events: list[Event]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, DataReceived):
                self.data[ev.stream_id] += bytes(ev.data)
                if ev.stream_id in self.stalled:
                    self.unacked[ev.stream_id] += len(ev.data)
                else:
                    self.conn.acknowledge_received_data(ev.stream_id, len(ev.data), self.pair.now)

    def unstall(self, sid: int) -> None:
        self.stalled.discard(sid)
        n, self.unacked[sid] = self.unacked[sid], 0
        self.conn.acknowledge_received_data(sid, n, self.pair.now, force=True)

    def of(self, cls: type) -> list:
        return [e for e in self.events if isinstance(e, cls)]


class Pair:
    def __init__(self, node_config: TunnelConfig | None = None, agent_config: TunnelConfig | None = None,
                 node_budget: MemoryBudget | None = None, agent_budget: MemoryBudget | None = None) -> None:
        self.now = 0.0
        self.node = Side(TunnelConnection(Role.NODE, 0.0, node_config, node_budget), self)
        self.agent = Side(TunnelConnection(Role.AGENT, 0.0, agent_config, agent_budget), self)
        self.wire: list[tuple[str, bytes]] = []   # everything sent, for replaying

    def pump(self, rounds: int = 100000) -> None:
        """Move bytes both ways until neither side has anything to send."""
        for _ in range(rounds):
            a = self.node.conn.data_to_send()
            b = self.agent.conn.data_to_send()
            self.node.take(self.node.conn.pop_events())
            self.agent.take(self.agent.conn.pop_events())
            if not a and not b:
                return
            if a:
                self.wire.append(("to_agent", a))
                self.agent.take(self.agent.conn.receive_data(a, self.now))
            if b:
                self.wire.append(("to_node", b))
                self.node.take(self.node.conn.receive_data(b, self.now))
        raise AssertionError("pump did not settle")

    def handshake(self) -> None:
        self.agent.conn.send_hello("dev-1", "tok", {"brand": "x"})
        self.pump()
        assert isinstance(self.node.events[-1], HelloReceived)
        self.node.conn.accept("node-a")
        self.pump()
        assert self.node.conn.handshake_done and self.agent.conn.handshake_done

    def open(self, host: str = "example.com", port: int = 443) -> int:
        sid = self.node.conn.open_stream(host, port)
        self.pump()
        req = self.agent.of(StreamOpenRequested)[-1]
        assert req.stream_id == sid
        assert self.agent.conn.accept_stream(sid, "10.0.0.2", 5555, "93.184.216.34")
        self.pump()
        return sid

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for side in (self.node, self.agent):
            side.take(side.conn.handle_timer(self.now))
