"""The Pre-Delivery Quality Gate on real-looking deliveries: good work passes, thin, placeholder,
refusal, pasted-back and repetitive deliveries are rejected; the score is deterministic."""

from __future__ import annotations

from marketplace_api.quality_gate import key_terms, score_delivery, verdict_for

TITLE = "Summarize quarterly earnings report"
DESCRIPTION = ("Summarize the Q3 earnings report of Acme Corp: revenue, operating margin, guidance for the "
               "next quarter and the main risks management mentioned. Use headings and bullet points.")

GOOD = """## Quarterly Earnings Summary: Acme Corp Q3

Acme Corp reported revenue of $4.2 billion for the third quarter, up 15% year over year, driven by
strong subscription sales in North America and a recovery in hardware orders across Europe.

### Operating margin
- Operating margin widened to 18.4%, from 16.1% a year earlier.
- Cost of goods fell as a share of revenue after the supplier contracts were renegotiated.
- Marketing spend stayed flat, so most of the extra revenue reached the bottom line.

### Guidance for the next quarter
Management guided next-quarter revenue between $4.3 and $4.5 billion, slightly above consensus, and
expects the margin to hold near current levels while the new plant ramps up.

### Main risks
1. Currency swings: roughly a third of revenue is earned outside the United States.
2. Component shortages could delay the launch of the new product line.
3. A pending antitrust review in Europe may limit the planned acquisition.

Overall the report shows healthy growth with improving profitability, and the risks management
mentioned are mostly external rather than operational.
"""

THIN = "Revenue went up. Margin is fine."
PLACEHOLDER = GOOD.replace("Overall the report", "TODO: [insert conclusion here]. Overall the report")
REFUSAL = ("I'm sorry, but as an AI language model I cannot access the earnings report of Acme Corp, so I am "
           "unable to summarize revenue, operating margin, guidance or the main risks for the quarter.")
PASTED = (DESCRIPTION + "\n\n") * 4
REPEATED = "## Summary\n\n" + "Acme Corp revenue grew and the operating margin improved this quarter. " * 40


def test_good_delivery_passes():
    result = score_delivery(TITLE, DESCRIPTION, GOOD)
    assert result.verdict == "passed", result
    assert result.score > 0.65


def test_thin_delivery_is_rejected():
    result = score_delivery(TITLE, DESCRIPTION, THIN)
    assert result.verdict == "rejected", result
    assert result.checks["length"] < 0.2


def test_placeholder_text_is_rejected_even_in_a_good_answer():
    result = score_delivery(TITLE, DESCRIPTION, PLACEHOLDER)
    assert result.verdict == "rejected", result
    assert "penalty_placeholder" in result.checks


def test_refusal_is_rejected():
    result = score_delivery(TITLE, DESCRIPTION, REFUSAL)
    assert result.verdict == "rejected", result
    assert "penalty_refusal" in result.checks


def test_task_text_pasted_back_is_rejected():
    result = score_delivery(TITLE, DESCRIPTION, PASTED)
    assert result.verdict == "rejected", result
    assert "penalty_boilerplate" in result.checks


def test_repetition_scores_low_originality_and_is_not_a_clean_pass():
    result = score_delivery(TITLE, DESCRIPTION, REPEATED)
    assert result.checks["originality"] < 0.1
    assert result.verdict != "passed", result


def test_off_topic_but_well_written_delivery_does_not_pass_cleanly():
    off_topic = GOOD.replace("Acme Corp", "the team").replace("revenue", "the garden").replace(
        "margin", "hedge").replace("Revenue", "Garden").replace("guidance", "advice").replace(
        "Guidance", "Advice").replace("risks", "weeds").replace("Earnings", "Garden").replace(
        "quarter", "season").replace("Quarterly", "Seasonal").replace("report", "walk")
    result = score_delivery(TITLE, DESCRIPTION, off_topic)
    assert result.checks["coverage"] < 0.5
    assert result.verdict != "passed" and "penalty_off_topic" in result.checks, result


def test_score_is_deterministic_and_in_range():
    scores = {score_delivery(TITLE, DESCRIPTION, c).score for _ in range(3) for c in (GOOD,)}
    assert len(scores) == 1
    for content in (GOOD, THIN, PLACEHOLDER, REFUSAL, PASTED, REPEATED, "", "   "):
        assert 0.0 <= score_delivery(TITLE, DESCRIPTION, content).score <= 1.0


def test_verdict_thresholds_follow_the_seed():
    assert verdict_for(0.39) == "rejected"
    assert verdict_for(0.40) == "passed_with_warning"
    assert verdict_for(0.65) == "passed_with_warning"
    assert verdict_for(0.66) == "passed"


def test_key_terms_drop_stop_words_and_stem():
    terms = key_terms("Summarize earnings", "the reports and the earnings")
    assert "the" not in terms and "earn" in terms and "report" in terms


CODE_TITLE = "Write a Python function to deduplicate a list"
CODE_DESCRIPTION = ("Write a Python function that removes duplicate items from a list while preserving the original "
                    "order. Include type hints, a docstring and a few unit tests with pytest.")
CODE_GOOD = '''## Order-preserving deduplication

The function walks the list once and remembers what it has seen in a set, so it runs in linear time
and keeps the first occurrence of every item in its original order.

```python
from collections.abc import Hashable, Iterable


def dedupe(items: Iterable[Hashable]) -> list:
    """Return the items without duplicates, preserving the original order."""
    seen = set()
    result = []
    for item in items:
        if item not in seen:
            seen.add(item)
            result.append(item)
    return result
```

### Unit tests (pytest)
- `test_removes_duplicates`: `dedupe([1, 2, 1, 3, 2]) == [1, 2, 3]`
- `test_preserves_order`: `dedupe(["b", "a", "b"]) == ["b", "a"]`
- `test_empty_list`: `dedupe([]) == []`

Type hints use `Hashable` because items are stored in a set; unhashable items would need a slower
list-based check.
'''


def test_coding_task_good_answer_passes_and_a_stub_is_rejected():
    assert score_delivery(CODE_TITLE, CODE_DESCRIPTION, CODE_GOOD).verdict == "passed"
    stub = score_delivery(CODE_TITLE, CODE_DESCRIPTION, "def dedupe(x):\n    # TODO\n    pass\n")
    assert stub.verdict == "rejected" and "penalty_placeholder" in stub.checks
    one_liner = score_delivery(CODE_TITLE, CODE_DESCRIPTION, "def dedupe(x): return list(dict.fromkeys(x))")
    assert one_liner.verdict == "rejected"
