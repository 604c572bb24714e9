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
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM = "/usr/bin/chromium"
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
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"], name=f"conn {EVIL}")
        await _echo(dep, conn, "127.0.0.1", targets.echo_port, 50_000)
        await _echo(dep, conn, "localhost", targets.echo_port, 20_000)

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
            page.on("dialog", lambda d: asyncio.ensure_future(d.dismiss()))
            await page.goto(dep.node.api + "/")
            await page.get_by_test_id("signin-token").fill(token)
            await page.get_by_test_id("signin-submit").click()

            # Devices: online, and the hostile name shows as text.
            devices = page.get_by_test_id("devices-table")
            await devices.get_by_test_id("device-state").filter(has_text="online").wait_for(timeout=20_000)
            row = devices.locator("tbody tr").first
            assert EVIL in await row.locator("td").first.text_content()
            assert await devices.locator("script, img").count() == 0
            assert await row.locator("td").nth(3).text_content() == "test-node"
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
