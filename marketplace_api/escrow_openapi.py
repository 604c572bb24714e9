"""OpenAPI schemas of the escrow surface (seed 002), including the nested types the seed only names.

``OPERATIONS`` maps a handler name to its request body and success answer (``$ref`` names into
``SCHEMAS``); ``routes_escrow`` attaches them to the handlers for ``openapi.build_document``.
"""

from __future__ import annotations

from .escrow_validation import (
    CAPTURES,
    DISPUTE_CATEGORIES,
    DISPUTE_FLAGS,
    INPUT_TYPES,
    PLACEMENTS,
    TECH_TYPES,
)

S = "string"
I = "integer"  # noqa: E741
B = "boolean"


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict, required: tuple[str, ...] = ()) -> dict:
    out: dict = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


STR, INT, BOOL, TIME = {"type": S}, {"type": I}, {"type": B}, {"type": S, "format": "date-time"}

SCHEMAS: dict[str, dict] = {
    "EscrowError": obj({"ok": {"const": False}, "error": obj({
        "code": {"type": S, "enum": ["BAD_REQUEST", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "CONFLICT",
                                     "INSUFFICIENT_FUNDS", "METHOD_NOT_ALLOWED", "INTERNAL"]},
        "message": STR, "details": arr(obj({"field": STR, "message": STR}))}, ("code", "message"))},
        ("ok", "error")),
    "FeedbackQuestion": {**obj({
        "id": {"type": S, "pattern": "^[A-Za-z0-9_.-]{1,64}$", "description": "unique within the variant"},
        "questionMarkdown": STR, "inputType": {"type": S, "enum": list(INPUT_TYPES)},
        "options": {**arr(STR), "minItems": 2, "description": "single_choice / multiple_choice only"}},
        ("id", "questionMarkdown", "inputType")),
        "description": "Answers: star_rating integer 1-5, text non-empty string, single_choice one option, "
                       "multiple_choice non-empty list of distinct options, yes_no boolean."},
    "PaymentRule": obj({"type": {"const": "fixed"}, "amountCents": {"type": I, "minimum": 1}}, ("type", "amountCents")),
    "Placement": obj({"type": {"type": S, "enum": list(PLACEMENTS)}}, ("type",)),
    "ScreenCaptureRule": obj({"type": {"type": S, "enum": list(CAPTURES)}, "required": BOOL}, ("type",)),
    "AudienceFilter": {**obj({"field": STR, "values": arr(STR)}, ("field", "values")),
                       "description": "The tester's profile value for `field` (or one of its values) must be in "
                                      "`values`; the profile is set with PUT /tester/profile."},
    "TechConstraint": {**obj({"type": {"type": S, "enum": list(TECH_TYPES)}, "values": arr(STR)}, ("type", "values")),
                       "description": "Matched like an AudienceFilter against the profile key named by `type`."},
    "LegalAgreement": obj({"title": STR, "url": {"type": S, "format": "uri"}, "textMarkdown": STR}, ("title",)),
    "ProofOfCompletion": obj({"method": {"const": "password"}, "password": STR}, ("method", "password")),
    "Variant": obj({"description": STR, "feedbackQuestions": {**arr(ref("FeedbackQuestion")), "minItems": 1},
                    "targetTestersMin": {"type": I, "minimum": 0}, "targetTestersMax": {"type": I, "minimum": 1},
                    "url": {"type": S, "format": "uri"}, "descriptionMimeType": {"enum": ["text/plain", "text/markdown"]},
                    "placement": ref("Placement"), "screenCapture": arr(ref("ScreenCaptureRule")),
                    "audienceFilters": arr(ref("AudienceFilter")), "techConstraints": arr(ref("TechConstraint"))},
                   ("description", "feedbackQuestions", "targetTestersMin")),
    "CreateJob": obj({"title": STR, "targetTesters": {"type": I, "minimum": 1}, "category": STR,
                      "jobPostingTimeLimitMinutes": {"type": I, "minimum": 5, "maximum": 10080},
                      "paymentRules": {**arr(ref("PaymentRule")), "minItems": 1, "maxItems": 1},
                      "variants": {**arr(ref("Variant")), "minItems": 1}, "description": STR,
                      "descriptionMimeType": {"enum": ["text/plain", "text/markdown"]},
                      "projectId": {"type": S, "format": "uuid"}, "projectTestersOnly": BOOL, "startsAt": TIME,
                      "taskHardTimeLimitMinutes": {"type": I, "default": 30}, "taskPaidTimeLimitMinutes": INT,
                      "legalAgreements": arr(ref("LegalAgreement")), "proofOfCompletion": ref("ProofOfCompletion")},
                     ("title", "targetTesters", "category", "jobPostingTimeLimitMinutes", "paymentRules", "variants")),
    "JobCreated": obj({"id": STR, "status": {"enum": ["active", "scheduled"]}, "title": STR,
                       "escrowHoldCents": INT, "createdAt": TIME}),
    "JobSummary": obj({"id": STR, "title": STR, "status": STR, "targetTesters": INT, "escrowHoldCents": INT,
                       "settlementStatus": STR, "createdAt": TIME}),
    "JobPage": obj({"data": arr(ref("JobSummary")), "next": {"type": [S, "null"]}}),
    "CompletedAssignment": obj({"testerId": STR, "status": STR, "durationMinutes": INT, "feedbackData": obj({
        "_meta": obj({"source": {"const": "tester_input"}, "untrusted": {"const": True}}), "answers": {"type": "object"}})}),
    "VariantProgress": obj({"id": STR, "assignmentCount": INT, "completedCount": INT,
                            "completedAssignments": arr(ref("CompletedAssignment"))}),
    "JobDetails": obj({"id": STR, "title": STR, "status": STR, "description": STR, "targetTesters": INT,
                       "escrowHoldCents": INT, "settlementStatus": STR, "variants": arr(ref("VariantProgress"))}),
    "JobStatus": obj({"id": STR, "status": STR}),
    "Settlement": obj({"ok": BOOL, "cancelled": BOOL, "settlementStatus": STR, "settlementDeadline": {"type": [S, "null"]}}),
    "SettlementStatus": obj({"ok": BOOL, "settlementStatus": STR}),
    "Dispute": obj({**{f: BOOL for f in DISPUTE_FLAGS}, "platformIssueDescription": STR,
                    "billingDiscrepancyDescription": STR,
                    "testers": arr(obj({"testerUserId": STR, "category": {"enum": list(DISPUTE_CATEGORIES)},
                                        "description": STR}, ("testerUserId",)))}),
    "Resize": obj({"targetTesters": {"type": I, "minimum": 1}}, ("targetTesters",)),
    "Resized": obj({"previousTargetTesters": INT, "newTargetTesters": INT, "previousEscrowHoldCents": INT,
                    "newEscrowHoldCents": INT, "escrowDeltaCents": INT}),
    "OpenJobPage": obj({"data": arr(obj({"id": STR, "title": STR, "category": STR, "openPlaces": INT,
                                         "amountCents": INT, "createdAt": TIME})), "next": {"type": [S, "null"]}}),
    "Assignment": obj({"assignmentId": STR, "jobId": STR, "variantId": STR, "description": STR, "url": STR,
                       "feedbackQuestions": arr(ref("FeedbackQuestion")), "expiresAt": TIME}),
    "Submit": obj({"answers": {"type": "object", "description": "question id → answer"}, "password": STR},
                  ("answers",)),
    "AssignmentState": obj({"assignmentId": STR, "jobId": STR, "variantId": STR, "status": STR,
                            "durationMinutes": INT, "answers": {"type": "object"}}),
    "TesterProfile": {"type": "object", "additionalProperties": {"oneOf": [STR, arr(STR)]},
                      "description": "e.g. {\"country\": \"DE\", \"languages\": [\"de\", \"en\"]}"},
    "Resolution": obj({"testers": arr(obj({"testerUserId": STR, "resolution": {"enum": ["pay", "refund"]}},
                                          ("testerUserId", "resolution")))}, ("testers",)),
}

