"""`traits-agent doctor`: each check against real files, sockets and a loopback endpoint."""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import trio

from traits_agent.cli import doctor
from traits_agent.cli.doctor import (
    Check,
    check_api_key,
    check_disk_space,
    check_endpoint,
    check_max_dgram_qlen,
    check_queue_dir,
    check_rmem_max,
    check_unix_socket,
    checks_json,
    exit_code,
    format_checks,
    run_doctor,
)
from traits_agent.config import from_mapping
from traits_agent.fakeapi import FakeAPI

SECRET = "tk_live_s3cr3t-do-not-print"
ROOT = os.geteuid() == 0


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="td-", dir="/tmp") as d:
        yield Path(d)


def make_config(directory: Path, **sections):
    data = {
        "api": {"endpoint": "http://127.0.0.1:9"},
        "listen": {
            "unix": str(directory / "events.sock"),
            "forward_unix": "",
            "udp": "127.0.0.1:0",
            "receive_buffer": 8 * 1024 * 1024,
        },
        "queue": {"dir": str(directory / "queue")},
        "control": {"socket": str(directory / "control.sock")},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return from_mapping(data)


def proc_sys(directory: Path, qlen: int, rmem: int) -> Path:
    """A /proc/sys look-alike with the two values the doctor reads."""
    root = directory / "proc-sys"
    (root / "net/unix").mkdir(parents=True)
    (root / "net/core").mkdir(parents=True)
    (root / "net/unix/max_dgram_qlen").write_text(f"{qlen}\n")
    (root / "net/core/rmem_max").write_text(f"{rmem}\n")
    return root


# -- sysctls ----------------------------------------------------------------------------------


def test_low_max_dgram_qlen_fails_with_the_sysctl_and_the_drop_in(tmp_path):
    """10 queued datagrams is a failure; the hint gives the sysctl and where the drop-in goes,
    or, when the drop-in is installed, that it was not applied."""
    config = make_config(tmp_path)
    dropin = tmp_path / "60-traits-agent.conf"
    check = check_max_dgram_qlen(config, proc_sys(tmp_path, 10, 1 << 23), dropin)
    assert check.ok is False
    assert check.detail.startswith("10 (< 512)")
    assert "sysctl -w net.unix.max_dgram_qlen=512" in check.hint
    assert str(dropin) in check.hint

    dropin.write_text("net.unix.max_dgram_qlen = 512\n")
    check = check_max_dgram_qlen(config, tmp_path / "proc-sys", dropin)
    assert "not applied" in check.hint and "sysctl --system" in check.hint


def test_max_dgram_qlen_ok_unreadable_or_not_needed(tmp_path):
    """512 passes; an unreadable value warns; no Unix listener, nothing to check."""
    dropin = tmp_path / "absent.conf"
    config = make_config(tmp_path)
    assert check_max_dgram_qlen(config, proc_sys(tmp_path, 512, 0), dropin).ok is True
    assert check_max_dgram_qlen(config, tmp_path / "nowhere", dropin).ok is None
    no_unix = make_config(tmp_path, listen={"unix": ""})
    assert check_max_dgram_qlen(no_unix, tmp_path / "nowhere", dropin).ok is True


def test_rmem_max_below_the_receive_buffer_warns(tmp_path):
    """rmem_max below listen.receive_buffer is a warning naming both numbers."""
    config = make_config(tmp_path)
    dropin = tmp_path / "absent.conf"
    check = check_rmem_max(config, proc_sys(tmp_path, 512, 212992), dropin)
    assert check.ok is None
    assert "212992 < listen.receive_buffer 8388608" in check.detail
    assert "sysctl -w net.core.rmem_max=8388608" in check.hint
    assert check_rmem_max(config, proc_sys(tmp_path / "b", 512, 1 << 24), dropin).ok is True


def test_the_real_proc_sys_is_read():
    """On this host the real value is read and judged against 512."""
    path = Path("/proc/sys/net/unix/max_dgram_qlen")
    if not path.exists():
        pytest.skip("no /proc/sys/net/unix")
    value = int(path.read_text())
    config = from_mapping({"listen": {"unix": "/tmp/x.sock"}})
    check = check_max_dgram_qlen(config, doctor.PROC_SYS, Path("/nonexistent"))
    assert check.ok is (value >= 512)
    assert check.detail.startswith(str(value))


# -- queue directory and disk ------------------------------------------------------------------


def test_queue_dir_states(tmp_path):
    """Missing under a writable parent: fine; present and writable: fine; a file, or under a
    file: failure."""
    missing = make_config(tmp_path, queue={"dir": str(tmp_path / "a/b/queue")})
    check = check_queue_dir(missing)
    assert check.ok is True and "will create it" in check.detail

    (tmp_path / "q").mkdir(mode=0o700)
    check = check_queue_dir(make_config(tmp_path, queue={"dir": str(tmp_path / "q")}))
    assert check.ok is True and "mode 0700" in check.detail and "writable" in check.detail

    (tmp_path / "file").write_text("x")
    check = check_queue_dir(make_config(tmp_path, queue={"dir": str(tmp_path / "file")}))
    assert check.ok is False and "not a directory" in check.detail
    check = check_queue_dir(make_config(tmp_path, queue={"dir": str(tmp_path / "file/queue")}))
    assert check.ok is False and "not a directory" in check.detail


@pytest.mark.skipif(ROOT, reason="root may write anywhere")
def test_queue_dir_not_writable_by_its_owner_fails(tmp_path):
    """A queue directory its own user cannot write is a failure."""
    (tmp_path / "q").mkdir(mode=0o500)
    try:
        check = check_queue_dir(make_config(tmp_path, queue={"dir": str(tmp_path / "q")}))
    finally:
        (tmp_path / "q").chmod(0o700)
    assert check.ok is False


def test_disk_space_against_the_quota(tmp_path):
    """Enough room for queue.max_bytes is fine; a quota larger than the disk warns."""
    (tmp_path / "queue" / "actions").mkdir(parents=True)
    (tmp_path / "queue" / "actions" / "seg").write_bytes(b"x" * 5000)
    small = make_config(tmp_path, queue={"max_bytes": 16 * 1024 * 1024, "segment_bytes": 65536})
    check = check_disk_space(small)
    assert check.ok is True, check
    assert "queue uses 4.9 KiB" in check.detail

    huge = make_config(tmp_path, queue={"max_bytes": 1 << 50})
    check = check_disk_space(huge)
    assert check.ok is None
    assert "queue.max_bytes 1024.0 TiB" in check.detail
    assert "set queue.max_bytes below" in check.hint


# -- Unix sockets ------------------------------------------------------------------------------


def test_unix_socket_receiving_with_the_right_mode(short_dir):
    """A bound datagram socket with mode 0660 passes and names owner, group and mode."""
    path = short_dir / "events.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        path.chmod(0o660)
        check = check_unix_socket("listen.unix", str(path), 0o660, socket.SOCK_DGRAM)
        assert check.ok is True, check
        assert "mode 0660" in check.detail and "receiving" in check.detail

        path.chmod(0o666)
        check = check_unix_socket("listen.unix", str(path), 0o660, socket.SOCK_DGRAM)
        assert check.ok is None and "any local user" in check.detail

        path.chmod(0o600)
        check = check_unix_socket("listen.unix", str(path), 0o660, socket.SOCK_DGRAM)
        assert check.ok is None and "group cannot send" in check.detail
        assert "chmod g+w" in check.hint


def test_stream_socket_listening(short_dir):
    """The forward socket is a stream socket: connecting to a listener passes."""
    path = short_dir / "forward.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen()
        path.chmod(0o660)
        check = check_unix_socket("listen.forward_unix", str(path), 0o660, socket.SOCK_STREAM)
    assert check.ok is True, check


def test_unix_socket_problems(short_dir):
    """Missing: warning; stale: warning; a regular file or an overlong path: failure;
    disabled: fine."""
    path = short_dir / "events.sock"
    check = check_unix_socket("listen.unix", str(path), 0o660, socket.SOCK_DGRAM)
    assert check.ok is None and "does not exist" in check.detail

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
    path.chmod(0o660)
    check = check_unix_socket("listen.unix", str(path), 0o660, socket.SOCK_DGRAM)
    assert check.ok is None and "nobody is receiving" in check.detail

    path.unlink()
    path.write_text("not a socket")
    check = check_unix_socket("listen.unix", str(path), 0o660, socket.SOCK_DGRAM)
    assert check.ok is False and "not a socket" in check.detail

    long = "/tmp/" + "x" * 120 + ".sock"
    check = check_unix_socket("listen.unix", long, 0o660, socket.SOCK_DGRAM)
    assert check.ok is False and "107" in check.detail

    assert check_unix_socket("listen.unix", "", 0o660, socket.SOCK_DGRAM).ok is True


# -- the API key -------------------------------------------------------------------------------


def key_file(directory: Path, mode: int, text: str = SECRET) -> Path:
    path = directory / "api_key"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_key_file_modes(tmp_path):
    """0600 passes, group-readable warns, world-readable fails; the key never shows."""
    absent = tmp_path / "no-credential"
    path = key_file(tmp_path, 0o600)
    config = make_config(tmp_path, api={"key_file": str(path)})
    results = []
    for mode, want in ((0o600, True), (0o640, None), (0o644, False)):
        path.chmod(mode)
        check = check_api_key(config, {}, absent)
        results.append(check)
        assert check.ok is want, check
        assert f"mode {mode:04o}" in check.detail
    assert "readable by every local user" in results[2].detail
    assert f"chmod 0600 {path}" in results[2].hint
    assert SECRET not in format_checks(results) + checks_json(results)


def test_key_sources(tmp_path):
    """$TRAITS_API_KEY, $CREDENTIALS_DIRECTORY and the LoadCredential source all count;
    none at all is a failure that says where to put it."""
    config = make_config(tmp_path)
    absent = tmp_path / "no-credential"

    check = check_api_key(config, {"TRAITS_API_KEY": SECRET}, absent)
    assert check.ok is True and "$TRAITS_API_KEY" in check.detail

    creds = tmp_path / "creds"
    creds.mkdir()
    key_file(creds, 0o400)
    check = check_api_key(config, {"CREDENTIALS_DIRECTORY": str(creds)}, absent)
    assert check.ok is True and "systemd credential" in check.detail

    source = key_file(tmp_path, 0o600)
    check = check_api_key(config, {}, source)
    assert check.ok is True and "LoadCredential" in check.detail

    check = check_api_key(config, {}, absent)
    assert check.ok is False and "no API key" in check.detail
    assert str(absent) in check.hint


def test_bad_key_files_fail(tmp_path):
    """A configured key_file that is missing or empty fails with the config's message."""
    absent = tmp_path / "no-credential"
    missing = make_config(tmp_path, api={"key_file": str(tmp_path / "nope")})
    check = check_api_key(missing, {}, absent)
    assert check.ok is False and "no such file" in check.detail

    empty = key_file(tmp_path, 0o600, "")
    check = check_api_key(make_config(tmp_path, api={"key_file": str(empty)}), {}, absent)
    assert check.ok is False and "empty" in check.detail


# -- the endpoint (loopback only) --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_endpoint_reachable(nursery, tmp_path):
    """A loopback fake API answers: reachable, with the status and the time it took."""
    api = FakeAPI(api_key=SECRET)
    url = await nursery.start(api.serve)
    config = make_config(tmp_path, api={"endpoint": url})
    check = await trio.to_thread.run_sync(check_endpoint, config)
    assert check.ok is True, check
    assert check.detail.startswith(f"{url} answered HTTP ")
    (request,) = api.requests
    assert request.method == "HEAD" and "authorization" not in request.headers
    assert request.headers["user-agent"].startswith("traits-agent/")


async def test_endpoint_refused(tmp_path):
    """Nothing listening: a failure that says so, with the network hint."""
    config = make_config(tmp_path, api={"endpoint": f"http://127.0.0.1:{free_port()}"})
    check = await trio.to_thread.run_sync(check_endpoint, config)
    assert check.ok is False
    assert "connection refused" in check.detail
    assert "HTTPS" in check.hint


async def test_endpoint_not_speaking_tls(nursery, tmp_path):
    """https:// to a plain HTTP server: a TLS handshake failure, not a crash."""
    api = FakeAPI()
    url = await nursery.start(api.serve)
    config = make_config(tmp_path, api={"endpoint": url.replace("http://", "https://")})
    check = await trio.to_thread.run_sync(check_endpoint, config)
    assert check.ok is False
    assert "TLS" in check.detail, check


async def test_endpoint_that_never_answers(tmp_path):
    """A peer that accepts TCP but never completes TLS: a timeout, within the limit."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = make_config(tmp_path, api={"endpoint": f"https://127.0.0.1:{port}"})
        with trio.fail_after(10):
            check = await trio.to_thread.run_sync(lambda: check_endpoint(config, timeout=0.3))
    assert check.ok is False
    assert "no answer after 0.3 s" in check.detail


# -- the whole report ------------------------------------------------------------------------


async def test_run_doctor_on_a_healthy_setup(nursery, short_dir):
    """Everything in place: every check passes, exit 0; the report and JSON name each check
    and never the key."""
    api = FakeAPI(api_key=SECRET)
    url = await nursery.start(api.serve)
    (short_dir / "queue").mkdir()
    path = key_file(short_dir, 0o600)
    config = make_config(
        short_dir,
        api={"endpoint": url, "key_file": str(path)},
        listen={"receive_buffer": 65536},
        queue={"max_bytes": 16 * 1024 * 1024, "segment_bytes": 65536},
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(config.listen.unix)
    os.chmod(config.listen.unix, 0o660)
    try:
        checks = await trio.to_thread.run_sync(
            lambda: run_doctor(
                config,
                env={},
                proc_sys=proc_sys(short_dir, 512, 1 << 23),
                credential_source=short_dir / "absent",
            )
        )
    finally:
        sock.close()
    assert [c.name for c in checks] == [
        "config",
        "net.unix.max_dgram_qlen",
        "net.core.rmem_max",
        "queue.dir",
        "directories",
        "disk space",
        "listen.unix",
        "listen.forward_unix",
        "api key",
        "endpoint",
        "agent",
    ]
    assert all(c.ok is True for c in checks), format_checks(checks)
    assert exit_code(checks) == 0
    text = format_checks(checks)
    assert text.endswith("0 failed, 0 warnings, 11 ok")
    parsed = json.loads(checks_json(checks))
    assert parsed["ok"] is True and len(parsed["checks"]) == 11
    assert SECRET not in text + checks_json(checks)


def test_report_and_exit_code_with_problems(short_dir):
    """A failure makes exit 1 and prints its hint; warnings alone exit 0."""
    config = make_config(short_dir, listen={"unix": ""})
    checks = run_doctor(
        config,
        env={},
        network=False,
        proc_sys=proc_sys(short_dir, 10, 0),
        credential_source=short_dir / "absent",
    )
    by_name = {c.name: c for c in checks}
    assert by_name["endpoint"].ok is None and "--no-network" in by_name["endpoint"].detail
    assert by_name["api key"].ok is False
    assert exit_code(checks) == 1
    text = format_checks(checks)
    assert "FAIL  api key" in text and "install -m 0600" in text
    assert "WARN  endpoint" in text
    assert json.loads(checks_json(checks))["ok"] is False

    warnings_only = [Check("a", True, "fine"), Check("b", None, "meh", "do x")]
    assert exit_code(warnings_only) == 0
    assert "do x" in format_checks(warnings_only)


def test_a_crashing_check_is_a_failure_not_a_crash(short_dir, monkeypatch):
    """One check that raises is reported as failed; the others still run."""

    def boom(config):
        raise RuntimeError("kaput")

    monkeypatch.setattr(doctor, "check_queue_dir", boom)
    checks = run_doctor(make_config(short_dir), env={}, network=False)
    failed = [c for c in checks if c.name == "queue.dir"]
    assert failed[0].ok is False and "kaput" in failed[0].detail
    assert len(checks) == 11  # the ten host checks and the running agent


def test_main_prints_json(short_dir):
    """doctor.main (the CLI's body) prints the JSON report and returns the exit status."""
    out = io.StringIO()
    config = make_config(short_dir, api={"key_file": str(key_file(short_dir, 0o600))})
    status = doctor.main(config, as_json=True, network=False, out=out)
    parsed = json.loads(out.getvalue())
    assert status == (0 if parsed["ok"] else 1)
    assert {c["name"] for c in parsed["checks"]} >= {"api key", "endpoint"}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_directories_another_user_owns_or_can_write_fail(short_dir):
    """The doctor flags what the agent would refuse: a socket directory writable by everyone
    and a queue directory inside a directory another user owns (issue 7 item 4)."""
    sockets = short_dir / "run"
    sockets.mkdir()
    sockets.chmod(0o777)
    theirs = short_dir / "theirs"
    (theirs / "queue").mkdir(parents=True, mode=0o700)
    os.chown(theirs, 65534, 65534)
    config = make_config(
        short_dir,
        listen={"unix": str(sockets / "events.sock")},
        queue={"dir": str(theirs / "queue")},
    )
    check = doctor.check_directories(config)
    assert check.ok is False
    assert "listen.unix:" in check.detail and "writable by other users" in check.detail
    assert "queue.dir:" in check.detail and "65534" in check.detail
    sockets.chmod(0o750)
    os.chown(theirs, 0, 0)
    assert doctor.check_directories(config).ok is True
