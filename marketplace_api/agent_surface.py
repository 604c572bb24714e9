"""The automation-agent surface (seed 004): what code running on a device does with its agent token.

Every call is made with the agent token minted for one running job task on one device. The token
stops working when the task finishes (``submitTask(..., finish=true)``, review by the employer) or
times out; a call with such a token is told the task is finished rather than just "unauthorised".

Also here: delivery of ``task_assigned`` to the device over its live tunnel (LISTEN on the
``task_assigned`` notification that the assignment sends, plus a sweep for anything a notification
missed), and ``launchAutomation`` (a CONTROL message to the device agent's runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from device_tunnel.registry import DeviceRegistry
from device_tunnel.relay import DeviceOffline
from proxyorch.tasks import TaskSet
from proxyorch.tokens import hash_token

from .agent_auth import TOKEN_PREFIX, AgentIdentity, authenticate_agent, mint_agent_token, revoke_for_task
from .assignment import assign_with_retries
from .auth import bearer_token
from .common import can_edit, parse_bool, parse_uuid
from .context import POOL
from .errors import ApiError
from .schema_validation import validate
from .storage import EXTENSION, decode_base64, save_proof_file

log = logging.getLogger(__name__)

AUTOMATION_STATUSES = ("running", "success", "failed", "declined")
FINAL_STATUS = {"success": "pending", "failed": "failed", "declined": "declined"}
MAX_SUBTASK_IDS = 100
MAX_SUBTASKS = 1000
MAX_INPUT_CHARS = 10_000
MAX_DATA_CHARS = 100_000
MAX_FILES = 20
MAX_VARIABLES_BYTES = 64 * 1024
DELIVERY_TIMEOUT_S = 10.0
DeviceControl = Callable[[str, dict, float], Awaitable[dict]]


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _json_or_text(value: str | None) -> Any:
    """A stored proof/input: the JSON value it encodes, else the string itself."""
    if value is None or value == "":
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


# -- authentication ---------------------------------------------------------------------------------
async def require_agent(request: web.Request) -> AgentIdentity:
    """The identity of a live agent token whose task is running; else the precise refusal."""
    pool = request.app[POOL]
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "Missing agent token")
    agent = await authenticate_agent(pool, token)
    if agent is not None and agent.task_status == "running":
        return agent
    if token.startswith(TOKEN_PREFIX):
        row = await pool.fetchrow(
            """SELECT a.revoked, a.expires_at <= now() AS expired, t.status, t.finished
               FROM agent_tokens a JOIN job_tasks t ON t.id = a.job_task_id WHERE a.token_hash = $1""",
            hash_token(token))
        if row is not None:
            if row["finished"] or row["status"] != "running":
                raise ApiError(403, f"The task of this agent token is finished (status '{row['status']}');"
                                    " no more calls are allowed for it")
            raise ApiError(401, "Agent token expired" if row["expired"] else "Agent token revoked")
    from proxyorch.accounts import user_for_token

    if await user_for_token(pool, token) is not None:
        raise ApiError(401, "This route needs an agent token (a user API token was given)")
    raise ApiError(401, "Invalid agent token")


# -- getCurrentTask -----------------------------------------------------------------------------------
async def current_task(pool: asyncpg.Pool, agent: AgentIdentity) -> dict:
    row = await pool.fetchrow(
        """SELECT t.*, p.input, j.automation_id FROM job_tasks t JOIN jobs j ON j.id = t.job_id
           LEFT JOIN planned_tasks p ON p.id = t.planned_task_id WHERE t.id = $1""", agent.job_task_id)
    if row is None:
        raise ApiError(404, "Task not found")
    proof = _json_or_text(row["input"]) if row["input"] is not None else _json_or_text(row["job_proof"])
    return {"success": True, "parent_task_id": agent.job_task_id, "job_proof": proof,
            "timeout": row["timeout"], "job_task_id": agent.job_task_id, "job_id": agent.job_id,
            "parent_of_current": str(row["parent_task_id"]) if row["parent_task_id"] else None,
            "remote_device_id": agent.remote_device_id,
            "automation_id": str(row["automation_id"]) if row["automation_id"] else None,
            "automation_status": row["automation_status"]}


# -- submitTask ---------------------------------------------------------------------------------------
def _files(given: Any) -> list[tuple[str, str, bytes]]:
    if given is None:
        return []
    if not isinstance(given, list) or len(given) > MAX_FILES:
        raise _bad(f"files must be an array of at most {MAX_FILES} files")
    out = []
    for i, f in enumerate(given):
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"].strip():
            raise _bad(f"files[{i}].name must be a non-empty string")
        ext = f.get("extension")
        if not isinstance(ext, str) or not EXTENSION.match(ext):
            raise _bad(f"files[{i}].extension must be a short alphanumeric extension")
        raw = decode_base64(f.get("base64Data"), f["name"])
        out.append((f["name"].strip()[:100], "." + ext.lstrip("."), raw))
    return out


async def submit_task(request: web.Request, agent: AgentIdentity, body: dict) -> dict:
    status = body.get("automationStatus")
    if status not in AUTOMATION_STATUSES:
        raise _bad(f"automationStatus must be one of {', '.join(AUTOMATION_STATUSES)}")
    data = body.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad("data must be an object")
    finish = parse_bool(body.get("finish"), "finish", _bad, False)
    if finish and status == "running":
        raise _bad("automationStatus 'running' cannot finish a task: use success, failed or declined")
    files = _files(body.get("files")) if finish else []  # files are ignored when finish=false
    info = []
    for name, ext, raw in files:
        stored, url = await save_proof_file(request, raw, name, ext)
        data[name] = url
        info.append({"fieldName": name, "fileName": name + ext, "filename": stored, "url": url,
                     "size": len(raw)})
    proof = orjson.dumps(data).decode()
    if len(proof) > MAX_DATA_CHARS:
        raise _bad(f"data must serialise to at most {MAX_DATA_CHARS} characters")
    pool = request.app[POOL]
    async with pool.acquire() as conn, conn.transaction():
        task = await conn.fetchrow("SELECT status, finished FROM job_tasks WHERE id = $1 FOR UPDATE",
                                   agent.job_task_id)
        if task is None:
            raise ApiError(404, "Task not found")
        if task["finished"] or task["status"] != "running":
            raise ApiError(403, "This task is already finished; no more submissions are allowed")
        if not finish:
            await conn.execute(
                "UPDATE job_tasks SET automation_status = $2, job_proof = $3, updated = now() WHERE id = $1",
                agent.job_task_id, status, proof)
            return {"success": True}
        reason = None
        if status in ("failed", "declined"):
            raw_reason = data.get("reason") or data.get("error")
            reason = str(raw_reason)[:1000] if raw_reason is not None else None
        await conn.execute(
            """UPDATE job_tasks SET automation_status = $2, job_proof = $3, status = $4, finished = true,
                      failure_reason = COALESCE($5, failure_reason), proof_files_info = $6, updated = now()
               WHERE id = $1""",
            agent.job_task_id, status, proof, FINAL_STATUS[status], reason, info)
        await revoke_for_task(conn, agent.job_task_id)
    return {"success": True}


# -- useAnotherTask -------------------------------------------------------------------------------------
async def use_another(pool: asyncpg.Pool, agent: AgentIdentity) -> dict | None:
    """Hand one waiting running task of the same job to the caller; each waiting task goes to one caller."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """SELECT id, job_proof, automation_variables FROM job_tasks
               WHERE job_id = $1 AND id <> $2 AND status = 'running'
                 AND automation_variables @> '{"waiting": true}'
               ORDER BY updated, id LIMIT 1 FOR UPDATE SKIP LOCKED""", agent.job_id, agent.job_task_id)
        if row is None:
            return None
        variables = dict(row["automation_variables"] or {})
        variables.update(waiting=False, used_by=agent.job_task_id)
        await conn.execute("UPDATE job_tasks SET automation_variables = $2, updated = now() WHERE id = $1",
                           row["id"], variables)
    return {"job_task_id": str(row["id"]), "job_proof": row["job_proof"]}


# -- automation variables -------------------------------------------------------------------------------
async def get_variables(pool: asyncpg.Pool, agent: AgentIdentity) -> dict:
    value = await pool.fetchval("SELECT automation_variables FROM job_tasks WHERE id = $1", agent.job_task_id)
    return {"success": True, "automation_variables": value if value is not None else {}}


async def set_variables(pool: asyncpg.Pool, agent: AgentIdentity, body: dict) -> dict:
    variables = body.get("automation_variables", body.get("variables"))
    if not isinstance(variables, dict):
        raise _bad("automation_variables must be an object")
    if len(orjson.dumps(variables)) > MAX_VARIABLES_BYTES:
        raise _bad(f"automation_variables must serialise to at most {MAX_VARIABLES_BYTES} bytes")
    stored = await pool.fetchval(
        "UPDATE job_tasks SET automation_variables = $2, updated = now() WHERE id = $1 AND status = 'running'"
        " RETURNING automation_variables", agent.job_task_id, variables)
    if stored is None:
        raise ApiError(403, "This task is already finished")
    return {"success": True, "automation_variables": stored}


# -- addSubTasks / getSubTasks ----------------------------------------------------------------------------
async def add_subtasks(pool: asyncpg.Pool, agent: AgentIdentity, body: dict, retry_delay_s: float) -> dict:
    variables = body.get("job_variables")
    if not isinstance(variables, list) or not variables or len(variables) > MAX_SUBTASKS:
        raise _bad(f"job_variables must be an array of 1 to {MAX_SUBTASKS} objects")
    inputs = []
    for i, item in enumerate(variables):
        if not isinstance(item, dict):
            raise _bad(f"job_variables[{i}] must be an object")
        text = orjson.dumps(item).decode()
        if len(text) > MAX_INPUT_CHARS:
            raise _bad(f"job_variables[{i}] must serialise to at most {MAX_INPUT_CHARS} characters")
        inputs.append(text)
    run_now = parse_bool(body.get("run_immediately"), "run_immediately", _bad, True)
    raw_job = body.get("job_id")
    target_id = agent.job_id if raw_job in (None, "") else parse_uuid(raw_job)
    if target_id is None:
        raise _bad("Invalid job_id")
    target = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1", target_id)
    if target is None:
        raise ApiError(404, "Job not found")
    if target_id != agent.job_id:
        if not can_edit(target, agent.job_owner_id):
            raise ApiError(403, "The parent task's job owner neither owns nor has shared_edit access to the"
                                " target job")
        if not target["allow_sub_tasks"]:
            raise ApiError(403, "The target job does not allow sub tasks (allow_sub_tasks is off)")
    if target["automation_id"] is not None:
        schema = await pool.fetchval("SELECT job_variables_schema FROM automations WHERE id = $1",
                                     target["automation_id"])
        for i, item in enumerate(variables):
            problems = validate(schema, item)
            if problems:
                raise ApiError(400, f"job_variables[{i}]: {'; '.join(problems)}",
                               {"success": False, "error": f"job_variables[{i}]: {'; '.join(problems)}",
                                "errors": problems})
    device_id = None
    if body.get("remote_device_id") not in (None, ""):
        device_id = parse_uuid(body["remote_device_id"])
        if device_id is None:
            raise _bad("Invalid remote_device_id")
        dev = await pool.fetchrow("SELECT user_id, rented_by FROM devices WHERE remote_device_id = $1",
                                  device_id)
        if dev is None or target["user_id"] not in (dev["user_id"], dev["rented_by"]):
            raise ApiError(404, "Device not found (it must be owned by or rented to the target job's owner)")
    ids = [str(uuid.uuid4()) for _ in inputs]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", target_id)
        used = await conn.fetchval(
            """SELECT count(*) FROM planned_tasks p LEFT JOIN job_tasks t ON t.id = p.job_task_id
               WHERE p.job_id = $1
                 AND (t.status IS NULL OR t.status NOT IN ('failed', 'declined', 'notcomplete'))""",
            target_id)
        excess = used + len(inputs) - target["positions"]
        if excess > 0:
            raise _bad(f"No enough positions left. Received {excess} tasks in excess.")
        rows = [(pid, target_id, text, device_id, agent.job_task_id, i / 1e6)
                for i, (pid, text) in enumerate(zip(ids, inputs, strict=True))]
        await conn.executemany(
            "INSERT INTO planned_tasks(id, job_id, input, remote_device_id, parent_task_id, added)"
            " VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))", rows)
        await conn.executemany(
            "INSERT INTO agent_subtasks(planned_task_id, parent_task_id, job_id) VALUES ($1, $2, $3)",
            [(pid, agent.job_task_id, target_id) for pid in ids])
    out: dict = {"success": True, "inserted_ids": [{"planned_task_id": pid, "input": text}
                                                   for pid, text in zip(ids, inputs, strict=True)]}
    if run_now:
        out["assignment_results"] = await assign_with_retries(pool, ids, retry_delay_s)
    return out


async def subtask_status(pool: asyncpg.Pool, agent: AgentIdentity, body: dict) -> dict:
    raw = body.get("planned_task_ids")
    if not isinstance(raw, list) or not raw:
        raise _bad("planned_task_ids must be a non-empty array")
    if len(raw) > MAX_SUBTASK_IDS:
        raise _bad(f"At most {MAX_SUBTASK_IDS} planned_task_ids per call (got {len(raw)})")
    ids = [parse_uuid(i) for i in raw]
    if any(i is None for i in ids):
        raise _bad("planned_task_ids must contain valid ids")
    unique = list(dict.fromkeys(ids))
    rows = await pool.fetch(
        """SELECT s.planned_task_id, p.id AS planned_id, t.id AS task_id, t.status, t.comment, t.job_proof,
                  COALESCE(t.timeout, j.timeout) AS timeout
           FROM agent_subtasks s LEFT JOIN planned_tasks p ON p.id = s.planned_task_id
           LEFT JOIN job_tasks t ON t.id = p.job_task_id LEFT JOIN jobs j ON j.id = s.job_id
           WHERE s.planned_task_id = ANY($1::uuid[]) AND s.parent_task_id = $2""", unique, agent.job_task_id)
    found = {str(r["planned_task_id"]): r for r in rows}
    foreign = [i for i in unique if i not in found]
    if foreign:
        raise ApiError(404, f"Not sub-tasks of the current task: {', '.join(foreign[:10])}")
    tasks = {}
    for pid in unique:
        r = found[pid]
        if r["planned_id"] is None:
            status = "deleted"
        elif r["task_id"] is None:
            status = "planned"
        else:
            status = r["status"]
        tasks[pid] = {"parent_task_id": agent.job_task_id, "comment": (r["comment"] or None),
                      "job_proof": _json_or_text(r["job_proof"]) if r["task_id"] else None,
                      "timeout": r["timeout"], "status": status,
                      "job_task_id": str(r["task_id"]) if r["task_id"] else None}
    return {"success": True, "tasks": tasks}


# -- the job bucket of this (job, device) ---------------------------------------------------------------
async def get_bucket(pool: asyncpg.Pool, agent: AgentIdentity) -> dict:
    data = await pool.fetchval("SELECT data FROM job_buckets WHERE job_id = $1 AND remote_device_id = $2",
                               agent.job_id, agent.remote_device_id)
    return {"success": True, "job_id": agent.job_id, "remote_device_id": agent.remote_device_id,
            "data": data if data is not None else {}}


async def put_bucket(pool: asyncpg.Pool, agent: AgentIdentity, body: dict) -> dict:
    data = body.get("data")
    if not isinstance(data, dict):
        raise _bad("Invalid bucket data: data must be an object")
    schema = await pool.fetchval(
        "SELECT a.bucket_schema FROM jobs j JOIN automations a ON a.id = j.automation_id WHERE j.id = $1",
        agent.job_id)
    problems = validate(schema, data)
    if problems:
        raise ApiError(400, "Invalid bucket data", {"success": False, "error": "Invalid bucket data",
                                                    "details": problems})
    stored = await pool.fetchval(
        """INSERT INTO job_buckets(id, job_id, remote_device_id, data) VALUES ($1, $2, $3, $4)
           ON CONFLICT (job_id, remote_device_id) DO UPDATE SET data = EXCLUDED.data, updated_at = now()
           RETURNING data""", str(uuid.uuid4()), agent.job_id, agent.remote_device_id, data)
    return {"success": True, "job_id": agent.job_id, "remote_device_id": agent.remote_device_id,
            "data": stored}


# -- launchAutomation -----------------------------------------------------------------------------------
async def launch(pool: asyncpg.Pool, control: DeviceControl, user_id: str, body: dict) -> dict:
    """``control(device_id, message, timeout)`` reaches the device on whichever node holds its tunnel
    (raises :class:`DeviceOffline` when none does)."""
    device_id = parse_uuid(body.get("device_id"))
    if device_id is None:
        raise _bad("device_id is required" if not body.get("device_id") else "Invalid device_id")
    command = body.get("command")
    if command not in ("start", "stop"):
        raise _bad("command must be 'start' or 'stop'")
    code = body.get("code")
    if command == "start" and (not isinstance(code, str) or not code.strip()):
        raise _bad("code is required to start an automation")
    if code is not None and not isinstance(code, str):
        raise _bad("code must be a string")
    if isinstance(code, str) and len(code) > 5 * 1024 * 1024:
        raise _bad("code must be at most 5 MiB")
    automation_id = body.get("automationId")
    if automation_id is not None and (not isinstance(automation_id, str) or not automation_id.strip()
                                      or len(automation_id) > 100):
        raise _bad("automationId must be a short string")
    if command == "stop" and automation_id is None:
        raise _bad("automationId is required to stop an automation")
    automation_id = automation_id or uuid.uuid4().hex
    device = await pool.fetchrow(
        "SELECT user_id, rented_by, payment_type FROM devices WHERE remote_device_id = $1",
        device_id)
    uid = uuid.UUID(user_id)
    if device is None or not (device["user_id"] == uid
                              or (device["rented_by"] == uid and device["payment_type"] == "live")):
        raise ApiError(404, "Device not found")
    message = {"command": command, "automationId": automation_id}
    if code is not None:
        message["code"] = code
    try:
        reply = await control(device_id, message, DELIVERY_TIMEOUT_S)
    except DeviceOffline:
        raise _bad("Device is offline: it has no live tunnel, so the automation cannot be delivered") from None
    except TimeoutError:
        raise ApiError(504, "The device did not answer the launch request in time") from None
    except (ConnectionError, OSError) as exc:
        raise _bad(f"Device went offline while launching: {exc}") from None
    if not reply.get("ok"):
        raise ApiError(502, f"The device refused the automation: {reply.get('error') or 'unknown error'}")
    return {"automationId": reply.get("automationId", automation_id), "result": True,
            "deviceResult": reply.get("result")}


async def _revoke_token(pool: asyncpg.Pool, token: str) -> None:
    await pool.execute("UPDATE agent_tokens SET revoked = true WHERE token_hash = $1", hash_token(token))


# -- delivering task assignments over the tunnel ---------------------------------------------------------
class TaskDelivery:
    """Sends ``{command: task_assigned, job_task_id, agent_token, ...}`` to devices with a tunnel here.

    ``delivered_at`` is claimed atomically before sending, so a notification and the sweep (or two
    nodes) never deliver one task twice; a failed send clears the claim and revokes the token it minted.
    """

    def __init__(self, pool: asyncpg.Pool, registry: DeviceRegistry, *, sweep_s: float, api_port: int,
                 public_api_url: str | None) -> None:
        self.pool = pool
        self.registry = registry
        self.sweep_s = sweep_s
        self.api_port = api_port
        self.public_api_url = public_api_url
        self._conn: asyncpg.Connection | None = None
        self._tasks = TaskSet("task delivery")

    async def start(self) -> None:
        self._tasks.spawn(self._loop(), name="task delivery sweep")

    async def stop(self) -> None:
        await self._tasks.close()
        await self._unlisten()

    async def _listen(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        self._conn = await self.pool.acquire()
        await self._conn.add_listener("task_assigned", self._notified)

    async def _unlisten(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.remove_listener("task_assigned", self._notified)
            with contextlib.suppress(Exception):
                await self.pool.release(conn)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        task_id, _, device_id = payload.partition(":")
        if self.registry.pick(device_id) is None:
            return
        with contextlib.suppress(RuntimeError):  # closed: the sweep of the next start delivers it
            self._tasks.spawn(self.deliver(task_id, device_id), name=f"deliver {task_id}")

    async def _loop(self) -> None:
        while True:
            try:
                await self._listen()
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task delivery sweep failed")
                await self._unlisten()
            await asyncio.sleep(self.sweep_s)

    async def sweep(self) -> int:
        devices = self.registry.device_ids()
        if not devices:
            return 0
        rows = await self.pool.fetch(
            """SELECT id, remote_device_id FROM job_tasks WHERE status = 'running' AND delivered_at IS NULL
               AND mode = 'automation' AND remote_device_id = ANY($1::uuid[])""", devices)
        done = 0
        for r in rows:
            done += await self.deliver(str(r["id"]), str(r["remote_device_id"]))
        return done

    async def deliver(self, task_id: str, device_id: str) -> bool:
        tunnel = self.registry.pick(device_id)
        if tunnel is None:
            return False
        pool = self.pool
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE job_tasks t SET delivered_at = now() FROM jobs j
                   WHERE t.id = $1 AND t.remote_device_id = $2 AND t.status = 'running'
                     AND t.delivered_at IS NULL AND j.id = t.job_id
                   RETURNING t.id, t.job_id, t.planned_task_id, t.parent_task_id, t.timeout, t.job_proof,
                             j.automation_id, j.automation_parameters""", task_id, device_id)
            if row is None:
                return False
            token = await mint_agent_token(conn, task_id, device_id, row["timeout"])
        code = None
        if row["automation_id"] is not None:
            code = await pool.fetchval("SELECT code FROM automations WHERE id = $1", row["automation_id"])
        message = {"command": "task_assigned", "job_task_id": task_id, "agent_token": token,
                   "job_id": str(row["job_id"]), "remote_device_id": device_id,
                   "planned_task_id": str(row["planned_task_id"]) if row["planned_task_id"] else None,
                   "parent_task_id": str(row["parent_task_id"]) if row["parent_task_id"] else None,
                   "automation_id": str(row["automation_id"]) if row["automation_id"] else None,
                   "automation_parameters": row["automation_parameters"], "job_proof": row["job_proof"],
                   "timeout": row["timeout"], "code": code, "api_port": self.api_port,
                   "api_url": self.public_api_url}
        try:
            reply = await tunnel.control(message, timeout=DELIVERY_TIMEOUT_S)
        except Exception as exc:  # offline mid-send, timeout: cleared, so the sweep retries
            log.info("task_assigned %s to %s not delivered: %s", task_id, device_id, exc)
            await pool.execute("UPDATE job_tasks SET delivered_at = NULL WHERE id = $1", task_id)
            await _revoke_token(pool, token)
            return False
        if not reply.get("ok"):  # the device answered "no" (e.g. no runner): not retried
            log.warning("device %s refused task_assigned %s: %s", device_id, task_id, reply.get("error"))
            await _revoke_token(pool, token)
            return False
        return True
