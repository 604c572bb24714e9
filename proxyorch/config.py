"""All configuration in one place: environment variables with defaults.

Every setting is listed ONCE in ``SETTINGS`` as (ENV, attribute, type, default, help): that tuple is
the only place its default lives; ``proxyorch serve --help`` and the README show the same table.
The :class:`Settings` dataclass only declares each attribute's type (a default written there must
equal the one in ``SETTINGS``, or importing this module fails). Read once at start-up with
:func:`load_settings`: a malformed value or an unknown setting name raises :class:`ConfigError`,
which ``proxyorch`` prints as one line before exiting with status 2.

Adding a setting: one tuple in ``SETTINGS`` and one ``name: type`` line in ``Settings``.
Settings whose name starts with ``TEST_ONLY_`` are fault hooks for the test suite; never set them
in production.
"""

from __future__ import annotations

import os
import socket
from dataclasses import MISSING, dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting is unknown or its value malformed (raised at start-up, before anything listens)."""


@dataclass(frozen=True, slots=True)
class Rate:
    """A request rate limit: ``per_second`` sustained with bursts of ``burst``; ``0`` = unlimited.

    Written ``RATE`` or ``RATE:BURST`` (``"50:200"``); without a burst it is twice the rate.
    """

    per_second: float
    burst: float

    @classmethod
    def parse(cls, raw: str) -> Rate:
        rate_s, _, burst_s = raw.strip().partition(":")
        rate = float(rate_s)
        burst = float(burst_s) if burst_s.strip() else 2 * rate
        if rate < 0 or burst < 0 or (rate > 0 and burst < 1):
            raise ValueError("rate and burst must be >= 0, burst >= 1")
        return cls(rate, burst)

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def __str__(self) -> str:
        return f"{self.per_second:g}:{self.burst:g}"


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
    ("CLUSTER_SECRET", "cluster_secret", str, "", "Shared by the nodes of a cluster: authenticates relay links and /internal/"),
    ("RELAY_PORT", "relay_port", int, 0, "Node-to-node relay listener port; 0 = no relay (single node; under --workers: private ports on 127.0.0.1)"),
    ("RELAY_BIND_HOST", "relay_bind_host", str, "", "Address the relay listener binds (default BIND_HOST)"),
    ("RELAY_ADVERTISE", "relay_advertise", str, "",
     "host:port the other nodes dial to relay to this one (default 127.0.0.1:RELAY_PORT)"),
    ("API_ADVERTISE", "api_advertise", str, "",
     "http://HOST:PORT the other nodes use to reach this node's API, e.g. for the cluster-wide sessions list "
     "(default http://127.0.0.1:API_PORT; under --workers each worker's private port)"),
    ("RELAY_TLS", "relay_tls", bool, True,
     "Relay links over TLS 1.3 with the tunnel certificate (TUNNEL_TLS_CERT/KEY, which the nodes share), the "
     "dialer pinning it; 0 = plaintext links with only the HMAC handshake, for a private network"),
    ("PRESENCE_TTL_S", "presence_ttl_s", float, 5.0,
     "Device and node presence expire this long after the last heartbeat (a dead node's devices, its name)"),
    ("ADMIN_TOKEN", "admin_token", str, "", "Admin API token; empty = generated once under DATA_DIR"),
    ("RMS_KEY", "rms_key", str, "", "Base64 AES-256 key for passwords at rest; empty = key file under DATA_DIR"),
    ("AUTH_CACHE_TTL_MS", "auth_cache_ttl_ms", int, 100, "Longest time a credential record is served after a change"),
    ("AUTH_FAIL_LIMIT", "auth_fail_limit", int, 20,
     "Failed proxy / device logins per client address (and per id) per window"),
    ("AUTH_FAIL_WINDOW_S", "auth_fail_window_s", float, 60.0, "Window of the failed-login limit"),
    ("CONNECT_TIMEOUT_S", "connect_timeout_s", float, 10.0, "Device-side timeout to connect to a target"),
    ("HANDSHAKE_TIMEOUT_S", "handshake_timeout_s", float, 15.0, "Time a client has to finish the proxy handshake"),
    ("MAX_UNAUTH_PER_IP", "max_unauth_per_ip", int, 64,
     "Concurrent not-yet-authenticated proxy connections per client address (more are closed at once)"),
    ("TUNNEL_PING_S", "tunnel_ping_s", float, 5.0, "Interval of tunnel keep-alive pings"),
    ("TUNNEL_DEAD_AFTER", "tunnel_dead_after", float, 15.0, "Tunnel declared dead after this long without traffic"),
    ("TUNNEL_WINDOW", "tunnel_window", int, 256 * 1024, "Initial per-stream flow-control window (bytes)"),
    ("TUNNEL_TLS", "tunnel_tls", bool, True, "Serve the tunnel port over TLS 1.3 (0 = plaintext, only behind a TLS terminator)"),
    ("TUNNEL_TLS_CERT", "tunnel_tls_cert", str, "", "Tunnel certificate chain (PEM); empty = self-signed, created once under DATA_DIR"),
    ("TUNNEL_TLS_KEY", "tunnel_tls_key", str, "", "Private key of TUNNEL_TLS_CERT (PEM)"),
    ("PUBLIC_TUNNEL_ADDR", "public_tunnel_addr", str, "", "HOST:PORT agents dial, shown in agent_command (default BIND_HOST:TUNNEL_PORT)"),
    ("TUNNEL_MAX_WINDOW", "tunnel_max_window", int, 8 * 1024 * 1024, "Largest auto-tuned per-stream window"),
    ("TUNNEL_CONN_WINDOW", "tunnel_conn_window", int, 64 * 1024 * 1024,
     "Connection window of one tunnel: received bytes it may hold over all its streams"),
    ("TUNNEL_MEMORY_BUDGET", "tunnel_memory_budget", int, 256 * 1024 * 1024,
     "Receive windows of all tunnels of the node together; windows shrink under pressure"),
    ("DRAIN_TIMEOUT_S", "drain_timeout_s", float, 10.0, "Graceful shutdown: how long sessions may drain"),
    ("OPTIMISTIC_OPEN", "optimistic_open", bool, False, "SOCKS5/CONNECT through a device tunnel: answer the client at once and send its first bytes with the open (one mobile round trip less per session); a target that then fails resets the client, the request log keeps the real reply code"),
    ("DIRECT_EXIT", "direct_exit", bool, False, "Node connects to targets itself instead of via devices (server-side exit)"),
    ("DIRECT_EXIT_ALLOW_PRIVATE", "direct_exit_allow_private", bool, False, "Direct exit may reach private addresses"),
    ("REQUEST_LOG", "request_log", bool, True, "Write one ClickHouse row per proxy attempt"),
    ("LOG_BATCH_ROWS", "log_batch_rows", int, 10000, "Request-log batch size (rows)"),
    ("LOG_BATCH_S", "log_batch_s", float, 5.0, "Request-log batch interval (seconds)"),
    ("BANDWIDTH_FLUSH_S", "bandwidth_flush_s", float, 60.0, "Interim byte deltas of long sessions"),
    ("USAGE_FLUSH_S", "usage_flush_s", float, 1.0,
     "Per-connection usage counters (quotas) are written to PostgreSQL this often; a SIGKILL loses at most this"),
    ("LOG_RETENTION_DAYS", "log_retention_days", int, 90, "Request-log TTL"),
    ("MAX_BODY_BYTES", "max_body_bytes", int, 1024 * 1024, "Largest JSON request body the API accepts (larger: 413)"),
    ("API_BODY_TIMEOUT_S", "api_body_timeout_s", float, 30.0, "A request body not complete this long after its headers: 408, connection closed"),
    ("API_RATE_PER_TOKEN", "api_rate_per_token", Rate, Rate(200, 2000), "API requests/s per bearer or admin token, RATE[:BURST]; 0 = off (429 beyond)"),
    ("API_RATE_PER_IP", "api_rate_per_ip", Rate, Rate(1000, 5000), "API requests/s per client address, RATE[:BURST]; 0 = off (/healthz, /metrics exempt)"),
    ("PUBLIC_API_URL", "public_api_url", str, "", "API URL sent to device agents with a task (empty: they use the node's address and API_PORT)"),
    ("ASSIGN_RETRY_DELAY_S", "assign_retry_delay_s", float, 5.0, "run_immediately: pause between the assignment attempts of planned tasks"),
    ("ASSIGN_SWEEP_INTERVAL_S", "assign_sweep_interval_s", float, 2.0, "Interval of the background sweep that assigns planned tasks and expires overdue ones"),
    ("AGENT_DELIVERY_SWEEP_S", "agent_delivery_sweep_s", float, 1.0, "Interval of the sweep that delivers assigned tasks a notification missed"),
    ("TEST_ONLY_CLICKHOUSE_FAULT_FILE", "test_only_clickhouse_fault_file", str, "", "TEST ONLY fault hook: request-log inserts fail while this file exists"),
    ("LOG_LEVEL", "log_level", str, "INFO", "Python logging level"),
    ("IDEMPOTENCY_TTL_S", "idempotency_ttl_s", float, 86400.0, "How long an Idempotency-Key replays its first answer"),
    ("RESUBMIT_WINDOW_S", "resubmit_window_s", float, 6 * 3600.0, "Task market: time to resubmit after a PDQG rejection"),
    ("MARKET_MINUTE_S", "market_minute_s", float, 60.0,
     "Escrow jobs: seconds in one 'minute' of posting/task limits (test setting; keep 60 in production)"),
    ("MARKET_SWEEP_S", "market_sweep_s", float, 5.0, "Escrow jobs: interval of the close/timeout/auto-approve sweep"),
    ("SETTLEMENT_DEADLINE_S", "settlement_deadline_s", float, 86400.0,
     "Escrow jobs: a settlement not approved or disputed within this is approved automatically"),
    ("PLATFORM_FEE_BPS", "platform_fee_bps", int, 3000, "Escrow jobs: platform fee on each place, basis points"),
    ("ROTATE_MIN_INTERVAL_S", "rotate_min_interval_s", float, 10.0,
     "IP rotation: a device's next rotation by the API no sooner than this after the end of its previous one (429)"),
    ("ROTATE_WAIT_S", "rotate_wait_s", float, 30.0,
     "IP rotation: how long a new session for a rotating device waits before failing 0x03/502"),
    ("ROTATION_MIN_TIMER_S", "rotation_min_timer_s", int, 60,
     "IP rotation: smallest interval_s of a rotation timer (test setting below 60; keep 60 in production)"),
    ("LOG_STORE_URL", "log_store_url", str, "",
     "http://HOST:API_PORT of the node owning the request log; empty = this node owns its own store"),
    ("WORKERS", "workers", int, 1, "Node processes on this machine sharing the ports (SO_REUSEPORT)"),
    ("INTERNAL_API_PORT", "internal_api_port", int, 0,
     "Extra API listener on INTERNAL_API_HOST (set by the supervisor for each worker: its own API address; worker 0's also serves the log store). "
     "Given to a supervisor: worker i uses INTERNAL_API_PORT + i (fixed ports for a firewall) instead of free ones"),
    ("INTERNAL_API_HOST", "internal_api_host", str, "127.0.0.1",
     "Address of the INTERNAL_API_PORT listener (the supervisor sets BIND_HOST when API_ADVERTISE says the workers are reached from other machines)"),
    ("REUSE_PORT", "reuse_port", bool, False, "Listen with SO_REUSEPORT (set by the supervisor for its workers)"),
]


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse(kind: type, raw: str) -> Any:
    """``raw`` as ``kind``; ValueError when malformed."""
    if kind is bool:
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        return word in _TRUE
    if kind in (int, float):
        value = kind(raw.strip())
        if value < 0 or value != value:  # no setting is negative; NaN is not a number
            raise ValueError("must be a non-negative number")
        return value
    parse = getattr(kind, "parse", None)
    return parse(raw) if parse is not None else kind(raw)


def _settings_dataclass(cls: type) -> type:
    """Give each field of ``cls`` its default from ``SETTINGS`` (the only place defaults live)."""
    declared = {name for name in cls.__annotations__ if name != "extra"}
    listed = {attr for _var, attr, _kind, _default, _help in SETTINGS}
    if declared != listed:
        raise TypeError(f"Settings fields and SETTINGS differ: {sorted(declared ^ listed)}")
    for var, attr, _kind, default, _help in SETTINGS:
        written = cls.__dict__.get(attr, MISSING)
        if written is not MISSING and written != default:
            raise TypeError(f"{var}: default {written!r} in Settings differs from {default!r} in SETTINGS")
        setattr(cls, attr, default)
    return dataclass(cls)


@_settings_dataclass
class Settings:
    """Resolved settings of one process. Field names mirror ``SETTINGS`` (defaults come from there)."""

    data_dir: str
    bind_host: str
    proxy_port: int
    tunnel_port: int
    api_port: int
    node_name: str
    database_url: str
    clickhouse_url: str
    redis_url: str
    admin_token: str
    rms_key: str
    auth_cache_ttl_ms: int
    auth_fail_limit: int
    auth_fail_window_s: float
    connect_timeout_s: float
    handshake_timeout_s: float
    tunnel_ping_s: float
    tunnel_dead_after: float
    tunnel_window: int
    tunnel_max_window: int
    tunnel_conn_window: int
    tunnel_memory_budget: int
    tunnel_tls: bool
    tunnel_tls_cert: str
    tunnel_tls_key: str
    public_tunnel_addr: str
    drain_timeout_s: float
    optimistic_open: bool
    direct_exit: bool
    direct_exit_allow_private: bool
    request_log: bool
    log_batch_rows: int
    log_batch_s: float
    bandwidth_flush_s: float
    log_retention_days: int
    max_body_bytes: int
    api_body_timeout_s: float
    api_rate_per_token: Rate
    api_rate_per_ip: Rate
    public_api_url: str
    assign_retry_delay_s: float
    assign_sweep_interval_s: float
    agent_delivery_sweep_s: float
    test_only_clickhouse_fault_file: str
    log_level: str
    idempotency_ttl_s: float
    resubmit_window_s: float
    market_minute_s: float
    market_sweep_s: float
    settlement_deadline_s: float
    platform_fee_bps: int
    rotate_min_interval_s: float
    rotate_wait_s: float
    rotation_min_timer_s: int
    usage_flush_s: float
    max_unauth_per_ip: int
    cluster_secret: str
    relay_port: int
    relay_bind_host: str
    relay_advertise: str
    api_advertise: str
    relay_tls: bool
    presence_ttl_s: float
    log_store_url: str
    workers: int
    internal_api_port: int
    internal_api_host: str
    reuse_port: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.node_name:
            self.node_name = socket.gethostname()


_BY_ATTR = {attr: (var, kind) for var, attr, kind, _default, _help in SETTINGS}


def env_value(var: str, env: dict[str, str] | None = None) -> Any:
    """One setting from the environment (or its default), e.g. for the device agent's defaults."""
    for name, _attr, kind, default, _help in SETTINGS:
        if name == var:
            raw = (os.environ if env is None else env).get(var, "")
            return default if raw == "" else _parse_setting(var, kind, raw)
    raise ConfigError(f"unknown setting {var}")


def _parse_setting(var: str, kind: type, raw: str) -> Any:
    try:
        return _parse(kind, raw)
    except (TypeError, ValueError) as exc:
        what = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{var}={raw!r} is not a valid {what}: {exc}") from None


def process_environment() -> dict[str, str]:
    """A copy of this process's environment, for child processes that read their own settings."""
    return dict(os.environ)


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from ``env`` (default ``os.environ``) then apply keyword overrides.

    Raises :class:`ConfigError` for a malformed value in ``env`` or an override that names no
    setting (keyword overrides use attribute names, e.g. ``api_port=0``).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for var, attr, kind, _default, _help in SETTINGS:
        if var in env and env[var] != "":
            values[attr] = _parse_setting(var, kind, env[var])
    unknown = sorted(k for k in overrides if k not in _BY_ATTR and k != "extra")
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values.update(overrides)
    return Settings(**values)


def settings_help() -> str:
    """The settings table as text, for ``--help``."""
    lines = ["environment variables:"]
    for var, _attr, _kind, default, text in SETTINGS:
        shown = str(default) if isinstance(default, Rate) else repr(default)
        lines.append(f"  {var:<31} {text} (default: {shown})")
    return "\n".join(lines)
