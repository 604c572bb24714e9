"""RMS: limits, access modes and usage of a connection (the control-plane side of issue 16).

Validation of the ``PUT`` bodies (unknown keys and bad values are a 400 and change nothing), the
rows of ``connection_limits``, the overlap rule of ``ip_only`` ranges (checked under a transaction
advisory lock so two concurrent claims cannot both win), and the usage read. Every write reaches the
nodes through the table's ``NOTIFY`` trigger and, with Redis, a published ``conn:<id>``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from proxyorch.bus_events import connection_changed
from proxyorch.limits_model import ACCESS_MODES, QUOTA_PERIODS, networks_overlap, parse_network, period_start

from .service import Rms, RmsError

LIMIT_KEYS = ("download_bytes_per_s", "upload_bytes_per_s", "max_concurrent_sessions", "quota_bytes", "quota_period")
MAX_INT = 2**62
MAX_SESSIONS = 1_000_000
MAX_ALLOWED_IPS = 256
_ACCESS_LOCK = 0x13_0CCE55  # advisory lock of the ip_only overlap check

_SELECT = """SELECT download_bytes_per_s, upload_bytes_per_s, max_concurrent_sessions, quota_bytes, quota_period,
                    quota_set_at, access_mode, allowed_ips FROM connection_limits WHERE connection_id = $1"""


def _positive_int(key: str, value: object, top: int = MAX_INT) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise RmsError(400, f"{key} must be an integer from 1 to {top}, or null")
    return value


def validate_limits(body: dict[str, Any]) -> dict[str, Any]:
    """The given keys, checked (400 on any unknown key or bad value)."""
    unknown = sorted(set(body) - set(LIMIT_KEYS))
    if unknown:
        raise RmsError(400, f"unknown keys: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "quota_period":
            if value is not None and value not in QUOTA_PERIODS:
                raise RmsError(400, "quota_period must be one of day, month, total, or null")
            out[key] = value
        else:
            out[key] = _positive_int(key, value, MAX_SESSIONS if key == "max_concurrent_sessions" else MAX_INT)
    return out


def validate_access(body: dict[str, Any]) -> tuple[str, list[str]]:
    """``(mode, normalised allowed_ips)`` or RmsError(400)."""
    unknown = sorted(set(body) - {"mode", "allowed_ips"})
    if unknown:
        raise RmsError(400, f"unknown keys: {', '.join(unknown)}")
    mode = body.get("mode")
    if mode not in ACCESS_MODES:
        raise RmsError(400, "mode must be one of password, password_and_ip, ip_only")
    raw = body.get("allowed_ips", [])
    if raw is None:
        raw = []
    if not isinstance(raw, list) or len(raw) > MAX_ALLOWED_IPS:
        raise RmsError(400, f"allowed_ips must be an array of at most {MAX_ALLOWED_IPS} IP/CIDR strings")
    nets = []
    for entry in raw:
        try:
            nets.append(parse_network(entry))
        except (ValueError, TypeError):
            raise RmsError(400, f"invalid allowed_ips entry: {entry!r}") from None
    if mode in ("ip_only", "password_and_ip") and not nets:
        raise RmsError(400, f"mode {mode} needs a non-empty allowed_ips")
    if mode == "ip_only":
        _refuse_open_proxy(nets)
    unique = sorted({str(n) for n in nets}, key=lambda s: (":" in s, s))
    return mode, unique


# ip_only admits whoever has an allowed address, with no password: a list covering more than a /8 of
# IPv4 or a /32 of IPv6 in total (0.0.0.0/0, ::/0, ::ffff:0:0/96, or many large ranges) would make the
# connection an open proxy, and would also claim ranges no other tenant could use for ip_only (409)
IP_ONLY_MAX_V4 = 2 ** 24
IP_ONLY_MAX_V6 = 2 ** 96


def _refuse_open_proxy(nets: list[Any]) -> None:
    """RmsError(400) when an ip_only list covers too many addresses (overlaps counted once)."""
    import ipaddress

    for version, most, widest in ((4, IP_ONLY_MAX_V4, "/8"), (6, IP_ONLY_MAX_V6, "/32")):
        collapsed = ipaddress.collapse_addresses([n for n in nets if n.version == version])
        if sum(n.num_addresses for n in collapsed) > most:
            raise RmsError(400, f"allowed_ips of an ip_only connection may cover at most a {widest} of IPv{version} "
                                "in total (no password is asked: a wider range would be an open proxy); "
                                "use password_and_ip for wide ranges")


def limits_json(row: asyncpg.Record | None) -> dict[str, Any]:
    """The limits object (all null by default)."""
    return {k: (row[k] if row is not None else None) for k in LIMIT_KEYS}


def access_json(row: asyncpg.Record | None) -> dict[str, Any]:
    if row is None:
        return {"mode": "password", "allowed_ips": []}
    return {"mode": row["access_mode"], "allowed_ips": list(row["allowed_ips"])}


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else None


class ConnectionLimits:
    """The limits/access/usage routes' logic on top of :class:`rms.service.Rms`."""

    def __init__(self, rms: Rms) -> None:
        self.rms = rms
        self.pool = rms.pool

    async def _scope(self, user_id: str, connection_id: object, write: bool) -> str:
        """The connection id if the caller may read (owner or device owner) / write (owner) it."""
        row = await self.rms._load(connection_id)
        owner = str(row["owner_user_id"]) == user_id
        if write and not owner:
            raise RmsError(403, "Only the owner of the connection may change its limits")
        if not write and not self.rms._owner_or_device_owner(row, user_id):
            raise RmsError(403, "Connection not owned/routed through any device the caller owns")
        return str(row["connection_id"])

    async def get_limits(self, user_id: str, connection_id: object) -> dict[str, Any]:
        cid = await self._scope(user_id, connection_id, write=False)
        return limits_json(await self.pool.fetchrow(_SELECT, cid))

    async def put_limits(self, user_id: str, connection_id: object, body: dict[str, Any]) -> dict[str, Any]:
        given = validate_limits(body)
        cid = await self._scope(user_id, connection_id, write=True)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO connection_limits(connection_id) VALUES ($1) ON CONFLICT DO NOTHING", cid)
            old = await conn.fetchrow(_SELECT + " FOR UPDATE", cid)
            new = {k: old[k] for k in LIMIT_KEYS}
            new.update(given)
            if new["quota_bytes"] is not None and new["quota_period"] is None:
                new["quota_period"] = "total"
            set_at = old["quota_set_at"]
            quota_started = old["quota_bytes"] is None and new["quota_bytes"] is not None
            if new["quota_period"] != old["quota_period"] or quota_started or set_at is None:
                set_at = datetime.now(UTC) if new["quota_bytes"] is not None or new["quota_period"] else None
            row = await conn.fetchrow(
                """UPDATE connection_limits SET download_bytes_per_s = $2, upload_bytes_per_s = $3,
                          max_concurrent_sessions = $4, quota_bytes = $5, quota_period = $6, quota_set_at = $7,
                          updated_at = now()
                   WHERE connection_id = $1
                   RETURNING download_bytes_per_s, upload_bytes_per_s, max_concurrent_sessions, quota_bytes,
                             quota_period""",
                cid, new["download_bytes_per_s"], new["upload_bytes_per_s"], new["max_concurrent_sessions"],
                new["quota_bytes"], new["quota_period"], set_at)
        await self.rms._publish(connection_changed(cid))
        return limits_json(row)

    async def get_access(self, user_id: str, connection_id: object) -> dict[str, Any]:
        cid = await self._scope(user_id, connection_id, write=False)
        return access_json(await self.pool.fetchrow(_SELECT, cid))

    async def put_access(self, user_id: str, connection_id: object, body: dict[str, Any]) -> dict[str, Any]:
        mode, ips = validate_access(body)
        cid = await self._scope(user_id, connection_id, write=True)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ACCESS_LOCK)
            if mode == "ip_only":
                mine = [parse_network(s) for s in ips]
                others = await conn.fetch(
                    "SELECT connection_id, allowed_ips FROM connection_limits "
                    "WHERE access_mode = 'ip_only' AND connection_id <> $1", cid)
                for other in others:
                    for entry in other["allowed_ips"]:
                        theirs = parse_network(entry)
                        clash = next((m for m in mine if networks_overlap(m, theirs)), None)
                        if clash is not None:
                            raise RmsError(409, f"{clash} overlaps an ip_only range of another connection")
            row = await conn.fetchrow(
                """INSERT INTO connection_limits(connection_id, access_mode, allowed_ips) VALUES ($1, $2, $3)
                   ON CONFLICT (connection_id) DO UPDATE SET access_mode = $2, allowed_ips = $3, updated_at = now()
                   RETURNING access_mode, allowed_ips""", cid, mode, ips)
        await self.rms._publish(connection_changed(cid))
        return access_json(row)

    async def get_usage(self, user_id: str, connection_id: object, unflushed: int = 0,
                        active_sessions: int = 0) -> dict[str, Any]:
        """Usage of the quota period; ``unflushed``/``active_sessions``: this node's live share."""
        cid = await self._scope(user_id, connection_id, write=False)
        row = await self.pool.fetchrow(_SELECT, cid)
        return await self.usage_of(cid, row, datetime.now(UTC), unflushed, active_sessions)

    async def usage_of(self, cid: str, row: asyncpg.Record | None, now: datetime, unflushed: int = 0,
                       active_sessions: int = 0) -> dict[str, Any]:
        quota = row["quota_bytes"] if row is not None else None
        period = row["quota_period"] if row is not None else None
        key = period_start(period, row["quota_set_at"] if row is not None else None, now)
        used = await self.pool.fetchval(
            "SELECT used_bytes FROM connection_usage WHERE connection_id = $1 AND period = $2 AND period_start = $3",
            cid, key[0], key[1]) or 0
        used += unflushed
        return {"quota_bytes": quota, "quota_period": period,
                "period_start": _iso(key[1]) if period is not None else None,
                "used_bytes": used, "remaining_bytes": max(0, quota - used) if quota is not None else None,
                "active_sessions": active_sessions}

    async def summaries(self, connection_ids: list[str], live: Any = None) -> dict[str, dict[str, Any]]:
        """``{"limits", "access", "usage"}`` per connection, for the list routes (``live``: the node's book)."""
        if not connection_ids:
            return {}
        rows = {str(r["connection_id"]): r for r in await self.pool.fetch(
            "SELECT connection_id, " + _SELECT.split("SELECT", 1)[1].split("FROM", 1)[0]
            + " FROM connection_limits WHERE connection_id = ANY($1::uuid[])", connection_ids)}
        now = datetime.now(UTC)
        out = {}
        for cid in connection_ids:
            row = rows.get(cid)
            unflushed, active = live.live_usage(cid) if live is not None else (0, 0)
            out[cid] = {"limits": limits_json(row), "access": access_json(row),
                        "usage": await self.usage_of(cid, row, now, unflushed, active)}
        return out
