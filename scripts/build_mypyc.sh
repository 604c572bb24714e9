#!/usr/bin/env bash
# OPTIONAL compiled build of the sans-I/O cores for a server install (run from the checkout the
# server runs from, e.g. the editable install ./.venv): the tunnel core (device_tunnel frames,
# windows, stream, connection) and the session core (proxy session_core/actions/policy, socks5
# protocol) compiled with mypyc into extension modules next to their .py files, which Python then
# imports instead. Nothing else changes; the phone agent (pip install ./device_tunnel) stays pure
# Python, and neither CI nor the default install needs this.
#
#   bash scripts/build_mypyc.sh          # build (needs a C compiler; installs mypy into the venv)
#   bash scripts/build_mypyc.sh --clean  # remove the compiled modules (back to pure Python)
#
# Rebuild after every update of those files: a stale compiled module shadows its newer .py.
# What it buys is measured by `python -m benchmarks.core_bench` (see benchmarks/CPU-PROFILE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
TUNNEL=(device_tunnel/frames.py device_tunnel/windows.py device_tunnel/stream.py device_tunnel/connection.py)
SESSION=(proxy/session_actions.py proxy/session_policy.py proxy/session_core.py proxy/socks5/protocol.py)

clean() {
  for f in "${TUNNEL[@]}" "${SESSION[@]}"; do
    rm -f "${f%.py}".cpython-*.so
  done
  rm -f device_tunnel/_compiled__mypyc.cpython-*.so proxy/_compiled__mypyc.cpython-*.so
  rm -rf build/mypyc
}

if [ "${1:-}" = "--clean" ]; then
  clean
  echo "compiled cores removed: pure Python"
  exit 0
fi

"$PY" -c "import mypyc" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check "mypy>=1.10"
clean
"$PY" - "${#TUNNEL[@]}" "${TUNNEL[@]}" "${SESSION[@]}" <<'PYEOF'
import sys

from mypyc.build import mypycify
from setuptools import setup

n = int(sys.argv[1])
tunnel, session = sys.argv[2:2 + n], sys.argv[2 + n:]
# Two groups (one shared library each, inside its own package): the tunnel core never needs the
# proxy package. Imported modules that are not compiled are type-checked silently.
setup(name="proxyorch-compiled-cores", packages=[], py_modules=[],
      ext_modules=mypycify(["--follow-imports=silent", *tunnel, *session], opt_level="3",
                           separate=[(tunnel, "device_tunnel._compiled"), (session, "proxy._compiled")]),
      script_args=["build_ext", "--inplace", "--build-temp", "build/mypyc", "--build-lib", "build/mypyc/lib"])
PYEOF
"$PY" - <<'PYEOF'
import device_tunnel.connection, proxy.session_core
for m in (device_tunnel.connection, proxy.session_core):
    assert m.__file__.endswith(".so"), f"{m.__name__} did not load compiled: {m.__file__}"
print("compiled cores in place:", device_tunnel.connection.__file__, proxy.session_core.__file__)
PYEOF
