"""Users, API tokens and devices (creation and token checks)."""

from __future__ import annotations

import secrets
import uuid

import asyncpg

from proxyorch.tokens import hash_token

from .names import random_name


def new_token(prefix: str = "po_") -> str:
    """256 random bits, URL-safe. The prefix keeps a token from starting with '-' (which a command
    line would take for an option) and tells token kinds apart in logs and support tickets."""
    return prefix + secrets.token_urlsafe(32)


async def create_user(pool: asyncpg.Pool, name: str, **fields: object) -> tuple[str, str]:
    """Create a user and one API token; returns (user_id, token). The token is shown only here."""
    user_id = str(uuid.uuid4())
    token = new_token()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO users(id, name, email, country, is_premium) VALUES ($1, $2, $3, $4, $5)",
            user_id, name, fields.get("email"), fields.get("country"), bool(fields.get("is_premium", False)))
        await conn.execute("INSERT INTO api_tokens(token_hash, user_id) VALUES ($1, $2)", hash_token(token), user_id)
    return user_id, token


async def user_for_token(pool: asyncpg.Pool, token: str) -> str | None:
    row = await pool.fetchrow("SELECT user_id FROM api_tokens WHERE token_hash = $1 AND kind = 'user'",
                              hash_token(token))
    return str(row["user_id"]) if row else None


async def create_device(pool: asyncpg.Pool, user_id: str, name: str | None = None) -> dict:
    """Register a device for ``user_id``; returns remote_device_id, name and the device token (shown once)."""
    device_id = str(uuid.uuid4())
    token = new_token("dev_")
    for attempt in range(40):
        label = name or random_name(attempt)
        try:
            await pool.execute(
                "INSERT INTO devices(remote_device_id, user_id, name, token_hash) VALUES ($1, $2, $3, $4)",
                device_id, user_id, label, hash_token(token))
            return {"remote_device_id": device_id, "name": label, "device_token": token}
        except asyncpg.UniqueViolationError:
            if name:
                raise
    raise RuntimeError("could not find a free device name")


async def check_device_token(pool: asyncpg.Pool, device_id: str, token: str) -> bool:
    try:
        uuid.UUID(device_id)
    except ValueError:
        return False
    row = await pool.fetchrow("SELECT token_hash FROM devices WHERE remote_device_id = $1", device_id)
    if row is None:
        return False
    return secrets.compare_digest(bytes(row["token_hash"]), hash_token(token))


_META_COLUMNS = {"brand": "brand", "model": "model", "version": "version", "sdkVersion": "sdk_version",
                 "processor": "processor", "country": "country", "networkType": "network_type",
                 "numberOfCores": "number_of_cores", "ramMb": "ram_mb", "isEmulator": "is_emulator"}


async def set_presence(pool: asyncpg.Pool, device_id: str, online: bool, node: str, meta: dict) -> None:
    """Mark a device online/offline on ``node`` and store the metadata its agent reported."""
    sets = ["online = $2", "node = CASE WHEN $2 THEN $3 ELSE NULL END", "last_seen = now()"]
    args: list[object] = [device_id, online, node]
    for key, column in _META_COLUMNS.items():
        if key in meta and meta[key] not in (None, ""):
            value = meta[key]
            if column in ("number_of_cores", "ram_mb"):
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    continue
            elif column == "is_emulator":
                value = bool(value)
            else:
                value = str(value)[:200]
            args.append(value)
            sets.append(f"{column} = ${len(args)}")
    sql = f"UPDATE devices SET {', '.join(sets)} WHERE remote_device_id = $1"
    if not online:
        sql += " AND node = $3"
    await pool.execute(sql, *args)
