"""Checking a proxy client's credentials: rate limit, auth cache, and the credential store on a miss.

One :class:`Authenticator` per node. It owns the store lookups it starts (cancelled by
:meth:`Authenticator.close`). The session core decides what an outcome means for the client.
The username may carry routing parameters (``proxy.username_params``); access modes
(``password_and_ip``, ``ip_only``) come from the record's limits (``proxyorch.limits_model``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from proxyorch.limits_model import address_allowed

from .auth_cache.cache import MISSING, AuthCache, CredentialRecord
from .ratelimit import FailureLimiter
from .session_core import ProxyMetrics
from .username_params import NOT_A_CONNECTION, RouteParams, UsernameError, parse_username

log = logging.getLogger(__name__)

# A credential in use is re-read when its cache entry has less than this fraction of the TTL left.
REFRESH_AHEAD = 0.3


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The record of valid credentials, else None and why; ``unavailable``: the store could not be asked."""

    record: CredentialRecord | None
    reason: str = ""
    unavailable: bool = False
    params: RouteParams | None = None  # routing parameters of the username (sticky session, country)
    refused: CredentialRecord | None = None  # right password, address outside password_and_ip's list


class Authenticator:
    """Authenticates ``connectionId``/password pairs for the sessions of one node."""

    def __init__(self, cache: AuthCache, limiter: FailureLimiter, metrics: ProxyMetrics) -> None:
        self.cache = cache
        self.limiter = limiter
        self.metrics = metrics
        self.tasks: set[asyncio.Task[None]] = set()

    def authenticate(self, client_addr: str, username: str, password: str,
                     done: Callable[[AuthOutcome], None], by_address: bool = False) -> bool:
        """Call ``done`` now and return False, or return True and call it after a store lookup.

        ``by_address``: no password; ``username`` is the connection the node's ``ip_only`` index
        found for ``client_addr``, confirmed here against the (fresh) record."""
        params = parse_username(username)
        conn_id = params.connection_id if isinstance(params, RouteParams) else None
        if not self.limiter.allowed(client_addr, conn_id):
            self.metrics.auth_rate_limited += 1
            done(self._failed(client_addr, conn_id, "too many failed attempts"))
            return False
        if isinstance(params, UsernameError):
            if params.reason == NOT_A_CONNECTION:
                done(self._failed(client_addr, None, "unknown connection"))
                return False
            log.info("proxy login from %s refused: malformed username parameters: %s", client_addr, params.reason)
            done(self._failed(client_addr, None, f"malformed username: {params.reason}"))
            return False
        assert conn_id is not None
        cache = self.cache
        cached = cache.get_cached(conn_id)
        if cached is not MISSING:
            if cache.expires_soon(conn_id, cache.ttl * REFRESH_AHEAD):
                self._own(asyncio.get_running_loop().create_task(self._refresh(conn_id)))
            done(self._check(cached, client_addr, params, password, by_address))  # type: ignore[arg-type]
            return False
        self._own(asyncio.get_running_loop().create_task(
            self._lookup(client_addr, params, password, done, by_address)))
        return True

    def _own(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _refresh(self, conn_id: str) -> None:
        """Re-read a credential in use shortly before its cache entry expires, so its sessions do not
        all miss (and wait for the store) at expiry; each record served is still at most TTL old."""
        try:
            await self.cache.refresh(conn_id)
        except Exception as exc:  # the sessions' own lookup at expiry reports it
            log.debug("credential refresh of %s failed: %s", conn_id, exc)

    def close(self) -> None:
        """Cancel the lookups in flight."""
        for task in list(self.tasks):
            task.cancel()

    async def _lookup(self, client_addr: str, params: RouteParams, password: str,
                      done: Callable[[AuthOutcome], None], by_address: bool = False) -> None:
        try:
            record = await self.cache.lookup(params.connection_id)
        except Exception as exc:  # store unreachable: a clear refusal, not a crash
            log.warning("credential lookup failed: %s", exc)
            done(AuthOutcome(None, "credential store unavailable", unavailable=True))
            return
        done(self._check(record, client_addr, params, password, by_address))

    def _check(self, record: CredentialRecord | None, client_addr: str, params: RouteParams,
               password: str, by_address: bool = False) -> AuthOutcome:
        conn_id = params.connection_id
        if by_address:
            lim = record.limits if record is not None else None
            if record is None or lim is None or lim.access_mode != "ip_only" or not address_allowed(
                    client_addr, lim.allowed_ips):
                return AuthOutcome(None, "proxy authentication required")
            return AuthOutcome(record, params=params)
        if record is None or not password or not record.check_password(password):
            return self._failed(client_addr, conn_id, "invalid credentials")
        lim = record.limits
        if lim.access_mode == "password_and_ip" and not address_allowed(client_addr, lim.allowed_ips):
            out = self._failed(client_addr, conn_id, "invalid credentials")  # like a wrong password
            return AuthOutcome(None, out.reason, refused=record)
        self.limiter.record_success(client_addr, record.connection_id)
        return AuthOutcome(record, params=params)

    def _failed(self, client_addr: str, conn_id: str | None, reason: str) -> AuthOutcome:
        self.limiter.record_failure(client_addr)
        if conn_id is not None:
            self.limiter.record_failure(conn_id)
        return AuthOutcome(None, reason)
