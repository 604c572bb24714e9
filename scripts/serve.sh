#!/usr/bin/env bash
# Installs proxyorch into ./.venv and starts one node on its embedded defaults
# (embedded PostgreSQL and chDB under ./data, proxy :1080, tunnels :7000, API :8000).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -e .
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/proxyorch-runtime-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
exec "$VENV/bin/proxyorch" serve "$@"
