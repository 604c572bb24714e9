"""One node's client for another node's ``/internal/`` API: pooled, authenticated with the cluster secret."""

from __future__ import annotations

import aiohttp

CLUSTER_SECRET_HEADER = "X-Cluster-Secret"


class InternalClient:
    """POSTs JSON bodies to peers' ``/internal/`` routes; the HTTP session is made on first use."""

    def __init__(self, secret: str, timeout: float) -> None:
        self.secret = secret
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def post(self, url: str, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of ``POST {url}{path}``; raises aiohttp.ClientError or TimeoutError."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._http.post(f"{url}{path}", data=body, headers={
                CLUSTER_SECRET_HEADER: self.secret, "Content-Type": "application/json"}) as r:
            return r.status, await r.read()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
