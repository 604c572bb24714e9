"""Checking a proxy client's credentials: rate limit, auth cache, and the credential store on a miss.

One :class:`Authenticator` per node. It owns the store lookups it starts (cancelled by
:meth:`Authenticator.close`). The session core decides what an outcome means for the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .auth_cache.cache import MISSING, AuthCache, CredentialRecord, normalize_connection_id
from .ratelimit import FailureLimiter
from .session_core import ProxyMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The record of valid credentials, else None and why; ``unavailable``: the store could not be asked."""

    record: CredentialRecord | None
    reason: str = ""
    unavailable: bool = False


class Authenticator:
    """Authenticates ``connectionId``/password pairs for the sessions of one node."""

    def __init__(self, cache: AuthCache, limiter: FailureLimiter, metrics: ProxyMetrics) -> None:
        self.cache = cache
        self.limiter = limiter
        self.metrics = metrics
        self.tasks: set[asyncio.Task[None]] = set()

    def authenticate(self, client_addr: str, username: str, password: str,
                     done: Callable[[AuthOutcome], None]) -> bool:
        """Call ``done`` now and return False, or return True and call it after a store lookup."""
        conn_id = normalize_connection_id(username)
        if not self.limiter.allowed(client_addr, conn_id):
            self.metrics.auth_rate_limited += 1
            done(self._failed(client_addr, conn_id, "too many failed attempts"))
            return False
        if conn_id is None:
            done(self._failed(client_addr, None, "unknown connection"))
            return False
        cached = self.cache.get_cached(conn_id)
        if cached is not MISSING:
            done(self._check(cached, client_addr, conn_id, password))  # type: ignore[arg-type]
            return False
        task = asyncio.get_running_loop().create_task(self._lookup(client_addr, conn_id, password, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def close(self) -> None:
        """Cancel the lookups in flight."""
        for task in list(self.tasks):
            task.cancel()

    async def _lookup(self, client_addr: str, conn_id: str, password: str,
                      done: Callable[[AuthOutcome], None]) -> None:
        try:
            record = await self.cache.lookup(conn_id)
        except Exception as exc:  # store unreachable: a clear refusal, not a crash
            log.warning("credential lookup failed: %s", exc)
            done(AuthOutcome(None, "credential store unavailable", unavailable=True))
            return
        done(self._check(record, client_addr, conn_id, password))

    def _check(self, record: CredentialRecord | None, client_addr: str, conn_id: str, password: str) -> AuthOutcome:
        if record is None or not password or not record.check_password(password):
            return self._failed(client_addr, conn_id, "invalid credentials")
        self.limiter.record_success(client_addr, record.connection_id)
        return AuthOutcome(record)

    def _failed(self, client_addr: str, conn_id: str | None, reason: str) -> AuthOutcome:
        self.limiter.record_failure(client_addr)
        if conn_id is not None:
            self.limiter.record_failure(conn_id)
        return AuthOutcome(None, reason)
