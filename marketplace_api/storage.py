"""File storage under ``DATA_DIR/files``: proof files (permanent, public URL with an unguessable name)
and temporary uploads (``DATA_DIR/files/temp``). Also a JSON body reader with a per-route size limit
for the routes that carry base64 files (the app-wide limit is MAX_BODY_BYTES)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import secrets
from pathlib import Path

from aiohttp import web

from .bodies import parse_json_object, too_large
from .context import SETTINGS
from .errors import ApiError

MAX_PROOF_FILE_BYTES = 5 * 1024 * 1024
EXTENSION = re.compile(r"^\.?[A-Za-z0-9]{1,10}$")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def files_dir(request: web.Request, sub: str = "") -> Path:
    path = Path(request.app[SETTINGS].data_dir).resolve() / "files"
    if sub:
        path = path / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


def public_url(request: web.Request, route: str, name: str) -> str:
    return f"{request.scheme}://{request.host}{route}/{name}"


def safe_name(name: str, limit: int = 80) -> str:
    cleaned = UNSAFE.sub("_", Path(name).name).strip("._") or "file"
    return cleaned[-limit:]


def decode_base64(data: object, label: str, limit: int = MAX_PROOF_FILE_BYTES) -> bytes:
    """Strictly decoded bytes (data-URL prefixes allowed), or ApiError(400)."""
    if not isinstance(data, str) or not data:
        raise ApiError(400, f"{label}: base64 data is required")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    if len(data) > (limit // 3 + 2) * 4 + 8:
        raise ApiError(400, f"{label}: file exceeds {limit // (1024 * 1024)} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{label}: invalid base64 data") from None
    if len(raw) > limit:
        raise ApiError(400, f"{label}: file exceeds {limit // (1024 * 1024)} MB")
    return raw


async def save_proof_file(request: web.Request, raw: bytes, stem: str, extension: str) -> tuple[str, str]:
    """Write a proof file; returns (stored name, public URL)."""
    name = f"{secrets.token_hex(12)}_{safe_name(stem, 40)}{extension}"
    path = files_dir(request, "proof") / name
    await asyncio.to_thread(path.write_bytes, raw)
    return name, public_url(request, "/api/v2/files/proof", name)


async def read_json_limited(request: web.Request, limit: int) -> dict:
    """A JSON object body of at most ``limit`` bytes (413 beyond), read from the stream (not client_max_size)."""
    if not request.can_read_body:
        raise ApiError(400, "request body must be a JSON object")
    if request.content_length is not None and request.content_length > limit:
        raise too_large()
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


async def serve_proof_file(request: web.Request) -> web.StreamResponse:
    """A stored proof file by its public (unguessable) name."""
    name = request.match_info["filename"]
    if safe_name(name, 200) != name:
        raise ApiError(404, "File not found", {"error": "File not found"})
    path = files_dir(request, "proof") / name
    if not path.is_file():
        raise ApiError(404, "File not found", {"error": "File not found"})
    return web.FileResponse(path)
