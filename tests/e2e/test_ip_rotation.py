"""IP rotation end to end: a real node, real agents whose rotate command switches their source
address between 127.0.0.2 and 127.0.0.3, a local echo target reporting the peer address."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import fresh_deployment
from socks_client import SocksReplyError, socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCRIPT = """#!/bin/sh
# test rotate command: switch between 127.0.0.2 and 127.0.0.3 (sleep SLEEP seconds in between)
echo run >> "{dir}/runs"
touch "{dir}/started"
cur=$(cat "{dir}/state")
if [ "{mode}" = same ]; then n=$cur; elif [ "$cur" = 127.0.0.2 ]; then n=127.0.0.3; else n=127.0.0.2; fi
sleep {sleep}
echo "$n" > "{dir}/state"
echo "rotated"
echo "source_address=$n"
"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(pg_root, tmp_path_factory, targets):
    dep = await fresh_deployment(pg_root, tmp_path_factory.mktemp("rotation"), ROTATE_WAIT_S="4",
                                 ROTATION_MIN_TIMER_S="2", ROTATE_MIN_INTERVAL_S="10")
    _uid, token = await dep.user("rotator")
    _uid2, other = await dep.user("other")
    yield {"dep": dep, "token": token, "other": other, "root": tmp_path_factory.mktemp("rot-scripts")}
    await dep.close()
    await dep.node.stop()


async def rotating_device(world, targets, name: str, *, mode: str = "switch", sleep: float = 0) -> dict:
    """A device whose agent rotates with the test script; its connection and script folder."""
    dep, token = world["dep"], world["token"]
    folder: Path = world["root"] / name
    folder.mkdir()
    (folder / "state").write_text("127.0.0.2\n")
    script = folder / "rotate.sh"
    script.write_text(SCRIPT.format(dir=folder, mode=mode, sleep=sleep))
    device = await dep.device(token)
    agent = await dep.agent(device, "--allow-private", "--source-address", "127.0.0.2",
                            "--rotate-command", f"sh {script}", "--rotate-recheck-s", "0.5",
                            "--ip-echo-url", f"http://127.0.0.1:{targets.http_port}/peer")
    conn = await dep.connection(token, device["remote_device_id"])
    return {"device": device, "id": device["remote_device_id"], "conn": conn, "dir": folder, "agent": agent}


async def exit_address(world, d: dict, targets, user: str | None = None) -> tuple[str, asyncio.StreamReader,
                                                                                     asyncio.StreamWriter]:
    """Open a session to the peer-echo target; the address the target saw, and the open stream."""
    r, w, _ = await socks5_open(world["dep"].node.proxy_port, user or d["conn"]["connectionId"],
                                d["conn"]["password"], "127.0.0.1", targets.peer_port, timeout=30)
    line = await asyncio.wait_for(r.readline(), 30)
    return line.decode().strip(), r, w


def runs(d: dict) -> int:
    path = d["dir"] / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


async def rotate(world, d: dict, token: str | None = None) -> tuple[int, dict, dict]:
    dep = world["dep"]
    async with dep.http.post(f"{dep.node.api}/api/v2/devices/{d['id']}/rotate-ip",
                             headers={"Authorization": f"Bearer {token or world['token']}"}) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_rotation_changes_the_exit_and_closes_open_sessions(world, targets):
    d = await rotating_device(world, targets, "basic")
    dep = world["dep"]
    _s, devices = await dep.call("GET", "/api/v2/devices", world["token"])
    shown = next(x for x in devices if x["remote_device_id"] == d["id"])
    assert shown["public_ip"] == "127.0.0.2" and shown["last_rotated_at"] is None  # from HELLO
    before, reader, writer = await exit_address(world, d, targets)
    assert before == "127.0.0.2"

    status, body, _h = await rotate(world, d)
    assert status == 200, body
    assert (body["old_ip"], body["new_ip"], body["changed"]) == ("127.0.0.2", "127.0.0.3", True)
    assert isinstance(body["took_ms"], int) and body["took_ms"] >= 0
    # the session open during the rotation was closed
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    after, _r, w2 = await exit_address(world, d, targets)
    assert after == body["new_ip"] == "127.0.0.3"  # the answer and what the target sees agree
    w2.close()

    # inside ROTATE_MIN_INTERVAL_S: 429 with Retry-After, the command not run
    status, body, headers = await rotate(world, d)
    assert status == 429 and body["success"] is False
    assert 1 <= int(headers["Retry-After"]) <= 10
    assert runs(d) == 1 and (d["dir"] / "state").read_text().strip() == "127.0.0.3"

    _s, devices = await dep.call("GET", "/api/v2/devices", world["token"])
    shown = next(x for x in devices if x["remote_device_id"] == d["id"])
    assert shown["public_ip"] == "127.0.0.3" and shown["last_rotated_at"]
    s, hist = await dep.call("GET", f"/api/v2/devices/{d['id']}/rotations", world["token"])
    assert s == 200 and len(hist["rotations"]) == 1
    row = hist["rotations"][0]
    assert {k: row[k] for k in ("old_ip", "new_ip", "changed", "trigger")} == {
        "old_ip": "127.0.0.2", "new_ip": "127.0.0.3", "changed": True, "trigger": "api"}
    assert row["id"] and row["started_at"] and isinstance(row["took_ms"], int)


