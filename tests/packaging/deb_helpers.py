"""Shared by the package tests (imported by basename: tests/packaging is on sys.path)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "traits-agent"


def run(
    *argv: str | Path, check: bool = True, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=check, env=env, **kwargs
    )


def is_known_to_dpkg() -> bool:
    """Installed, or removed with its config files still there."""
    return run("dpkg-query", "-W", PACKAGE, check=False).returncode == 0
