"""Directory safety (issue 7 items 4 and 11): what the agent creates is private whatever the
umask, and a directory another user owns or can write is refused, for the agent and for the
clients talking to its sockets. Real directories, real chown (root) to uid 65534."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from traits_agent import paths
from traits_agent.paths import (
    UnsafePathError,
    check_socket_dir,
    directory_problem,
    ensure_private_dir,
    shared_directory_problem,
    user_runtime_base,
)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_000():
    old = os.umask(0)
    yield
    os.umask(old)


def test_created_directories_are_0700_under_umask_000(tmp_path, umask_000):
    target = tmp_path / "a" / "b" / "c"
    ensure_private_dir(target, "queue.dir")
    for d in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert mode(d) == 0o700, d


def test_created_directories_are_0700_under_umask_077(tmp_path):
    old = os.umask(0o077)
    try:
        ensure_private_dir(tmp_path / "x", "queue.dir")
    finally:
        os.umask(old)
    assert mode(tmp_path / "x") == 0o700


def test_private_file_is_0600_under_umask_000(tmp_path, umask_000):
    paths.write_private_file(tmp_path / "agent-id", b"x\n")
    assert mode(tmp_path / "agent-id") == 0o600


@needs_root
def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    planted = tmp_path / "runtime"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError) as info:
        ensure_private_dir(planted, "control.socket")
    message = str(info.value)
    assert message.startswith("control.socket: refusing to use ")
    assert "is owned by" in message and "65534" in message and "\n" not in message


@needs_root
def test_a_directory_inside_one_another_user_owns_is_refused(tmp_path):
    """/tmp/runtime-0 planted by nobody: a root-made traits-agent/ inside it is still theirs
    to rename away."""
    planted = tmp_path / "runtime-0"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=r"runtime-0 is owned by .*65534"):
        ensure_private_dir(planted / "traits-agent", "listen.unix")


@pytest.mark.parametrize(("bits", "who"), [(0o770, "its group"), (0o777, "other users")])
def test_a_directory_others_can_write_is_refused(tmp_path, bits, who):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(bits)
    with pytest.raises(UnsafePathError, match=f"writable by {who}"):
        ensure_private_dir(d, "queue.dir")


def test_a_group_readable_directory_and_a_sticky_tmp_parent_are_fine(tmp_path):
    d = tmp_path / "service"
    d.mkdir()
    d.chmod(0o750)  # RuntimeDirectoryMode=0750: the group may reach the sockets
    assert directory_problem(d) is None
    assert stat.S_IMODE(os.stat("/tmp").st_mode) & stat.S_ISVTX  # the suite's tmp is in /tmp


def test_default_runtime_base_is_computed_without_touching_it(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    monkeypatch.setattr(paths, "RUN_USER", str(tmp_path / "no-logind"))  # as in cron, su
    assert user_runtime_base() == tmp_path / f"runtime-{os.geteuid()}"
    assert paths.runtime_dir() == tmp_path / f"runtime-{os.geteuid()}" / "traits-agent"
    assert os.listdir(tmp_path) == []  # nothing was created


@needs_root
def test_clients_refuse_a_socket_in_a_runtime_dir_another_user_owns(tmp_path, monkeypatch):
    base = tmp_path / "xdg"
    (base / "traits-agent").mkdir(parents=True, mode=0o700)
    os.chown(base, NOBODY, NOBODY)
    os.chown(base / "traits-agent", NOBODY, NOBODY)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    with pytest.raises(UnsafePathError, match=r"refusing to talk to .*control\.sock"):
        check_socket_dir(base / "traits-agent" / "control.sock", "control.socket")


@needs_root
def test_clients_trust_a_service_directory_owned_by_the_agents_user(tmp_path, monkeypatch):
    """/run/traits-agent/control (traits-agent:traits-agent 0750) is fine for root or a group
    member; the same directory writable by its group is not."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "elsewhere"))
    service = tmp_path / "run" / "control"
    service.mkdir(parents=True)
    service.chmod(0o750)
    os.chown(service, NOBODY, NOBODY)
    assert shared_directory_problem(service) is None
    check_socket_dir(service / "control.sock", "control.socket")
    service.chmod(0o770)
    with pytest.raises(UnsafePathError, match="writable by its group"):
        check_socket_dir(service / "control.sock", "control.socket")


def test_a_missing_socket_directory_is_left_to_connect(tmp_path):
    check_socket_dir(tmp_path / "nope" / "control.sock", "control.socket")


def test_an_existing_state_dir_others_can_read_is_made_private(tmp_path):
    """A queue directory made by hand under umask 022 (0755): another user read queued
    events from it. The state directory is tightened to 0700; socket directories are not."""
    queue = tmp_path / "queue"
    queue.mkdir()
    queue.chmod(0o755)
    ensure_private_dir(queue, "listen.unix")
    assert mode(queue) == 0o755
    ensure_private_dir(queue, "queue.dir", tighten=True)
    assert mode(queue) == 0o700


@needs_root
def test_dead_letters_put_back_by_root_stay_the_agents(tmp_path):
    """`sudo traits-agent dead-letters replay` that fails half-way puts the letters back; the
    file it makes must stay the agent's, or the agent can never append to it again."""
    from traits_agent.delivery.deadletter import DeadLetters

    directory = tmp_path / "dead-letters"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    taken = tmp_path / "taken.ndjson"
    taken.write_text('{"item": {"user_id": "1"}}\n')
    DeadLetters(directory).restore("level_ups", taken)
    st = os.stat(directory / "level_ups.ndjson")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
