"""Automation runners: what the device agent does with the node's CONTROL messages.

- ``{command: start|stop, automationId, code}`` — ``launchAutomation``;
- ``{command: task_assigned, job_task_id, agent_token, ...}`` — a planned task was assigned to this
  device: the message (with the agent token the automation uses for the agent API, see
  ``device_tunnel.sdk.Agent.from_assignment``) is recorded for the automation to pick up.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .agent import AutomationRunner

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class SaveToDirRunner:
    """Saves the automation code under a folder (``<automationId>.js``) and records start/stop.

    A real phone plugs its own runner in here; this one lets an operator (and the tests) see exactly
    what the node delivered.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.running: set[str] = set()

    def _record_assignment(self, body: dict) -> dict:
        """Write ``tasks/<job_task_id>.json`` (owner-only permissions: it holds the agent token)."""
        task_id = _SAFE.sub("_", str(body.get("job_task_id") or "task"))
        folder = self.folder / "tasks"
        folder.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in body.items() if k != "id"}
        tmp = folder / f".{task_id}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, folder / f"{task_id}.json")  # atomic: a reader never sees half a file
        return {"automationId": task_id, "result": "recorded"}

    async def __call__(self, body: dict) -> dict:
        if body.get("command") == "task_assigned":
            return self._record_assignment(body)
        automation_id = _SAFE.sub("_", str(body.get("automationId") or body.get("id") or "automation"))
        command = body.get("command", "start")
        if command == "stop":
            self.running.discard(automation_id)
            return {"automationId": automation_id, "result": "stopped"}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{automation_id}.js").write_text(str(body.get("code", "")))
        self.running.add(automation_id)
        return {"automationId": automation_id, "result": "started"}


def make_runner(folder: str | None) -> AutomationRunner | None:
    return SaveToDirRunner(folder) if folder else None