# handler name → (request schema or None, success status, answer schema)
OPERATIONS: dict[str, tuple[str | None, str, str]] = {
    "create_job": ("CreateJob", "201", "JobCreated"), "list_jobs": (None, "200", "JobPage"),
    "get_job": (None, "200", "JobDetails"), "pause_job": (None, "200", "JobStatus"),
    "resume_job": (None, "200", "JobStatus"), "stop_job": (None, "200", "JobStatus"),
    "settle_job": (None, "200", "Settlement"), "approve_job": (None, "200", "SettlementStatus"),
    "dispute_job": ("Dispute", "200", "SettlementStatus"), "resize_job": ("Resize", "200", "Resized"),
    "open_jobs": (None, "200", "OpenJobPage"), "take_place": (None, "201", "Assignment"),
    "submit_assignment": ("Submit", "200", "AssignmentState"), "abandon_assignment": (None, "200", "AssignmentState"),
    "put_profile": ("TesterProfile", "200", "TesterProfile"), "resolve_dispute": ("Resolution", "200", "SettlementStatus"),
}


def operation(name: str) -> dict:
    """The OpenAPI operation fragment (requestBody, responses) of one escrow handler."""
    request, status, answer = OPERATIONS[name]
    err = {"content": {"application/json": {"schema": ref("EscrowError")}}}
    op: dict = {"responses": {status: {"description": "OK", "content": {"application/json": {"schema": ref(answer)}}},
                              "400": {"description": "Bad request", **err},
                              "401": {"description": "Unauthorized", **err},
                              "404": {"description": "Not found", **err},
                              "409": {"description": "Not allowed in the current state", **err}}}
    if request:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
    return op
