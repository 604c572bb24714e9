"""Routes of the automation-agent surface (seed 004, agent token) and of the device-facing routes
``/api/v2/devices/verified-phone-number`` (agent token) and ``/api/v2/devices/launchAutomation``
(user token). Every error body is ``{"success": false, "error": ...}``.

``submitTaskToAnotherJob`` is ``POST /api/v2/tasks/submit`` in data-dump mode (``tasks.py``).
"""

from __future__ import annotations

import asyncpg
from aiohttp import web

from . import agent_surface as surface
from .agent_auth import agent_from_request
from .app import NODE, bearer_token, json_response, read_json, require_user
from .errors import ApiError, guard_data_errors
from .storage import read_json_limited

SUBMIT_BODY_LIMIT = 64 * 1024 * 1024
_DELIVERY = web.AppKey("agent_task_delivery", surface.TaskDelivery)


_guard = guard_data_errors


def _pool(request: web.Request) -> asyncpg.Pool:
    return request.app[NODE].pool


async def get_current_task(request: web.Request) -> web.Response:
    """getCurrentTask: the running task of this agent token (parent_task_id, job_proof, timeout)."""
    agent = await surface.require_agent(request)
    return json_response(await surface.current_task(_pool(request), agent))


async def submit_task(request: web.Request) -> web.Response:
    """submitTask: report progress (finish=false) or the final result (finish=true) of the running task."""
    agent = await surface.require_agent(request)
    body = await read_json_limited(request, SUBMIT_BODY_LIMIT)
    return json_response(await surface.submit_task(request, agent, body))


async def use_another_task(request: web.Request) -> web.Response:
    """useAnotherTask: take one waiting task of the same job (handed to one caller only), or null."""
    agent = await surface.require_agent(request)
    return json_response(await surface.use_another(_pool(request), agent))


async def add_sub_tasks(request: web.Request) -> web.Response:
    """addSubTasks: create planned tasks (sub-tasks) for this job or another job, optionally pinned."""
    agent = await surface.require_agent(request)
    body = await read_json(request)
    return json_response(await surface.add_subtasks(_pool(request), agent, body))


async def get_sub_tasks(request: web.Request) -> web.Response:
    """getSubTasks: status and details of sub-tasks of the current task (at most 100 ids)."""
    agent = await surface.require_agent(request)
    body = await read_json(request)
    return json_response(await surface.subtask_status(_pool(request), agent, body))


async def get_variables(request: web.Request) -> web.Response:
    """getAutomationVariables: the automation variables of the current task."""
    agent = await surface.require_agent(request)
    return json_response(await surface.get_variables(_pool(request), agent))


async def set_variables(request: web.Request) -> web.Response:
    """setAutomationVariables: replace the automation variables of the current task ({waiting: true} ...)."""
    agent = await surface.require_agent(request)
    body = await read_json(request)
    return json_response(await surface.set_variables(_pool(request), agent, body))


async def get_bucket(request: web.Request) -> web.Response:
    """agent.utils.bucket: read the bucket of this job on this device ({} before the first write)."""
    agent = await surface.require_agent(request)
    return json_response(await surface.get_bucket(_pool(request), agent))


async def put_bucket(request: web.Request) -> web.Response:
    """agent.utils.bucket: replace the bucket of this job on this device (validated by bucket_schema)."""
    agent = await surface.require_agent(request)
    body = await read_json(request)
    return json_response(await surface.put_bucket(_pool(request), agent, body))


async def verified_phone_number(request: web.Request) -> web.Response:
    """Verified phone number of the agent token's device, or null."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "Missing or invalid token")
    agent = await agent_from_request(request)
    if agent is None:
        from proxyorch.accounts import user_for_token

        if await user_for_token(_pool(request), token) is not None:
            raise ApiError(400, "Token is not bound to a device (a user token, not an automation agent"
                                " token)")
        raise ApiError(401, "Missing or invalid token")
    row = await _pool(request).fetchrow(
        "SELECT phone_number, phone_number_verified FROM devices WHERE remote_device_id = $1",
        agent.remote_device_id)
    if row is None:
        raise ApiError(404, "Device not found")
    if row["phone_number_verified"] and row["phone_number"]:
        return json_response({"phoneNumber": row["phone_number"]})
    return json_response(None)


async def launch_automation(request: web.Request) -> web.Response:
    """Launch (or stop) automation code on a device the caller owns, over its live tunnel."""
    user = await require_user(request)
    body = await read_json_limited(request, 6 * 1024 * 1024)
    return json_response(await surface.launch(request.app[NODE], user, body))


async def _start_delivery(app: web.Application) -> None:
    delivery = surface.TaskDelivery(app[NODE])
    app[_DELIVERY] = delivery
    await delivery.start()


async def _stop_delivery(app: web.Application) -> None:
    delivery = app.get(_DELIVERY)
    if delivery is not None:
        await delivery.stop()


def setup(app: web.Application) -> None:
    add = app.router
    add.add_get("/api/v2/agent/task", _guard(get_current_task))
    add.add_post("/api/v2/agent/task/submit", _guard(submit_task))
    add.add_post("/api/v2/agent/task/use-another", _guard(use_another_task))
    add.add_post("/api/v2/agent/subtasks", _guard(add_sub_tasks))
    add.add_post("/api/v2/agent/subtasks/status", _guard(get_sub_tasks))
    add.add_get("/api/v2/agent/variables", _guard(get_variables))
    add.add_put("/api/v2/agent/variables", _guard(set_variables))
    add.add_get("/api/v2/agent/bucket", _guard(get_bucket))
    add.add_put("/api/v2/agent/bucket", _guard(put_bucket))
    add.add_get("/api/v2/devices/verified-phone-number", _guard(verified_phone_number))
    add.add_post("/api/v2/devices/launchAutomation", _guard(launch_automation))
    app.on_startup.append(_start_delivery)
    app.on_cleanup.append(_stop_delivery)
