"""The cluster-wide list of open sessions: this node asks every other live node for its own.

The node that gets ``GET /api/v2/proxy/sessions`` looks up the live nodes and their API addresses
(presence, :meth:`proxyorch.presence.Presence.api_addresses`) and asks all of them at once at
``POST /internal/sessions`` with the cluster secret, each with ``PEER_TIMEOUT_S``. A node that does
not answer in time (dead, stopped, overloaded) or answers with an error is left out and named in
the result's ``missing``; the call itself never fails because of a peer. Which ids are asked for,
and the tenant filter on the answers, stay with the caller of :meth:`SessionFanout.collect`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from proxyorch.internal_client import InternalClient

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 2.0       # per node: a slower node is reported missing
PRESENCE_TIMEOUT_S = 1.0   # the live-node lookup; on failure the last answer is used


class SessionFanout:
    """One per app: a pooled HTTP client and the last known peer list. Close with :meth:`close`."""

    def __init__(self, secret: str, node_name: str) -> None:
        self.node_name = node_name
        self._client = InternalClient(secret, PEER_TIMEOUT_S)
        self._known: dict[str, str] = {}

    async def close(self) -> None:
        await self._client.close()

    async def peers(self, presence: Any) -> dict[str, str]:
        """The other live nodes: name -> API URL (the last answer when the presence store fails)."""
        try:
            found = await asyncio.wait_for(presence.api_addresses(), PRESENCE_TIMEOUT_S)
        except Exception as exc:  # Redis/PostgreSQL trouble: fall back to what we knew
            log.warning("sessions: live-node lookup failed (%s); using the last known nodes", exc)
            found = self._known
        else:
            self._known = found
        return {name: url for name, url in found.items() if name != self.node_name}

    async def collect(self, presence: Any, connection_ids: set[str] | None,
                      device_ids: set[str] | None) -> tuple[list[dict[str, Any]], list[str]]:
        """(rows of every other live node, names of the nodes that did not answer)."""
        peers = await self.peers(presence)
        if not peers:
            return [], []
        body = orjson.dumps({"connectionIds": None if connection_ids is None else sorted(connection_ids),
                             "deviceIds": None if device_ids is None else sorted(device_ids)})
        names = sorted(peers)
        answers = await asyncio.gather(*(self._ask(peers[n], body) for n in names))
        rows: list[dict[str, Any]] = []
        missing = []
        for name, answer in zip(names, answers, strict=True):
            if answer is None:
                missing.append(name)
            else:
                rows.extend(answer)
        return rows, missing

    async def _ask(self, url: str, body: bytes) -> list[dict[str, Any]] | None:
        if not url:
            return None  # the node advertises no API address
        try:
            status, raw = await self._client.post(url, "/internal/sessions", body)
            if status != 200:
                log.warning("sessions: %s answered %d", url, status)
                return None
            rows = orjson.loads(raw).get("sessions")
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError) as exc:
            log.info("sessions: %s did not answer: %s", url, type(exc).__name__)
            return None
        if not isinstance(rows, list) or not all(_row_ok(r) for r in rows):
            return None
        return rows


def _row_ok(row: Any) -> bool:
    """A peer's row has the id and sort fields the caller dedups, filters and sorts on, with their types."""
    return (isinstance(row, dict) and isinstance(row.get("sessionId"), str)
            and all(isinstance(row.get(k), str | None) for k in ("startedAt", "connectionId", "deviceId")))
