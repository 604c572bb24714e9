"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright) on a real node + agent.

Screenshots of every view are saved under ``test-artifacts/dashboard/`` (git-ignored); the path is
printed. Needs ``/usr/bin/chromium`` (scripts/test.sh installs it) — Playwright downloads nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest
from conftest import ROOT, fresh_deployment
from socks_client import socks5_code, socks5_open
from test_ip_rotation import SCRIPT

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM = "/usr/bin/chromium"
EXIT_1, EXIT_2 = "127.0.0.2", "127.0.0.3"  # the two devices' source (exit) addresses
QUOTA = 10 * 2**30
LIMITS = {"download_bytes_per_s": 50_000_000, "upload_bytes_per_s": 20_000_000, "max_concurrent_sessions": 7,
          "quota_bytes": QUOTA, "quota_period": "day"}
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
EVIL = "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>"


async def _echo(dep, conn, host: str, port: int, size: int) -> None:
    reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"], host, port)
    writer.write(b"z" * size)
    writer.write_eof()
    assert len(await asyncio.wait_for(reader.read(), 10)) == size
    writer.close()


async def _slow_download(dep, conn, port: int, stop: asyncio.Event) -> int:
    """Reads the blasting source through the proxy at ~1 MB/s until ``stop``; returns bytes read."""
    reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                          "127.0.0.1", port)
    got = 0
    try:
        while not stop.is_set():
            got += len(await reader.read(65536))
            await asyncio.sleep(0.05)
    finally:
        writer.close()
    return got


async def _exit_of(dep, conn, peer_port: int) -> str:
    reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                          "127.0.0.1", peer_port)
    try:
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    finally:
        writer.close()


async def _connection(dep, token: str, cid: str) -> dict:
    _s, body = await dep.call("GET", "/api/v2/proxy/connections", token)
    return next(c for c in body["connections"] if c["connectionId"] == cid)


