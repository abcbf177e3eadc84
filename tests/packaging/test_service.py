"""The README's "Install as a service", run for real: systemd boots as PID 1 in private
namespaces on this machine, the .deb is installed, the units are enabled with the README's
command, and `systemctl` must show the agent READY with a STATUS line.

The booted systemd shares the file system (so it sees the installed package) but gets its own
PID, mount, network, UTS, IPC and cgroup namespaces, a private tmpfs on /run, /tmp and
/etc/systemd/system (so the host's enabled services stay off), only a loopback network, and
no /usr/sbin/policy-rc.d (so the maintainer scripts act as on a real host).

One deviation from a real host: on this systemd-in-a-namespace, LoadCredential= produces a
credentials directory the service user cannot read (even for a bare `systemd-run -p User=x
-p LoadCredential=...`), so a drop-in hands the key over as $TRAITS_API_KEY instead.
Everything else is the shipped unit, config and sockets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deb_helpers import PACKAGE, is_known_to_dpkg, run

pytestmark = [
    pytest.mark.deb,
    pytest.mark.system,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="boots systemd: needs root"
    ),
    pytest.mark.skipif(
        not all(
            shutil.which(tool) for tool in ("dpkg", "dpkg-deb", "unshare", "nsenter", "systemctl")
        )
        or not os.path.exists("/lib/systemd/systemd"),
        reason="needs dpkg, util-linux unshare/nsenter and systemd installed",
    ),
]

BOOT = """
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mkdir -p /run/lock
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /etc/systemd/system
# container images ship a policy-rc.d that forbids maintainer scripts to touch services; a
# real host has none
if [ -e /usr/sbin/policy-rc.d ]; then mount --bind /bin/true /usr/sbin/policy-rc.d; fi
hostname traits-agent-test
export container=traits-agent-test
exec /lib/systemd/systemd --system --unit=multi-user.target --log-target=null
"""

README_ENABLE = [
    "systemctl",
    "enable",
    "--now",
    "traits-agent.socket",
    "traits-agent-udp.socket",
    "traits-agent-forward.socket",
    "traits-agent.service",
]


class Booted:
    """A systemd running as PID 1 of its own namespaces; `run` executes inside them."""

    def __init__(self) -> None:
        self.unshare = subprocess.Popen(
            [
                "unshare",
                "--fork",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--cgroup",
                "--mount-proc",
                "sh",
                "-c",
                BOOT,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self._systemd_pid()

    def _systemd_pid(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = run("pgrep", "-P", str(self.unshare.pid), check=False).stdout.split()
            if children:
                pid = int(children[0])
                if Path(f"/proc/{pid}/exe").resolve() == Path("/lib/systemd/systemd").resolve():
                    return pid
            if self.unshare.poll() is not None:
                break
            time.sleep(0.1)
        self.unshare.kill()
        raise RuntimeError(f"systemd did not start: {self.unshare.communicate()[1]}")

    def run(self, *argv: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess[str]:
        return run("nsenter", "-t", str(self.pid), "-a", *argv, check=check, timeout=120, **kwargs)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"systemd did not finish booting (state {state!r})")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> None:
        if self.unshare.poll() is None:
            self.run("systemctl", "poweroff")
            try:
                self.unshare.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, 9)  # PID 1 of the namespace: takes the namespace with it
                self.unshare.wait(timeout=30)


@pytest.fixture(scope="module")
def host(deb: Path) -> Iterator[Booted]:
    result = run("dpkg", "-i", deb, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    key = Path("/etc/traits-agent/api_key")
    key.write_text("test-key-not-valid-upstream\n")
    key.chmod(0o600)
    booted = None
    try:
        booted = Booted()
        booted.wait_until_up()
        dropin = (
            "[Service]\n"
            "# test only: LoadCredential's directory is unreadable in this namespace (see module)\n"
            "Environment=TRAITS_API_KEY=test-key-not-valid-upstream\n"
        )
        booted.run(
            "sh",
            "-c",
            "mkdir -p /etc/systemd/system/traits-agent.service.d && "
            "cat > /etc/systemd/system/traits-agent.service.d/test.conf && "
            "systemctl daemon-reload",
            input=dropin,
            check=True,
        )
        yield booted
    finally:
        if booted is not None:
            booted.stop()
        if is_known_to_dpkg():
            run("dpkg", "--purge", PACKAGE, check=False)


def test_readme_enable_command_brings_the_agent_to_ready_with_a_status(host: Booted) -> None:
    """`systemctl enable --now ...` returns once the agent sent READY=1; `systemctl status`
    then shows it active (running) with the agent's STATUS= line."""
    result = host.run(*README_ENABLE)
    assert result.returncode == 0, result.stdout + result.stderr + host_journal(host)
    props = host.show("traits-agent.service", "ActiveState", "SubState", "StatusText", "Type")
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), host_journal(host)
    assert props["StatusText"], "no STATUS= line"
    status = host.run("systemctl", "status", "--no-pager", "traits-agent.service").stdout
    assert re.search(r"Status: \".+\"", status), status


