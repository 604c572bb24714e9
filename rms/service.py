"""RMS: the owner of proxy connections.

It generates credentials (UUID v4 id + 16-character password from a CSPRNG), keeps the plaintext
AES-GCM encrypted (the list route must return it), writes only the keyed hash and the device
association into the data plane's store, and makes every change reach the nodes: the store's
triggers ``NOTIFY`` inside the same transaction, and when a Redis bus is configured the event is
also published there after commit.
"""

from __future__ import annotations

import secrets
import string
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg

from proxyorch.blacklist import Blacklist
from proxyorch.bus_events import blacklist_changed, connection_changed, connection_killed
from proxyorch.tokens import hash_password

from .crypto import PasswordBox

PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 16
MAX_NAME = 100
MAX_DOMAINS = 1000
MAX_POOL = 100
Publish = Callable[[str], Awaitable[None]]


class RmsError(Exception):
    """A refusal with the HTTP status the seed documents for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def new_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def parse_uuid(value: object, what: str) -> str:
    """Canonical UUID text or RmsError(400)."""
    if not isinstance(value, str):
        raise RmsError(400, f"{what} must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise RmsError(400, f"{what} must be a UUID") from None


def _iso(ts: datetime | None) -> str | None:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ") if ts else None


def normalize_domains(domains: object) -> list[str]:
    """Validate a ``domains`` body field: non-empty list of domain / IP / CIDR strings."""
    if not isinstance(domains, list) or not domains:
        raise RmsError(400, "domains must be a non-empty array of strings")
    if len(domains) > MAX_DOMAINS:
        raise RmsError(400, f"at most {MAX_DOMAINS} domains per request")
    out: list[str] = []
    for d in domains:
        if not isinstance(d, str) or not d.strip() or len(d) > 253:
            raise RmsError(400, "every domain must be a non-empty string of at most 253 characters")
        compiled = Blacklist.compile([d.strip()])
        if compiled.invalid:
            raise RmsError(400, f"invalid domain: {d!r}")
        out.append(d.strip().lower().rstrip("."))
    return out


def parse_pool(pool: object) -> tuple[list[str] | None, str | None]:
    """Validate a ``pool`` body field: ``{"device_ids": [...]}`` or ``{"country": "US"}``."""
    if not isinstance(pool, dict) or len(pool) != 1 or not ({"device_ids", "country"} & set(pool)):
        raise RmsError(400, 'pool must be {"device_ids": [...]} or {"country": "CC"}')
    if "country" in pool:
        cc = pool["country"]
        if not isinstance(cc, str) or len(cc) != 2 or not cc.isascii() or not cc.isalpha():
            raise RmsError(400, "pool.country must be a two-letter country code")
        return None, cc.upper()
    ids = pool["device_ids"]
    if not isinstance(ids, list) or not ids or len(ids) > MAX_POOL:
        raise RmsError(400, f"pool.device_ids must be a non-empty array of at most {MAX_POOL} device ids")
    out: list[str] = []
    for d in ids:
        did = parse_uuid(d, "every pool.device_ids entry")
        if did in out:
            raise RmsError(400, f"device {did} is listed twice in pool.device_ids")
        out.append(did)
    return out, None


def _pool_body(ids: list[str] | None, country: str | None) -> dict | None:
    if ids is not None:
        return {"device_ids": ids}
    return {"country": country} if country is not None else None


def pool_json(row: asyncpg.Record) -> dict | None:
    """The connection's pool as the API shows it (None for a one-device connection)."""
    keys = row.keys()
    if "pool_device_ids" in keys and row["pool_device_ids"] is not None:
        return {"device_ids": [str(d) for d in row["pool_device_ids"]]}
    if "pool_country" in keys and row["pool_country"] is not None:
        return {"country": row["pool_country"]}
    return None


