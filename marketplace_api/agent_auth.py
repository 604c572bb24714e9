"""Agent tokens: minted for one running job task on one device, stored as SHA-256 only.

``mint_agent_token`` is called by the assignment (inside its transaction); ``authenticate_agent``
resolves a bearer token into an :class:`AgentIdentity` (or None when unknown, expired, revoked or
when the task is gone). User-token routes never accept these: ``require_user`` only reads
``api_tokens`` of kind 'user'.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from aiohttp import web

from proxyorch.tokens import hash_token

from .auth import bearer_token
from .context import POOL

TOKEN_PREFIX = "agt_"
EXPIRY_SLACK_S = 300


@dataclass(frozen=True)
class AgentIdentity:
    """Who an agent token speaks for."""

    job_task_id: str
    remote_device_id: str
    job_id: str
    device_owner_id: str
    job_owner_id: str
    task_status: str
    expires_at: datetime


async def mint_agent_token(conn: asyncpg.Connection, job_task_id: str, remote_device_id: str,
                           ttl_seconds: int) -> str:
    """Create a token for (task, device) valid ``ttl_seconds`` (+ slack); returns the plaintext once."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO agent_tokens(token_hash, job_task_id, remote_device_id, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        hash_token(token), job_task_id, remote_device_id, float(ttl_seconds + EXPIRY_SLACK_S))
    return token


async def revoke_for_task(conn: asyncpg.Connection | asyncpg.Pool, job_task_id: str) -> None:
    await conn.execute("UPDATE agent_tokens SET revoked = true WHERE job_task_id = $1", job_task_id)


async def authenticate_agent(pool: asyncpg.Pool | asyncpg.Connection, token: str) -> AgentIdentity | None:
    """The identity behind a live agent token, or None."""
    if not token or not token.startswith(TOKEN_PREFIX):
        return None
    row = await pool.fetchrow(
        """SELECT a.job_task_id, a.remote_device_id, a.expires_at, t.job_id, t.status, j.user_id AS job_owner,
                  d.user_id AS device_owner
           FROM agent_tokens a JOIN job_tasks t ON t.id = a.job_task_id JOIN jobs j ON j.id = t.job_id
           JOIN devices d ON d.remote_device_id = a.remote_device_id
           WHERE a.token_hash = $1 AND NOT a.revoked AND a.expires_at > now()""", hash_token(token))
    if row is None:
        return None
    return AgentIdentity(job_task_id=str(row["job_task_id"]), remote_device_id=str(row["remote_device_id"]),
                         job_id=str(row["job_id"]), device_owner_id=str(row["device_owner"]),
                         job_owner_id=str(row["job_owner"]), task_status=row["status"],
                         expires_at=row["expires_at"])


async def was_agent_token(pool: asyncpg.Pool | asyncpg.Connection, token: str | None) -> bool:
    """Whether ``token`` was minted as an agent token (now revoked or expired, or still live)."""
    if not token or not token.startswith(TOKEN_PREFIX):
        return False
    return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM agent_tokens WHERE token_hash = $1)",
                                    hash_token(token)))


async def agent_from_request(request: web.Request) -> AgentIdentity | None:
    token = bearer_token(request)
    if token is None:
        return None
    return await authenticate_agent(request.app[POOL], token)
