"""The SDK's standard-library HTTP client: chunked and sized bodies, query strings, failures as shapes."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from device_tunnel.sdk import Agent, UserClient

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def serve_once(answer: bytes) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        seen.append(head + (await reader.readexactly(length) if length else b""))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_chunked_json_answer_and_request_shape():
    body = json.dumps({"task": {"id": 7}}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5))
    server, port, seen = await serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                          b"Content-Type: application/json\r\n\r\n" + chunked + b"0\r\n\r\n")
    try:
        async with Agent(f"http://127.0.0.1:{port}", "agt_token") as agent:
            assert await agent.utils.job.getCurrentTask() == {"success": True, "task": {"id": 7}}
    finally:
        server.close()
    request = seen[0]
    assert request.startswith(b"GET /api/v2/agent/task HTTP/1.1\r\n")
    assert b"Authorization: Bearer agt_token\r\n" in request


async def test_error_answer_and_query_string_and_json_body():
    server, port, seen = await serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 26\r\n\r\n"
                                          b'{"error": "job not found"}')
    try:
        client = UserClient(f"http://127.0.0.1:{port}", "tok")
        assert await client.listPlannedTasks("j 1", page=2) == {"success": False, "error": "job not found"}
    finally:
        server.close()
    assert seen[0].startswith(b"GET /api/v2/tasks/planned?job_id=j+1&page=2 HTTP/1.1\r\n")
    server, port, seen = await serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    try:
        assert await UserClient(f"http://127.0.0.1:{port}", "tok").updateJobStatus("j", "paused") == {"success": True}
    finally:
        server.close()
    assert seen[0].endswith(b'{"job_id": "j", "status": "paused"}')


async def test_network_failure_is_the_failure_shape_never_an_exception():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens
    res = await Agent(f"http://127.0.0.1:{port}", "t").utils.job.getCurrentTask()
    assert res["success"] is False and res["error"].startswith("network error")
    server, port, _ = await serve_once(b"garbage\r\n\r\n")
    try:
        res = await Agent(f"http://127.0.0.1:{port}", "t").utils.job.getCurrentTask()
    finally:
        server.close()
    assert res["success"] is False and "bad status line" in res["error"]