class Rms:
    """Connection management for the API and the admin CLI."""

    def __init__(self, pool: asyncpg.Pool, box: PasswordBox, publish: Publish | None = None) -> None:
        self.pool = pool
        self.box = box
        self.publish = publish
        # this node's own handler of bus events, called at once after a commit: a change made through
        # a node applies there before the API answers (read-your-writes), not when the bus brings it back
        self.local: Callable[[str], None] | None = None

    async def _publish(self, event: str) -> None:
        if self.local is not None:
            self.local(event)
        if self.publish is not None:
            await self.publish(event)

    def _connection_json(self, row: asyncpg.Record) -> dict:
        cid = str(row["connection_id"])
        return {
            "connectionId": cid,
            "password": self.box.open(cid, bytes(row["password_encrypted"])),
            "ownerUserId": str(row["owner_user_id"]),
            "name": row["name"],
            "createdAt": _iso(row["created_at"]),
            "deviceId": str(row["device_id"]) if row["device_id"] else None,
            "pool": pool_json(row),
        }

    # -- reads ----------------------------------------------------------------------------------
    async def list_for_user(self, user_id: str, limit: int | None = None, offset: int = 0) -> list[dict]:
        """Connections owned by, or routed through devices of, ``user_id`` (``limit`` from ``offset``)."""
        rows = await self.pool.fetch(
            """SELECT r.connection_id, r.owner_user_id, r.name, r.password_encrypted, r.created_at, c.device_id,
                      c.pool_device_ids, c.pool_country
               FROM rms_connections r JOIN proxy_credentials c USING (connection_id)
               LEFT JOIN devices d ON d.remote_device_id = c.device_id
               WHERE r.owner_user_id = $1 OR d.user_id = $1
               ORDER BY r.created_at, r.connection_id LIMIT $2 OFFSET $3""", user_id, limit, offset)
        return [self._connection_json(r) for r in rows]

    async def _load(self, connection_id: object) -> asyncpg.Record:
        cid = parse_uuid(connection_id, "connection_id")
        row = await self.pool.fetchrow(
            """SELECT r.connection_id, r.owner_user_id, c.device_id, d.user_id AS device_owner
               FROM rms_connections r JOIN proxy_credentials c USING (connection_id)
               LEFT JOIN devices d ON d.remote_device_id = c.device_id
               WHERE r.connection_id = $1""", cid)
        if row is None:
            raise RmsError(404, "Connection not found")
        return row

    @staticmethod
    def _owner_or_device_owner(row: asyncpg.Record, user_id: str) -> bool:
        return str(row["owner_user_id"]) == user_id or (
            row["device_owner"] is not None and str(row["device_owner"]) == user_id)

    async def _owned_device(self, device_id: object, user_id: str, status: int) -> str:
        did = parse_uuid(device_id, "device_id")
        owner = await self.pool.fetchval("SELECT user_id FROM devices WHERE remote_device_id = $1", did)
        if owner is None or str(owner) != user_id:
            raise RmsError(status, "Device not owned by caller")
        return did

    # -- writes ---------------------------------------------------------------------------------
    async def _owned_pool(self, pool: object, user_id: str, status: int) -> tuple[list[str] | None, str | None]:
        ids, country = parse_pool(pool)
        if ids is not None:
            owned = await self.pool.fetchval(
                "SELECT count(*) FROM devices WHERE remote_device_id = ANY($1::uuid[]) AND user_id = $2", ids, user_id)
            if owned != len(ids):
                raise RmsError(status, "Device not owned by caller")
        return ids, country

    async def create(self, user_id: str, device_id: object, name: object = None,
                     check_owner: bool = True, pool: object = None) -> dict:
        """New credential routed through ``device_id`` (which the caller must own), or through a pool."""
        if pool is not None and device_id not in (None, ""):
            raise RmsError(400, "give either device_id or pool, not both")
        if pool is None and (device_id is None or device_id == ""):
            raise RmsError(400, "device_id is required")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
            raise RmsError(400, f"name must be a string of at most {MAX_NAME} characters")
        pool_ids = pool_country = did = None
        if pool is not None:
            pool_ids, pool_country = await self._owned_pool(pool, user_id, 404)
        else:
            did = await self._owned_device(device_id, user_id, 404) if check_owner else parse_uuid(device_id, "device_id")
        cid = str(uuid.uuid4())
        password = new_password()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO proxy_credentials(connection_id, password_hash, device_id, pool_device_ids,"
                               " pool_country) VALUES ($1,$2,$3,$4,$5)",
                               cid, hash_password(cid, password), did, pool_ids, pool_country)
            row = await conn.fetchrow(
                """INSERT INTO rms_connections(connection_id, owner_user_id, name, password_encrypted)
                   VALUES ($1, $2, $3, $4) RETURNING created_at""",
                cid, user_id, name, self.box.seal(cid, password))
        await self._publish(connection_changed(cid))
        return {"connectionId": cid, "password": password, "ownerUserId": user_id, "name": name,
                "createdAt": _iso(row["created_at"]), "deviceId": did, "pool": _pool_body(pool_ids, pool_country)}

    async def delete(self, user_id: str, connection_id: object) -> None:
        row = await self._load(connection_id)
        if not self._owner_or_device_owner(row, user_id):
            raise RmsError(403, "Connection not owned/routed through any device the caller owns")
        cid = str(row["connection_id"])
        await self.pool.execute("DELETE FROM proxy_credentials WHERE connection_id = $1", cid)
        await self.pool.execute("DELETE FROM blacklist_entries WHERE scope = 'connection' AND scope_id = $1", cid)
        await self._publish(connection_killed(cid))

    async def rotate_password(self, user_id: str, connection_id: object) -> str:
        row = await self._load(connection_id)
        if str(row["owner_user_id"]) != user_id:
            raise RmsError(403, "Forbidden")
        cid = str(row["connection_id"])
        password = new_password()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE proxy_credentials SET password_hash = $2, updated_at = now() WHERE connection_id = $1",
                               cid, hash_password(cid, password))
            await conn.execute("UPDATE rms_connections SET password_encrypted = $2 WHERE connection_id = $1",
                               cid, self.box.seal(cid, password))
        await self._publish(connection_changed(cid))
        return password

    async def set_device(self, user_id: str, connection_id: object, device_id: object, pool: object = None) -> dict:
        """Hot-swap the exit device (or pool): new sessions use it; live sessions keep their device."""
        row = await self._load(connection_id)
        if pool is not None and device_id not in (None, ""):
            raise RmsError(400, "give either device_id or pool, not both")
        if pool is None and (device_id is None or device_id == ""):
            raise RmsError(400, "device_id is required")
        did = pool_ids = pool_country = None
        if pool is not None:
            pool_ids, pool_country = parse_pool(pool)
        else:
            did = parse_uuid(device_id, "device_id")
        if str(row["owner_user_id"]) != user_id:
            raise RmsError(403, "Source connection or target device not owned by caller")
        if pool is not None:
            await self._owned_pool(pool, user_id, 403)
        else:
            await self._owned_device(did, user_id, 403)
        cid = str(row["connection_id"])
        await self.pool.execute("UPDATE proxy_credentials SET device_id = $2, pool_device_ids = $3, pool_country = $4,"
                                " updated_at = now() WHERE connection_id = $1", cid, did, pool_ids, pool_country)
        await self._publish(connection_changed(cid))
        return {"connectionId": cid, "deviceId": did, "pool": _pool_body(pool_ids, pool_country)}

    async def dissociate(self, user_id: str, connection_id: object) -> None:
        row = await self._load(connection_id)
        if not self._owner_or_device_owner(row, user_id):
            raise RmsError(403, "Forbidden")
        cid = str(row["connection_id"])
        await self.pool.execute("UPDATE proxy_credentials SET device_id = NULL, pool_device_ids = NULL,"
                                " pool_country = NULL, updated_at = now() WHERE connection_id = $1", cid)
        await self._publish(connection_killed(cid))

    # -- blacklists -----------------------------------------------------------------------------
    async def connection_blacklist_scope(self, user_id: str, connection_id: object) -> str:
        row = await self._load(connection_id)
        if not self._owner_or_device_owner(row, user_id):
            raise RmsError(403, "Forbidden")
        return str(row["connection_id"])

    async def device_blacklist_scope(self, user_id: str, device_id: object) -> str:
        did = parse_uuid(device_id, "device_id")
        owner = await self.pool.fetchval("SELECT user_id FROM devices WHERE remote_device_id = $1", did)
        if owner is None:
            raise RmsError(404, "Device not found")
        if str(owner) != user_id:
            raise RmsError(403, "Forbidden")
        return did

    async def blacklist(self, scope: str, scope_id: str | None, limit: int | None = None, offset: int = 0) -> list[str]:
        """The entries of one scope, oldest first (``limit`` from ``offset``; None = all)."""
        rows = await self.pool.fetch(
            "SELECT entry FROM blacklist_entries WHERE scope = $1 AND scope_id IS NOT DISTINCT FROM $2::uuid"
            " ORDER BY created_at, entry LIMIT $3 OFFSET $4", scope, scope_id, limit, offset)
        return [r["entry"] for r in rows]

    async def blacklist_add(self, scope: str, scope_id: str | None, domains: object,
                            limit: int | None = None) -> list[str]:
        entries = normalize_domains(domains)
        await self.pool.executemany(
            """INSERT INTO blacklist_entries(scope, scope_id, entry) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING""", [(scope, scope_id, e) for e in entries])
        await self._publish_scope(scope, scope_id)
        return await self.blacklist(scope, scope_id, limit)

    async def blacklist_remove(self, scope: str, scope_id: str | None, domains: object,
                               limit: int | None = None) -> list[str]:
        entries = normalize_domains(domains)
        await self.pool.execute(
            "DELETE FROM blacklist_entries WHERE scope = $1 AND scope_id IS NOT DISTINCT FROM $2::uuid AND entry = ANY($3)",
            scope, scope_id, entries)
        await self._publish_scope(scope, scope_id)
        return await self.blacklist(scope, scope_id, limit)

    async def _publish_scope(self, scope: str, scope_id: str | None) -> None:
        await self._publish(blacklist_changed(scope, scope_id))

    # -- admin ----------------------------------------------------------------------------------
    async def admin_list(self, limit: int | None = None, offset: int = 0) -> list[dict]:
        """Every connection with its device (``limit`` from ``offset``; None = all)."""
        rows = await self.pool.fetch(
            """SELECT r.connection_id, r.name, r.password_encrypted, r.created_at, c.device_id,
                      d.user_id, d.name AS device_name, d.brand, d.model, d.country, d.online,
                      d.is_rented, d.is_on_market
               FROM rms_connections r JOIN proxy_credentials c USING (connection_id)
               LEFT JOIN devices d ON d.remote_device_id = c.device_id
               ORDER BY r.created_at, r.connection_id LIMIT $1 OFFSET $2""", limit, offset)
        out = []
        for r in rows:
            cid = str(r["connection_id"])
            device = None
            if r["device_id"] is not None:
                device = {"remote_device_id": str(r["device_id"]), "user_id": str(r["user_id"]),
                          "name": r["device_name"], "brand": r["brand"], "model": r["model"],
                          "country": r["country"], "online": r["online"], "is_rented": r["is_rented"],
                          "is_onMarket": r["is_on_market"]}
            out.append({"connection_id": cid, "name": r["name"],
                        "password": self.box.open(cid, bytes(r["password_encrypted"])),
                        "created_at": _iso(r["created_at"]), "bytes_last_24h": 0, "bytes_lifetime": 0,
                        "device": device})
        return out
