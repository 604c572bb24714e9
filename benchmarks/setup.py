"""Install what the benchmark compares against: the peers and the C compiler (apt, as root), py-spy and pproxy (pip).

``python -m benchmarks`` calls :func:`ensure_peers` first (``--no-install`` skips it); ``benchmarks/setup.sh``
does the same from a shell. Nothing is installed when everything is already there or when not root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

APT = {"microsocks": "microsocks", "dante-server": "/usr/sbin/danted", "openssh-server": "/usr/sbin/sshd",
       "openssh-client": "ssh", "gcc": "gcc"}


def _have(what: str) -> bool:
    return Path(what).exists() if what.startswith("/") else shutil.which(what) is not None


def missing_apt() -> list[str]:
    return [pkg for pkg, what in APT.items() if not _have(what)]


def ensure_peers() -> None:
    """apt-get install the missing peers (root only; quietly), pip install py-spy into this interpreter."""
    todo = missing_apt()
    if todo and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"[bench] apt-get install {' '.join(todo)}", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(["apt-get", "install", "-y", "-q", *todo], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", *todo], env=env, capture_output=True)
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], capture_output=True)
    try:  # the Python peer of the comparison (the bench extra); a report without it misses a column
        import pproxy  # noqa: F401
    except ImportError:
        print("[bench] pip install pproxy", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pproxy>=2.7"], capture_output=True)


if __name__ == "__main__":
    ensure_peers()
    left = missing_apt()
    print("missing: " + ", ".join(left) if left else "peers, compiler and py-spy ready")
    sys.exit(1 if left else 0)
