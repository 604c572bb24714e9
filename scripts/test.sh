#!/usr/bin/env bash
# Installs what the tests need (apt: redis-server, curl, git, proxychains4, chromium; a venv with the project and its test extras)
# and runs the default test suite. Extra arguments go to pytest (e.g. RUN_SLOW=1 for slow tests).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v git >/dev/null 2>&1 || need_apt+=(git)
command -v proxychains4 >/dev/null 2>&1 || need_apt+=(proxychains4)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/proxyorch-runtime-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest -q "$@"