async def _until(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.time() + timeout
    while True:
        value = await predicate()
        if value or time.time() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        await asyncio.sleep(0.2)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (scripts/test.sh installs it)")
async def test_dashboard_in_a_real_browser(pg_root, tmp_path, targets):
    from playwright.async_api import async_playwright

    dep = await fresh_deployment(pg_root, tmp_path, LOG_BATCH_S="0.2", BANDWIDTH_FLUSH_S="1")
    stop = asyncio.Event()
    download = None
    try:
        _uid, token = await dep.user("browser-user")
        device = await dep.device(token, name=f"phone {EVIL}")
        (tmp_path / "rotate").mkdir()
        (tmp_path / "rotate" / "state").write_text(f"{EXIT_1}\n")  # the script switches 127.0.0.2 <-> 127.0.0.3
        (tmp_path / "rotate" / "rotate.sh").write_text(SCRIPT.format(dir=tmp_path / "rotate", mode="switch", sleep=0))
        await dep.agent(device, "--allow-private", "--source-address", EXIT_1,
                        "--ip-echo-url", f"http://127.0.0.1:{targets.http_port}/peer",  # reports its public IP
                        "--rotate-command", f"sh {tmp_path / 'rotate' / 'rotate.sh'}", "--rotate-recheck-s", "0.5")
        device2 = await dep.device(token, name="second phone")
        await dep.agent(device2, "--allow-private", "--source-address", EXIT_2)
        conn = await dep.connection(token, device["remote_device_id"], name=f"conn {EVIL}")
        cid = conn["connectionId"]
        await _echo(dep, conn, "127.0.0.1", targets.echo_port, 50_000)
        await _echo(dep, conn, "localhost", targets.echo_port, 20_000)
        for path, body in (("limits", LIMITS), ("access", {"mode": "password_and_ip", "allowed_ips": ["127.0.0.0/8"]})):
            status, answer = await dep.call("PUT", f"/api/v2/proxy/connections/{cid}/{path}", token, json=body)
            assert status == 200, answer

        async def usage_flushed() -> dict | None:
            _s, usage = await dep.call("GET", f"/api/v2/proxy/connections/{cid}/usage", token)
            return usage if usage["used_bytes"] == 140_000 else None  # both echoes, each way
        usage = await _until(usage_flushed, 20, "the echoes' bytes in the connection's usage")
        assert usage["remaining_bytes"] == QUOTA - 140_000

        async def rows_landed() -> bool:
            _s, bw = await dep.call("GET", "/api/v2/proxy/bandwidth", token, params={"groupBy": "hour"})
            _s, logs = await dep.call("GET", "/api/v2/proxy/logs", token,
                                      params={"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"})
            return bool(bw["rows"]) and logs["total"] >= 2
        await _until(rows_landed, 30, "request-log and bandwidth rows")

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        errors: list[str] = []
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            answers: list[str | bool] = []  # for the next dialogs: a prompt's text, or True to accept a confirm

            async def on_dialog(dialog) -> None:  # noqa: ANN001
                answer = answers.pop(0) if answers else False
                if answer is False:
                    await dialog.dismiss()
                else:
                    await dialog.accept(answer if isinstance(answer, str) else "")
            page.on("dialog", lambda d: asyncio.ensure_future(on_dialog(d)))
            await page.goto(dep.node.api + "/")
            await page.get_by_test_id("signin-token").fill(token)
            await page.get_by_test_id("signin-submit").click()

            # Devices: online, and the hostile name shows as text.
            devices = page.get_by_test_id("devices-table")
            await devices.get_by_test_id("device-state").filter(has_text="online").first.wait_for(timeout=20_000)
            row = devices.locator("tbody tr").first
            assert EVIL in await row.locator("td").first.text_content()
            assert await devices.locator("script, img").count() == 0
            assert await row.locator("td").nth(3).text_content() == "test-node"
            assert await row.locator("td").nth(5).text_content() == EXIT_1  # the public IP the agent reported
            await page.screenshot(path=str(ARTIFACTS / "devices.png"), full_page=True)

            # Connections: the hostile name is text; the password shows on click.
            await page.get_by_test_id("nav-connections").click()
            table = page.get_by_test_id("connections-table")
            await table.wait_for()
            assert EVIL in await table.locator("tbody tr td").first.text_content()
            assert await table.locator("script, img").count() == 0
            assert conn["password"] not in await table.text_content()
            await table.get_by_test_id("reveal-password").first.click()
            assert conn["password"] in await table.text_content()
            # Limits, access mode and usage, as the API has them.
            assert await table.get_by_test_id("conn-access").first.get_attribute("data-mode") == "password_and_ip"
            assert "127.0.0.0/8" in await table.get_by_test_id("conn-access").first.text_content()
            assert await table.get_by_test_id("conn-rates").first.text_content() == "↓ 47.7 MiB/s ↑ 19.1 MiB/s"
            assert await table.get_by_test_id("conn-sessions").first.text_content() == "0 / 7"
            quota = table.get_by_test_id("conn-quota").first
            assert await quota.get_attribute("data-used") == "140000"
            assert await quota.get_attribute("data-remaining") == str(QUOTA - 140_000)
            assert "136.7 KiB of 10.0 GiB per day" in await quota.text_content()
            await page.screenshot(path=str(ARTIFACTS / "connections.png"), full_page=True)

            # Live sessions: a download through the proxy appears with a non-zero rate.
            download = asyncio.create_task(_slow_download(dep, conn, targets.source_port, stop))
            await page.get_by_test_id("nav-sessions").click()
            rate = page.get_by_test_id("sessions-table").locator("[data-rate]").first

            async def moving() -> bool:
                return await rate.count() > 0 and float(await rate.get_attribute("data-rate") or 0) > 0
            await _until(moving, 20, "a live session with a non-zero rate")
            assert f"127.0.0.1:{targets.source_port}" in await page.get_by_test_id("sessions-table").text_content()
            assert await page.get_by_test_id("total-open").text_content() == "1"
            await page.screenshot(path=str(ARTIFACTS / "sessions.png"), full_page=True)

            # The connections view counts the open session against the connection's limit.
            await page.get_by_test_id("nav-connections").click()
            open_cell = page.get_by_test_id("connections-table").get_by_test_id("conn-sessions").first

            async def counted() -> bool:
                return await open_cell.count() > 0 and await open_cell.text_content() == "1 / 7"
            await _until(counted, 10, "the open session in the connections view")

            # Back on devices, the sparkline has seen the throughput.
            await page.get_by_test_id("nav-devices").click()
            spark = page.get_by_test_id("devices-table").locator("canvas.spark").first

            async def sparked() -> bool:
                return await spark.count() > 0 and float(await spark.get_attribute("data-max") or 0) > 0
            await _until(sparked, 20, "a sparkline with data")
            await page.screenshot(path=str(ARTIFACTS / "devices-live.png"), full_page=True)
            stop.set()
            assert await download > 0

            # Bandwidth and domains: the charts have rendered data.
            await page.get_by_test_id("nav-bandwidth").click()
            chart = page.get_by_test_id("bandwidth-chart")
            await chart.locator("canvas").wait_for()
            assert int(await chart.get_attribute("data-points") or 0) > 0
            await page.screenshot(path=str(ARTIFACTS / "bandwidth.png"), full_page=True)

            await page.get_by_test_id("nav-domains").click()
            dchart = page.get_by_test_id("domains-chart")
            await dchart.locator("canvas").wait_for()
            assert int(await dchart.get_attribute("data-points") or 0) >= 2
            dtable = await page.get_by_test_id("domains-table").text_content()
            assert "127.0.0.1" in dtable and "localhost" in dtable
            await page.screenshot(path=str(ARTIFACTS / "domains.png"), full_page=True)

            await page.get_by_test_id("nav-logs").click()
            logs = page.get_by_test_id("logs-table")
            await logs.wait_for()
            assert int(await logs.get_attribute("data-rows") or 0) >= 2
            await page.screenshot(path=str(ARTIFACTS / "logs.png"), full_page=True)

            assert await page.evaluate("window.__pwned === undefined")

            # The action buttons, each checked through the API and by its effect on the proxy.
            await page.get_by_test_id("nav-connections").click()
            table = page.get_by_test_id("connections-table")
            await table.wait_for()
            answers[:] = ["blocked.test, ads.test", True]
            await table.get_by_test_id("blacklist").first.click()

            async def blacklisted() -> bool:
                _s, bl = await dep.call("GET", f"/api/v2/proxy/connections/{cid}/blacklist", token)
                return {"blocked.test", "ads.test"} <= set(bl["domains"])
            await _until(blacklisted, 10, "the blacklist added through the page")
            assert await socks5_code(dep.node.proxy_port, cid, conn["password"], "www.blocked.test", 443) == 0x02
            assert await _exit_of(dep, conn, targets.peer_port) == EXIT_1

            answers[:] = [f"{device2['remote_device_id']}  second phone", True]
            await table.get_by_test_id("rotate-exit").first.click()

            async def moved() -> bool:
                return (await _connection(dep, token, cid))["deviceId"] == device2["remote_device_id"]
            await _until(moved, 10, "the connection on the second device")
            assert await _exit_of(dep, conn, targets.peer_port) == EXIT_2
            device_cell = table.get_by_test_id("conn-device").first

            async def shown_moved() -> bool:
                return await device_cell.get_attribute("data-device") == device2["remote_device_id"]
            await _until(shown_moved, 10, "the page showing the new exit device")

            answers[:] = [True]
            await table.get_by_test_id("dissociate").first.click()

            async def dissociated() -> bool:
                return (await _connection(dep, token, cid))["deviceId"] is None
            await _until(dissociated, 10, "the connection without a device")
            assert await socks5_code(dep.node.proxy_port, cid, conn["password"], "127.0.0.1", targets.echo_port) != 0

            async def shown_none() -> bool:
                return await device_cell.text_content() == "none"
            await _until(shown_none, 10, "the page showing no exit device")
            await page.screenshot(path=str(ARTIFACTS / "connections-after-actions.png"), full_page=True)

            # The device's own blacklist, from the devices view.
            await page.get_by_test_id("nav-devices").click()
            await page.get_by_test_id("devices-table").wait_for()
            answers[:] = ["device-blocked.test", True]
            await page.get_by_test_id("device-blacklist").first.click()

            async def device_blacklisted() -> bool:
                _s, bl = await dep.call("GET", f"/api/v2/devices/{device['remote_device_id']}/blacklist", token)
                return "device-blocked.test" in bl["domains"]
            await _until(device_blacklisted, 10, "the device blacklist added through the page")

            # Rotate the phone's IP from the devices view: the rotation history and the page show the new one.
            answers[:] = [True]
            await page.get_by_test_id("device-rotate-ip").first.click()

            async def rotated() -> list | None:
                _s, hist = await dep.call("GET", f"/api/v2/devices/{device['remote_device_id']}/rotations", token)
                return hist["rotations"] or None
            [rotation] = await _until(rotated, 40, "the rotation asked for on the page")
            assert (rotation["trigger"], rotation["old_ip"], rotation["new_ip"], rotation["changed"]) == \
                ("api", EXIT_1, EXIT_2, True)
            ip_cell = page.get_by_test_id("devices-table").locator("tbody tr").first.locator("td").nth(5)

            async def new_ip_shown() -> bool:
                return await ip_cell.text_content() == EXIT_2
            await _until(new_ip_shown, 10, "the new public IP on the devices view")
            await page.screenshot(path=str(ARTIFACTS / "devices-after-actions.png"), full_page=True)

            # The admin token: every connection, live sessions of every tenant.
            await page.locator("#signout").click()
            await page.get_by_test_id("signin-token").fill(dep.node.admin_token)
            await page.get_by_test_id("signin-admin").check()
            await page.get_by_test_id("signin-submit").click()
            await page.get_by_test_id("sessions-table").wait_for()
            await page.get_by_test_id("nav-connections").click()
            admin_table = page.get_by_test_id("connections-table")
            await admin_table.wait_for()
            assert conn["connectionId"] in await admin_table.text_content()
            assert await admin_table.locator("script, img").count() == 0
            await page.screenshot(path=str(ARTIFACTS / "admin-connections.png"), full_page=True)
            assert await page.evaluate("sessionStorage.length") >= 1  # the token lives in sessionStorage only
            assert await page.evaluate("localStorage.length") == 0
            await browser.close()
        print(f"\ndashboard screenshots: {ARTIFACTS}")
        assert errors == []
    finally:
        stop.set()
        if download is not None:
            with contextlib.suppress(Exception):
                await download
        await dep.close()
        await dep.node.stop()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (scripts/test.sh installs it)")
async def test_the_page_on_one_node_shows_a_session_held_by_another(pg_root, redis_url, tmp_path, targets):
    """Two nodes: the device on node 2, a download through node 1; the page served by node 2 lists
    that session with node 1 and counts it on the device and on the connection."""
    from cluster_fixtures import start_cluster
    from playwright.async_api import async_playwright

    c = await start_cluster(pg_root, redis_url, tmp_path, count=2)
    stop = asyncio.Event()
    download = None
    errors: list[str] = []
    try:
        _uid, token = await c.dep(1).user("browser-cluster")
        device = await c.dep(2).device(token, name="phone on node 2")
        await c.dep(2).agent(device, "--allow-private", "--server", c.servers(2))
        await c.wait_device_on(device["remote_device_id"], 2)
        conn = await c.dep(1).connection(token, device["remote_device_id"])
        download = asyncio.create_task(_slow_download(c.dep(1), conn, targets.source_port, stop))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            await page.goto(c.nodes[2].api + "/")
            await page.get_by_test_id("signin-token").fill(token)
            await page.get_by_test_id("signin-submit").click()
            row = page.get_by_test_id("devices-table").locator("tbody tr").first

            async def device_busy() -> bool:
                cells = row.locator("td")
                return await cells.count() > 6 and (await cells.nth(3).text_content(), await cells.nth(6).text_content()) \
                    == (c.name(2), "1")
            await _until(device_busy, 20, "the device on node 2 with the session held by node 1")

            await page.get_by_test_id("nav-sessions").click()
            table = page.get_by_test_id("sessions-table")

            async def listed() -> bool:
                return await table.count() > 0 and await table.get_attribute("data-rows") == "1" and \
                    await table.locator("tbody tr td").nth(5).text_content() == c.name(1)
            await _until(listed, 20, "node 1's session on node 2's page")
            assert f"127.0.0.1:{targets.source_port}" in await table.text_content()
            await page.screenshot(path=str(ARTIFACTS / "cluster-sessions.png"), full_page=True)

            await page.get_by_test_id("nav-connections").click()
            cell = page.get_by_test_id("connections-table").get_by_test_id("conn-sessions").first

            async def counted() -> bool:
                return await cell.count() > 0 and await cell.get_attribute("data-open") == "1"
            await _until(counted, 20, "the open session counted on the connection")
            await browser.close()
        stop.set()
        assert await download > 0
        assert errors == []
    finally:
        stop.set()
        if download is not None:
            with contextlib.suppress(Exception):
                await download
        await c.close()
