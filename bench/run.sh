#!/usr/bin/env bash
# The benchmark (issue 4): installs what it needs, runs every figure, prints the table and writes
# bench/results/<date>.{json,md,png}.  Needs root (network namespaces, the kernel firewall): re-executes
# with sudo.  Takes about 11 minutes; never fails on a number.  Arguments go to `python -m bench`
# (--quick for a small trial run, --only nftables,iptables, --profile for py-spy on the server,
# --metrics for the throughput and latency phases again with metrics on).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then exec sudo -E "$0" "$@"; fi
scripts/bootstrap.sh
# fwknopd / fwknop for the side-by-side figures; stdbuf (coreutils) for `nft monitor`.
debs=(fwknop-server fwknop-client coreutils)
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bench: installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's fwknop-server package starts a system fwknopd; the benchmark runs its own in a namespace.
python="${BENCH_PYTHON:-.venv/bin/python}"
"$python" -c "import matplotlib" 2>/dev/null || "$python" -m pip install -q matplotlib
[ -x "$(dirname "$python")/py-spy" ] || "$python" -m pip install -q py-spy || echo "bench: no py-spy (no profile)"
exec "$python" -m bench --profile --metrics "$@"