async def test_rotation_that_changes_nothing_says_so_after_one_recheck(world, targets):
    d = await rotating_device(world, targets, "same", mode="same")
    t0 = time.monotonic()
    status, body, _h = await rotate(world, d)
    assert status == 200, body
    assert body["changed"] is False and body["old_ip"] == body["new_ip"] == "127.0.0.2"
    assert time.monotonic() - t0 >= 0.5  # the agent checked once more after --rotate-recheck-s
    assert runs(d) == 1  # ... without running the command twice


async def test_session_opened_during_rotation_waits_and_exits_through_new_address(world, targets):
    d = await rotating_device(world, targets, "slow", sleep=1.5)
    task = asyncio.create_task(rotate(world, d))
    deadline = time.monotonic() + 10
    while not (d["dir"] / "started").exists():
        assert time.monotonic() < deadline, "the rotate command never started"
        await asyncio.sleep(0.02)
    seen, _r, w = await exit_address(world, d, targets)  # opened while the command still runs
    status, body, _h = await task
    assert status == 200 and body["new_ip"] == "127.0.0.3"
    assert seen == "127.0.0.3"  # it waited for the rotation instead of leaving through the old address
    w.close()


async def test_session_fails_0x03_when_the_rotation_outlasts_the_wait(world, targets):
    d = await rotating_device(world, targets, "stuck", sleep=8)  # ROTATE_WAIT_S is 4 here
    task = asyncio.create_task(rotate(world, d))
    while not (d["dir"] / "started").exists():
        await asyncio.sleep(0.02)
    t0 = time.monotonic()
    with pytest.raises(SocksReplyError) as err:
        await exit_address(world, d, targets)
    assert err.value.code == 0x03
    assert 3 <= time.monotonic() - t0 < 8
    status, _body, _h = await task
    assert status == 200


async def test_device_without_rotate_command_or_offline_gets_409(world, targets):
    dep, token = world["dep"], world["token"]
    device = await dep.device(token)
    agent = await dep.agent(device, "--allow-private")
    d = {"id": device["remote_device_id"]}
    status, body, _h = await rotate(world, d)
    assert status == 409 and "cannot rotate" in body["error"]
    agent.kill()
    await dep.wait_online(d["id"], False)
    status, body, _h = await rotate(world, d)
    assert status == 409 and "offline" in body["error"]


async def test_timer_rotates_and_can_be_stopped(world, targets):
    d = await rotating_device(world, targets, "timer")
    dep, token = world["dep"], world["token"]
    path = f"/api/v2/devices/{d['id']}/rotation"
    assert (await dep.call("PUT", path, token, json={"interval_s": 1}))[0] == 400  # below ROTATION_MIN_TIMER_S=2
    s, body = await dep.call("PUT", path, token, json={"interval_s": 2})
    assert s == 200 and body["rotation"] == {"interval_s": 2}
    _s, devices = await dep.call("GET", "/api/v2/devices", token)
    assert next(x for x in devices if x["remote_device_id"] == d["id"])["rotation"] == {"interval_s": 2}
    deadline = time.monotonic() + 20
    while True:
        _s, hist = await dep.call("GET", f"/api/v2/devices/{d['id']}/rotations", token)
        if len(hist["rotations"]) >= 2:
            break
        assert time.monotonic() < deadline, hist
        await asyncio.sleep(0.3)
    newest, older = hist["rotations"][0], hist["rotations"][1]
    assert newest["trigger"] == older["trigger"] == "timer"
    assert newest["started_at"] > older["started_at"] and newest["old_ip"] == older["new_ip"]
    assert (await dep.call("PUT", path, token, json={"interval_s": None}))[0] == 200
    await asyncio.sleep(0.5)  # a timer rotation in flight may still finish
    count = len((await dep.call("GET", f"/api/v2/devices/{d['id']}/rotations", token))[1]["rotations"])
    await asyncio.sleep(3)
    assert len((await dep.call("GET", f"/api/v2/devices/{d['id']}/rotations", token))[1]["rotations"]) == count


