"""Helpers of the task-market (/v1) tests: posters, agents, tasks and an SSE reader, all through the
real HTTP API of a running node."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import aiohttp
import orjson
from marketplace_fixtures import funded_user

TASK = {"title": "Summarize quarterly earnings report", "category": "summarization", "band": "standard",
        "description": ("Summarize the Q3 earnings report of Acme Corp: revenue, operating margin, guidance for "
                        "the next quarter and the main risks management mentioned. Use headings and bullets."),
        "price": "20.00"}

GOOD = """## Quarterly Earnings Summary: Acme Corp Q3

Acme Corp reported revenue of $4.2 billion for the third quarter, up 15% year over year, driven by
strong subscription sales in North America and a recovery in hardware orders across Europe.

### Operating margin
- Operating margin widened to 18.4%, from 16.1% a year earlier.
- Cost of goods fell as a share of revenue after the supplier contracts were renegotiated.
- Marketing spend stayed flat, so most of the extra revenue reached the bottom line.

### Guidance for the next quarter
Management guided next-quarter revenue between $4.3 and $4.5 billion, slightly above consensus, and
expects the margin to hold near current levels while the new plant ramps up.

### Main risks
1. Currency swings: roughly a third of revenue is earned outside the United States.
2. Component shortages could delay the launch of the new product line.
3. A pending antitrust review in Europe may limit the planned acquisition.

Overall the report shows healthy growth with improving profitability, and the risks management
mentioned are mostly external rather than operational.
"""
POOR = "TODO: summary goes here."


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def poster(dep: Any, amount: float = 100) -> tuple[str, str]:
    return await funded_user(dep, f"poster-{uuid.uuid4().hex[:6]}", amount)


async def agent(dep: Any, user_token: str | None = None) -> dict:
    """A new agent key (of a new user unless ``user_token`` is given): {id, name, apiKey, userId?}."""
    user_id = None
    if user_token is None:
        user_id, user_token = await dep.user(f"agent-owner-{uuid.uuid4().hex[:6]}")
    status, body = await dep.call("POST", "/v1/agents", user_token, json={"name": "bot"})
    assert status == 201, body
    return {**body["data"], "userId": user_id, "userToken": user_token}


async def post_task(dep: Any, token: str, **overrides: Any) -> dict:
    status, body = await dep.call("POST", "/v1/tasks", token, json={**TASK, **overrides}, headers=key())
    assert status == 201, body
    return body["data"]


async def bid(dep: Any, agent_key: str, task_id: str, price: float = 15.0) -> dict:
    status, body = await dep.call("POST", f"/v1/tasks/{task_id}/bids", agent_key,
                                  json={"proposedPrice": price, "coverLetter": "I can do this well."}, headers=key())
    assert status == 201, body
    return body["data"]


async def claimed_task(dep: Any, price: float = 15.0) -> tuple[dict, dict, tuple[str, str]]:
    """(task, agent, (poster id, poster token)) with the agent's bid accepted."""
    who = await poster(dep)
    task = await post_task(dep, who[1])
    a = await agent(dep)
    b = await bid(dep, a["apiKey"], task["id"], price)
    status, body = await dep.call("POST", f"/v1/tasks/{task['id']}/bids/{b['id']}/accept", who[1], headers=key())
    assert status == 200, body
    return body["data"], a, who


async def balance(dep: Any, user_id: str) -> Any:
    from decimal import Decimal

    value = await dep.pool.fetchval("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE user_id = $1",
                                    uuid.UUID(user_id))
    return Decimal(value)


class SSE:
    """Reads a text/event-stream into a queue of (id, data) events as they arrive."""

    def __init__(self, url: str, token: str | None, last_event_id: str | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        if last_event_id:
            self.headers["Last-Event-ID"] = last_event_id
        self.events: asyncio.Queue = asyncio.Queue()
        self.status: int | None = None
        self.opened = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.error_body: Any = None

    async def __aenter__(self) -> SSE:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.opened.wait(), 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as http, http.get(self.url, headers=self.headers,
                                                              timeout=aiohttp.ClientTimeout(total=None)) as r:
            self.status = r.status
            if r.status != 200:
                self.error_body = await r.json()
                self.opened.set()
                return
            self.opened.set()
            event: dict[str, str] = {}
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if not line:
                    if "data" in event:
                        await self.events.put((event.get("id"), orjson.loads(event["data"])))
                    event = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    event[name] = value[1:] if value.startswith(" ") else value

    async def next(self, timeout: float = 10) -> tuple[str, dict]:
        return await asyncio.wait_for(self.events.get(), timeout)
