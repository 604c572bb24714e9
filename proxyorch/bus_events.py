"""The invalidation-bus event format, defined once: every producer encodes, every consumer decodes here.

An event is a short string, ``<kind>`` or ``<kind>:<id>``:

=============== ===============================================================================
``conn:<id>``    a connection's credential, device or connection blacklist changed
``kill:<id>``    a connection was deleted or dissociated: also terminate its live sessions
``device:<id>``  a device's blacklist changed (every connection routed through it)
``global``       the global blacklist changed
``flush``        the bus reconnected and may have missed events: drop everything cached
=============== ===============================================================================

The PostgreSQL triggers of ``proxyorch/migrations/001_core.sql`` produce the same strings with
``pg_notify('proxy_invalidate', …)``; ``tests/unit/test_bus_events.py`` checks they only use these
kinds. A payload this module does not know decodes to kind ``None`` (consumers treat it as a flush).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "CHANNEL",
    "CONN",
    "DEVICE",
    "FLUSH",
    "GLOBAL",
    "KILL",
    "BusEvent",
    "EventKind",
    "blacklist_changed",
    "connection_changed",
    "connection_killed",
    "decode",
    "encode",
]


# The PostgreSQL NOTIFY channel (and Redis pub/sub channel suffix) the events travel on.
CHANNEL = "proxy_invalidate"


class EventKind(StrEnum):
    CONN = "conn"
    KILL = "kill"
    DEVICE = "device"
    GLOBAL = "global"
    FLUSH = "flush"


CONN, KILL, DEVICE, GLOBAL, FLUSH = EventKind.CONN, EventKind.KILL, EventKind.DEVICE, EventKind.GLOBAL, EventKind.FLUSH
_WITH_ID = frozenset({CONN, KILL, DEVICE})


@dataclass(frozen=True, slots=True)
class BusEvent:
    """A decoded event; ``ident`` is the connection or device id ("" for ``global``/``flush``)."""

    kind: EventKind | None
    ident: str = ""


def encode(kind: EventKind, ident: object = None) -> str:
    """The payload of an event; ``conn``, ``kill`` and ``device`` need an id, the others take none."""
    if kind in _WITH_ID:
        if ident is None or str(ident) == "":
            raise ValueError(f"bus event {kind} needs an id")
        return f"{kind}:{ident}"
    if ident is not None:
        raise ValueError(f"bus event {kind} takes no id")
    return str(kind)


def decode(payload: str) -> BusEvent:
    """Parse a payload (never raises): unknown kinds and id-less ``conn``/``kill``/``device`` give kind None."""
    name, _, ident = payload.partition(":")
    try:
        kind = EventKind(name)
    except ValueError:
        return BusEvent(None, ident)
    if (kind in _WITH_ID) != bool(ident):
        return BusEvent(None, ident)
    return BusEvent(kind, ident)


def connection_changed(connection_id: object) -> str:
    """``conn:<id>``."""
    return encode(CONN, connection_id)


def connection_killed(connection_id: object) -> str:
    """``kill:<id>``."""
    return encode(KILL, connection_id)


def blacklist_changed(scope: str, scope_id: object) -> str:
    """The event for a change of the ``global``, ``device`` or ``connection`` blacklist."""
    if scope == "global":
        return encode(GLOBAL)
    if scope == "device":
        return encode(DEVICE, scope_id)
    if scope == "connection":
        return encode(CONN, scope_id)
    raise ValueError(f"unknown blacklist scope {scope!r}")
