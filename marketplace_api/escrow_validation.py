"""Validation of the escrow surface's bodies (pure: dicts in, normalised dicts or ``Invalid`` out).

Nested types the seed only names are defined here (and documented in ``escrow_openapi``):

- FeedbackQuestion ``{id, questionMarkdown, inputType, options?}``; ``inputType`` one of
  ``star_rating`` (answer: integer 1–5), ``text`` (non-empty string), ``single_choice`` (one of
  ``options``), ``multiple_choice`` (non-empty list of distinct ``options``), ``yes_no`` (boolean).
- PaymentRule ``{"type": "fixed", "amountCents": int > 0}`` — exactly one; other types are refused.
- Placement ``{"type": "new_tab" | "same_tab" | "iframe"}``.
- ScreenCaptureRule ``{"type": "screenshot" | "recording", "required": bool}``.
- AudienceFilter ``{"field", "values"}``: the tester's profile value (or one of its list values)
  for ``field`` must be one of ``values``.
- TechConstraint ``{"type": "os" | "browser" | "device", "values"}``: matched like an audience
  filter against the profile key of the same name.
- LegalAgreement ``{"title", "url"?, "textMarkdown"?}`` (a url or a text).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

INPUT_TYPES = ("star_rating", "text", "single_choice", "multiple_choice", "yes_no")
PLACEMENTS = ("new_tab", "same_tab", "iframe")
CAPTURES = ("screenshot", "recording")
TECH_TYPES = ("os", "browser", "device")
MIME_TYPES = ("text/plain", "text/markdown")
DISPUTE_FLAGS = ("lowQuality", "offTopic", "suspectedFraud", "incompleteWork", "platformIssue", "billingDiscrepancy")
DISPUTE_CATEGORIES = ("low_quality", "off_topic", "suspected_fraud", "incomplete_work", "other")
MAX_TESTERS = 10000
MAX_AMOUNT_CENTS = 100_000_000  # one million per place
MAX_TEXT = 20000
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_URL = re.compile(r"^https?://[^\s/$.?#][^\s]*$", re.IGNORECASE)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class Invalid(Exception):
    """Validation failed: ``details`` is a list of ``{field, message}``."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in details))
        self.details = details


