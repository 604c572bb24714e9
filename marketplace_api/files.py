"""Temporary files: multipart upload streamed to disk (50 MB), owner-only retrieval, 15-minute expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
from aiohttp import web

from .auth import require_user
from .bodies import json_response
from .common import iso, pool_of
from .errors import ApiError, with_message
from .storage import files_dir, public_url, safe_name

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
TTL = timedelta(minutes=15)
CHUNK = 256 * 1024
SWEEP_INTERVAL_S = 30.0


async def _drain(request: web.Request, limit: int = 2 * MAX_UPLOAD_BYTES) -> None:
    """Read and discard what is left of the body so the client can read our 400."""
    seen = 0
    with contextlib.suppress(Exception):
        while seen < limit:
            chunk = await request.content.read(CHUNK)
            if not chunk:
                break
            seen += len(chunk)


async def upload(request: web.Request) -> web.Response:
    """Upload a temporary file (multipart field ``file``; 50 MB; deleted after 15 minutes)."""
    user = await require_user(request)
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES + 64 * 1024:
        await _drain(request)
        raise with_message(400, "File too large (maximum 50 MB)")
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise with_message(400, "No file uploaded") from None
    directory = files_dir(request, "temp")
    try:
        while True:
            part = await reader.next()
            if part is None:
                raise with_message(400, "No file uploaded")
            if getattr(part, "name", None) == "file" and getattr(part, "filename", None):
                break
            if hasattr(part, "release"):
                await part.release()
        original = part.filename[:255]
        filename = f"{int(time.time() * 1000)}_{safe_name(original)}"
        path = directory / filename
        size = await _stream_to(part, path)
    except ApiError:
        await _drain(request)
        raise
    except (ValueError, AssertionError, asyncio.IncompleteReadError):
        raise with_message(400, "Malformed multipart body") from None
    if size == 0:
        path.unlink(missing_ok=True)
        raise with_message(400, "No file uploaded")
    expires = await pool_of(request).fetchval(
        """INSERT INTO temp_files(filename, original_name, user_id, size, content_type, expires_at)
           VALUES ($1, $2, $3, $4, $5, now() + $6) RETURNING expires_at""",
        filename, original, user, size, part.headers.get("Content-Type"), TTL)
    return json_response({"success": True, "message": "File uploaded successfully", "data": {
        "filename": filename, "originalName": original, "size": size,
        "url": public_url(request, "/api/v2/files/temp", filename), "expiresAt": iso(expires)}})


async def _stream_to(part, path: Path) -> int:  # noqa: ANN001
    """Write a multipart part to ``path`` chunk by chunk; over the limit → delete and 400."""
    size = 0
    handle = await asyncio.to_thread(open, path, "wb")
    try:
        while True:
            chunk = await part.read_chunk(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise with_message(400, "File too large (maximum 50 MB)")
            await asyncio.to_thread(handle.write, chunk)
    except BaseException:
        handle.close()
        path.unlink(missing_ok=True)
        raise
    handle.close()
    return size


async def fetch_temp(request: web.Request) -> web.StreamResponse:
    """A temporary file the caller uploaded, until it expires."""
    user = await require_user(request)
    filename = request.match_info.get("filename", "")
    if not filename:
        raise with_message(400, "Filename is required")
    row = await pool_of(request).fetchrow(
        "SELECT * FROM temp_files WHERE filename = $1 AND user_id = $2 AND expires_at > now()", filename, user)
    path = files_dir(request, "temp") / safe_name(filename, 400)
    if row is None or safe_name(filename, 400) != filename or not path.is_file():
        raise with_message(404, "File not found or expired")
    return web.FileResponse(path, headers={
        "Content-Disposition": f'attachment; filename="{safe_name(row["original_name"])}"'})


async def sweep_expired(pool: asyncpg.Pool, directory: Path) -> int:
    rows = await pool.fetch("DELETE FROM temp_files WHERE expires_at <= now() RETURNING filename")
    for r in rows:
        (directory / r["filename"]).unlink(missing_ok=True)
    return len(rows)


async def sweeper(pool: asyncpg.Pool, directory: Path) -> None:
    while True:
        try:
            await sweep_expired(pool, directory)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("temp file sweep failed")
        await asyncio.sleep(SWEEP_INTERVAL_S)
