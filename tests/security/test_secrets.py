"""Secrets stay secret: no plaintext passwords or tokens in logs, ClickHouse rows or the database."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from socks_client import socks5_code

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_passwords_and_tokens_never_reach_logs_rows_or_tables(deployment):
    dep = deployment
    user_id, token = await dep.user("secretive")
    device = await dep.device(token)
    await dep.agent(device, "--allow-private")
    conn = await dep.connection(token, device["remote_device_id"])
    cid, pw = conn["connectionId"], conn["password"]
    port = dep.node.proxy_port
    # successful, failed and blocked attempts, SOCKS and HTTP (with Proxy-Authorization headers)
    await socks5_code(port, cid, pw, "127.0.0.1", 9)
    await socks5_code(port, cid, pw[::-1], "127.0.0.1", 9)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = base64.b64encode(f"{cid}:{pw}".encode()).decode()
    writer.write(f"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await dep.call("GET", "/api/v2/proxy/connections", token)
    await dep.call("GET", "/api/v2/proxy/connections", "wrong-token-value")
    await asyncio.sleep(1.0)  # let the request log flush

    secrets = [pw, token, device["device_token"], auth]
    # 1. node and agent logs
    for log in Path(dep.node.data_dir).glob("*.log"):
        text = log.read_text(errors="replace")
        for s in secrets:
            assert s not in text, f"secret found in {log.name}"
    # 2. ClickHouse rows
    now = datetime.now(UTC)
    status, body = await dep.call("GET", "/api/v2/proxy/logs", token,
                                  params={"from": (now - timedelta(hours=1)).isoformat(),
                                          "to": (now + timedelta(hours=1)).isoformat()})
    assert status == 200 and body["total"] >= 1
    dump = str(body)
    for s in secrets:
        assert s not in dump
    # 3. PostgreSQL: hashes only
    for table in ("api_tokens", "devices", "proxy_credentials", "rms_connections"):
        rows = await dep.pool.fetch(f"SELECT * FROM {table}")
        flat = " ".join(str(dict(r)) for r in rows)
        for s in secrets:
            assert s not in flat, table
            assert s.encode().hex() not in flat, table
