#!/usr/bin/env bash
# The sknock demo: installs what it needs, then runs scripts/demo.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then exec sudo -E "$0" "$@"; fi
scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
