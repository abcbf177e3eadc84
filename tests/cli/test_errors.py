"""The CLI's one-line error: every kind of the agent's own errors reaches the user as
`traits-agent: <message>` and an exit status, never as a traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.harness import short_tmpdir, write_config
from traits_agent import errors
from traits_agent.cli import main

REPO = Path(__file__).resolve().parents[2]

#: puts a Unix *stream* socket at fd 3 named `events` (a datagram socket is what the agent
#: needs there), as a socket unit with the wrong `ListenDatagram=`/`ListenStream=` would, and
#: execs `python -m traits_agent run` in the same process (so LISTEN_PID names it)
LAUNCHER = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1] + "/wrong.sock")
    s.listen()
    if s.fileno() != 3:
        os.dup2(s.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="events")
    os.execv(sys.executable, [sys.executable, "-m", "traits_agent", "run", "--fake-api",
                              "--config", sys.argv[2]])
    """
)


def test_an_inherited_socket_of_the_wrong_kind_is_one_line_not_a_traceback() -> None:
    """An ActivationError at start-up: exit 1 with one line naming both socket kinds."""
    directory = short_tmpdir()
    try:
        config = write_config(directory, "http://127.0.0.1:9", log={"format": "json"})
        (directory / "launcher.py").write_text(LAUNCHER)
        proc = subprocess.run(
            [sys.executable, str(directory / "launcher.py"), str(directory), str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        )
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("traits-agent: ")
    assert "SOCK_STREAM" in lines[0] and "UNIX_DATAGRAM" in lines[0]


def _raiser(error: Exception):
    def command(_args: object) -> int:
        raise error

    return command


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.UsageError("RESOURCE: unknown resource 'x'"), 2),
        (errors.ConfigError("queue.dir", "must be absolute"), 2),
        (errors.SpoolError("a.csv: is empty"), 2),
        (errors.AgentNotRunning("no agent is running"), 1),
        (errors.ActivationError("events: a SOCK_STREAM socket"), 1),
        (errors.QueueLockedError("locked by another agent"), 1),
    ],
)
def test_every_kind_of_error_is_one_line_with_its_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error, status
) -> None:
    """Whatever a command raises from the tree, `main` prints one line and returns its status."""
    import traits_agent.cli as cli

    monkeypatch.setattr(cli, "_command", lambda _name: _raiser(error))
    assert main(["status"]) == status
    err = capsys.readouterr().err
    assert err == f"traits-agent: {error}\n"


def test_every_error_class_hangs_under_the_root() -> None:
    """One root: every public exception class of the package is a TraitsAgentError."""
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert len(classes) >= 12
    assert all(issubclass(c, errors.TraitsAgentError) for c in classes)
