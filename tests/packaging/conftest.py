"""The Debian package tests: they build, install and purge a real .deb on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from deb_helpers import PACKAGE, REPO, is_known_to_dpkg, run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deb: builds and dpkg-installs the Debian package (root, dpkg; about half a minute)",
    )


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built once per test session by packaging/build-deb.sh."""
    if is_known_to_dpkg():
        pytest.skip(f"{PACKAGE} is already known to dpkg here; the test would replace and purge it")
    out = tmp_path_factory.mktemp("dist")
    result = run("sh", REPO / "packaging" / "build-deb.sh", out, check=False, timeout=900)
    assert result.returncode == 0, f"build-deb.sh failed:\n{result.stdout}\n{result.stderr}"
    debs = list(out.glob("*.deb"))
    assert len(debs) == 1, debs
    return debs[0]
