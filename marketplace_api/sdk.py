"""Python client SDK (asyncio + aiohttp) for automation code and for employers / device owners.

Automation code running on a device (seed 004 names and return shapes)::

    async with Agent.from_assignment("automations/tasks/<job_task_id>.json", "http://node:8000") as agent:
        task = await agent.utils.job.getCurrentTask()
        subs = await agent.utils.job.addSubTasks([{"email": "a@example.com"}], False)
        await agent.utils.job.submitTask("success", {"done": True}, True, [])

Every method returns the seed's shape: ``{"success": True, ...}`` or ``{"success": False, "error": ...}``
— an API-level failure (4xx/5xx) or a network failure is never raised. ``useAnotherTask`` returns the
task or ``None``; ``getVerifiedPhoneNumber`` returns the number or ``None`` (and the failure shape on
an error, where the seed's TypeScript types have no error branch).

Employers and device owners use :class:`UserClient` (user API token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

Result = dict[str, Any]


def _error_text(status: int, body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "message"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
        if isinstance(body.get("errors"), list) and body["errors"]:
            return "; ".join(map(str, body["errors"]))
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return f"HTTP {status}"


class _Client:
    """One aiohttp session, a base URL and a bearer token."""

    def __init__(self, base_url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                 timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> _Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: dict | None = None) -> tuple[int, Any]:
        """(status, decoded body); a network failure is (0, message)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            async with self._http().request(method, self.base_url + path, json=json_body, params=params,
                                            headers=headers) as r:
                text = await r.text()
                try:
                    body = json.loads(text) if text else None
                except ValueError:
                    body = text
                return r.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"network error: {type(exc).__name__}: {exc}"

    async def call(self, method: str, path: str, *, json_body: Any = None,
                   params: dict | None = None) -> Result:
        """The body of a 2xx answer (``success: true`` added when absent), else the failure shape."""
        status, body = await self.request(method, path, json_body=json_body, params=params)
        if 200 <= status < 300:
            if isinstance(body, dict):
                return {"success": True, **body} if "success" not in body else body
            return {"success": True, "data": body}
        return {"success": False, "error": _error_text(status, body)}


# -- the automation side ------------------------------------------------------------------------------
class JobUtils:
    """``agent.utils.job``."""

    def __init__(self, client: _Client) -> None:
        self._c = client

    async def submitTask(self, automationStatus: str, data: dict, finish: bool,  # noqa: N802, N803
                         files: list[dict] | None = None) -> Result:
        body = {"automationStatus": automationStatus, "data": data, "finish": finish, "files": files or []}
        res = await self._c.call("POST", "/api/v2/agent/task/submit", json_body=body)
        return {"success": True} if res["success"] else res

    async def submitTaskToAnotherJob(self, job_id: str, data: dict, status: str = "pending",  # noqa: N802
                                     files: list[dict] | None = None) -> Result:
        try:
            proof = json.dumps(data)
        except (TypeError, ValueError) as exc:
            return {"success": False, "error": f"data is not JSON-serialisable: {exc}"}
        body: dict = {"job_id": job_id, "job_proof": proof, "status": status}
        if files:
            body["files"] = files
        res = await self._c.call("POST", "/api/v2/tasks/submit", json_body=body)
        if not res["success"]:
            return res
        return {"success": True, "job_task_id": res.get("job_task_id"), "job_id": res.get("job_id")}

    async def useAnotherTask(self) -> Result | None:  # noqa: N802
        status, body = await self._c.request("POST", "/api/v2/agent/task/use-another")
        if status == 200:
            return body if isinstance(body, dict) else None
        return {"success": False, "error": _error_text(status, body)}

    async def getCurrentTask(self) -> Result:  # noqa: N802
        return await self._c.call("GET", "/api/v2/agent/task")

    async def addSubTasks(self, job_variables: list[dict] | dict, run_immediately: bool | None = None,  # noqa: N802
                          job_id: str | None = None, remote_device_id: str | None = None) -> Result:
        """``addSubTasks(vars)``, ``addSubTasks(vars, run_immediately)``, ``addSubTasks(vars, run, job_id)``
        or ``addSubTasks({"job_variables", "run_immediately", "job_id", "remote_device_id"})``.

        The job of the current task is the default target (the server knows it from the token).
        """
        if isinstance(job_variables, dict):
            options = job_variables
            if "job_variables" not in options:
                return {"success": False, "error": "options.job_variables is required"}
            body = {k: options[k] for k in ("job_variables", "run_immediately", "job_id", "remote_device_id")
                    if options.get(k) is not None}
        else:
            body = {"job_variables": job_variables}
            if run_immediately is not None:
                body["run_immediately"] = run_immediately
            if job_id is not None:
                body["job_id"] = job_id
            if remote_device_id is not None:
                body["remote_device_id"] = remote_device_id
        res = await self._c.call("POST", "/api/v2/agent/subtasks", json_body=body)
        if not res["success"]:
            return res
        out = {"success": True, "inserted_ids": res.get("inserted_ids", [])}
        if "assignment_results" in res:
            out["assignment_results"] = res["assignment_results"]
        return out

    async def getSubTasks(self, planned_task_ids: list[str]) -> Result:  # noqa: N802
        return await self._c.call("POST", "/api/v2/agent/subtasks/status",
                                  json_body={"planned_task_ids": list(planned_task_ids)})


