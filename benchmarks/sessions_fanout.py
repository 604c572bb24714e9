"""Cost of the cluster-wide sessions list: ``python -m benchmarks.sessions_fanout``.

10 000 fake open sessions (as in :mod:`benchmarks.sessions_snapshot`) spread evenly over 1, 2 or 3
nodes. The other nodes are separate processes serving the real ``POST /internal/sessions``
(:mod:`marketplace_api.internal` with a real ``SessionRegistry``) on loopback; the calling node
does what ``GET /api/v2/proxy/sessions`` does after authentication: its own ``snapshot()``, the
fan-out (:class:`marketplace_api.sessions_fanout.SessionFanout`), merge, sort, tenant filter and
orjson encoding. Timed for the admin (every session) and one user who sees 1 % of them.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
import uuid
from typing import Any

import orjson

from benchmarks.sessions_snapshot import _Fake
from proxy.sessions import SessionRegistry

SECRET = "bench-secret-" + "x" * 16


def _registry(n: int, conns: list[str], devs: list[str], offset: int) -> SessionRegistry:
    reg = SessionRegistry()
    for i in range(offset, offset + n):
        s = _Fake(conns[i % len(conns)], devs[i % len(devs)], i)
        s.bytes_in, s.bytes_out = 1500 * i, 100 * i
        reg.add(s)
    for t in range(8):
        reg.sample(2.0 + t)
    return reg


def _peer(name: str, n: int, conns: list[str], devs: list[str], offset: int, ready: Any) -> None:
    """A node process: the real /internal/ sub-application over a registry of ``n`` sessions."""
    from aiohttp import web

    from marketplace_api import internal
    from marketplace_api.context import PROXY, SETTINGS
    from proxyorch.config import load_settings

    class _Proxy:
        sessions = _registry(n, conns, devs, offset)

    async def main() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app[SETTINGS] = load_settings({"NODE_NAME": name, "CLUSTER_SECRET": SECRET})
        app[PROXY] = _Proxy()  # type: ignore[assignment]
        internal.setup(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


class _Presence:
    def __init__(self, apis: dict[str, str]) -> None:
        self.apis = apis

    async def api_addresses(self) -> dict[str, str]:
        return self.apis


async def _measure(nodes: int, total: int, repeat: int) -> dict[str, float]:
    from marketplace_api.routes_live import _keep
    from marketplace_api.sessions_fanout import SessionFanout

    conns = [str(uuid.uuid4()) for _ in range(max(1, total // 10))]
    devs = [str(uuid.uuid4()) for _ in range(max(1, total // 100))]
    share = total // nodes
    procs, apis = [], {"node-1": ""}
    ctx = multiprocessing.get_context("fork")
    for k in range(2, nodes + 1):
        here, there = ctx.Pipe()
        p = ctx.Process(target=_peer, args=(f"node-{k}", share, conns, devs, (k - 2) * share, there), daemon=True)
        p.start()
        apis[f"node-{k}"] = f"http://127.0.0.1:{here.recv()}"
        procs.append(p)
    local = _registry(total - share * (nodes - 1), conns, devs, (nodes - 1) * share)
    fanout = SessionFanout(SECRET, "node-1")
    presence = _Presence(apis)
    user_conns, user_devs = set(conns[: len(conns) // 100 or 1]), {devs[0]}

    async def view(c: set[str] | None, d: set[str] | None) -> tuple[int, int]:
        rows = local.snapshot(9.0, "node-1", connection_ids=c, device_ids=d)
        remote, missing = await fanout.collect(presence, c, d)
        assert not missing, missing
        if remote:  # as the route: merge and sort again only with rows from other nodes
            rows.extend(remote)
            rows.sort(key=lambda r: (r.get("startedAt") or "", r.get("sessionId") or ""))
        rows = [r for r in rows if _keep(r, c, d, None, None)]
        return len(rows), len(orjson.dumps({"success": True, "total": len(rows), "sessions": rows}))

    out: dict[str, float] = {"nodes": nodes, "sessions": total}
    try:
        for label, c, d in (("admin", None, None), ("user", user_conns, user_devs)):
            await view(c, d)  # warm the connection pool
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                count, size = await view(c, d)
                times.append(time.perf_counter() - t0)
            out[f"{label}_rows"], out[f"{label}_json_bytes"] = count, size
            out[f"{label}_ms_min"] = min(times) * 1000
            out[f"{label}_ms_median"] = statistics.median(times) * 1000
    finally:
        await fanout.close()
        for p in procs:
            p.terminate()
            p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    for nodes in (1, 2, 3):
        result = asyncio.run(_measure(nodes, args.sessions, args.repeat))
        print(" ".join(f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v:,}" for k, v in result.items()),
              flush=True)


if __name__ == "__main__":
    main()
