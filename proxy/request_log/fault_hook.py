"""TEST ONLY: the ``TEST_ONLY_CLICKHOUSE_FAULT_FILE`` hook (request-log inserts fail while a file exists).

The e2e tests use it to take ClickHouse "down" under a real ``proxyorch serve`` process without
stopping the embedded engine. Never set that setting in production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class FaultInjectingClickHouse:
    """Wraps a ClickHouse client: ``insert_rows`` raises while ``flag_path`` exists."""

    def __init__(self, inner: Any, flag_path: str) -> None:
        self.inner = inner
        self.flag = Path(flag_path)

    def insert_rows(self, *args: Any, **kwargs: Any) -> Any:
        if self.flag.exists():
            raise ConnectionError("ClickHouse unavailable (fault injected)")
        return self.inner.insert_rows(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