class _Checker:
    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []

    def fail(self, field: str, message: str) -> None:
        self.errors.append({"field": field, "message": message})

    def text(self, obj: dict, key: str, path: str, required: bool, max_len: int = MAX_TEXT) -> str | None:
        value = obj.get(key)
        if value is None:
            if required:
                self.fail(path, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(path, "must be a non-empty string")
            return None
        if len(value) > max_len or "\x00" in value:
            self.fail(path, f"must be at most {max_len} characters without NUL")
            return None
        return value

    def integer(self, obj: dict, key: str, path: str, required: bool, lo: int, hi: int) -> int | None:
        value = obj.get(key)
        if value is None:
            if required:
                self.fail(path, "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(path, f"must be an integer between {lo} and {hi}")
            return None
        return value

    def boolean(self, obj: dict, key: str, path: str) -> bool | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, bool):
            self.fail(path, "must be a boolean")
            return None
        return value

    def array(self, obj: dict, key: str, path: str, required: bool, max_items: int = 100) -> list | None:
        value = obj.get(key)
        if value is None:
            if required:
                self.fail(path, "is required")
            return None
        if not isinstance(value, list) or len(value) > max_items:
            self.fail(path, f"must be an array of at most {max_items} items")
            return None
        return value

    def strings(self, value: Any, path: str, max_items: int = 100) -> list[str] | None:
        if (not isinstance(value, list) or not value or len(value) > max_items
                or not all(isinstance(v, str) and v.strip() and len(v) <= 200 for v in value)):
            self.fail(path, f"must be a non-empty array of at most {max_items} strings")
            return None
        return value

    def url(self, obj: dict, key: str, path: str) -> str | None:
        value = self.text(obj, key, path, False, 2048)
        if value is not None and not _URL.match(value):
            self.fail(path, "must be an http(s) URL")
            return None
        return value


def _question(c: _Checker, q: Any, path: str) -> dict | None:
    if not isinstance(q, dict):
        c.fail(path, "must be an object")
        return None
    out: dict[str, Any] = {}
    qid = q.get("id")
    if not isinstance(qid, str) or not _ID.match(qid):
        c.fail(f"{path}.id", "must be 1-64 characters of letters, digits, '_', '-', '.'")
    out["id"] = qid
    out["questionMarkdown"] = c.text(q, "questionMarkdown", f"{path}.questionMarkdown", True, 5000)
    kind = q.get("inputType")
    if kind not in INPUT_TYPES:
        c.fail(f"{path}.inputType", f"must be one of {', '.join(INPUT_TYPES)}")
    out["inputType"] = kind
    if kind in ("single_choice", "multiple_choice"):
        options = c.strings(q.get("options"), f"{path}.options", 50)
        if options is not None and len(set(options)) != len(options):
            c.fail(f"{path}.options", "must be distinct")
        if options is not None and len(options) < 2:
            c.fail(f"{path}.options", "needs at least 2 options")
        out["options"] = options
    elif q.get("options") is not None:
        c.fail(f"{path}.options", f"only choice questions have options, not {kind}")
    return out


def _filters(c: _Checker, items: list | None, path: str, key: str, kinds: tuple[str, ...] | None) -> list:
    out = []
    for i, f in enumerate(items or []):
        p = f"{path}[{i}]"
        if not isinstance(f, dict):
            c.fail(p, "must be an object")
            continue
        name = f.get(key)
        if kinds is not None and name not in kinds:
            c.fail(f"{p}.{key}", f"must be one of {', '.join(kinds)}")
        elif not isinstance(name, str) or not _ID.match(name):
            c.fail(f"{p}.{key}", "must be a profile field name")
        values = c.strings(f.get("values"), f"{p}.values")
        out.append({key: name, "values": values})
    return out


def _variant(c: _Checker, v: Any, path: str, target: int | None) -> dict | None:
    if not isinstance(v, dict):
        c.fail(path, "must be an object")
        return None
    out: dict[str, Any] = {"description": c.text(v, "description", f"{path}.description", True)}
    questions = c.array(v, "feedbackQuestions", f"{path}.feedbackQuestions", True, 50)
    if questions is not None and not questions:
        c.fail(f"{path}.feedbackQuestions", "needs at least one question")
    qs = [_question(c, q, f"{path}.feedbackQuestions[{i}]") for i, q in enumerate(questions or [])]
    ids = [q["id"] for q in qs if q and isinstance(q.get("id"), str)]
    if len(set(ids)) != len(ids):
        c.fail(f"{path}.feedbackQuestions", "question ids must be unique")
    out["feedbackQuestions"] = qs
    hi = target or MAX_TESTERS
    out["targetTestersMin"] = c.integer(v, "targetTestersMin", f"{path}.targetTestersMin", True, 0, hi)
    out["targetTestersMax"] = c.integer(v, "targetTestersMax", f"{path}.targetTestersMax", False, 1, hi)
    lo, mx = out["targetTestersMin"], out["targetTestersMax"]
    if lo is not None and mx is not None and mx < lo:
        c.fail(f"{path}.targetTestersMax", "must be at least targetTestersMin")
    out["url"] = c.url(v, "url", f"{path}.url")
    mime = v.get("descriptionMimeType")
    if mime is not None and mime not in MIME_TYPES:
        c.fail(f"{path}.descriptionMimeType", f"must be one of {', '.join(MIME_TYPES)}")
    out["descriptionMimeType"] = mime
    placement = v.get("placement")
    if placement is not None and (not isinstance(placement, dict) or placement.get("type") not in PLACEMENTS):
        c.fail(f"{path}.placement", f"must be {{\"type\": one of {', '.join(PLACEMENTS)}}}")
        placement = None
    out["placement"] = placement and {"type": placement["type"]}
    captures = []
    for i, s in enumerate(c.array(v, "screenCapture", f"{path}.screenCapture", False, 10) or []):
        p = f"{path}.screenCapture[{i}]"
        if not isinstance(s, dict) or s.get("type") not in CAPTURES:
            c.fail(p, f"must be {{\"type\": one of {', '.join(CAPTURES)}, \"required\": boolean}}")
            continue
        captures.append({"type": s["type"], "required": bool(c.boolean(s, "required", f"{p}.required"))})
    out["screenCapture"] = captures
    out["audienceFilters"] = _filters(c, c.array(v, "audienceFilters", f"{path}.audienceFilters", False, 20),
                                      f"{path}.audienceFilters", "field", None)
    out["techConstraints"] = _filters(c, c.array(v, "techConstraints", f"{path}.techConstraints", False, 20),
                                      f"{path}.techConstraints", "type", TECH_TYPES)
    return out


def parse_iso(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else None


def validate_job(body: dict) -> dict:
    """The normalised job of a ``POST /jobs`` body, or ``Invalid`` listing every bad field."""
    c = _Checker()
    job: dict[str, Any] = {"title": c.text(body, "title", "title", True, 200),
                           "category": c.text(body, "category", "category", True, 100)}
    target = c.integer(body, "targetTesters", "targetTesters", True, 1, MAX_TESTERS)
    job["targetTesters"] = target
    job["jobPostingTimeLimitMinutes"] = c.integer(body, "jobPostingTimeLimitMinutes",
                                                  "jobPostingTimeLimitMinutes", True, 5, 10080)
    rules = c.array(body, "paymentRules", "paymentRules", True, 10)
    job["amountCents"] = None
    if rules is not None:
        if len(rules) != 1:
            c.fail("paymentRules", "must hold exactly one rule")
        for i, rule in enumerate(rules[:1]):
            if not isinstance(rule, dict) or rule.get("type") != "fixed":
                c.fail(f"paymentRules[{i}].type", "only {\"type\": \"fixed\"} is supported")
                continue
            job["amountCents"] = c.integer(rule, "amountCents", f"paymentRules[{i}].amountCents", True,
                                           1, MAX_AMOUNT_CENTS)
    variants = c.array(body, "variants", "variants", True, 20)
    if variants is not None and not variants:
        c.fail("variants", "needs at least one variant")
    job["variants"] = [_variant(c, v, f"variants[{i}]", target) for i, v in enumerate(variants or [])]
    mins = [v["targetTestersMin"] for v in job["variants"] if v and isinstance(v.get("targetTestersMin"), int)]
    if target is not None and sum(mins) > target:
        c.fail("variants", "targetTestersMin of the variants sum to more than targetTesters")
    job["description"] = c.text(body, "description", "description", False)
    mime = body.get("descriptionMimeType")
    if mime is not None and mime not in MIME_TYPES:
        c.fail("descriptionMimeType", f"must be one of {', '.join(MIME_TYPES)}")
    job["descriptionMimeType"] = mime
    project = body.get("projectId")
    if project is not None and (not isinstance(project, str) or not _UUID.match(project)):
        c.fail("projectId", "must be a UUID")
    job["projectId"] = project
    job["projectTestersOnly"] = c.boolean(body, "projectTestersOnly", "projectTestersOnly")
    starts = body.get("startsAt")
    job["startsAt"] = None
    if starts is not None:
        job["startsAt"] = parse_iso(starts)
        if job["startsAt"] is None:
            c.fail("startsAt", "must be an ISO 8601 date-time with a time zone")
    job["taskHardTimeLimitMinutes"] = c.integer(body, "taskHardTimeLimitMinutes", "taskHardTimeLimitMinutes",
                                                False, 1, 10080) or 30
    job["taskPaidTimeLimitMinutes"] = c.integer(body, "taskPaidTimeLimitMinutes", "taskPaidTimeLimitMinutes",
                                                False, 1, 10080)
    agreements = []
    for i, a in enumerate(c.array(body, "legalAgreements", "legalAgreements", False, 10) or []):
        p = f"legalAgreements[{i}]"
        if not isinstance(a, dict):
            c.fail(p, "must be an object")
            continue
        item = {"title": c.text(a, "title", f"{p}.title", True, 200), "url": c.url(a, "url", f"{p}.url"),
                "textMarkdown": c.text(a, "textMarkdown", f"{p}.textMarkdown", False)}
        if item["url"] is None and item["textMarkdown"] is None:
            c.fail(p, "needs a url or a textMarkdown")
        agreements.append(item)
    job["legalAgreements"] = agreements
    proof = body.get("proofOfCompletion")
    job["password"] = None
    if proof is not None:
        if not isinstance(proof, dict) or proof.get("method") != "password":
            c.fail("proofOfCompletion.method", "only \"password\" is supported")
        else:
            job["password"] = c.text(proof, "password", "proofOfCompletion.password", True, 200)
    if c.errors:
        raise Invalid(c.errors)
    return job


def validate_answers(questions: list[dict], answers: Any) -> dict:
    """The answers of a submit, checked against the variant's questions (every one answered)."""
    c = _Checker()
    if not isinstance(answers, dict):
        raise Invalid([{"field": "answers", "message": "must be an object of question id to answer"}])
    known = {q["id"] for q in questions}
    for key in answers:
        if key not in known:
            c.fail(f"answers.{key}", "is not a question of this task")
    out: dict[str, Any] = {}
    for q in questions:
        qid, kind, path = q["id"], q["inputType"], f"answers.{q['id']}"
        if qid not in answers or answers[qid] is None:
            c.fail(path, "is required")
            continue
        value = answers[qid]
        if kind == "star_rating":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
                c.fail(path, "must be an integer from 1 to 5")
                continue
        elif kind == "text":
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT or "\x00" in value:
                c.fail(path, f"must be a non-empty string of at most {MAX_TEXT} characters")
                continue
        elif kind == "single_choice":
            if value not in q["options"] or not isinstance(value, str):
                c.fail(path, "must be one of the options")
                continue
        elif kind == "multiple_choice":
            if (not isinstance(value, list) or not value or len(set(map(str, value))) != len(value)
                    or not all(isinstance(v, str) and v in q["options"] for v in value)):
                c.fail(path, "must be a non-empty list of distinct options")
                continue
        elif kind == "yes_no" and not isinstance(value, bool):
            c.fail(path, "must be a boolean")
            continue
        out[qid] = value
    if c.errors:
        raise Invalid(c.errors)
    return out


def validate_profile(body: dict) -> dict:
    """A tester profile: up to 30 fields, each a string or a list of strings (e.g. country, languages)."""
    c = _Checker()
    if len(body) > 30:
        c.fail("profile", "has more than 30 fields")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if not _ID.match(key):
            c.fail(key, "is not a valid field name")
        elif isinstance(value, str) and value.strip() and len(value) <= 200 and "\x00" not in value:
            out[key] = value
        elif isinstance(value, list) and c.strings(value, key, 50) is not None:
            out[key] = value
        elif not isinstance(value, list):
            c.fail(key, "must be a string or an array of strings")
    if c.errors:
        raise Invalid(c.errors)
    return out


def matches(filters: list[dict], key: str, profile: dict) -> bool:
    """Whether a profile passes every filter (``key`` names the filter's field: field or type)."""
    for f in filters:
        have = profile.get(f[key])
        have_set = set(have) if isinstance(have, list) else {have}
        if not have_set & set(f["values"]):
            return False
    return True


def variant_accepts(spec: dict, profile: dict) -> bool:
    return (matches(spec.get("audienceFilters") or [], "field", profile)
            and matches(spec.get("techConstraints") or [], "type", profile))


def validate_dispute(body: dict) -> dict:
    """A dispute: flags, the required descriptions, and per-tester entries."""
    c = _Checker()
    out: dict[str, Any] = {}
    for flag in DISPUTE_FLAGS:
        out[flag] = bool(c.boolean(body, flag, flag))
    for flag, key in (("platformIssue", "platformIssueDescription"),
                      ("billingDiscrepancy", "billingDiscrepancyDescription")):
        out[key] = c.text(body, key, key, out[flag], 5000)
    testers = []
    seen: set[str] = set()
    for i, t in enumerate(c.array(body, "testers", "testers", False, MAX_TESTERS) or []):
        p = f"testers[{i}]"
        if not isinstance(t, dict):
            c.fail(p, "must be an object")
            continue
        uid = t.get("testerUserId")
        if not isinstance(uid, str) or not _UUID.match(uid):
            c.fail(f"{p}.testerUserId", "must be the tester's user id")
            continue
        if uid.lower() in seen:
            c.fail(f"{p}.testerUserId", "is listed twice")
        seen.add(uid.lower())
        category = t.get("category")
        if category is not None and category not in DISPUTE_CATEGORIES:
            c.fail(f"{p}.category", f"must be one of {', '.join(DISPUTE_CATEGORIES)}")
        testers.append({"testerUserId": uid.lower(), "category": category,
                        "description": c.text(t, "description", f"{p}.description", False, 5000)})
    out["testers"] = testers
    if not any(out[f] for f in DISPUTE_FLAGS) and not testers:
        c.fail("dispute", "give at least one reason flag or one tester")
    if c.errors:
        raise Invalid(c.errors)
    return out


def validate_resolution(body: dict) -> list[dict]:
    c = _Checker()
    out = []
    items = c.array(body, "testers", "testers", True, MAX_TESTERS)
    for i, t in enumerate(items or []):
        p = f"testers[{i}]"
        uid = t.get("testerUserId") if isinstance(t, dict) else None
        if not isinstance(uid, str) or not _UUID.match(uid):
            c.fail(f"{p}.testerUserId", "must be the tester's user id")
            continue
        if t.get("resolution") not in ("pay", "refund"):
            c.fail(f"{p}.resolution", "must be \"pay\" or \"refund\"")
            continue
        out.append({"testerUserId": uid.lower(), "resolution": t["resolution"]})
    if len({t["testerUserId"] for t in out}) != len(out):
        c.fail("testers", "a tester is listed twice")
    if c.errors:
        raise Invalid(c.errors)
    return out
