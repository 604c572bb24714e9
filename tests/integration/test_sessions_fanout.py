"""The sessions fan-out against real HTTP peers on loopback: a node serving the real
``/internal/sessions`` and peers that misbehave (garbage, wrong shape, an error, too slow, gone).
Each bad peer is reported missing; the good one's rows arrive; the call takes one per-node timeout."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from aiohttp import web

from marketplace_api import internal
from marketplace_api.context import PROXY, SETTINGS
from marketplace_api.sessions_fanout import PEER_TIMEOUT_S, SessionFanout
from proxy.sessions import SessionRegistry
from proxyorch.config import load_settings

SECRET = "fanout-secret-0123456789"


class Session:
    def __init__(self, cid: str, did: str, size: int) -> None:
        self.connection_id, self.device_id = cid, did
        self.client_addr, self.protocol = "127.0.0.9", "socks5"
        self.target_host, self.target_port = "example.com", 443
        self.started, self.started_wall = 1.0, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        self.bytes_in = self.bytes_out = size

    def terminate(self, reason: str) -> None:
        pass


class Holder:
    def __init__(self, registry: SessionRegistry) -> None:
        self.sessions = registry


class LivePresence:
    """What the node's presence answers: live node name -> API URL (``fail``: the store is down)."""

    def __init__(self, apis: dict[str, str]) -> None:
        self.apis = apis
        self.fail = False

    async def api_addresses(self) -> dict[str, str]:
        if self.fail:
            raise ConnectionError("presence store down")
        return dict(self.apis)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def good_node(name: str, registry: SessionRegistry, secret: str = SECRET) -> web.Application:
    app = web.Application()
    app[SETTINGS] = load_settings({"NODE_NAME": name, "CLUSTER_SECRET": secret})
    app[PROXY] = Holder(registry)  # type: ignore[assignment]
    internal.setup(app)
    return app


def bad_node(kind: str) -> web.Application:
    async def handler(_request: web.Request) -> web.Response:
        if kind == "slow":
            await asyncio.sleep(PEER_TIMEOUT_S + 5)
        if kind == "garbage":
            return web.Response(body=b"\x00not json", content_type="application/json")
        if kind == "shape":
            return web.json_response({"success": True, "sessions": [1, "two"]})
        if kind == "fields":  # rows of the right kind with fields the caller could not dedup or sort
            return web.json_response({"success": True, "sessions": [{"sessionId": ["x"], "startedAt": 5},
                                                                    {"sessionId": "y", "startedAt": 7}]})
        return web.json_response({"success": False, "error": "boom"}, status=500)

    app = web.Application()
    app.router.add_post("/internal/sessions", handler)
    return app


@pytest.fixture
async def cluster():
    reg = SessionRegistry()
    reg.add(Session("c-1", "d-1", 111))
    reg.add(Session("c-2", "d-2", 222))
    runners, apis = [], {}
    for name, app in [("good", good_node("good", reg)), ("other-secret", good_node("other-secret", reg, "x" * 24)),
                      *((k, bad_node(k)) for k in ("garbage", "shape", "fields", "error", "slow"))]:
        runner, url = await serve(app)
        runners.append(runner)
        apis[name] = url
    apis["gone"] = "http://127.0.0.1:9"  # nothing listens there
    apis["no-address"] = ""
    apis["me"] = "http://127.0.0.1:1"  # the calling node itself: never asked
    fanout = SessionFanout(SECRET, "me")
    yield fanout, LivePresence(apis)
    await fanout.close()
    for r in runners:
        await r.cleanup()


async def test_bad_peers_are_missing_and_the_good_ones_rows_arrive_within_one_timeout(cluster):
    fanout, presence = cluster
    t0 = time.monotonic()
    rows, missing = await fanout.collect(presence, None, None)
    took = time.monotonic() - t0
    assert sorted(r["bytesIn"] for r in rows) == [111, 222] and {r["node"] for r in rows} == {"good"}
    assert missing == ["error", "fields", "garbage", "gone", "no-address", "other-secret", "shape", "slow"]
    assert PEER_TIMEOUT_S <= took < PEER_TIMEOUT_S + 3  # the peers are asked at once, not one after another


async def test_the_asked_ids_narrow_the_peers_answer(cluster):
    fanout, presence = cluster
    presence.apis = {"good": presence.apis["good"]}
    rows, missing = await fanout.collect(presence, {"c-2"}, None)
    assert [(r["connectionId"], r["bytesIn"]) for r in rows] == [("c-2", 222)] and missing == []
    rows, _ = await fanout.collect(presence, set(), {"d-1"})
    assert [(r["deviceId"], r["bytesIn"]) for r in rows] == [("d-1", 111)]
    rows, _ = await fanout.collect(presence, set(), set())
    assert rows == []


async def test_a_failing_presence_store_falls_back_to_the_last_known_nodes(cluster):
    fanout, presence = cluster
    presence.apis = {"good": presence.apis["good"]}
    assert len((await fanout.collect(presence, None, None))[0]) == 2
    presence.fail = True
    rows, missing = await fanout.collect(presence, None, None)
    assert len(rows) == 2 and missing == []
