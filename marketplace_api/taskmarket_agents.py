"""``POST /v1/agents`` and ``DELETE /v1/agents/{id}``: agent API keys (``ak_…``, stored as SHA-256)."""

from __future__ import annotations

import uuid

from aiohttp import web

from proxyorch.accounts import new_token
from proxyorch.tokens import hash_token

from . import idempotency
from .taskmarket_common import (
    AGENT_KEY_PREFIX,
    USER_IDEM,
    not_found,
    ok,
    parse_id,
    read_body,
    require_poster,
    text_field,
)


@USER_IDEM
async def create_agent(request: web.Request) -> web.Response:
    """Register an agent: its API key is shown once (user token)."""
    user_id = await require_poster(request)
    body = await read_body(request)
    name = text_field(body, "name", max_len=200)
    agent_id, key = str(uuid.uuid4()), new_token(AGENT_KEY_PREFIX)
    async with idempotency.transaction(request) as conn:
        await conn.execute("INSERT INTO tm_agents(id, user_id, name, key_hash) VALUES ($1, $2, $3, $4)",
                           agent_id, user_id, name, hash_token(key))
    return ok({"id": agent_id, "name": name, "apiKey": key}, 201)


async def revoke_agent(request: web.Request) -> web.Response:
    """Revoke an agent key (its owner): the key is 401 from then on."""
    user_id = await require_poster(request)
    agent_id = parse_id(request.match_info["id"], "Agent")
    async with idempotency.transaction(request) as conn:
        done = await conn.fetchval("UPDATE tm_agents SET revoked_at = now() WHERE id = $1 AND user_id = $2"
                                   " AND revoked_at IS NULL RETURNING 1", agent_id, user_id)
    if done is None:
        raise not_found("Agent")
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/agents", create_agent)
    app.router.add_delete("/v1/agents/{id}", revoke_agent)
