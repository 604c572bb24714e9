"""Shared helpers of the marketplace routes: ids, numbers, money, dates, pagination, job access."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import asyncpg

from .context import pool_of  # noqa: F401 - moved to context, kept importable here
from .errors import ApiError

MONEY_PLACES = Decimal("0.000001")
MAX_MONEY = Decimal("1000000000")


def parse_uuid(value: Any) -> str | None:
    """The canonical string of a UUID, or None when ``value`` is not one."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        return None


def need_uuid(value: Any, err: Callable[[], ApiError]) -> str:
    parsed = parse_uuid(value)
    if parsed is None:
        raise err()
    return parsed


def parse_money(value: Any) -> Decimal | None:
    """An exact Decimal from a JSON number or numeric string; None when invalid or out of range.

    orjson gives floats; ``str(float)`` is the shortest repr, so 0.06 stays exactly 0.06.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        dec = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    if not dec.is_finite() or abs(dec) > MAX_MONEY or dec != dec.quantize(MONEY_PLACES, ROUND_HALF_UP):
        return None
    return dec


def money(value: Decimal | None) -> float | int | None:
    """Render exact money as a JSON number (the seed shows numbers such as 0.06 or -30)."""
    if value is None:
        return None
    value = Decimal(value).normalize()
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def money_str(value: Decimal, places: int = 2) -> str:
    return str(Decimal(value).quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP))


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_int(value: Any, name: str, default: int, lo: int, hi: int, err: Callable[[str], ApiError]) -> int:
    """An integer parameter from JSON or a query string, within [lo, hi]."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise err(f"{name} must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise err(f"{name} must be an integer")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise err(f"{name} must be an integer") from None
    if not isinstance(value, int) or not lo <= value <= hi:
        raise err(f"{name} must be an integer between {lo} and {hi}")
    return value


def parse_bool(value: Any, name: str, err: Callable[[str], ApiError], default: bool | None = None) -> bool | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    raise err(f"{name} must be a boolean")


def like_pattern(term: str) -> str:
    """A LIKE pattern matching ``term`` as a literal substring."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def pages(total: int, limit: int) -> int:
    return (total + limit - 1) // limit if total else 0


# -- job access ---------------------------------------------------------------------------------
def can_view(job: asyncpg.Record, user_id: str) -> bool:
    uid = uuid.UUID(user_id)
    return job["user_id"] == uid or uid in (job["shared_view"] or []) or uid in (job["shared_edit"] or [])


def can_edit(job: asyncpg.Record, user_id: str) -> bool:
    uid = uuid.UUID(user_id)
    return job["user_id"] == uid or uid in (job["shared_edit"] or [])


async def fetch_job(conn: asyncpg.Connection | asyncpg.Pool, job_id: str, lock: bool = False) -> asyncpg.Record | None:
    sql = "SELECT * FROM jobs WHERE id = $1" + (" FOR UPDATE" if lock else "")
    return await conn.fetchrow(sql, job_id)
