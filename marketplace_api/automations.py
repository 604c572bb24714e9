"""Automations (admin): create and list, with their three ``IInputSchema`` schemas."""

from __future__ import annotations

import uuid

from aiohttp import web

from .auth import require_admin
from .bodies import json_response, read_json
from .common import iso, parse_uuid, pool_of
from .errors import ApiError
from .paging import limit_offset, list_route
from .schema_validation import check_schema

SCHEMAS = ("automation_parameters_schema", "job_variables_schema", "bucket_schema")


def automation_json(r) -> dict:  # noqa: ANN001
    return {"automation_id": str(r["id"]), "name": r["name"],
            "owner_user_id": str(r["owner_user_id"]) if r["owner_user_id"] else None,
            **{k: r[k] for k in SCHEMAS}, "created_at": iso(r["created_at"])}


async def create_automation(request: web.Request) -> web.Response:
    """Admin: create an automation with its parameter, job-variable and bucket schemas."""
    require_admin(request)
    body = await read_json(request)
    errors = []
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        errors.append("name must be a non-empty string of at most 200 characters")
    for key in SCHEMAS:
        errors += check_schema(body.get(key), key)
    owner = body.get("owner_user_id")
    if owner is not None and parse_uuid(owner) is None:
        errors.append("owner_user_id must be a user id")
    code = body.get("code")
    if code is not None and not isinstance(code, str):
        errors.append("code must be a string")
    if errors:
        raise ApiError(400, errors[0], {"success": False, "error": errors[0], "errors": errors})
    pool = pool_of(request)
    if owner is not None and not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)",
                                                     parse_uuid(owner)):
        raise ApiError(404, "Owner user not found")
    row = await pool.fetchrow(
        """INSERT INTO automations(id, name, owner_user_id, code, automation_parameters_schema,
                                   job_variables_schema, bucket_schema)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        str(uuid.uuid4()), name.strip(), parse_uuid(owner) if owner else None, code,
        *(body.get(k) for k in SCHEMAS))
    return json_response({"success": True, "automation": automation_json(row)}, 201)


@list_route(1000)
async def list_automations(request: web.Request) -> web.Response:
    """Admin: every automation."""
    require_admin(request)
    limit, offset = limit_offset(request, list_automations)
    rows = await pool_of(request).fetch("SELECT * FROM automations ORDER BY created_at, id LIMIT $1 OFFSET $2",
                                        limit, offset)
    return json_response({"success": True, "automations": [automation_json(r) for r in rows]})
