"""The invalidation-bus event format: one encoder/decoder, and the SQL triggers speak the same strings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxyorch.bus_events import (
    CHANNEL,
    CONN,
    DEVICE,
    FLUSH,
    GLOBAL,
    KILL,
    BusEvent,
    EventKind,
    blacklist_changed,
    connection_changed,
    connection_killed,
    decode,
    encode,
)

CID = "0b0e6f9a-5a1c-4a43-9d0e-3c0f3f6f4c11"
MIGRATIONS = Path(__file__).resolve().parents[2] / "proxyorch" / "migrations"


def test_events_round_trip() -> None:
    for payload, event in [(f"conn:{CID}", BusEvent(CONN, CID)), (f"kill:{CID}", BusEvent(KILL, CID)),
                           (f"device:{CID}", BusEvent(DEVICE, CID)), ("global", BusEvent(GLOBAL)),
                           ("flush", BusEvent(FLUSH))]:
        assert decode(payload) == event
        assert encode(event.kind, event.ident or None) == payload


def test_producers_helpers() -> None:
    assert connection_changed(CID) == f"conn:{CID}" and connection_killed(CID) == f"kill:{CID}"
    assert blacklist_changed("global", None) == "global"
    assert blacklist_changed("device", CID) == f"device:{CID}"
    assert blacklist_changed("connection", CID) == f"conn:{CID}"
    with pytest.raises(ValueError):
        blacklist_changed("planet", CID)


@pytest.mark.parametrize(("kind", "ident"), [(CONN, None), (KILL, ""), (DEVICE, None), (GLOBAL, CID), (FLUSH, "x")])
def test_encode_refuses_a_missing_or_extra_id(kind: EventKind, ident: str | None) -> None:
    with pytest.raises(ValueError):
        encode(kind, ident)


@pytest.mark.parametrize("payload", ["", "conn", "kill:", "device:", "bogus:1", "global:1", "flush:now"])
def test_unknown_or_malformed_payloads_decode_to_no_kind(payload: str) -> None:
    assert decode(payload).kind is None


def test_sql_triggers_only_produce_known_events() -> None:
    """Every ``pg_notify`` on the bus channel in the migrations sends a payload this module decodes."""
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        for literal in re.findall(rf"pg_notify\('{CHANNEL}',\s*'([^']*)'", path.read_text()):
            found.append(literal)
    assert found, "no trigger payloads found: the pattern is out of date"
    for literal in found:
        if literal.endswith(":"):  # 'kind:' || id
            assert decode(literal + CID).kind is not None, literal
        else:
            assert decode(literal).kind is not None, literal
    assert {decode(lit + CID if lit.endswith(":") else lit).kind for lit in found} == {CONN, KILL, DEVICE, GLOBAL}
