#!/usr/bin/env bash
# Install what sknock needs on a Debian machine, then make (or refresh) the virtualenv .venv.
# Idempotent: Debian packages are installed only when missing, pip runs only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: the Python venv module, the kernel firewall tools and libraries (libnftables for the
# in-process nftables backend, iptables for python-iptables), iproute2 for test namespaces, openssl for
# the interoperability test, ping/nc for the tests' network checks; the servers the tests start for real:
# SoftHSM2 and OpenSC's pkcs11-tool (client keys on a PKCS#11 token), redis-server (the shared replay
# store, docs/fleet.md), OpenSSH client and server (the ssh ProxyCommand end-to-end test and the
# benchmark's ssh phase); libseccomp2 for the workers' seccomp filter (pyseccomp loads it);
# systemd-container (systemd-nspawn) to run the unit under a real systemd (tests/test_service_container.py).
debs=(python3 python3-venv nftables libnftables1 iptables iproute2 openssl iputils-ping netcat-openbsd procps
      softhsm2 opensc redis-server openssh-server openssh-client libseccomp2 systemd-container)
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.sknock-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing sknock and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[server,token,fleet,test,dev]"
  echo "$want" > "$stamp"
fi
