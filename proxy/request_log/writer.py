"""Request-log writer: batches rows off the hot path and never loses them.

Producers (the event loop, any thread) only append to a deque (O(1), no lock, no I/O). One
background thread drains it, cuts batches of ``batch_rows`` rows or ``batch_seconds`` age, and
inserts them in order, each with a dedup token fixed when the batch is formed. While ClickHouse
fails, batches stay in memory (retried with back-off) up to ``max_memory_rows``; beyond that the
oldest go to an append-only spool (JSON lines, fsync per batch) under ``spool_dir``. The spool
is always older than the memory queue, so it is replayed first, in order, and its files are
deleted once written. Flush and close write or spool everything, so a clean shutdown loses
nothing and a SIGKILL loses only rows not yet spooled. The same tokens on replay make a batch
that did reach ClickHouse count once.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from .clickhouse import ClickHouse
from .columns import LEGACY_SPOOL_COLUMNS, TABLES, Table
from .columns import REQUEST_LOG as REQUEST_LOG_TABLE
from .columns import TRAFFIC_DELTA as TRAFFIC_DELTA_TABLE

log = logging.getLogger(__name__)

REQUEST_LOG = REQUEST_LOG_TABLE.name
TRAFFIC_DELTA = TRAFFIC_DELTA_TABLE.name
REQUEST_LOG_COLUMNS = REQUEST_LOG_TABLE.names
TRAFFIC_DELTA_COLUMNS = TRAFFIC_DELTA_TABLE.names
COLUMNS = {name: table.names for name, table in TABLES.items()}

_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class SessionRecord:
    """One SOCKS5 / HTTP CONNECT attempt, recorded when the session ends."""

    timestamp: datetime          # session start, UTC
    connection_id: str
    device_id: str
    server_node: str
    target: str                  # "host:port"
    target_type: str             # "domain" | "ipv4" | "ipv6"
    port: int
    resolved_ip: str
    action: str                  # "allowed" | "blocked" | "failed"
    block_reason: str | None
    bytes_in: int                # target -> client
    bytes_out: int               # client -> target
    duration_ms: int
    client_addr: str
    protocol: str                # "socks5" | "http"
    reply_code: int
    error: str
    device_node: str = ""        # node holding the device's tunnel; "" = this node (server_node)

    def to_row(self) -> tuple:
        """The ``request_log`` row, in ``REQUEST_LOG_COLUMNS`` order (built by ``columns.REQUEST_LOG``)."""
        return REQUEST_LOG_TABLE.row(self)


@dataclass(slots=True)
class TrafficCursor:
    """Turns one session's running byte totals into ``traffic_delta`` rows.

    Call :meth:`emit` every BANDWIDTH_FLUSH_S while the session is open and once at close with
    the totals so far: the deltas then add up exactly to the totals of its ``request_log`` row.
    """

    device_id: str
    connection_id: str
    sent_in: int = 0
    sent_out: int = 0

    def emit(self, writer: RequestLogWriter, ts: datetime, bytes_in_total: int, bytes_out_total: int) -> None:
        d_in, d_out = bytes_in_total - self.sent_in, bytes_out_total - self.sent_out
        self.sent_in, self.sent_out = bytes_in_total, bytes_out_total
        writer.record_traffic(ts, self.device_id, self.connection_id, d_in, d_out)


@dataclass(slots=True)
class _Batch:
    table: str
    token: str
    rows: list[tuple]
    columns: list[str]           # the names of the rows' values, fixed when the batch is cut


class _Flush:
    """Marker queued by :meth:`RequestLogWriter.flush`; set once all rows before it are safe."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class Spool:
    """Append-only spool: segment files ``spool-<ns>.jsonl``, one batch per line, fsync per batch.

    Segments are replayed oldest first; a torn last line (crash mid-write) is cut off on open.
    Only the writer thread touches it; an exclusive ``flock`` keeps other processes out.
    """

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise RuntimeError(f"spool directory {directory} is in use by another writer") from exc
        self.segments: list[Path] = sorted(self.dir.glob("spool-*.jsonl"))
        for seg in self.segments:
            self._cut_torn_tail(seg)
        self._active: Any = None          # open file of the segment being appended to
        self._active_path: Path | None = None
        self.read_offset = 0              # bytes of segments[0] already replayed

    @staticmethod
    def _cut_torn_tail(path: Path) -> None:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("spool %s: dropping a torn last line (%d bytes)", path, len(data) - keep)
            with open(path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())

    def __bool__(self) -> bool:
        return bool(self.segments)

    def size_bytes(self) -> int:
        total = 0
        for seg in list(self.segments):
            try:
                total += seg.stat().st_size
            except OSError:
                pass
        return total - self.read_offset

    def append(self, batch: _Batch) -> None:
        """Write one batch durably (written + fsynced before returning)."""
        if self._active is None:
            path = self.dir / f"spool-{time.time_ns():020d}.jsonl"
            while path.exists():
                path = self.dir / f"spool-{time.time_ns():020d}.jsonl"
            self._active = open(path, "ab")  # noqa: SIM115 - kept open across appends
            self._active_path = path
            self.segments.append(path)
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        line = orjson.dumps({"table": batch.table, "token": batch.token, "columns": batch.columns,
                             "rows": batch.rows})
        self._active.write(line + b"\n")
        self._active.flush()
        os.fsync(self._active.fileno())

    def seal(self) -> None:
        """Stop appending to the current segment (the next append opens a new one)."""
        if self._active is not None:
            self._active.close()
            self._active = None
            self._active_path = None

    def oldest(self) -> Generator[tuple[_Batch, int], None, None]:
        """Batches of the oldest segment from ``read_offset``, each with the offset after it."""
        seg = self.segments[0]
        if seg == self._active_path:
            self.seal()
        with open(seg, "rb") as f:
            f.seek(self.read_offset)
            for line in f:
                end = f.tell()
                batch = self._parse(line, seg)
                if batch is None:
                    self.read_offset = end
                    continue
                yield batch, end

    @staticmethod
    def _parse(line: bytes, seg: Path) -> _Batch | None:
        try:
            obj = orjson.loads(line)
            table = obj["table"]
            if table not in LEGACY_SPOOL_COLUMNS:
                raise ValueError(f"unknown table {table!r}")
            columns = list(obj.get("columns") or LEGACY_SPOOL_COLUMNS[table])  # format 1 had no names
            ts = columns.index("timestamp")
            rows = []
            for r in obj["rows"]:
                if len(r) != len(columns):
                    raise ValueError(f"a row has {len(r)} values for {len(columns)} columns")
                r[ts] = datetime.fromisoformat(r[ts])
                rows.append(tuple(r))
            return _Batch(table, obj["token"], rows, columns)
        except Exception as exc:  # a corrupt line must not block the rest
            log.error("spool %s: skipping an unreadable batch: %r", seg, exc)
            return None

    def drop_oldest(self) -> None:
        """The oldest segment is fully replayed: delete it."""
        seg = self.segments.pop(0)
        seg.unlink(missing_ok=True)
        self.read_offset = 0

    def close(self) -> None:
        self.seal()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = -1


