"""Importing semiseg reaches no network: albumentations' version check (a request to PyPI at import) is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Records every name lookup or connection the interpreter attempts and refuses it at once (so a check that would
# wait on an absent network fails fast), then imports ``MODULES`` and prints what was attempted.
PROBE = """
import json, sys
attempts = []
def refuse_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        attempts.append([event, repr(args)[:120]])
        raise OSError("network refused by the test")
sys.addaudithook(refuse_network)
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(attempts))
"""

MODULES = ["semiseg", "semiseg.cli", "semiseg.api", "semiseg.data.transforms", "semiseg.methods", "semiseg.export",
           "semiseg.bench.matrix"]


def attempts(modules: list[str], **env: str) -> list[list[str]]:
    environ = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"} | env
    done = subprocess.run([sys.executable, "-c", PROBE, *modules], env=environ, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_semiseg_makes_no_network_connection() -> None:
    assert attempts(MODULES) == []


def test_the_probe_sees_albumentations_update_check_when_the_user_turns_it_on() -> None:
    # the control: the probe catches the request semiseg switches off, and a user's explicit setting wins
    seen = attempts(["semiseg.data.transforms"], NO_ALBUMENTATIONS_UPDATE="0")
    assert seen and seen[0][0] in ("socket.getaddrinfo", "socket.connect")