def test_the_event_sockets_belong_to_systemd_with_group_access(host: Booted) -> None:
    """events.sock and forward.sock are root:traits-agent 0660 and the UDP socket is bound;
    all are passed to the agent by name."""
    out = host.run(
        "stat", "-c", "%U:%G %a", "/run/traits-agent/events.sock", "/run/traits-agent/forward.sock"
    ).stdout.split("\n")
    assert out[:2] == ["root:traits-agent 660", "root:traits-agent 660"]
    for unit in ("traits-agent.socket", "traits-agent-udp.socket", "traits-agent-forward.socket"):
        assert host.show(unit, "ActiveState")["ActiveState"] == "active", unit


def test_events_reach_the_agent_through_the_socket_and_status_answers(host: Booted) -> None:
    """`traits-agent send` writes to the activated socket and `traits-agent status` reaches
    the control socket in the runtime directory."""
    config = "/etc/traits-agent/agent.toml"
    record = '{"user_id": "1", "action_id": "1", "action_name": "smoke-test"}'
    result = host.run("traits-agent", "send", "--config", config, "actions", record)
    assert result.returncode == 0, result.stdout + result.stderr
    result = host.run("traits-agent", "status", "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr + host_journal(host)


FORWARD_CHUNK = (
    "import socket, msgpack\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.settimeout(60)\n"
    "s.connect('/run/traits-agent/forward.sock')\n"
    "event = {'user_id': '3', 'action_id': '1', 'action_name': 'forward-smoke-test'}\n"
    "s.sendall(msgpack.packb(['actions', [[1.7e9, event]], {'chunk': 'c1'}]))\n"
    "u = msgpack.Unpacker(raw=False)\n"
    "while True:\n"
    "    u.feed(s.recv(4096))\n"
    "    for m in u:\n"
    "        print(m)\n"
    "        raise SystemExit\n"
)


def test_a_forward_chunk_is_acked_through_the_intake_process_in_the_unit(host: Booted) -> None:
    """A Forward message with a chunk on the activated forward.sock is acked: under the shipped
    unit's sandbox (SystemCallFilter, NoNewPrivileges, ...) the agent starts its Forward intake
    process (two CPUs: `forward_process = "auto"`, at this first connection) and the process
    runs in the service's cgroup, so systemd stops it with the service."""
    config = "/etc/traits-agent/agent.toml"
    result = host.run("/opt/traits-agent/bin/python", "-c", FORWARD_CHUNK)
    assert result.stdout.strip() == "{'ack': 'c1'}", (
        result.stdout + result.stderr + host_journal(host)
    )
    result = host.run("traits-agent", "status", "--json", "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    intake = json.loads(result.stdout)["forward_process"]
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: auto keeps the listeners in the agent")
    assert intake["state"] == "running" and intake["restarts"] == 0, intake
    # systemctl status lists the processes of the unit's cgroup
    tree = host.run("systemctl", "status", "--no-pager", "-l", "traits-agent.service").stdout
    assert f"{intake['pid']} " in tree and "traits_agent.intake.forward_worker" in tree, tree


def test_stopping_the_agent_keeps_its_sockets_and_drops_the_runtime_dir(host: Booted) -> None:
    """A stop removes /run/traits-agent/control but not the sockets; a datagram sent while
    the agent is down starts it again (socket activation)."""
    assert host.run("systemctl", "stop", "traits-agent.service").returncode == 0
    assert host.run("test", "-e", "/run/traits-agent/control").returncode != 0
    assert host.run("test", "-S", "/run/traits-agent/events.sock").returncode == 0
    result = host.run(
        "/opt/traits-agent/bin/python",
        "-c",
        "import socket, msgpack; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
        "s.sendto(msgpack.packb(['logins', None, {'user_id': '2'}]), "
        "'/run/traits-agent/events.sock')",
    )
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 60
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        state = host.show("traits-agent.service", "ActiveState", "SubState")
        if state.get("SubState") == "running":
            break
        time.sleep(0.2)
    assert state.get("SubState") == "running", host_journal(host)


def host_journal(host: Booted) -> str:
    return (
        "\n--- journal ---\n"
        + host.run(
            "journalctl", "-u", "traits-agent.service", "--no-pager", "-n", "30", "-o", "cat"
        ).stdout
    )


def test_an_upgrade_restarts_the_running_agent_and_keeps_its_sockets(
    host: Booted, deb: Path
) -> None:
    """dpkg -i over a running install (with systemd up) restarts the agent through postinst
    and leaves the socket units alone: same socket inode, agent running again."""
    assert host.show("traits-agent.service", "SubState")["SubState"] == "running"
    pid_before = host.show("traits-agent.service", "MainPID")["MainPID"]
    inode = host.run("stat", "-c", "%i", "/run/traits-agent/events.sock").stdout
    # /tmp is private to the booted system: hand the .deb over through /var/tmp
    staged = Path(tempfile.mkdtemp(dir="/var/tmp")) / deb.name
    try:
        shutil.copy(deb, staged)
        result = host.run("dpkg", "-i", str(staged))
    finally:
        shutil.rmtree(staged.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    props = host.show("traits-agent.service", "SubState", "MainPID")
    assert props["SubState"] == "running", host_journal(host)
    assert props["MainPID"] != pid_before
    assert host.run("stat", "-c", "%i", "/run/traits-agent/events.sock").stdout == inode
