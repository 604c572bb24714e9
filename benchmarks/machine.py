"""What the benchmark ran on: CPU, cores, kernel, Python, uvloop and the peers' versions."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dpkg(name: str) -> str:
    if shutil.which("dpkg-query") is None:
        return "unknown"
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "not installed"


def _ssh_version() -> str:
    if shutil.which("ssh") is None:
        return "not installed"
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip()


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s+(\d+)", f.read())
        return f"{int(m.group(1)) / 1024 / 1024:.1f} GiB" if m else "unknown"
    except OSError:
        return "unknown"


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks", ":!tests"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" + uncommitted changes to the product" if dirty else "")


def describe() -> dict[str, str]:
    from .loadgen import compiler_version

    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _mem_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": _pkg("uvloop"),
        "proxyorch": f"{_pkg('proxyorch')} (git {_commit()})",
        "pproxy": _pkg("pproxy"),
        "microsocks": _dpkg("microsocks"),
        "dante-server": _dpkg("dante-server"),
        "OpenSSH": _ssh_version(),
        "C compiler": compiler_version(),
    }
