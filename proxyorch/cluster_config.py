"""Start-up checks of the cluster settings (``proxyorch serve`` refuses to start on any problem).

A node that talks to other nodes (``REDIS_URL``, ``RELAY_PORT``, ``LOG_STORE_URL``) must share a
``CLUSTER_SECRET`` with them, and every node of a cluster must share ``RMS_KEY`` and
``ADMIN_TOKEN``: a key or token generated per node under its ``DATA_DIR`` would differ between
nodes (passwords encrypted by one node unreadable on another, admin calls working on one only).
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import urlsplit

from .config import Settings

MIN_SECRET_CHARS = 16


class ClusterConfigError(ValueError):
    """The settings cannot start a node; ``problems`` lists every reason, one sentence each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def cluster_settings_set(s: Settings) -> list[str]:
    """Names of the cluster settings given (non-empty) in ``s``."""
    given = [("REDIS_URL", s.redis_url), ("RELAY_PORT", s.relay_port), ("LOG_STORE_URL", s.log_store_url),
             ("CLUSTER_SECRET", s.cluster_secret)]
    return [name for name, value in given if value]


def problems(s: Settings, *, supervisor: bool = False) -> list[str]:
    """Every reason ``s`` cannot start a node (``supervisor``: the ``--workers`` parent, which
    generates the secret and shares the key and token itself)."""
    out: list[str] = []
    if s.workers < 1:
        out.append(f"WORKERS must be at least 1 (got {s.workers})")
    if s.relay_port and not 0 < s.relay_port < 65536:
        out.append(f"RELAY_PORT must be a TCP port 1-65535 (got {s.relay_port})")
    ports = [(n, v) for n, v in (("PROXY_PORT", s.proxy_port), ("TUNNEL_PORT", s.tunnel_port),
                                  ("API_PORT", s.api_port), ("RELAY_PORT", s.relay_port),
                                  ("INTERNAL_API_PORT", s.internal_api_port)) if v]
    for i, (name, port) in enumerate(ports):  # with SO_REUSEPORT a clash would not even fail to bind
        out += [f"{name} and {other} are both {port}" for other, p in ports[i + 1:] if p == port]
    if supervisor and s.workers > 1:  # worker i takes RELAY_PORT + i and INTERNAL_API_PORT + i
        ranges = [(n, v, v + s.workers - 1) for n, v in (("RELAY_PORT", s.relay_port),
                                                         ("INTERNAL_API_PORT", s.internal_api_port)) if v]
        for name, lo, hi in ranges:
            if hi > 65535:
                out.append(f"{name} + WORKERS - 1 must be at most 65535 (got {hi})")
            out += [f"{other} ({port}) is in the workers' {name} range {lo}-{hi}"
                    for other, port in ports if other != name and lo < port <= hi]
        if len(ranges) == 2 and ranges[0][1] <= ranges[1][2] and ranges[1][1] <= ranges[0][2] and \
                ranges[0][1] != ranges[1][1]:
            out.append(f"the workers' RELAY_PORT range {ranges[0][1]}-{ranges[0][2]} and INTERNAL_API_PORT range "
                       f"{ranges[1][1]}-{ranges[1][2]} overlap")
    if supervisor:
        out += [f"{n} must not be 0 with WORKERS > 1 (the workers share it)"
                for n, v in (("PROXY_PORT", s.proxy_port), ("TUNNEL_PORT", s.tunnel_port), ("API_PORT", s.api_port))
                if not v]
    if s.cluster_secret and len(s.cluster_secret) < MIN_SECRET_CHARS:
        out.append(f"CLUSTER_SECRET must be at least {MIN_SECRET_CHARS} characters")
    if s.log_store_url:
        parts = urlsplit(s.log_store_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            out.append(f"LOG_STORE_URL must look like http://HOST:API_PORT (got {s.log_store_url!r})")
        elif s.clickhouse_url:
            out.append("LOG_STORE_URL and CLICKHOUSE_URL are exclusive: the log-store owner has the CLICKHOUSE_URL")
    if s.api_advertise:
        parts = urlsplit(s.api_advertise)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            out.append(f"API_ADVERTISE must look like http://HOST:PORT (got {s.api_advertise!r})")
    if s.rms_key:
        try:
            if len(base64.b64decode(s.rms_key, validate=True)) != 32:
                raise ValueError
        except (binascii.Error, ValueError):
            out.append("RMS_KEY must be 32 bytes, base64-encoded")
    if supervisor:
        return out
    cluster = [n for n in cluster_settings_set(s) if n != "CLUSTER_SECRET"]
    if cluster and not s.cluster_secret:
        out.append(f"{', '.join(cluster)} set without CLUSTER_SECRET: nodes of a cluster must share one secret")
    if cluster_settings_set(s):
        missing = [n for n, v in (("RMS_KEY", s.rms_key), ("ADMIN_TOKEN", s.admin_token)) if not v]
        if missing:
            out.append(f"cluster setting(s) {', '.join(cluster_settings_set(s))} need {' and '.join(missing)} "
                       "set explicitly (every node of a cluster must share them)")
    return out


def validate(s: Settings, *, supervisor: bool = False) -> None:
    """Raise :class:`ClusterConfigError` listing every problem of ``s``."""
    found = problems(s, supervisor=supervisor)
    if found:
        raise ClusterConfigError(found)
