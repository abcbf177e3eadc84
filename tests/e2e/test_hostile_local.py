"""A hostile local user against the real daemon (a subprocess): descriptor floods with a low
RLIMIT_NOFILE, and the modes of everything it creates under umask 000 (issue 7)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import trio

from tests.e2e.harness import AgentProcess, run_until_exit, write_config
from tests.e2e.test_pipeline import EVENT_TIME, send_blocking, start_agent
from traits_agent.fakeapi import Fault
from traits_agent.intake.wire import encode_event

GUARD_S = 60


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_for(predicate, what: str) -> None:
    """Poll until predicate() holds; a hang guard (not a speed assertion) bounds it."""
    with trio.fail_after(GUARD_S):
        while not predicate():  # noqa: ASYNC110 - another process: nothing to wait on
            await trio.sleep(0.05)


def flood_control(path: str, connections: int, fds_each: int) -> list[socket.socket]:
    """Connections that each send a partial request carrying descriptors, then say nothing."""
    null = os.open(os.devnull, os.O_RDONLY)
    clients = []
    try:
        for _ in range(connections):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(s)
            s.setblocking(False)
            try:
                s.connect(path)
                socket.send_fds(s, [b"stat"], [null] * fds_each)
            except OSError:
                continue  # the backlog is full: the agent is not accepting any more
    finally:
        os.close(null)
    return clients


def logged(agent: AgentProcess, event: str, **fields) -> bool:
    return any(
        e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        for e in agent.log_events()
    )


async def test_descriptor_exhaustion_is_survived_and_fully_recovered(workdir, api):
    """The agent at its RLIMIT_NOFILE (a control-socket flood carrying descriptors): the CSV
    spool's scan got EMFILE and the agent exited. Now it waits, says so (fd_exhausted), keeps
    no descriptor of the flood, and delivers afterwards."""
    agent = await start_agent(workdir, api)
    pid = agent.proc.pid
    before = open_fds(pid)
    limit = before + 24
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        control = str(workdir / "control.sock")
        clients = await trio.to_thread.run_sync(flood_control, control, 40, 4)
        # the spool scans every second: it meets EMFILE, and must wait, not die
        await wait_for(
            lambda: (
                agent.proc.poll() is not None
                or logged(agent, "fd_exhausted", where="csv_spool_scan")
            ),
            "EMFILE met",
        )
        assert agent.proc.poll() is None, agent.log_text()[-3000:]
        peak = open_fds(pid)
        for c in clients:
            c.close()
        try:
            # <=: `before` may have caught a transient one (the spool's scandir, a sync)
            await wait_for(lambda: open_fds(pid) <= before, "the flood's descriptors closed")
        except trio.TooSlowError:
            fds = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
            raise AssertionError(f"{before} descriptors before, now {fds}") from None
        after = open_fds(pid)
        status = agent.status()
        assert status["csv"]["pending_files"] == 0
        datagram = encode_event("level_ups", {"user_id": "1", "level": 2}, EVENT_TIME)
        await trio.to_thread.run_sync(send_blocking, agent.unix_socket, [datagram])
        await api.wait_for_items(1, "level_ups")
    finally:
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert agent.proc.poll() is None, agent.log_text()[-2000:]
    assert await agent.terminate() == 0
    print(f"fds: before {before}, limit {limit}, peak {peak}, after {after}")


# -- file modes and other users' directories (items 4, 11) ------------------------------------

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="another user's files need root")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


async def test_everything_the_agent_creates_has_explicit_modes_under_umask_000(workdir, api):
    """Run by hand as root with umask 000, the runtime dir, queue dir and lock files were 0777
    and agent-id 0666: another user replaced control.sock and read root's upload."""
    api.inject(Fault(reject_field="user_id", reject_value="bad", times=None))
    run = workdir / "run"  # the agent makes it
    config = write_config(
        workdir,
        api.url,
        listen={
            "unix": str(run / "events.sock"),
            "forward_unix": str(run / "forward.sock"),
            "unix_mode": 0o660,
        },
        control={"socket": str(run / "control" / "control.sock")},
        queue={"dir": str(workdir / "state" / "queue")},
    )
    agent = AgentProcess(workdir, config)
    with umask(0):
        await agent.start()
    datagram = encode_event("level_ups", {"user_id": "bad", "level": 2}, EVENT_TIME)
    await trio.to_thread.run_sync(send_blocking, str(run / "events.sock"), [datagram])
    state = workdir / "state" / "queue"
    await wait_for(lambda: (state / "dead-letters" / "level_ups.ndjson").exists(), "dead letter")
    source = workdir / "k.csv"
    source.write_bytes(b"a,b\n1,2\n")
    source.chmod(0o600)
    with umask(0):
        from traits_agent.cli.upload import upload_command
        from traits_agent.config import load_config

        assert (
            await trio.to_thread.run_sync(upload_command, load_config(config), "kpis", source) == 0
        )
    expected = {
        run: 0o700,
        run / "control": 0o700,
        workdir / "state": 0o700,
        state: 0o700,
        state / "agent-id": 0o600,
        run / "events.sock": 0o660,
        run / "forward.sock": 0o660,
        run / "control" / "control.sock": 0o660,
        state / "dead-letters": 0o700,
        state / "dead-letters" / "level_ups.ndjson": 0o600,
        state / "csv-spool": 0o700,
        state / "csv-spool" / "kpis": 0o700,
    }
    actual = {path: mode(path) for path in expected}
    assert {str(p): oct(m) for p, m in actual.items()} == {
        str(p): oct(m) for p, m in expected.items()
    }
    assert await agent.terminate() == 0


