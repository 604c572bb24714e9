"""Python client SDK for automation code on a device and for employers / device owners (asyncio, standard
library only: it ships in the agent distribution, which must install on a phone without compiled wheels).

Automation code running on a device (seed 004 names and return shapes)::

    async with Agent.from_assignment("automations/tasks/<job_task_id>.json", "http://node:8000") as agent:
        task = await agent.utils.job.getCurrentTask()
        subs = await agent.utils.job.addSubTasks([{"email": "a@example.com"}], False)
        await agent.utils.job.submitTask("success", {"done": True}, True, [])

Every method returns the seed's shape: ``{"success": True, ...}`` or ``{"success": False, "error": ...}``
— an API-level failure (4xx/5xx) or a network failure is never raised. ``useAnotherTask`` returns the
task or ``None``; ``getVerifiedPhoneNumber`` returns the number or ``None`` (and the failure shape on
an error, where the seed's TypeScript types have no error branch).

Employers and device owners use :class:`UserClient` (user API token). ``marketplace_api.sdk`` re-exports
this module for the full install.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

Result = dict[str, Any]
MAX_RESPONSE = 64 * 1024 * 1024


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


class HttpError(Exception):
    """The server's answer is not HTTP/1.x."""


async def http_request(method: str, url: str, headers: dict[str, str], body: bytes | None,
                       ssl_context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on its own connection (``Connection: close``); (status, body bytes)."""
    u = urlsplit(url)
    https = u.scheme == "https"
    if u.scheme not in ("http", "https") or not u.hostname:
        raise HttpError(f"not an http(s) URL: {url!r}")
    reader, writer = await asyncio.open_connection(
        u.hostname, u.port or (443 if https else 80),
        ssl=(ssl_context or ssl.create_default_context()) if https else None)
    try:
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = [f"{method} {target} HTTP/1.1", f"Host: {u.netloc}", "Connection: close",
                "Accept: application/json", *(f"{k}: {v}" for k, v in headers.items())]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        status_line = (await reader.readline()).decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        fields: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            fields[k.strip().lower()] = v.strip()
        if method == "HEAD" or status in (204, 304):
            return status, b""
        if "chunked" in fields.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                out += await reader.readexactly(size)
                await reader.readline()
                if len(out) > MAX_RESPONSE:
                    raise HttpError("response too large")
            return status, bytes(out)
        if "content-length" in fields:
            length = int(fields["content-length"])
            if length > MAX_RESPONSE:
                raise HttpError("response too large")
            return status, await reader.readexactly(length)
        return status, await reader.read(MAX_RESPONSE)
    finally:
        writer.close()


class _Client:
    """A base URL and a bearer token; every call is one short HTTP/1.1 exchange."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._timeout = timeout
        self._ssl = ssl_context

    async def __aenter__(self) -> _Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing is kept open between calls; kept for ``async with`` and symmetry."""

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: dict | None = None) -> tuple[int, Any]:
        """(status, decoded body); a network failure is (0, message)."""
        url = self.base_url + path
        if params:
            url += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        body = None if json_body is None else json.dumps(json_body).encode()
        try:
            async with asyncio.timeout(self._timeout):
                status, raw = await http_request(method, url, {"Authorization": f"Bearer {self.token}"}, body,
                                                 self._ssl)
        except (OSError, TimeoutError, HttpError, ValueError, asyncio.IncompleteReadError) as exc:
            return 0, f"network error: {type(exc).__name__}: {exc}"
        text = raw.decode("utf-8", "replace")
        try:
            decoded = json.loads(text) if text else None
        except ValueError:
            decoded = text
        return status, decoded

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
