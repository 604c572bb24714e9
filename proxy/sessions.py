"""Registry of live proxy sessions, by connection and by device, so changes can terminate them."""

from __future__ import annotations

from typing import Protocol


class Terminable(Protocol):
    connection_id: str | None
    device_id: str | None

    def terminate(self, reason: str) -> None: ...


class SessionRegistry:
    """Node-local. ``terminate_connection`` closes every live session of a connection."""

    def __init__(self) -> None:
        self._by_connection: dict[str, set[Terminable]] = {}
        self._by_device: dict[str, set[Terminable]] = {}
        self.all: set[Terminable] = set()

    def add(self, session: Terminable) -> None:
        self.all.add(session)
        if session.connection_id:
            self._by_connection.setdefault(session.connection_id, set()).add(session)
        if session.device_id:
            self._by_device.setdefault(session.device_id, set()).add(session)

    def remove(self, session: Terminable) -> None:
        self.all.discard(session)
        for index, key in ((self._by_connection, session.connection_id), (self._by_device, session.device_id)):
            if key:
                group = index.get(key)
                if group is not None:
                    group.discard(session)
                    if not group:
                        del index[key]

    def of_connection(self, connection_id: str) -> list[Terminable]:
        return list(self._by_connection.get(connection_id, ()))

    def of_device(self, device_id: str) -> list[Terminable]:
        return list(self._by_device.get(device_id, ()))

    def terminate_connection(self, connection_id: str, reason: str) -> int:
        sessions = self.of_connection(connection_id)
        for s in sessions:
            s.terminate(reason)
        return len(sessions)

    def __len__(self) -> int:
        return len(self.all)
