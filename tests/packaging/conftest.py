"""The Debian package tests: they build, install and purge a real .deb on this machine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from deb_helpers import PACKAGE, REPO, is_known_to_dpkg, run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deb: builds and dpkg-installs the Debian package (root, dpkg; about half a minute)",
    )


#: the sysctls postinst raises for good; put back afterwards, so the rest of the suite and the
#: machine keep the host's own values (max_dgram_qlen is 10 on some hosts: tests must see it)
SYSCTLS = ("net/unix/max_dgram_qlen", "net/core/rmem_max")


@pytest.fixture(scope="module", autouse=True)
def host_sysctls_restored() -> Iterator[None]:
    saved = {}
    for name in SYSCTLS:
        try:
            saved[name] = (Path("/proc/sys") / name).read_text()
        except OSError:
            continue
    yield
    for name, value in saved.items():
        # not root, or a read-only /proc/sys: then the package could not change it either
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / name).write_text(value)


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
