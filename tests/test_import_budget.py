"""The client's start-up imports only what a knock needs.

``sknock-knock ssh-proxy`` is started by ssh for every new connection, so everything its interpreter
imports is paid on every login (issue 12: the knock should add at most 100 ms).  Timing an import is
load-dependent, so this checks *which* modules are loaded instead: the heavy or optional ones that the
.pfx knock path and the ssh proxy never use must stay unimported until something needs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Not needed to knock with a .pfx or to proxy ssh: asyncio (AsyncKnockClient only), the token module
#: and its PKCS#11 binding (a ``pkcs11:`` URI only), the keyring (``passwordKeyring = yes`` only),
#: difflib (a misspelt key's hint), getpass (a prompt), the server and the CA, test-only libraries.
HEAVY = (
    "asyncio", "threading", "sknock.token", "pkcs11", "keyring", "difflib", "getpass", "sknock.server",
    "sknock.ca", "requests", "hypothesis", "pytest",
)


def _loaded(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import sknock.cli.knock",  # python -m sknock.cli.knock
    "from sknock.cli.knock import main",  # what the console script sknock-knock does
    "import sknock.cli.knock, sknock.sshproxy",  # ssh-proxy mode
])
def test_knock_cli_leaves_heavy_modules_unimported(code: str) -> None:
    loaded = _loaded(code)
    assert "sknock.client" in loaded  # the check itself sees the client's imports
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"{code!r} imports {heavy}: import them where they are used"


def test_token_module_is_loaded_for_a_token_uri_only() -> None:
    loaded = _loaded(
        "from sknock.credentials import is_pkcs11_uri\n"
        "assert is_pkcs11_uri('PKCS11:token=a') and not is_pkcs11_uri('pkcs11.pfx') and not is_pkcs11_uri(None)"
    )
    assert "sknock.token" not in loaded
    from sknock import credentials, token

    assert token.is_pkcs11_uri is credentials.is_pkcs11_uri and token.SCHEME == credentials.PKCS11_SCHEME
