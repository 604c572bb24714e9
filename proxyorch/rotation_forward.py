"""A rotation asked at one node for a device whose tunnel is on another: forwarded whole to that node.

The device's node does all of it (its sessions closed, new ones held, CONTROL, the record), so the
call goes to its API, ``POST /internal/rotate`` with the cluster secret, found through presence
(:meth:`proxyorch.presence.Presence.api_addresses`). That endpoint answers 200 with the status and
body the public route would give there; :meth:`RotationForwarder.rotate` returns or raises them as
a local rotation does, so the caller answers the same codes and body through any node.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson

from .internal_client import InternalClient
from .rotation import CONTROL_TIMEOUT_S, RotationError

log = logging.getLogger(__name__)

PATH = "/internal/rotate"


class RotationForwarder:
    """One per node: a pooled HTTP client for forwarded rotations. Close with :meth:`close`."""

    def __init__(self, secret: str, rotate_wait_s: float) -> None:
        # the device's node may take CONTROL_TIMEOUT_S, then ROTATE_WAIT_S for a reconnect
        self._client = InternalClient(secret, CONTROL_TIMEOUT_S + 2 * rotate_wait_s + 30)

    async def close(self) -> None:
        await self._client.close()

    async def rotate(self, node: str, url: str, device_id: str) -> dict:
        """The rotation's result from ``node`` at ``url`` (``{old_ip, new_ip, changed, took_ms}``), or
        its RotationError; 502/504 when that node does not answer."""
        if not url:
            raise RotationError(502, f"the device's node '{node}' advertises no API address")
        try:
            status, raw = await self._client.post(url, PATH, orjson.dumps({"deviceId": device_id}))
        except TimeoutError:
            raise RotationError(504, "the device did not finish the rotation in time") from None
        except aiohttp.ClientError as exc:
            log.warning("rotation of %s: node %s (%s) did not answer: %s", device_id, node, url, exc)
            raise RotationError(502, f"the device's node '{node}' did not answer") from None
        try:
            answer = orjson.loads(raw) if status == 200 else None
            code, body = answer["status"], answer["body"]
            if not isinstance(code, int) or not isinstance(body, dict):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("rotation of %s: node %s answered HTTP %d %r", device_id, node, status, raw[:200])
            raise RotationError(502, f"the device's node '{node}' refused the rotation (HTTP {status})") from None
        if code == 200:
            return {k: v for k, v in body.items() if k != "success"}
        raise RotationError(code, str(body.get("error") or "rotation failed"), answer.get("retryAfter"))


def answer(result: dict | None, error: RotationError | None) -> dict[str, Any]:
    """The body ``POST /internal/rotate`` answers (200) for a result or a RotationError."""
    if error is None:
        return {"status": 200, "body": {"success": True, **(result or {})}}
    return {"status": error.status, "body": {"success": False, "error": error.message},
            "retryAfter": error.retry_after}
