"""Build the C load generator (``loadgen.c``) with the system compiler and drive it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import WORK, Proc, Stack, pinned

SRC = Path(__file__).resolve().parent / "loadgen.c"


def build() -> Path:
    """Compile ``loadgen.c`` into ``benchmarks/work/loadgen`` (rebuilt when the source is newer)."""
    WORK.mkdir(parents=True, exist_ok=True)
    exe = WORK / "loadgen"
    if exe.exists() and exe.stat().st_mtime >= SRC.stat().st_mtime:
        return exe
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) found: apt-get install gcc")
    subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(SRC)], check=True)
    return exe


def compiler_version() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return "none"
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


@dataclass
class Via:
    """How a client session reaches the target: directly, or through a SOCKS5 proxy."""

    proxy_port: int | None = None
    user: str | None = None
    password: str | None = None

    def args(self) -> list[str]:
        out: list[str] = []
        if self.proxy_port:
            out += ["--proxy", str(self.proxy_port)]
        if self.user:
            out += ["--user", self.user, "--pass", self.password or ""]
        return out


class LoadGen:
    def __init__(self, exe: Path) -> None:
        self.exe = exe

    def _run(self, mode: str, via: Via, port: int, timeout: float, **opts: object) -> dict:
        argv = [str(self.exe), mode, *via.args(), "--port", str(port)]
        for k, v in opts.items():
            argv += ["--" + k.replace("_", "-"), str(v)]
        out = subprocess.run(pinned("load", argv), capture_output=True, text=True, timeout=timeout, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"loadgen {mode} failed ({out.returncode}): {out.stderr[-500:]}")
        return json.loads(lines[-1])

    def bulk(self, via: Via, port: int, streams: int, duration: float, warmup: float = 0.5) -> dict:
        return self._run("bulk", via, port, duration + warmup + 30, streams=streams, duration=duration,
                         warmup=warmup)

    def rate(self, via: Via, port: int, conns: int, duration: float, warmup: float = 0.5, size: int = 64) -> dict:
        return self._run("rate", via, port, duration + warmup + 30, conns=conns, duration=duration,
                         warmup=warmup, size=size)

    def rtt(self, via: Via, port: int, count: int = 0, duration: float = 0.0, interval_ms: float = 0.0,
            size: int = 64) -> dict:
        opts: dict[str, object] = {"size": size}
        if count:
            opts["count"] = count
        else:
            opts["duration"] = duration
        if interval_ms:
            opts["interval_ms"] = interval_ms
        return self._run("rtt", via, port, (duration or 30) + 60, **opts)

    def start_bulk(self, stack: Stack, name: str, via: Via, port: int, streams: int, duration: float,
                   warmup: float) -> Proc:
        """A bulk run in the background (read its JSON with ``finish``)."""
        argv = [str(self.exe), "bulk", *via.args(), "--port", str(port), "--streams", str(streams),
                "--duration", str(duration), "--warmup", str(warmup)]
        return stack.spawn(name, argv, stdout_pipe=True, pin="load")

    def start_idle(self, stack: Stack, name: str, via: Via, port: int, count: int) -> Proc:
        argv = [str(self.exe), "idle", *via.args(), "--port", str(port), "--count", str(count)]
        return stack.spawn(name, argv, stdin=subprocess.PIPE, stdout_pipe=True, pin="load")


def finish(stack: Stack, proc: Proc, timeout: float = 60.0, interrupt: bool = False) -> dict:
    """Wait for a background loadgen's JSON (``interrupt``: SIGINT it first; bulk then reports early)."""
    if interrupt and proc.alive():
        proc.popen.send_signal(signal.SIGINT)
    try:
        out, _ = proc.popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stack.stop(proc)
        raise
    stack.stop(proc)
    lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{proc.name} produced no result: {proc.tail()}")
    return json.loads(lines[-1])


def read_line(proc: Proc, timeout: float) -> dict:
    """The first JSON line of a background loadgen (``idle`` prints one when its sessions are open)."""
    import select

    assert proc.popen.stdout is not None
    ready, _, _ = select.select([proc.popen.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{proc.name}: no output in {timeout}s")
    line = proc.popen.stdout.readline()
    if not line.startswith("{"):
        raise RuntimeError(f"{proc.name}: {line!r} {proc.tail()}")
    return json.loads(line)
