"""Pins as people paste them, and the agent distribution's version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def test_fingerprint_parsing_accepts_what_people_paste_and_rejects_the_rest():
    from device_tunnel.tls import parse_fingerprint

    hexd = "0123456789abcdef" * 4
    assert parse_fingerprint(f"sha256:{hexd}") == f"sha256:{hexd}"
    assert parse_fingerprint(f" SHA256:{hexd.upper()} ") == f"sha256:{hexd}"
    colons = ":".join(hexd[i:i + 2] for i in range(0, 64, 2))
    assert parse_fingerprint(f"sha256:{colons}") == f"sha256:{hexd}"
    for bad in ("", hexd, f"sha1:{hexd}", f"sha256:{hexd[:-1]}", f"sha256:{hexd}00", f"sha256:{hexd[:-1]}g"):
        with pytest.raises(ValueError):
            parse_fingerprint(bad)


def test_agent_distribution_version_is_the_project_version():
    import tomllib

    import device_tunnel

    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert device_tunnel.__version__ == main
    out = subprocess.run([sys.executable, "-m", "device_tunnel", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.stdout.strip() == f"proxyorch-agent {main}"
