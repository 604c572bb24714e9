#!/usr/bin/env bash
# Set up the benchmark: the bench extra (pproxy, matplotlib, psutil, py-spy) and the peers (apt, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m pip install -q -e '.[bench]'
exec "$PY" -m benchmarks.setup
