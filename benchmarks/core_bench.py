"""``python -m benchmarks.core_bench``: CPU per session of the sans-I/O cores alone, in one process.

One "session" is what the cores do for a SOCKS5 session of the session-rate scenario, without sockets
or an event loop: the session core's greeting, username/password, CONNECT, the open result and the
log row at the end; the tunnel core's OPEN / OPEN_OK, 64 bytes each way and FIN both ways between an
in-memory node and agent. It measures what compiling the cores (``scripts/build_mypyc.sh``) can buy:
run it once from a plain tree and once from a compiled one (``PYTHONPATH``), the same machine, back
to back. Prints JSON with the median microseconds per session of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime


def _tunnel_pair():  # noqa: ANN202
    from device_tunnel.connection import Role, TunnelConnection

    node, agent = TunnelConnection(Role.NODE, 0.0), TunnelConnection(Role.AGENT, 0.0)

    def pump() -> tuple[list, list]:
        ev_n, ev_a = [], []
        for _ in range(100):
            a, b = node.data_to_send(), agent.data_to_send()
            ev_n += node.pop_events()
            ev_a += agent.pop_events()
            if not a and not b:
                break
            if a:
                ev_a += agent.receive_data(a, 0.0)
            if b:
                ev_n += node.receive_data(b, 0.0)
        return ev_n, ev_a

    agent.send_hello("dev-1", "tok", {})
    pump()
    node.accept("node-a")
    pump()
    return node, agent, pump


def tunnel_sessions(n: int) -> float:
    """Seconds of CPU for ``n`` tunnel streams: open, accept, 64 B each way, FIN both ways."""
    from device_tunnel.events import DataReceived

    node, agent, pump = _tunnel_pair()
    payload = bytes(64)
    t0 = time.process_time()
    for _ in range(n):
        sid = node.open_stream("127.0.0.1", 5000)
        pump()
        agent.accept_stream(sid, "127.0.0.1", 40000, "127.0.0.1")
        pump()
        node.send_data(sid, payload)
        _en, ea = pump()
        for ev in ea:
            if type(ev) is DataReceived:
                agent.acknowledge_received_data(sid, len(ev.data), 0.0)
        agent.send_data(sid, payload)
        agent.send_eof(sid)
        en, _ea = pump()
        for ev in en:
            if type(ev) is DataReceived:
                node.acknowledge_received_data(sid, len(ev.data), 0.0)
        node.send_eof(sid)
        pump()
    return time.process_time() - t0


def socks_sessions(n: int) -> float:
    """Seconds of CPU for ``n`` SOCKS5 sessions through the session core (cached record, one device)."""
    from proxy.auth_cache.cache import CredentialRecord
    from proxy.session_core import Instant, ProxyMetrics, SessionCore

    cid = str(uuid.uuid4())
    record = CredentialRecord(cid, b"h" * 32, "dev-1", ())
    metrics = ProxyMetrics()
    u = cid.encode()
    greeting, auth = b"\x05\x01\x02", b"\x01" + bytes([len(u)]) + u + b"\x10" + b"p" * 16
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x13\x88"
    wall = datetime.now(UTC)
    t0 = time.process_time()
    for i in range(n):
        now = Instant(float(i), wall)
        core = SessionCore(metrics=metrics, client_addr="127.0.0.1")
        core.start()
        core.receive_data(greeting, now)
        core.receive_data(auth, now)
        core.auth_result(record, "", now)
        core.receive_data(request, now)
        core.open_result(0, "", "127.0.0.1", "127.0.0.1", 40000, True, now)
        core.client_lost(now, 64, 64)
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.core_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    import device_tunnel.connection
    import proxy.session_core

    compiled = {m.__name__: m.__file__.endswith(".so") for m in (device_tunnel.connection, proxy.session_core)}
    tunnel_sessions(500)
    socks_sessions(500)  # warm
    tun = sorted(tunnel_sessions(args.sessions) / args.sessions * 1e6 for _ in range(args.rounds))
    socks = sorted(socks_sessions(args.sessions) / args.sessions * 1e6 for _ in range(args.rounds))
    print(json.dumps({"compiled": compiled, "tunnel_us_per_session": round(statistics.median(tun), 2),
                      "socks_core_us_per_session": round(statistics.median(socks), 2),
                      "tunnel_rounds": [round(x, 1) for x in tun], "socks_rounds": [round(x, 1) for x in socks]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
