"""TLS on the tunnel, end to end: real node (TLS by default), real agent processes, real clients.

The agent pins the node's certificate (or trusts a CA file); a wrong pin, no pin, and a TLS/plaintext
mismatch never bring the device online and say why; an observer between agent and node sees a TLS
handshake and never the device token or a client's bytes; the certificate survives a node restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import stat
import subprocess
import time

import pytest
from conftest import PY, ROOT, fresh_deployment
from relays import BlackholeRelay, tls_records
from socks_client import socks5_open

pytestmark = pytest.mark.asyncio(loop_scope="session")
FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
WRONG_PIN = "sha256:" + "ab" * 32


async def echo_once(dep, conn: dict, targets, payload: bytes) -> bytes:
    reader, writer, _ = await socks5_open(dep.node.proxy_port, conn["connectionId"], conn["password"],
                                          "127.0.0.1", targets.echo_port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()


def admin_fingerprint(node, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "proxyorch", "admin", "tunnel-fingerprint"], env={**node.env(), **env},
                          cwd=str(node.data_dir), capture_output=True, text=True, timeout=60)


async def test_registration_hands_out_pin_and_a_command_that_brings_the_device_online(deployment, targets):
    _uid, token = await deployment.user("tls-register")
    device = await deployment.device(token)
    node = deployment.node
    assert FINGERPRINT.match(device["tunnel_fingerprint"])
    assert device["tunnel_fingerprint"] == node.fingerprint
    out = admin_fingerprint(node)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == node.fingerprint
    assert f"tunnel TLS fingerprint {node.fingerprint}" in node.log_path.read_text()  # serve logs it
    argv = shlex.split(device["agent_command"])
    assert argv[0] == "proxyorch-agent"
    assert argv[argv.index("--server") + 1] == f"127.0.0.1:{node.tunnel_port}"
    assert argv[argv.index("--server-fingerprint") + 1] == node.fingerprint
    assert argv[argv.index("--device-id") + 1] == device["remote_device_id"]
    # the command as given (the agent's own CLI), plus the test-only opt-in to reach 127.0.0.1 targets
    log = open(node.data_dir / "agent-from-command.log", "ab")
    proc = subprocess.Popen([PY, "-m", "device_tunnel", *argv[1:], "--allow-private"], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            cwd=str(node.data_dir))
    try:
        await deployment.wait_online(device["remote_device_id"])
        conn = await deployment.connection(token, device["remote_device_id"])
        assert await echo_once(deployment, conn, targets, b"pinned hello") == b"pinned hello"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_wrong_pin_never_comes_online_and_says_why(deployment):
    _uid, token = await deployment.user("tls-wrong-pin")
    device = await deployment.device(token)
    agent = await deployment.agent(device, "--server-fingerprint", WRONG_PIN, wait=False)
    log = await agent.wait_log("does not match --server-fingerprint")
    assert deployment.node.fingerprint in log and WRONG_PIN in log and "tunnel-fingerprint" in log
    await agent.wait_log("retrying", 5)
    deadline = time.time() + 30  # retried with back-off: a second attempt is logged too
    while agent.log_text().count("does not match --server-fingerprint") < 2 and time.time() < deadline:
        await asyncio.sleep(0.2)
    assert agent.log_text().count("does not match --server-fingerprint") >= 2
    assert agent.proc.poll() is None  # keeps retrying: the node may be rotating its certificate
    online = await deployment.pool.fetchval("SELECT online FROM devices WHERE remote_device_id = $1",
                                            device["remote_device_id"])
    assert online is False
    agent.kill(15)
    # not a byte of HELLO reached the node: it never heard of this device
    assert device["remote_device_id"] not in deployment.node.log_path.read_text()


async def test_wrong_pin_sends_nothing_after_the_handshake(deployment):
    """Through a recording relay: beyond the TLS handshake (whose client Finished is the one encrypted
    record a TLS 1.3 client sends) the refused agent sends not one record: no HELLO."""
    relay = await BlackholeRelay(deployment.node.tunnel_port).start()
    try:
        _uid, token = await deployment.user("tls-wrong-pin-relay")
        device = await deployment.device(token)
        agent = await deployment.agent(device, "--server-fingerprint", WRONG_PIN, wait=False,
                                       server=f"127.0.0.1:{relay.port}")
        await agent.wait_log("does not match --server-fingerprint")
        deadline = time.time() + 30
        while relay.connections < 2 and time.time() < deadline:  # a retry, so the first one is complete
            await asyncio.sleep(0.1)
        agent.kill(15)
        await asyncio.sleep(0.3)
        up = bytes(relay.up[0])
        records = tls_records(up)
        assert sum(len_ + 5 for _t, len_ in records) == len(up)  # the whole stream is TLS records
        assert records[0][0] == 22
        # at most the handshake's Finished (abort may even drop it unsent); a HELLO would be one more
        assert sum(1 for t, _ in records if t == 23) <= 1
    finally:
        relay.close()

    # the same relay view of a pinned agent: HELLO follows the Finished
    relay = await BlackholeRelay(deployment.node.tunnel_port).start()
    try:
        _uid, token = await deployment.user("tls-right-pin-relay")
        device = await deployment.device(token)
        agent = await deployment.agent(device, server=f"127.0.0.1:{relay.port}")
        assert sum(1 for t, _ in tls_records(bytes(relay.up[0])) if t == 23) >= 2
        agent.kill(15)
    finally:
        relay.close()


async def test_no_pin_and_no_ca_exits_2_before_connecting():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for cmd in ([PY, "-m", "proxyorch", "device-agent"], [PY, "-m", "device_tunnel"]):
            out = subprocess.run([*cmd, "--server", f"127.0.0.1:{port}", "--device-id", "d", "--token", "t"],
                                 capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert out.returncode == 2, out
            assert "--server-fingerprint" in out.stderr and "--ca-file" in out.stderr
            for bad in (["--server-fingerprint", "sha256:1234"], ["--plaintext", "--server-fingerprint", WRONG_PIN],
                        ["--ca-file", "/nonexistent/ca.pem"]):
                out = subprocess.run([*cmd, "--server", f"127.0.0.1:{port}", "--device-id", "d", "--token", "t",
                                      *bad], capture_output=True, text=True, timeout=60,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert out.returncode == 2, (bad, out)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


async def test_plaintext_agent_against_tls_node_fails_clearly(deployment):
    _uid, token = await deployment.user("tls-plain-agent")
    device = await deployment.device(token)
    agent = await deployment.agent(device, "--plaintext", wait=False)
    log = await agent.wait_log("serves TLS on this port")
    assert "NOT encrypted" in log  # the --plaintext warning
    assert "drop --plaintext" in log
    online = await deployment.pool.fetchval("SELECT online FROM devices WHERE remote_device_id = $1",
                                            device["remote_device_id"])
    assert online is False
    agent.kill(15)


async def test_ca_file_verifies_node_and_host_name(deployment, targets, tmp_path):
    from proxyorch.config import load_settings
    from proxyorch.tunnel_cert import load_or_create

    _uid, token = await deployment.user("tls-ca")
    device = await deployment.device(token)
    ca = str(deployment.node.data_dir / "tunnel-tls" / "cert.pem")  # self-signed: its own CA
    agent = await deployment.agent(device, "--ca-file", ca, "--allow-private", server=f"localhost:{deployment.node.tunnel_port}")
    conn = await deployment.connection(token, device["remote_device_id"])
    assert await echo_once(deployment, conn, targets, b"via CA") == b"via CA"
    agent.kill(15)
    await deployment.wait_online(device["remote_device_id"], online=False)
    # a CA that did not sign the node's certificate: refused, with the reason
    other = load_or_create(load_settings({"DATA_DIR": str(tmp_path / "other")}))
    stranger = await deployment.agent(device, "--ca-file", other.cert_file, wait=False)
    log = await stranger.wait_log("node certificate not trusted")
    assert "--ca-file" in log
    stranger.kill(15)


async def test_observer_between_agent_and_node_sees_only_tls(deployment, targets):
    relay = await BlackholeRelay(deployment.node.tunnel_port).start()
    try:
        _uid, token = await deployment.user("tls-observer")
        device = await deployment.device(token)
        await deployment.agent(device, "--allow-private", server=f"127.0.0.1:{relay.port}")
        conn = await deployment.connection(token, device["remote_device_id"])
        secret = b"CLIENT-PAYLOAD-" + os.urandom(8).hex().encode()
        assert await echo_once(deployment, conn, targets, secret) == secret
        up, down = bytes(relay.up[0]), bytes(relay.down[0])
        assert up[:1] == b"\x16" and up[1] == 3  # a TLS handshake record (ClientHello) comes first
        records = tls_records(up)
        assert records and records[0][0] == 22 and all(t in (20, 21, 22, 23) for t, _ in records)
        for stream in (up, down):
            assert device["device_token"].encode() not in stream
            assert device["remote_device_id"].encode() not in stream
            assert secret not in stream
    finally:
        relay.close()


async def test_tls_agent_against_plaintext_node_fails_clearly_and_plaintext_works(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path, TUNNEL_TLS="0")
    try:
        assert "PLAINTEXT" in dep.node.log_path.read_text()  # the node warns
        out = admin_fingerprint(dep.node)
        assert out.returncode == 1 and "TUNNEL_TLS=0" in out.stderr
        _uid, token = await dep.user("plain-node")
        device = await dep.device(token)
        assert device["tunnel_fingerprint"] is None and "--plaintext" in device["agent_command"]
        agent = await dep.agent(device, "--server-fingerprint", WRONG_PIN, wait=False)
        log = await agent.wait_log("TUNNEL_TLS=0")
        assert "--plaintext" in log
        agent.kill(15)
        await dep.agent(device, "--plaintext", "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        assert await echo_once(dep, conn, targets, b"clear") == b"clear"
    finally:
        await dep.close()
        await dep.node.stop()


async def test_certificate_persists_across_restart_and_pinned_agent_reconnects(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path)
    try:
        node = dep.node
        first = node.fingerprint
        key = node.data_dir / "tunnel-tls" / "key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        _uid, token = await dep.user("persist")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        assert await echo_once(dep, conn, targets, b"before") == b"before"
        assert await node.stop() == 0
        await node.start()
        assert node.fingerprint == first
        assert admin_fingerprint(node).stdout.strip() == first
        await dep.wait_online(device["remote_device_id"], timeout=60)  # the same pin still matches
        assert await echo_once(dep, conn, targets, b"after") == b"after"
    finally:
        await dep.close()
        await dep.node.stop()


async def test_operator_certificate_and_public_address_are_what_devices_get(pg_root, tmp_path, targets):
    from proxyorch.config import load_settings
    from proxyorch.tunnel_cert import load_or_create

    own = load_or_create(load_settings({"DATA_DIR": str(tmp_path / "operator")}))
    dep = await fresh_deployment(pg_root, tmp_path, TUNNEL_TLS_CERT=own.cert_file, TUNNEL_TLS_KEY=own.key_file,
                                 PUBLIC_TUNNEL_ADDR="tunnel.example.net:443")
    try:
        assert not (dep.node.data_dir / "tunnel-tls").exists()  # nothing self-signed when one is configured
        _uid, token = await dep.user("operator-cert")
        device = await dep.device(token)
        assert device["tunnel_fingerprint"] == own.fingerprint
        assert shlex.split(device["agent_command"])[1:3] == ["--server", "tunnel.example.net:443"]
        assert admin_fingerprint(dep.node).stdout.strip() == own.fingerprint
        await dep.agent(device, "--server-fingerprint", own.fingerprint, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        assert await echo_once(dep, conn, targets, b"operator cert") == b"operator cert"
    finally:
        await dep.close()
        await dep.node.stop()


async def test_serve_with_half_a_certificate_config_exits_1_and_says_why(tmp_path):
    out = subprocess.run([PY, "-m", "proxyorch", "serve"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path),
                              "TUNNEL_TLS_CERT": str(tmp_path / "cert.pem"), "DATABASE_URL": "postgresql://unused/x"})
    assert out.returncode == 1, out
    assert "TUNNEL_TLS_CERT and TUNNEL_TLS_KEY must be set together" in out.stderr
    assert "Traceback" not in out.stderr