class BucketUtils:
    """``agent.utils.bucket``: the bucket of this job on this device."""

    def __init__(self, client: _Client) -> None:
        self._c = client

    async def get(self) -> Result:
        return await self._c.call("GET", "/api/v2/agent/bucket")

    async def set(self, data: dict) -> Result:
        return await self._c.call("PUT", "/api/v2/agent/bucket", json_body={"data": data})


class DeviceBucketUtils:
    """``agent.utils.deviceBucket``: the bucket of this device, shared by every job it runs."""

    def __init__(self, client: _Client) -> None:
        self._c = client

    async def read(self) -> Result:
        return await self._c.call("POST", "/api/v2/device-bucket/read", json_body={})

    async def merge(self, data: dict) -> Result:
        return await self._c.call("POST", "/api/v2/device-bucket/merge", json_body={"data": data})


class AgentUtils:
    """``agent.utils``."""

    def __init__(self, client: _Client) -> None:
        self._c = client
        self.job = JobUtils(client)
        self.bucket = BucketUtils(client)
        self.deviceBucket = DeviceBucketUtils(client)  # noqa: N815

    async def getAutomationVariables(self) -> Result:  # noqa: N802
        return await self._c.call("GET", "/api/v2/agent/variables")

    async def setAutomationVariables(self, variables: dict) -> Result:  # noqa: N802
        return await self._c.call("PUT", "/api/v2/agent/variables",
                                  json_body={"automation_variables": variables})


class AgentInfo:
    """``agent.info``."""

    def __init__(self, client: _Client) -> None:
        self._c = client

    async def getVerifiedPhoneNumber(self) -> str | None | Result:  # noqa: N802
        status, body = await self._c.request("GET", "/api/v2/devices/verified-phone-number")
        if status == 200:
            return body.get("phoneNumber") if isinstance(body, dict) else None
        return {"success": False, "error": _error_text(status, body)}


class Agent(_Client):
    """What automation code holds as ``agent``: ``agent.utils.job.*``, ``agent.utils.*``, ``agent.info.*``."""

    def __init__(self, base_url: str, agent_token: str, **kwargs: Any) -> None:
        super().__init__(base_url, agent_token, **kwargs)
        self.utils = AgentUtils(self)
        self.info = AgentInfo(self)
        self.assignment: dict | None = None

    @classmethod
    def from_assignment(cls, assignment: dict | str | Path, base_url: str, **kwargs: Any) -> Agent:
        """From a ``task_assigned`` message (or the JSON file the device runner recorded it in)."""
        if not isinstance(assignment, dict):
            assignment = json.loads(Path(assignment).read_text())
        agent = cls(base_url, assignment["agent_token"], **kwargs)
        agent.assignment = assignment
        return agent


