"""Routes of the automation-agent surface (seed 004, agent token) and of the device-facing routes
``/api/v2/devices/verified-phone-number`` (agent token) and ``/api/v2/devices/launchAutomation``
(user token). Every error body is ``{"success": false, "error": ...}``.

``submitTaskToAnotherJob`` is ``POST /api/v2/tasks/submit`` in data-dump mode (``tasks.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from device_tunnel.relay import DeviceOffline

from . import agent_surface as surface
from .agent_auth import agent_from_request
from .auth import bearer_token, require_user
from .bodies import json_response, read_json
from .context import CLUSTER, DEVICE_REGISTRY, POOL, SETTINGS
from .errors import ApiError
from .storage import read_json_limited

SUBMIT_BODY_LIMIT = 64 * 1024 * 1024


def _pool(request: web.Request) -> asyncpg.Pool:
    return request.app[POOL]


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
    return json_response(await surface.add_subtasks(_pool(request), agent, body,
                                                request.app[SETTINGS].assign_retry_delay_s))


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
    return json_response(await surface.launch(_pool(request), _device_control(request.app), user, body))


def _device_control(app: web.Application) -> surface.DeviceControl:
    """CONTROL to a device's tunnel here, else (a cluster node) over the relay to the node holding it."""
    registry, cluster = app[DEVICE_REGISTRY], app[CLUSTER]

    async def control(device_id: str, message: dict, timeout: float) -> dict:
        tunnel = registry.pick(device_id)
        if tunnel is not None:
            return await tunnel.control(message, timeout=timeout)
        if cluster is None:
            raise DeviceOffline("device offline")
        return await cluster.control(device_id, message, timeout)
    return control


async def _delivery(app: web.Application) -> AsyncIterator[None]:
    """Task delivery over the tunnels, running for the app's lifetime."""
    settings = app[SETTINGS]
    delivery = surface.TaskDelivery(app[POOL], app[DEVICE_REGISTRY], sweep_s=settings.agent_delivery_sweep_s,
                                    api_port=settings.api_port, public_api_url=settings.public_api_url or None)
    await delivery.start()
    yield
    await delivery.stop()


def setup(app: web.Application) -> None:
    add = app.router
    add.add_get("/api/v2/agent/task", get_current_task)
    add.add_post("/api/v2/agent/task/submit", submit_task)
    add.add_post("/api/v2/agent/task/use-another", use_another_task)
    add.add_post("/api/v2/agent/subtasks", add_sub_tasks)
    add.add_post("/api/v2/agent/subtasks/status", get_sub_tasks)
    add.add_get("/api/v2/agent/variables", get_variables)
    add.add_put("/api/v2/agent/variables", set_variables)
    add.add_get("/api/v2/agent/bucket", get_bucket)
    add.add_put("/api/v2/agent/bucket", put_bucket)
    add.add_get("/api/v2/devices/verified-phone-number", verified_phone_number)
    add.add_post("/api/v2/devices/launchAutomation", launch_automation)
    app.cleanup_ctx.append(_delivery)
