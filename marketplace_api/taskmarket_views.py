"""JSON shapes of the /v1 surface (tasks, bids, deliveries, traces) and the opaque listing cursor."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import asyncpg
import orjson

from .taskmarket_common import bad, iso, price_str


def task_item(row: asyncpg.Record) -> dict:
    """The discovery item: exactly the fields the seed shows."""
    return {"id": str(row["id"]), "title": row["title"], "description": row["description"],
            "category": row["category"], "status": row["status"], "band": row["band"],
            "price": price_str(row["price"]), "createdAt": iso(row["created_at"])}


def task_full(row: asyncpg.Record, bids_count: int, delivery: asyncpg.Record | None) -> dict:
    """The poster's view: the item plus bids, accepted bid, latest delivery with its gate result."""
    out = task_item(row)
    out.update({"deadline": iso(row["deadline"]), "bidsCount": bids_count,
                "acceptedBidId": str(row["accepted_bid_id"]) if row["accepted_bid_id"] else None,
                "escrow": price_str(row["escrow"]),
                "delivery": delivery_full(delivery) if delivery is not None else None,
                "resubmitDeadline": iso(row["resubmit_deadline"]), "reviewComment": row["review_comment"]})
    return out


def bid(row: asyncpg.Record) -> dict:
    return {"id": str(row["id"]), "taskId": str(row["task_id"]), "agentId": str(row["agent_id"]),
            "proposedPrice": float(row["proposed_price"]), "coverLetter": row["cover_letter"],
            "status": row["status"], "createdAt": iso(row["created_at"])}


def delivery(row: asyncpg.Record) -> dict:
    return {"id": str(row["id"]), "content": row["content"], "createdAt": iso(row["created_at"])}


def delivery_full(row: asyncpg.Record) -> dict:
    return {**delivery(row), "attempt": row["attempt"], "score": float(row["score"]), "verdict": row["verdict"]}


def trace(row: asyncpg.Record) -> dict:
    return {"id": str(row["id"]), "event": row["event"], "message": row["message"], "metadata": row["metadata"],
            "visibility": row["visibility"], "createdAt": iso(row["created_at"])}


def encode_cursor(secret: bytes, seq: int, category: str | None) -> str:
    """``base64url(payload).base64url(HMAC-SHA256(secret, payload)[:16])``: opaque and unforgeable."""
    raw = orjson.dumps({"v": 1, "s": seq, "c": category})
    mac = hmac.new(secret, raw, hashlib.sha256).digest()[:16]
    return f"{_b64(raw)}.{_b64(mac)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_cursor(secret: bytes, cursor: str, category: str | None) -> int:
    """The position a cursor points after; 400 unless this server made it for this listing."""
    try:
        payload, _, tag = cursor.partition(".")
        raw, mac = _unb64(payload), _unb64(tag)
        if not hmac.compare_digest(mac, hmac.new(secret, raw, hashlib.sha256).digest()[:16]):
            raise ValueError("bad signature")
        data = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise bad("invalid cursor") from None
    if (not isinstance(data, dict) or set(data) != {"v", "s", "c"} or data["v"] != 1
            or not isinstance(data["s"], int) or isinstance(data["s"], bool) or not 0 < data["s"] < 2**63
            or data["c"] != category):
        raise bad("invalid cursor")
    return data["s"]
