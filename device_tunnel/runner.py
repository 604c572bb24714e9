"""Automation runners: what the device agent does with a ``launchAutomation`` control message."""

from __future__ import annotations

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

    async def __call__(self, body: dict) -> dict:
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