@needs_root
@pytest.mark.parametrize("key", ["queue.dir", "control.socket"])
async def test_a_directory_another_user_owns_is_refused_in_one_line(workdir, api, key):
    planted = workdir / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    sections = (
        {"queue": {"dir": str(planted)}}
        if key == "queue.dir"
        else {"control": {"socket": str(planted / "control.sock")}}
    )
    config = write_config(workdir, api.url, **sections)
    with trio.fail_after(GUARD_S):  # an agent that accepts the directory runs until killed
        result = await run_until_exit(config)
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert "\n" not in err and err.startswith(f"traits-agent: {key}: refusing to use {planted}")
    assert "65534" in err
    assert b"directory_refused" in result.stdout
    assert os.listdir(planted) == []  # nothing was made in it


HIDE_RUN_USER = (
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "if [ -d /run/user ]; then mount -t tmpfs -o size=1m,mode=0755 tmpfs /run/user || exit 99; "
    'fi; exec "$@"',
    "sh",
)
"""No /run/user/<uid> (cron, su, containers), in a private mount namespace: the host's
/run/user is untouched."""


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HIDE_RUN_USER, sys.executable, "-m", "traits_agent", *args],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        env=env,
    )


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
async def test_a_planted_tmp_runtime_dir_breaks_nothing_with_explicit_paths(workdir, api):
    """/tmp/runtime-<uid> made by another user: with every path in --config, run, status and
    send worked never (a PermissionError traceback from computing the unused default); with
    the default paths each says in one line why it refuses."""
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700)
    planted = tmp / f"runtime-{os.geteuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY")}
    env.update(
        TMPDIR=str(tmp),
        XDG_DATA_HOME=str(workdir / "data"),
        XDG_CONFIG_HOME=str(workdir / "config"),
        TRAITS_API_KEY="test-key",
    )
    explicit = write_config(workdir, api.url, listen={"forward_unix": str(workdir / "f.sock")})
    agent = AgentProcess(workdir, explicit, prefix=HIDE_RUN_USER)
    old_env = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        await agent.start()
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    status = cli("status", "--json", "--config", str(explicit), env=env)
    assert status.returncode == 0, status.stderr
    sent = cli(
        "send", "level_ups", '{"user_id": "1", "level": 2}', "--config", str(explicit), env=env
    )
    assert sent.returncode == 0, sent.stderr
    await api.wait_for_items(1, "level_ups")
    assert await agent.terminate() == 0

    defaults = workdir / "defaults.toml"
    defaults.write_text(f'[api]\nendpoint = "{api.url}"\n')
    for args in (("status",), ("send", "level_ups", '{"user_id": "1", "level": 2}'), ("run",)):
        result = cli(*args, "--config", str(defaults), env=env)
        err = result.stderr.strip()
        assert result.returncode == 2, (args, err)
        assert "Traceback" not in err and "\n" not in err, err
        assert f"refusing to talk to {planted}" in err or f"refusing to use {planted}" in err
        assert "65534" in err
    assert os.listdir(planted) == []
