#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, then lint, types and pytest.
# Run as root: the end-to-end tests create network namespaces and real firewall rules (they skip otherwise).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then exec sudo -E "$0" "$@"; fi
scripts/bootstrap.sh
echo "== ruff";  .venv/bin/ruff check sknock tests scripts
echo "== mypy";  .venv/bin/mypy sknock
# The unit under a real systemd in a container (about 45 s); SKNOCK_SYSTEMD_CONTAINER=0 skips it.
export SKNOCK_SYSTEMD_CONTAINER="${SKNOCK_SYSTEMD_CONTAINER:-1}"
echo "== pytest"; .venv/bin/python -m pytest -q "$@"
