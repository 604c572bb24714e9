"""Which device of a connection's pool a new session uses (sans-I/O: the clock is passed in).

Each new session goes to a usable device of the pool with the fewest active sessions (ties: the
pool's order). A session with a sticky token (``-session-TOKEN`` in the username) goes to the
device the token is bound to while that device stays usable; the binding lasts while the token has
sessions and ``ttl`` seconds after its last one ended. ``-country-CC`` narrows the pool first.
On a cluster node the binding another node made (``hint``, from Redis) takes precedence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .username_params import RouteParams

Candidate = tuple[str, str | None]  # (device id, country)
PURGE_EVERY = 1024


@dataclass(slots=True)
class _Sticky:
    device_id: str
    active: int
    expires: float  # meaningful when active == 0
    ttl: float


@dataclass(frozen=True, slots=True)
class Lease:
    """One session's hold on a device; give it back with :meth:`PoolRouter.release`."""

    device_id: str
    sticky_key: tuple[str, str] | None = None


class PoolRouter:
    """Node-local session counts per device and the sticky-token bindings."""

    def __init__(self) -> None:
        self.load: Counter[str] = Counter()
        self._sticky: dict[tuple[str, str], _Sticky] = {}
        self._calls = 0

    def choose(self, connection_id: str, candidates: Sequence[Candidate], params: RouteParams,
               usable: Callable[[str], bool], now: float, busy: Callable[[str], bool] | None = None,
               hint: str | None = None) -> Lease | None:
        """A lease on the device for a new session, or None when no device of the pool is usable.

        ``busy`` devices (rotating their IP: a session there waits) are chosen freely only when no
        other member is usable; a sticky token keeps its busy device. ``hint``: the device the token
        is bound to cluster-wide (another node's binding), used when it is a usable member.
        """
        self._calls += 1
        if self._calls % PURGE_EVERY == 0:
            self.purge(now)
        if params.country is not None:
            candidates = [c for c in candidates if (c[1] or "").upper() == params.country]
        members = [c[0] for c in candidates]
        key = (connection_id, params.session) if params.session is not None else None
        if key is not None:
            bound = self._sticky.get(key)
            if hint is not None and hint in members and usable(hint) and (bound is None or bound.device_id != hint):
                bound = self._sticky[key] = _Sticky(hint, bound.active if bound is not None else 0,
                                                    now + params.ttl, params.ttl)
            if bound is not None and (bound.active > 0 or bound.expires > now) and bound.device_id in members \
                    and usable(bound.device_id):
                bound.active += 1
                bound.ttl = params.ttl
                self.load[bound.device_id] += 1
                return Lease(bound.device_id, key)
        best: str | None = None
        for pass_busy in (False, True):
            for device_id in members:
                if busy is not None and busy(device_id) is not pass_busy:
                    continue
                if usable(device_id) and (best is None or self.load[device_id] < self.load[best]):
                    best = device_id
            if best is not None or busy is None:
                break
        if best is None:
            return None
        self.load[best] += 1
        if key is not None:
            old = self._sticky.get(key)
            active = old.active if old is not None else 0  # sessions still on a device that went away
            self._sticky[key] = _Sticky(best, active + 1, 0.0, params.ttl)
        return Lease(best, key)

    def release(self, lease: Lease, now: float) -> float | None:
        """The session of ``lease`` ended; the binding's ttl when that left it without sessions."""
        n = self.load[lease.device_id] - 1
        if n > 0:
            self.load[lease.device_id] = n
        else:
            del self.load[lease.device_id]
        if lease.sticky_key is not None:
            bound = self._sticky.get(lease.sticky_key)
            if bound is not None and bound.active > 0:
                bound.active -= 1
                if bound.active == 0:
                    bound.expires = now + bound.ttl
                    return bound.ttl
        return None

    def bound_device(self, connection_id: str, token: str, now: float) -> str | None:
        """The device ``token`` is bound to right now (None: not bound or expired)."""
        bound = self._sticky.get((connection_id, token))
        if bound is None or (bound.active == 0 and bound.expires <= now):
            return None
        return bound.device_id

    def purge(self, now: float) -> None:
        """Forget bindings that expired (bounded memory)."""
        for key in [k for k, b in self._sticky.items() if b.active == 0 and b.expires <= now]:
            del self._sticky[key]

    def __len__(self) -> int:
        return len(self._sticky)
