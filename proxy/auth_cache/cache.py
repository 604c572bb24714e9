"""connectionId -> credential record, served at most ``ttl`` after a change in the store.

Records expire ``ttl`` seconds (default 100 ms) after they were read, and pushed invalidations
(``invalidate*``) drop them at once, so a change normally lands in a few milliseconds and never
later than the TTL. Unknown ids are cached negatively for the same TTL. Concurrent misses for one
id share a single store query. When the store cannot be reached, a record that was never
invalidated keeps being served (stale-if-error), so live customers survive a database restart.
Only password *hashes* are held.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxyorch.blacklist import Blacklist
from proxyorch.bus_events import CONN, DEVICE, KILL, decode
from proxyorch.limits_model import NO_LIMITS, Limits
from proxyorch.tokens import verify_password


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """What the data plane knows about one connection."""

    connection_id: str
    password_hash: bytes
    device_id: str | None
    blacklists: tuple[tuple[str, Blacklist], ...]   # (scope, list): global, device, connection
    # A pool connection's members as (device id, country); a one-device connection has its device here.
    pool: tuple[tuple[str, str | None], ...] = ()
    is_pool: bool = False
    limits: Limits = NO_LIMITS   # speed, sessions, quota, access mode
    used_bytes: int = 0          # the quota period's usage in the store when the record was read

    def check_password(self, password: str) -> bool:
        return verify_password(self.password_hash, self.connection_id, password)


@dataclass(slots=True)
class StoredCredential:
    """A row as the store returns it."""

    connection_id: str
    password_hash: bytes
    device_id: str | None
    connection_entries: list[str]
    device_entries: list[str]
    global_entries: list[str]
    pool: list[tuple[str, str | None]] = field(default_factory=list)
    is_pool: bool = False
    limits: Limits = NO_LIMITS
    used_bytes: int = 0


CredentialFetcher = Callable[[str], Awaitable[StoredCredential | None]]
MISSING = object()  # get_cached: nothing fresh in the cache


def normalize_connection_id(raw: str) -> str | None:
    """Canonical lower-case UUID text, or None when ``raw`` is not a UUID."""
    if not 32 <= len(raw) <= 36:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


class AuthCache:
    """The data plane's view of credentials. ``fetch`` reads one id from the store."""

    def __init__(self, fetch: CredentialFetcher, ttl: float = 0.1, stale_if_error: float = 600.0) -> None:
        self._fetch = fetch
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self._entries: dict[str, tuple[float, CredentialRecord | None]] = {}
        # reads under way: (generation when it started, its result); a read that began before an
        # invalidation is never shared with a lookup that comes after it
        self._inflight: dict[str, tuple[int, asyncio.Future[CredentialRecord | None]]] = {}
        self._compiled: dict[tuple[str, ...], Blacklist] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0
        self.stale_served = 0
        self.store_errors = 0

    def get_cached(self, connection_id: str) -> CredentialRecord | None | object:
        """The fresh cached record (or None for a known-unknown id), else ``MISSING``."""
        entry = self._entries.get(connection_id)
        if entry is not None and entry[0] > time.monotonic():
            self.hits += 1
            return entry[1]
        return MISSING

    def expires_soon(self, connection_id: str, within: float) -> bool:
        """True when a cached *record* (not a negative entry) expires in less than ``within`` seconds
        and no read of it is under way: a caller may :meth:`refresh` it before sessions miss."""
        entry = self._entries.get(connection_id)
        return (entry is not None and entry[1] is not None and connection_id not in self._inflight
                and entry[0] - time.monotonic() < within)

    async def lookup(self, connection_id: str) -> CredentialRecord | None:
        """The record for ``connection_id`` (None if unknown), from cache or store."""
        cached = self.get_cached(connection_id)
        if cached is not MISSING:
            return cached  # type: ignore[return-value]
        return await self.refresh(connection_id)

    async def refresh(self, connection_id: str) -> CredentialRecord | None:
        """Read ``connection_id`` from the store now (sharing a read under way) and cache it."""
        running = self._inflight.get(connection_id)
        if running is not None and running[0] == self._generation:
            return await asyncio.shield(running[1])
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        generation = self._generation
        self._inflight[connection_id] = (generation, fut)
        try:
            stored = await self._fetch(connection_id)
            record = self._to_record(stored) if stored is not None else None
            # An invalidation that arrived while we were reading means this read may be stale.
            if generation == self._generation:
                self._entries[connection_id] = (time.monotonic() + self.ttl, record)
            fut.set_result(record)
            return record
        except Exception as exc:
            # Store unreachable: a record that was never invalidated is still the truth (nothing can
            # change it while the store is down), so serve it for up to ``stale_if_error``.
            self.store_errors += 1
            entry = self._entries.get(connection_id)
            if entry is not None and entry[0] + self.stale_if_error > time.monotonic():
                self.stale_served += 1
                fut.set_result(entry[1])
                return entry[1]
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            if self._inflight.get(connection_id, (0, None))[1] is fut:
                del self._inflight[connection_id]

    def _compile(self, entries: list[str]) -> Blacklist:
        key = tuple(sorted(entries))
        if not key:
            return Blacklist.EMPTY
        bl = self._compiled.get(key)
        if bl is None:
            if len(self._compiled) > 4096:
                self._compiled.clear()
            bl = self._compiled[key] = Blacklist.compile(key)
        return bl

    def _to_record(self, s: StoredCredential) -> CredentialRecord:
        lists = []
        for scope, entries in (("global", s.global_entries), ("device", s.device_entries),
                               ("connection", s.connection_entries)):
            if entries:
                lists.append((scope, self._compile(entries)))
        return CredentialRecord(s.connection_id, s.password_hash, s.device_id, tuple(lists), tuple(s.pool), s.is_pool,
                                s.limits, s.used_bytes)

    # -- invalidation -------------------------------------------------------------------------
    def invalidate(self, connection_id: str) -> None:
        self._generation += 1
        self._entries.pop(connection_id, None)

    def invalidate_device(self, device_id: str) -> None:
        self._generation += 1
        stale = [cid for cid, (_exp, rec) in self._entries.items()
                 if rec is not None and (rec.device_id == device_id or any(m[0] == device_id for m in rec.pool))]
        for cid in stale:
            del self._entries[cid]

    def invalidate_all(self) -> None:
        self._generation += 1
        self._entries.clear()

    def handle_event(self, event: str) -> None:
        """Apply one bus event: ``conn:<id>``, ``kill:<id>``, ``device:<id>``, ``global``, ``flush``."""
        ev = decode(event)
        if ev.kind is CONN or ev.kind is KILL:
            self.invalidate(ev.ident)
        elif ev.kind is DEVICE:
            self.invalidate_device(ev.ident)
        else:  # global, flush, or an event this node does not know: drop everything
            self.invalidate_all()