# -- the employer / device-owner side ---------------------------------------------------------------------
class UserClient(_Client):
    """A user API token's view: jobs, planned tasks, applicants, balance, devices, launchAutomation."""

    async def createJob(self, **fields: Any) -> Result:  # noqa: N802
        return await self.call("POST", "/api/v2/jobs/submit", json_body=fields)

    async def jobDetails(self, job_id: str) -> Result:  # noqa: N802
        return await self.call("GET", "/api/v2/jobs/details", params={"job_id": job_id})

    async def myJobs(self, **filters: Any) -> Result:  # noqa: N802
        return await self.call("POST", "/api/v2/jobs/myjobs", json_body=filters)

    async def updateJobStatus(self, job_id: str, status: str) -> Result:  # noqa: N802
        return await self.call("PUT", "/api/v2/jobs/update-status",
                               json_body={"job_id": job_id, "status": status})

    async def submitPlannedTasks(self, job_id: str, inputs: list[str | dict],  # noqa: N802
                                 run_immediately: bool = False, remote_device_id: str | None = None,
                                 device_name: str | None = None) -> Result:
        body: dict = {"job_id": job_id, "run_immediately": run_immediately,
                      "inputs": [i if isinstance(i, str) else json.dumps(i) for i in inputs]}
        if remote_device_id:
            body["remote_device_id"] = remote_device_id
        if device_name:
            body["device_name"] = device_name
        return await self.call("POST", "/api/v2/tasks/planned", json_body=body)

    async def listPlannedTasks(self, job_id: str, **params: Any) -> Result:  # noqa: N802
        return await self.call("GET", "/api/v2/tasks/planned", params={"job_id": job_id, **params})

    async def deletePlannedTasks(self, planned_task_ids: list[str]) -> Result:  # noqa: N802
        return await self.call("DELETE", "/api/v2/tasks/planned",
                               json_body={"planned_task_ids": planned_task_ids})

    async def getApplicants(self, job_id: str, **filters: Any) -> Result:  # noqa: N802
        return await self.call("POST", "/api/v2/jobs/applicants", json_body={"job_id": job_id, **filters})

    async def updateApplicants(self, job_id: str, job_task_ids: list[str], status: str,  # noqa: N802
                               comment: str | None = None) -> Result:
        body: dict = {"job_id": job_id, "JobTasks_Ids": job_task_ids, "status": status}
        if comment is not None:
            body["comment"] = comment
        return await self.call("PUT", "/api/v2/jobs/applicants", json_body=body)

    async def taskDetails(self, task_id: str | None = None) -> Result:  # noqa: N802
        params = {"task_id": task_id} if task_id else None
        return await self.call("POST", "/api/v2/tasks/details", params=params, json_body={})

    async def balance(self) -> Result:
        return await self.call("GET", "/api/v2/user/balance")

    async def devices(self) -> Result:
        return await self.call("GET", "/api/v2/devices")

    async def registerDevice(self, name: str | None = None) -> Result:  # noqa: N802
        return await self.call("POST", "/api/v2/devices/register", json_body={"name": name} if name else {})

    async def getJobBucket(self, job_id: str, device_id: str) -> Result:  # noqa: N802
        return await self.call("GET", f"/api/v2/jobs/{job_id}/buckets/{device_id}")

    async def launchAutomation(self, device_id: str, command: str = "start", code: str | None = None,  # noqa: N802
                               automationId: str | None = None) -> Result:  # noqa: N803
        body: dict = {"device_id": device_id, "command": command}
        if code is not None:
            body["code"] = code
        if automationId is not None:
            body["automationId"] = automationId
        return await self.call("POST", "/api/v2/devices/launchAutomation", json_body=body)
