"""Pure rules of the escrow surface: escrow arithmetic, cents ↔ ledger units, validation, matching, cursors."""

from __future__ import annotations

from decimal import Decimal

import pytest

from marketplace_api.escrow_http import EscrowError, decode_cursor, encode_cursor
from marketplace_api.escrow_money import escrow_cents, place_cents, to_cents, units
from marketplace_api.escrow_validation import (
    Invalid,
    validate_answers,
    validate_dispute,
    validate_job,
    variant_accepts,
)

JOB = {"title": "t", "targetTesters": 5, "category": "c", "jobPostingTimeLimitMinutes": 60,
       "paymentRules": [{"type": "fixed", "amountCents": 300}],
       "variants": [{"description": "d", "targetTestersMin": 5,
                     "feedbackQuestions": [{"id": "r", "questionMarkdown": "q", "inputType": "star_rating"}]}]}


def test_seed_escrow_figures_at_thirty_percent():
    assert escrow_cents(300, 3000, 5) == 1950
    assert escrow_cents(500, 3000, 5) == 3250
    assert escrow_cents(500, 3000, 10) == 6500
    assert place_cents(5, 3000) == 7  # 6.5 rounds half up
    assert place_cents(1, 0) == 1 and place_cents(333, 3000) == 433


def test_cents_and_ledger_units_convert_exactly():
    assert units(1950) == Decimal("19.50") and units(1) == Decimal("0.01")
    assert to_cents(Decimal("19.500000")) == 1950
    with pytest.raises(ValueError):
        to_cents(Decimal("0.001"))


def test_job_validation_lists_every_bad_field():
    assert validate_job(JOB)["amountCents"] == 300
    with pytest.raises(Invalid) as exc:
        validate_job({**JOB, "title": "", "jobPostingTimeLimitMinutes": 3, "variants": [
            {"description": "d", "targetTestersMin": 9, "feedbackQuestions": [
                {"id": "a", "questionMarkdown": "q", "inputType": "star_rating"},
                {"id": "a", "questionMarkdown": "q", "inputType": "multiple_choice", "options": ["x"]}]}]})
    fields = {d["field"] for d in exc.value.details}
    assert {"title", "jobPostingTimeLimitMinutes", "variants[0].targetTestersMin",
            "variants[0].feedbackQuestions", "variants[0].feedbackQuestions[1].options"} <= fields


def test_answers_by_input_type():
    qs = [{"id": "s", "inputType": "star_rating"}, {"id": "y", "inputType": "yes_no"},
          {"id": "m", "inputType": "multiple_choice", "options": ["a", "b"]}]
    assert validate_answers(qs, {"s": 1, "y": False, "m": ["b"]}) == {"s": 1, "y": False, "m": ["b"]}
    for bad in ({"s": True, "y": False, "m": ["a"]}, {"s": 0, "y": False, "m": ["a"]},
                {"s": 3, "y": 1, "m": ["a"]}, {"s": 3, "y": True, "m": []}, {"s": 3, "y": True}):
        with pytest.raises(Invalid):
            validate_answers(qs, bad)


def test_audience_filters_and_tech_constraints_match_profiles():
    spec = {"audienceFilters": [{"field": "languages", "values": ["de"]}],
            "techConstraints": [{"type": "os", "values": ["android"]}]}
    assert variant_accepts(spec, {"languages": ["en", "de"], "os": "android"})
    assert not variant_accepts(spec, {"languages": ["en"], "os": "android"})
    assert not variant_accepts(spec, {"languages": ["de"]})
    assert variant_accepts({}, {})


def test_dispute_descriptions_required_with_their_flags():
    with pytest.raises(Invalid):
        validate_dispute({"platformIssue": True})
    assert validate_dispute({"platformIssue": True, "platformIssueDescription": "x"})["platformIssue"] is True
    with pytest.raises(Invalid):
        validate_dispute({})


def test_cursor_round_trip_and_garbage():
    assert decode_cursor(encode_cursor(42)) == 42 and decode_cursor(None) is None
    for bad in ("!!", "bm9wZQ", encode_cursor(1) + "x"):
        with pytest.raises(EscrowError):
            decode_cursor(bad)
