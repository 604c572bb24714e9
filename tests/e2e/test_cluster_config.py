"""`proxyorch serve` refuses cluster settings without a shared secret, key and admin token."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from conftest import ROOT, free_port

KEY = base64.b64encode(b"k" * 32).decode()
SECRET = "s" * 32


def serve(tmp_path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CLUSTER_SECRET", "LOG_STORE_URL",
                                                            "RELAY_PORT", "RMS_KEY", "ADMIN_TOKEN", "WORKERS")}
    full.update({"DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "BIND_HOST": "127.0.0.1",
                 "API_PORT": str(free_port()), "PROXY_PORT": str(free_port()), "TUNNEL_PORT": str(free_port()),
                 "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", **env})
    return subprocess.run([sys.executable, "-m", "proxyorch", "serve"], env=full, capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))


@pytest.mark.parametrize("setting,value", [
    ("REDIS_URL", "redis://127.0.0.1:6379/0"),
    ("RELAY_PORT", "7100"),
    ("LOG_STORE_URL", "http://127.0.0.1:8000"),
])
def test_a_cluster_setting_without_cluster_secret_is_a_start_up_error(tmp_path, setting, value) -> None:
    r = serve(tmp_path, **{setting: value, "RMS_KEY": KEY, "ADMIN_TOKEN": "adm"})
    assert r.returncode == 2, r.stderr
    assert f"configuration error: {setting} set without CLUSTER_SECRET" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("missing", ["RMS_KEY", "ADMIN_TOKEN"])
def test_a_cluster_node_needs_rms_key_and_admin_token_set_explicitly(tmp_path, missing) -> None:
    env = {"CLUSTER_SECRET": SECRET, "LOG_STORE_URL": "http://127.0.0.1:8000", "RMS_KEY": KEY, "ADMIN_TOKEN": "adm"}
    del env[missing]
    r = serve(tmp_path, **env)
    assert r.returncode == 2, r.stderr
    assert "configuration error" in r.stderr and f"need {missing} set explicitly" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("env,message", [
    ({"CLUSTER_SECRET": "short"}, "CLUSTER_SECRET must be at least 16 characters"),
    ({"CLUSTER_SECRET": SECRET, "LOG_STORE_URL": "ftp://x"}, "LOG_STORE_URL must look like http://HOST:API_PORT"),
    ({"CLUSTER_SECRET": SECRET, "LOG_STORE_URL": "http://h:1", "CLICKHOUSE_URL": "http://c:8123"},
     "LOG_STORE_URL and CLICKHOUSE_URL are exclusive"),
    ({"CLUSTER_SECRET": SECRET, "RMS_KEY": "bm90IDMyIGJ5dGVz"}, "RMS_KEY must be 32 bytes"),
    ({"WORKERS": "0"}, "WORKERS must be at least 1"),
    ({"TUNNEL_PORT": "7777", "API_PORT": "7777"}, "TUNNEL_PORT and API_PORT are both 7777"),
    ({"WORKERS": "2", "API_PORT": "0"}, "API_PORT must not be 0 with WORKERS > 1"),
])
def test_malformed_cluster_settings_are_refused_with_the_reason(tmp_path, env, message) -> None:
    r = serve(tmp_path, **{"ADMIN_TOKEN": "adm", "RMS_KEY": KEY, **env})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
