"""The automations' ``IInputSchema`` (``{fields: [{name, type, required, min, max}]}``).

``check_schema`` validates a schema definition; ``validate`` checks a value against one and returns
field-level messages (empty list = valid). ``min``/``max`` bound numbers by value and strings and
arrays by length. Keys the schema does not list are allowed (buckets carry extra state).
"""

from __future__ import annotations

from typing import Any

TYPES = ("string", "number", "integer", "boolean", "object", "array")


def check_schema(schema: Any, label: str) -> list[str]:
    """Problems with a schema definition; ``None`` is a valid "no schema"."""
    if schema is None:
        return []
    if not isinstance(schema, dict) or not isinstance(schema.get("fields"), list):
        return [f"{label} must be an object with a 'fields' array"]
    errors: list[str] = []
    seen: set[str] = set()
    for i, field in enumerate(schema["fields"]):
        where = f"{label}.fields[{i}]"
        if not isinstance(field, dict):
            errors.append(f"{where} must be an object")
            continue
        name = field.get("name")
        if not isinstance(name, str) or not name:
            errors.append(f"{where}.name must be a non-empty string")
        elif name in seen:
            errors.append(f"{where}.name '{name}' is duplicated")
        else:
            seen.add(name)
        if field.get("type") not in TYPES:
            errors.append(f"{where}.type must be one of {', '.join(TYPES)}")
        if "required" in field and not isinstance(field["required"], bool):
            errors.append(f"{where}.required must be a boolean")
        for bound in ("min", "max"):
            value = field.get(bound)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                errors.append(f"{where}.{bound} must be a number")
        lo, hi = field.get("min"), field.get("max")
        if isinstance(lo, int | float) and isinstance(hi, int | float) and lo > hi:
            errors.append(f"{where}: min must not exceed max")
    return errors


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and value.is_integer())
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    return isinstance(value, list)


def validate(schema: dict | None, value: Any) -> list[str]:
    """Field-level error messages for ``value`` against ``schema`` (``[]`` when valid)."""
    if not isinstance(value, dict):
        return ["value must be an object"]
    if not schema:
        return []
    errors: list[str] = []
    for field in schema.get("fields", []):
        name, kind = field["name"], field["type"]
        if name not in value or value[name] is None:
            if field.get("required"):
                errors.append(f"{name}: is required")
            continue
        item = value[name]
        if not _type_ok(kind, item):
            errors.append(f"{name}: must be of type {kind}")
            continue
        size = len(item) if kind in ("string", "array") else item if kind in ("number", "integer") else None
        unit = " characters" if kind == "string" else " items" if kind == "array" else ""
        lo, hi = field.get("min"), field.get("max")
        if size is not None and lo is not None and size < lo:
            errors.append(f"{name}: must be at least {lo}{unit}")
        if size is not None and hi is not None and size > hi:
            errors.append(f"{name}: must be at most {hi}{unit}")
    return errors
