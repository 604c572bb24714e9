"""All configuration in one place: environment variables with defaults.

Every setting is listed in ``SETTINGS`` so ``proxyorch serve --help`` and the README show the same
table. Read once at start-up with :func:`load_settings`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any

# (env var, attribute, type, default, help)
SETTINGS: list[tuple[str, str, type, Any, str]] = [
    ("DATA_DIR", "data_dir", str, "./data", "Where the embedded PostgreSQL, chDB, spool files and keys live"),
    ("BIND_HOST", "bind_host", str, "0.0.0.0", "Address the proxy, tunnel and API listeners bind to"),
    ("PROXY_PORT", "proxy_port", int, 1080, "Mixed SOCKS5 / HTTP proxy port"),
    ("TUNNEL_PORT", "tunnel_port", int, 7000, "Port device agents dial to open reverse tunnels"),
    ("API_PORT", "api_port", int, 8000, "HTTP API port (marketplace + RMS)"),
    ("NODE_NAME", "node_name", str, "", "Name of this node in logs and presence (default: hostname)"),
    ("DATABASE_URL", "database_url", str, "", "PostgreSQL URL; empty = start the embedded server under DATA_DIR"),
    ("CLICKHOUSE_URL", "clickhouse_url", str, "", "ClickHouse http(s) URL; empty = embedded chDB under DATA_DIR"),
    ("REDIS_URL", "redis_url", str, "", "Redis URL; set = invalidations via Redis pub/sub (multi-node)"),
    ("ADMIN_TOKEN", "admin_token", str, "", "Admin API token; empty = generated once under DATA_DIR"),
    ("RMS_KEY", "rms_key", str, "", "Base64 AES-256 key for passwords at rest; empty = key file under DATA_DIR"),
    ("AUTH_CACHE_TTL_MS", "auth_cache_ttl_ms", int, 100, "Longest time a credential record is served after a change"),
    ("AUTH_FAIL_LIMIT", "auth_fail_limit", int, 20, "Failed proxy logins per client address (and per id) per window"),
    ("AUTH_FAIL_WINDOW_S", "auth_fail_window_s", float, 60.0, "Window of the failed-login limit"),
    ("CONNECT_TIMEOUT_S", "connect_timeout_s", float, 10.0, "Device-side timeout to connect to a target"),
    ("HANDSHAKE_TIMEOUT_S", "handshake_timeout_s", float, 15.0, "Time a client has to finish the proxy handshake"),
    ("TUNNEL_PING_S", "tunnel_ping_s", float, 5.0, "Interval of tunnel keep-alive pings"),
    ("TUNNEL_DEAD_AFTER", "tunnel_dead_after", float, 15.0, "Tunnel declared dead after this long without traffic"),
    ("TUNNEL_WINDOW", "tunnel_window", int, 256 * 1024, "Initial per-stream flow-control window (bytes)"),
    ("TUNNEL_MAX_WINDOW", "tunnel_max_window", int, 8 * 1024 * 1024, "Largest auto-tuned per-stream window"),
    ("TUNNEL_CONN_WINDOW", "tunnel_conn_window", int, 64 * 1024 * 1024,
     "Connection window of one tunnel: received bytes it may hold over all its streams"),
    ("TUNNEL_MEMORY_BUDGET", "tunnel_memory_budget", int, 256 * 1024 * 1024,
     "Receive windows of all tunnels of the node together; windows shrink under pressure"),
    ("DRAIN_TIMEOUT_S", "drain_timeout_s", float, 10.0, "Graceful shutdown: how long sessions may drain"),
    ("DIRECT_EXIT", "direct_exit", bool, False, "Node connects to targets itself instead of via devices (server-side exit)"),
    ("DIRECT_EXIT_ALLOW_PRIVATE", "direct_exit_allow_private", bool, False, "Direct exit may reach private addresses"),
    ("REQUEST_LOG", "request_log", bool, True, "Write one ClickHouse row per proxy attempt"),
    ("LOG_BATCH_ROWS", "log_batch_rows", int, 10000, "Request-log batch size (rows)"),
    ("LOG_BATCH_S", "log_batch_s", float, 1.0, "Request-log batch interval (seconds)"),
    ("BANDWIDTH_FLUSH_S", "bandwidth_flush_s", float, 60.0, "Interim byte deltas of long sessions"),
    ("LOG_RETENTION_DAYS", "log_retention_days", int, 90, "Request-log TTL"),
    ("CLICKHOUSE_FAULT_FILE", "clickhouse_fault_file", str, "", "Test hook: request-log inserts fail while this file exists"),
    ("MAX_BODY_BYTES", "max_body_bytes", int, 1024 * 1024, "Largest JSON request body the API accepts"),
    ("LOG_LEVEL", "log_level", str, "INFO", "Python logging level"),
    ("IDEMPOTENCY_TTL_S", "idempotency_ttl_s", float, 86400.0, "How long an Idempotency-Key replays its first answer"),
    ("RESUBMIT_WINDOW_S", "resubmit_window_s", float, 6 * 3600.0, "Task market: time to resubmit after a PDQG rejection"),
    ("MARKET_MINUTE_S", "market_minute_s", float, 60.0,
     "Escrow jobs: seconds in one 'minute' of posting/task limits (test setting; keep 60 in production)"),
    ("MARKET_SWEEP_S", "market_sweep_s", float, 5.0, "Escrow jobs: interval of the close/timeout/auto-approve sweep"),
    ("SETTLEMENT_DEADLINE_S", "settlement_deadline_s", float, 86400.0,
     "Escrow jobs: a settlement not approved or disputed within this is approved automatically"),
    ("PLATFORM_FEE_BPS", "platform_fee_bps", int, 3000, "Escrow jobs: platform fee on each place, basis points"),
    ("CLUSTER_SECRET", "cluster_secret", str, "",
     "Shared by the nodes of a cluster: authenticates node-to-node links and /internal/ endpoints"),
    ("LOG_STORE_URL", "log_store_url", str, "",
     "http://HOST:API_PORT of the node owning the request log; empty = this node owns its own store"),
    ("WORKERS", "workers", int, 1, "Node processes on this machine sharing the ports (SO_REUSEPORT)"),
    ("RELAY_PORT", "relay_port", int, 0, "Node-to-node relay listener port (0 = no relay)"),
    ("INTERNAL_API_PORT", "internal_api_port", int, 0,
     "Extra API listener on 127.0.0.1 (set by the supervisor for worker 0, which owns the log store)"),
    ("REUSE_PORT", "reuse_port", bool, False, "Listen with SO_REUSEPORT (set by the supervisor for its workers)"),
]


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


@dataclass
class Settings:
    """Resolved settings of one process. Field names mirror ``SETTINGS``."""

    data_dir: str = "./data"
    bind_host: str = "0.0.0.0"
    proxy_port: int = 1080
    tunnel_port: int = 7000
    api_port: int = 8000
    node_name: str = ""
    database_url: str = ""
    clickhouse_url: str = ""
    redis_url: str = ""
    admin_token: str = ""
    rms_key: str = ""
    auth_cache_ttl_ms: int = 100
    auth_fail_limit: int = 20
    auth_fail_window_s: float = 60.0
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 15.0
    tunnel_ping_s: float = 5.0
    tunnel_dead_after: float = 15.0
    tunnel_window: int = 256 * 1024
    tunnel_max_window: int = 8 * 1024 * 1024
    tunnel_conn_window: int = 64 * 1024 * 1024
    tunnel_memory_budget: int = 256 * 1024 * 1024
    drain_timeout_s: float = 10.0
    direct_exit: bool = False
    direct_exit_allow_private: bool = False
    request_log: bool = True
    log_batch_rows: int = 10000
    log_batch_s: float = 1.0
    bandwidth_flush_s: float = 60.0
    log_retention_days: int = 90
    clickhouse_fault_file: str = ""
    max_body_bytes: int = 1024 * 1024
    log_level: str = "INFO"
    idempotency_ttl_s: float = 86400.0
    resubmit_window_s: float = 6 * 3600.0
    market_minute_s: float = 60.0
    market_sweep_s: float = 5.0
    settlement_deadline_s: float = 86400.0
    platform_fee_bps: int = 3000
    cluster_secret: str = ""
    log_store_url: str = ""
    workers: int = 1
    relay_port: int = 0
    internal_api_port: int = 0
    reuse_port: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.node_name:
            self.node_name = socket.gethostname()


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from ``env`` (default ``os.environ``) then apply keyword overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for var, attr, kind, _default, _help in SETTINGS:
        if var in env and env[var] != "":
            values[attr] = _parse(kind, env[var])
    values.update(overrides)
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})


def settings_help() -> str:
    """The settings table as text, for ``--help``."""
    lines = ["environment variables:"]
    for var, _attr, _kind, default, text in SETTINGS:
        lines.append(f"  {var:<26} {text} (default: {default!r})")
    return "\n".join(lines)
