"""Escrow arithmetic in integer cents, and the exact conversion to the ledger's decimal units.

The ledger keeps numeric(20, 6) units where 1 unit = 100 cents; ``Decimal(cents).scaleb(-2)`` is
exact, so no float is ever involved.
"""

from __future__ import annotations

from decimal import Decimal

PLATFORM_USER_ID = "00000000-0000-0000-0000-00000000fee0"  # created by migration 004


def units(cents: int) -> Decimal:
    """Ledger units of ``cents`` (exact)."""
    return Decimal(int(cents)).scaleb(-2)


def to_cents(amount: Decimal) -> int:
    """Whole cents of a ledger amount; raises ValueError when it has a fraction of a cent."""
    cents = Decimal(amount).scaleb(2)
    if cents != cents.to_integral_value():
        raise ValueError(f"{amount} is not a whole number of cents")
    return int(cents)


def place_cents(amount_cents: int, fee_bps: int) -> int:
    """What one tester place holds: ``round_half_up(amount × (10000 + fee) / 10000)`` cents."""
    return (amount_cents * (10000 + fee_bps) + 5000) // 10000


def escrow_cents(amount_cents: int, fee_bps: int, places: int) -> int:
    """The escrow of ``places`` places (300 at 30 % × 5 → 1950)."""
    return place_cents(amount_cents, fee_bps) * places
