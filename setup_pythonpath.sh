# Source this file from a checkout: `source setup_pythonpath.sh`
# Afterwards `python -c "from sknock.client import knock"` works without installing the package.
_sknock_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
case ":${PYTHONPATH:-}:" in
  *":${_sknock_root}:"*) ;;
  *) export PYTHONPATH="${_sknock_root}${PYTHONPATH:+:${PYTHONPATH}}" ;;
esac
unset _sknock_root
