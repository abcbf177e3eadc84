"""The default test command changes nothing on the host, even as root (issue 10 item 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_default_run_selects_no_package_or_service_test():
    """`pytest` with the project's addopts deselects tests/packaging (dpkg -i, a system user,
    sysctls): they run only with `-m system`."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/packaging"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert selected == [], proc.stdout
    opted_in = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "system", "tests/packaging"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert any("test_deb.py::" in line for line in opted_in.stdout.splitlines()), opted_in.stdout
