"""Devices whose public IP is being rotated, and the session opens waiting for them (sans-I/O).

While a device rotates, a new session for it does not fail: its open is parked here with a callback
and carried out when the rotation ends (the session's own timer bounds the wait). Nothing here
blocks or reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable

Resume = Callable[[], None]
CancelWait = Callable[[], None]


class RotationGate:
    """device id -> callbacks of the opens waiting for its rotation to end."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[Resume]] = {}

    def begin(self, device_id: str) -> None:
        """The device starts rotating: new opens for it wait."""
        self._waiting.setdefault(device_id, [])

    def end(self, device_id: str) -> int:
        """The rotation ended: resume every waiting open (in arrival order); how many there were."""
        waiters = self._waiting.pop(device_id, [])
        for resume in waiters:
            resume()
        return len(waiters)

    def is_rotating(self, device_id: str | None) -> bool:
        return device_id is not None and device_id in self._waiting

    def wait(self, device_id: str, resume: Resume) -> CancelWait:
        """Park an open until the rotation of ``device_id`` ends; call the result to give up."""
        waiters = self._waiting.setdefault(device_id, [])
        waiters.append(resume)

        def cancel() -> None:
            current = self._waiting.get(device_id)
            if current is not None and resume in current:
                current.remove(resume)
        return cancel

    def waiting(self, device_id: str) -> int:
        return len(self._waiting.get(device_id, ()))

    def rotating(self) -> list[str]:
        return list(self._waiting)
