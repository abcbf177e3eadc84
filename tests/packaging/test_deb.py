"""Build the .deb with packaging/build-deb.sh, install it with dpkg, use it, purge it.

These change the machine (a package, a system user, two sysctls raised), so they run only as
root with dpkg, and refuse to touch a traits-agent package that was installed before they ran.
The build installs the agent's dependencies from the pip index: it needs the network.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from deb_helpers import PACKAGE, REPO, is_known_to_dpkg, run

pytestmark = [
    pytest.mark.deb,
    pytest.mark.system,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="installs a package: needs root"
    ),
    pytest.mark.skipif(
        not (shutil.which("dpkg") and shutil.which("dpkg-deb")), reason="needs dpkg and dpkg-deb"
    ),
]

UNITS = [
    "traits-agent.service",
    "traits-agent.socket",
    "traits-agent-udp.socket",
    "traits-agent-forward.socket",
    "traits-agent-forward-tcp.socket",
]
INSTALLED_FILES = [
    "/usr/bin/traits-agent",
    "/opt/traits-agent/bin/traits-agent",
    "/etc/traits-agent/agent.toml",
    "/usr/lib/sysctl.d/60-traits-agent.conf",
    "/usr/share/doc/traits-agent/copyright",
    "/usr/share/man/man1/traits-agent.1.gz",
    *(f"/lib/systemd/system/{unit}" for unit in UNITS),
]


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Path]:
    result = run("dpkg", "-i", deb, check=False)
    assert result.returncode == 0, f"dpkg -i failed:\n{result.stdout}\n{result.stderr}"
    try:
        yield deb
    finally:
        if is_known_to_dpkg():
            run("dpkg", "--purge", PACKAGE, check=False)


def test_the_deb_is_named_and_described_from_pyproject(deb: Path) -> None:
    """dist/traits-agent_<version>_<arch>.deb, Depends on the interpreter its venv uses."""
    with open(REPO / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert deb.name == f"traits-agent_{version}_{arch}.deb"
    fields = run("dpkg-deb", "-f", deb, "Package", "Version", "Depends").stdout
    assert f"Version: {version}" in fields
    assert re.search(r"Depends: python3\.\d+, adduser", fields), fields
    conffiles = run("dpkg-deb", "-I", deb, "conffiles").stdout.split()
    assert conffiles == ["/etc/traits-agent/agent.toml"]


def test_install_lays_out_the_venv_units_and_user(installed: Path) -> None:
    """Files are where the units and docs say; the system user and group exist."""
    for path in INSTALLED_FILES:
        assert os.path.exists(path), path
    assert os.readlink("/usr/bin/traits-agent") == "/opt/traits-agent/bin/traits-agent"
    assert user_exists("traits-agent") and group_exists("traits-agent")
    assert pwd.getpwnam("traits-agent").pw_shell == "/usr/sbin/nologin"
    # postinst compiled the venv's bytecode (the sandboxed service cannot write under /opt)
    assert list(Path("/opt/traits-agent/lib").rglob("traits_agent/__pycache__/*.pyc"))


def test_the_installed_command_runs(installed: Path) -> None:
    """/usr/bin/traits-agent --help and --version work from the packaged venv."""
    result = run("/usr/bin/traits-agent", "--help", check=False)
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout
    with open(REPO / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    result = run("/usr/bin/traits-agent", "--version", check=False)
    assert result.returncode == 0 and version in result.stdout + result.stderr


def test_the_shipped_config_is_accepted(installed: Path) -> None:
    """The conffile loads with the installed agent's own config parser."""
    result = run(
        "/opt/traits-agent/bin/python",
        "-c",
        "from pathlib import Path; from traits_agent.config import load_config; "
        "c = load_config(Path('/etc/traits-agent/agent.toml')); print(c.listen.unix)",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/run/traits-agent/events.sock"


def test_doctor_runs(installed: Path) -> None:
    """`traits-agent doctor` checks the host and reports instead of crashing."""
    if run("/usr/bin/traits-agent", "doctor", "--help", check=False).returncode != 0:
        pytest.skip("this build has no `traits-agent doctor` command yet")
    result = run(
        "/usr/bin/traits-agent", "doctor", "--config", "/etc/traits-agent/agent.toml", check=False
    )
    # no agent runs here and no key is installed, so findings are expected: exit 0 or 1,
    # never a traceback or a usage error
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "max_dgram_qlen" in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify_against_the_installed_binary(installed: Path) -> None:
    """With /usr/bin/traits-agent really there, verify is silent and exposure <= 1.5."""
    result = run("sh", REPO / "systemd" / "check.sh", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NOTE" not in result.stderr  # it verified the real binary, not a placeholder
    installed_units = [f"/lib/systemd/system/{unit}" for unit in UNITS]
    result = run("systemd-analyze", "verify", "--man=no", *installed_units, check=False)
    assert result.stdout + result.stderr == ""


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_lintian_reports_no_errors_or_warnings(installed: Path, tmp_path: Path) -> None:
    """Only informational tags remain (the /opt venv's are overridden with reasons).

    lintian leaves a temporary file per run (`mldbm-elf-*`, its ELF index): it gets the
    test's own temporary directory, so the host's /tmp stays as it was."""
    result = run("lintian", "--allow-root", installed, check=False, env={"TMPDIR": str(tmp_path)})
    problems = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert problems == [], result.stdout + result.stderr


def test_reinstall_keeps_the_queue_and_config_edits(installed: Path) -> None:
    """An upgrade (here: reinstall) keeps /var/lib/traits-agent and a locally edited
    conffile."""
    queue = Path("/var/lib/traits-agent/queue")
    queue.mkdir(parents=True, exist_ok=True)
    (queue / "segment-test").write_bytes(b"backlog")
    config = Path("/etc/traits-agent/agent.toml")
    config.write_text(config.read_text() + "\n# local edit\n")
    result = run("dpkg", "-i", "--force-confold", installed, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (queue / "segment-test").read_bytes() == b"backlog"
    assert config.read_text().endswith("# local edit\n")


def test_purge_removes_everything(installed: Path) -> None:
    """dpkg --purge leaves no venv, config, key, queue, unit or user behind."""
    Path("/etc/traits-agent/api_key").write_text("secret\n")
    Path("/var/lib/traits-agent/queue").mkdir(parents=True, exist_ok=True)
    result = run("dpkg", "--purge", PACKAGE, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in [
        *INSTALLED_FILES,
        "/opt/traits-agent",
        "/etc/traits-agent",
        "/var/lib/traits-agent",
    ]:
        assert not os.path.lexists(path), path
    assert not user_exists("traits-agent")
    assert not group_exists("traits-agent")
    assert run("dpkg-query", "-W", PACKAGE, check=False).returncode != 0
