"""Cost of the live-sessions view with many open sessions: ``python -m benchmarks.sessions_snapshot``.

Fills a ``SessionRegistry`` with N fake sessions (the attributes ``ClientSession`` has), then times
the once-a-second ``sample()`` and one ``/api/v2/proxy/sessions``-sized ``snapshot()`` + JSON
encoding, for the admin (every session) and for one user who sees 1 % of them.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime

import orjson

from proxy.sessions import SessionRegistry


class _Fake:
    __slots__ = ("connection_id", "device_id", "client_addr", "protocol", "target_host", "target_port",
                 "started", "started_wall", "bytes_in", "bytes_out", "__weakref__")

    def __init__(self, cid: str, did: str, i: int) -> None:
        self.connection_id, self.device_id = cid, did
        self.client_addr, self.protocol = f"10.0.{i // 256 % 256}.{i % 256}", "socks5"
        self.target_host, self.target_port = f"host{i}.example.com", 443
        self.started, self.started_wall = 1.0, datetime.now(UTC)
        self.bytes_in = self.bytes_out = 0

    def terminate(self, reason: str) -> None:
        pass


def _best(fn, repeat: int) -> tuple[float, float]:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000, statistics.median(times) * 1000


def run(n: int, repeat: int) -> dict[str, float]:
    reg = SessionRegistry()
    conns = [str(uuid.uuid4()) for _ in range(max(1, n // 10))]   # 10 sessions per connection
    devs = [str(uuid.uuid4()) for _ in range(max(1, n // 100))]   # 100 sessions per device
    sessions = [_Fake(conns[i % len(conns)], devs[i % len(devs)], i) for i in range(n)]
    for s in sessions:
        reg.add(s)
    clock = [2.0]

    def sample() -> None:
        for s in sessions:
            s.bytes_in += 1500
            s.bytes_out += 100
        clock[0] += 1
        reg.sample(clock[0])

    for _ in range(8):
        sample()
    user_conns, user_devs = set(conns[: len(conns) // 100 or 1]), {devs[0]}
    out: dict[str, float] = {"sessions": n}
    out["sample_ms_min"], out["sample_ms_median"] = _best(lambda: reg.sample(clock[0]), repeat)
    out["admin_snapshot_json_ms_min"], out["admin_snapshot_json_ms_median"] = _best(
        lambda: orjson.dumps({"sessions": reg.snapshot(clock[0], "node-1")}), repeat)
    out["user_snapshot_json_ms_min"], out["user_snapshot_json_ms_median"] = _best(
        lambda: orjson.dumps({"sessions": reg.snapshot(clock[0], "node-1", connection_ids=user_conns,
                                                       device_ids=user_devs)}), repeat)
    out["admin_json_bytes"] = len(orjson.dumps({"sessions": reg.snapshot(clock[0], "node-1")}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=20)
    for k, v in run(ap.parse_args().sessions, ap.parse_args().repeat).items():
        print(f"{k:32} {v:,.2f}" if isinstance(v, float) else f"{k:32} {v:,}")


if __name__ == "__main__":
    main()