async def test_rotation_routes_refuse_other_tenants_and_bad_input(world, targets):
    dep, token, other = world["dep"], world["token"], world["other"]
    device = await dep.device(token)
    did = device["remote_device_id"]
    for method, suffix, body in (("POST", "rotate-ip", None), ("PUT", "rotation", {"interval_s": 60}),
                                 ("GET", "rotations", None)):
        s, data = await dep.call(method, f"/api/v2/devices/{did}/{suffix}", other, json=body)
        assert s == 404 and data["success"] is False, (suffix, data)
        s, data = await dep.call(method, f"/api/v2/devices/not-a-uuid/{suffix}", token, json=body)
        assert s == 400, (suffix, data)
        assert (await dep.call(method, f"/api/v2/devices/{did}/{suffix}", None, json=body))[0] == 401
    path = f"/api/v2/devices/{did}/rotation"
    for bad in ({}, {"interval_s": "60"}, {"interval_s": True}, {"interval_s": 1.5}, {"interval_s": -5},
                {"interval_s": 10 ** 9}):
        s, data = await dep.call("PUT", path, token, json=bad)
        assert s == 400 and data["success"] is False and data["error"], bad
    s, data = await dep.call("PUT", path, token, data=b"not json", headers={"Content-Type": "application/json"})
    assert s == 400
    for limit in ("0", "x", "501", "-1"):
        assert (await dep.call("GET", f"/api/v2/devices/{did}/rotations?limit={limit}", token))[0] == 400
    s, data = await dep.call("GET", f"/api/v2/devices/{did}/rotations", token)
    assert s == 200 and data["rotations"] == []


async def test_rotation_routes_are_in_openapi(world):
    s, doc = await world["dep"].call("GET", "/api/v2/openapi.json")
    assert s == 200
    paths = doc["paths"]
    assert "post" in paths["/api/v2/devices/{device_id}/rotate-ip"]
    assert "put" in paths["/api/v2/devices/{device_id}/rotation"]
    assert "get" in paths["/api/v2/devices/{device_id}/rotations"]


class DroppingRelay:
    """agent ⇄ relay ⇄ node; ``drop()`` closes every relayed connection (the phone's network went away)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> DroppingRelay:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [writer, uw]
        await asyncio.gather(self._pipe(reader, uw), self._pipe(ur, writer))

    def drop(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.drop()


async def test_rotation_survives_the_tunnel_dropping_mid_rotation(world, targets):
    """Airplane mode on a phone drops the tunnel: the node waits for the device to come back and asks its IP."""
    dep, token = world["dep"], world["token"]
    folder: Path = world["root"] / "drop"
    folder.mkdir()
    (folder / "state").write_text("127.0.0.2\n")
    (folder / "rotate.sh").write_text(SCRIPT.format(dir=folder, mode="switch", sleep=1.5))
    relay = await DroppingRelay(dep.node.tunnel_port).start()
    try:
        device = await dep.device(token)
        await dep.agent(device, "--allow-private", "--source-address", "127.0.0.2",
                        "--rotate-command", f"sh {folder / 'rotate.sh'}", "--rotate-recheck-s", "0.5",
                        "--ip-echo-url", f"http://127.0.0.1:{targets.http_port}/peer",
                        server=f"127.0.0.1:{relay.port}")
        d = {"id": device["remote_device_id"]}
        task = asyncio.create_task(rotate(world, d))
        while not (folder / "started").exists():
            await asyncio.sleep(0.02)
        relay.drop()  # the network goes away while the command runs; the agent reconnects
        status, body, _h = await asyncio.wait_for(task, 30)
        assert status == 200, body
        assert (body["old_ip"], body["new_ip"], body["changed"]) == ("127.0.0.2", "127.0.0.3", True)
        assert len((folder / "runs").read_text().splitlines()) == 1
    finally:
        relay.close()
