"""The Pre-Delivery Quality Gate (PDQG): a deterministic 0-1 score of a delivery against its task.

Pure function, no I/O, no model: the same task and content always give the same score. It measures

- **length** (weight 0.25): words of the delivery against a target that grows with the task's
  description (``clamp(2 x description words, 60, 400)``); full marks at the target, linear below;
- **structure** (0.15): paragraphs, headings, list items, sentences of a sensible length;
- **coverage** (0.35): the share of the task's key terms (title and description words of 4+
  letters, stop words dropped, crude suffix stemming) that the delivery uses;
- **originality** (0.25): distinct word trigrams over all trigrams; copy-pasted lines and the same
  sentence over and over score low (and a few words cannot earn full marks).

Then penalties multiply the sum: **off-topic** (coverage below 0.5) x coverage/0.5, **placeholder** text (lorem ipsum, TODO, TBD, ``[insert ...]``,
``<your ... here>``) x0.35, **refusal** text ("as an AI language model", "I cannot help") x0.25,
**boilerplate** (the task text pasted back as the answer: >60% of its words copied in order) x0.5.
Verdicts: below 0.40 ``rejected``, 0.40-0.65 ``passed_with_warning``, above 0.65 ``passed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

REJECT_BELOW = 0.40
WARN_UP_TO = 0.65
WEIGHTS = {"length": 0.25, "structure": 0.15, "coverage": 0.35, "originality": 0.25}

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOP = frozenset("""
a about above after again against all also and any are because been before being below between both but
by can could did does doing down during each few for from further had has have having here how into its
itself just more most must need needs other our ours out over own please same should some such than that
the their theirs them then there these they this those through under until very want what when where which
while who whom why will with within without would your yours you make sure give write provide using based
task each like well into onto upon only
""".split())
_PLACEHOLDER = re.compile(r"lorem ipsum|\btodo\b|\btbd\b|\[insert[^\]]*\]|<\s*your [^>]*>|\bplaceholder\b|"
                          r"\bfill (?:this|me) in\b|\bxxx+\b|\bcoming soon\b", re.I)
_REFUSAL = re.compile(r"as an ai(?: language model)?|i(?:'m| am) (?:unable|not able) to|i can(?:not|'t) "
                      r"(?:help|assist|complete|do that)|i(?:'m| am) sorry,? but|i do not have access", re.I)


@dataclass(frozen=True)
class GateResult:
    score: float
    verdict: str
    checks: dict[str, float] = field(default_factory=dict)


def _stem(word: str) -> str:
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "es", "ly", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def key_terms(title: str, description: str) -> set[str]:
    """Stemmed content words of the task (4+ letters, not stop words, not numbers)."""
    return {_stem(w) for w in words(f"{title} {description}") if len(w) >= 4 and w not in _STOP
            and not w.isdigit()}


def verdict_for(score: float) -> str:
    if score < REJECT_BELOW:
        return "rejected"
    if score <= WARN_UP_TO:
        return "passed_with_warning"
    return "passed"


def _structure(content: str, n_words: int) -> float:
    lines = [ln.strip() for ln in content.splitlines() if ln.strip()]
    paragraphs = [p for p in re.split(r"\n\s*\n", content) if p.strip()]
    headings = sum(1 for ln in lines if ln.startswith("#") or (ln.endswith(":") and len(ln) < 80))
    items = sum(1 for ln in lines if re.match(r"^(?:[-*\u2022]|\d+[.)])\s+", ln))
    sentences = [s for s in re.split(r"[.!?]+(?:\s|$)", content) if len(words(s)) >= 3]
    avg = n_words / len(sentences) if sentences else 0.0
    score = 0.0
    score += 0.35 if len(paragraphs) >= 2 else 0.0
    score += 0.25 if headings else 0.0
    score += 0.2 if items >= 2 else 0.0
    score += 0.2 if 6 <= avg <= 35 else (0.1 if sentences else 0.0)
    return min(score, 1.0)


def _originality(tokens: list[str]) -> float:
    if len(tokens) < 3:
        return 0.0 if not tokens else 0.5
    trigrams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    ratio = len(set(trigrams)) / len(trigrams)
    # 0.3 distinct → 0, 0.9+ distinct → 1; a few words are too little evidence for full marks
    return max(0.0, min(1.0, (ratio - 0.3) / 0.6)) * min(1.0, len(tokens) / 40)


def _copied_share(task_tokens: list[str], tokens: list[str]) -> float:
    """Share of the delivery's trigrams taken from the task text."""
    if len(tokens) < 3 or len(task_tokens) < 3:
        return 0.0
    task_grams = {tuple(task_tokens[i:i + 3]) for i in range(len(task_tokens) - 2)}
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    return sum(1 for g in grams if g in task_grams) / len(grams)


def score_delivery(title: str, description: str, content: str) -> GateResult:
    """Score ``content`` as the answer to the task ``title``/``description``."""
    tokens = words(content)
    n = len(tokens)
    target = max(60, min(400, 2 * len(words(description))))
    length = min(1.0, n / target)
    terms = key_terms(title, description)
    used = {_stem(w) for w in tokens}
    coverage = len(terms & used) / len(terms) if terms else 1.0
    checks = {"length": round(length, 4), "structure": round(_structure(content, n), 4),
              "coverage": round(coverage, 4), "originality": round(_originality(tokens), 4)}
    score = sum(WEIGHTS[k] * v for k, v in checks.items())
    penalties = {}
    if coverage < 0.5:  # off-topic: well-written text about something else is not an answer
        penalties["off_topic"] = round(max(coverage, 0.1) / 0.5, 4)
    if _PLACEHOLDER.search(content):
        penalties["placeholder"] = 0.35
    if _REFUSAL.search(content):
        penalties["refusal"] = 0.25
    if _copied_share(words(f"{title} {description}"), tokens) > 0.6:
        penalties["boilerplate"] = 0.5
    for factor in penalties.values():
        score *= factor
    score = round(max(0.0, min(1.0, score)), 4)
    return GateResult(score, verdict_for(score), {**checks, **{f"penalty_{k}": v for k, v in penalties.items()}})