class RequestLogWriter:
    """Batches ``request_log`` rows and ``traffic_delta`` byte deltas into ClickHouse."""

    def __init__(
        self,
        client_factory: Callable[[], ClickHouse],
        spool_dir: str,
        batch_rows: int = 10000,
        batch_seconds: float = 1.0,
        max_memory_rows: int = 100000,
        tables: dict[str, Table] | None = None,
    ) -> None:
        self._factory = client_factory
        self._tables = TABLES if tables is None else tables   # request_log / traffic_delta specs
        self._spool_dir = spool_dir
        self.batch_rows = max(1, batch_rows)
        self.batch_seconds = batch_seconds
        self.max_memory_rows = max(self.batch_rows, max_memory_rows)
        self._queue: deque[Any] = deque()            # SessionRecord | traffic tuple | _Flush
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._spool: Spool | None = None
        self._ch: ClickHouse | None = None
        # writer-thread state
        self._current: dict[str, list[tuple]] = {REQUEST_LOG: [], TRAFFIC_DELTA: []}
        self._current_since: dict[str, float] = {}
        self._last_drain = time.monotonic()
        self._outbox: deque[_Batch] = deque()
        self._outbox_rows = 0
        self._failing = False
        self._backoff = _BACKOFF_MIN_S
        self._retry_at = 0.0
        self._stats: dict[str, Any] = {
            "rows_written": 0, "rows_spooled": 0, "rows_replayed": 0, "batches_written": 0,
            "batches_failed": 0, "rows_invalid": 0, "last_error": None,
        }

    # ---- producer side (any thread, never blocks) ------------------------------------------

    def record_session(self, rec: SessionRecord) -> None:
        """Queue one attempt's row."""
        self._push(rec)

    def record_traffic(
        self, ts: datetime, device_id: str, connection_id: str, bytes_in: int, bytes_out: int
    ) -> None:
        """Queue a byte delta of an open or closing session (feeds the bandwidth rollups)."""
        if bytes_in or bytes_out:
            self._push((ts, device_id, connection_id, bytes_in, bytes_out))

    def _push(self, item: Any) -> None:
        # No wake-up per row: the writer thread comes by every batch_seconds on its own (a wake-up per
        # row cost the event loop a Condition.notify and the writer a GIL hand-off per session); a full
        # batch wakes it at once.
        q = self._queue
        q.append(item)
        if len(q) % self.batch_rows == 0:
            self._wake.set()

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: rows_written, rows_spooled, rows_replayed, batches_failed, queue_len, ..."""
        out = dict(self._stats)
        out["queue_len"] = len(self._queue) + self._outbox_rows + sum(len(v) for v in self._current.values())
        spool = self._spool
        out["spool_bytes"] = spool.size_bytes() if spool else 0
        return out

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while inserts are failing (ClickHouse down); rows then wait in memory / the spool."""
        return not self._failing

    def start(self) -> None:
        """Lock the spool directory and start the writer thread (which replays the spool first)."""
        if self._thread is not None:
            return
        self._spool = Spool(self._spool_dir)
        self._thread = threading.Thread(target=self._run, name="request-log-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row recorded before the call is written or spooled."""
        if self._thread is None or not self._thread.is_alive():
            return not self._queue and not self._outbox_rows
        marker = _Flush()
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout) and marker.ok

    async def aflush(self, timeout: float = 10.0) -> bool:
        """:meth:`flush` without blocking the event loop."""
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop the thread; whatever cannot be written stays in the spool."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.error("request-log writer did not stop in %.1fs; %d rows not yet safe", timeout,
                      self.stats["queue_len"])
            return
        self._thread = None

    # ---- writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self._wait_time())
                self._wake.clear()
                markers = self._drain()
                stopping = self._stopping and not self._queue
                force = bool(markers) or stopping
                self._cut(force)
                if force or time.monotonic() >= self._retry_at:
                    self._write()
                if force or self._failing:
                    # During an outage batches go to disk at once, so a crash loses nothing batched.
                    self._spool_outbox(0)
                else:
                    self._spool_outbox(self.max_memory_rows)
                for m in markers:
                    m.ok = self._outbox_rows == 0
                    m.done.set()
                if stopping:
                    break
        except Exception:  # never expected; put what we hold on disk
            log.exception("request-log writer crashed")
            self._failing = True
            markers = self._drain()
            self._spool_outbox(0, cut_current=True)
            for m in markers:
                m.done.set()
        finally:
            if self._spool is not None:
                self._spool.close()

    def _wait_time(self) -> float:
        now = time.monotonic()
        wait = self.batch_seconds
        if self._queue:  # queued since the last drain: cut batch_seconds after it at the latest
            wait = min(wait, self._last_drain + self.batch_seconds - now)
        for since in self._current_since.values():
            wait = min(wait, since + self.batch_seconds - now)
        if self._outbox or self._spool:
            wait = min(wait, self._retry_at - now)
        return max(0.0, wait)

    def _drain(self) -> list[_Flush]:
        """Move queued items into the current batches; stop early when memory is full and
        ClickHouse is healthy (write first rather than spool)."""
        q, markers, now = self._queue, [], time.monotonic()
        # the rows queued since the last drain are at most that old: a batch's age counts from there
        since, self._last_drain = self._last_drain, now
        while self._failing or self._outbox_rows < self.max_memory_rows:
            try:
                item = q.popleft()
            except IndexError:
                break
            if isinstance(item, _Flush):
                markers.append(item)
                continue
            try:
                table = REQUEST_LOG if isinstance(item, SessionRecord) else TRAFFIC_DELTA
                row = self._tables[table].row(item)
            except Exception as exc:  # a malformed record must not stop the writer
                self._stats["rows_invalid"] += 1
                log.error("request log: dropping a malformed record %r: %r", item, exc)
                continue
            cur = self._current[table]
            if not cur:
                self._current_since[table] = since
            cur.append(row)
            if len(cur) >= self.batch_rows:
                self._cut_table(table)
        return markers

    def _cut(self, force: bool) -> None:
        now = time.monotonic()
        for table, rows in self._current.items():
            if rows and (force or now - self._current_since[table] >= self.batch_seconds):
                self._cut_table(table)

    def _cut_table(self, table: str) -> None:
        rows = self._current[table]
        self._current[table] = []
        self._current_since.pop(table, None)
        self._outbox.append(_Batch(table, uuid.uuid4().hex, rows, self._tables[table].names))
        self._outbox_rows += len(rows)

    def _client(self) -> ClickHouse:
        if self._ch is None:
            self._ch = self._factory()
        return self._ch

    def _write(self) -> None:
        """Replay the spool (older), then the memory queue, in order; stop at the first failure."""
        spool = self._spool
        assert spool is not None
        if not spool and not self._outbox:
            return
        try:
            ch = self._client()
            while spool:
                batches = spool.oldest()
                try:
                    for batch, end in batches:
                        self._insert(ch, batch)
                        spool.read_offset = end
                        self._count_written(batch, replayed=True)
                finally:
                    batches.close()
                spool.drop_oldest()
            while self._outbox:
                batch = self._outbox[0]
                self._insert(ch, batch)
                self._outbox.popleft()
                self._outbox_rows -= len(batch.rows)
                self._count_written(batch, replayed=False)
        except Exception as exc:
            self._stats["batches_failed"] += 1
            self._stats["last_error"] = repr(exc)
            if not self._failing:
                log.warning("request log: ClickHouse insert failed, keeping rows: %r", exc)
            self._failing = True
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            return
        if self._failing:
            log.info("request log: ClickHouse writes recovered")
        self._failing = False
        self._backoff = _BACKOFF_MIN_S
        self._retry_at = 0.0

    def _insert(self, ch: ClickHouse, batch: _Batch) -> None:
        """Insert with the batch's own column names; values of columns the table no longer has
        (dropped by a later migration) are left out rather than blocking every later batch."""
        columns, rows = batch.columns, batch.rows
        known = ch.table_columns(batch.table)
        if not set(columns) <= known:
            keep = [i for i, c in enumerate(columns) if c in known]
            log.warning("request log: batch %s has columns %s the table lacks; inserting without them",
                        batch.token, sorted(set(columns) - known))
            columns = [columns[i] for i in keep]
            rows = [tuple(r[i] for i in keep) for r in rows]
        ch.insert_rows(batch.table, rows, columns, batch.token)

    def _count_written(self, batch: _Batch, *, replayed: bool) -> None:
        self._stats["rows_written"] += len(batch.rows)
        self._stats["batches_written"] += 1
        if replayed:
            self._stats["rows_replayed"] += len(batch.rows)

    def _spool_outbox(self, keep_rows: int, cut_current: bool = False) -> None:
        """Move the oldest in-memory batches to the spool until at most ``keep_rows`` remain."""
        if cut_current:
            self._cut(force=True)
        spool = self._spool
        if spool is None:
            return
        while self._outbox and self._outbox_rows > keep_rows:
            batch = self._outbox[0]
            try:
                spool.append(batch)
            except OSError as exc:
                self._stats["last_error"] = f"spool: {exc!r}"
                log.error("request log: cannot spool %d rows: %r", len(batch.rows), exc)
                return
            self._outbox.popleft()
            self._outbox_rows -= len(batch.rows)
            self._stats["rows_spooled"] += len(batch.rows)
