"""The node proxies' processes import neither ``cryptography`` (~10 MB of RSS) nor
``prometheus_client`` (~2.7 MB): certificates go through ``ambient.x509lite`` and the
exposition through ``ambient.promtext``. (The e2e suite checks the running processes' maps.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["ztunnel.main", "waypoint.main"])
def test_proxy_imports_stay_lean(module: str) -> None:
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in sys.modules\n"
            "               if m.split('.')[0] in ('cryptography', 'prometheus_client', 'grpc'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "[]"
