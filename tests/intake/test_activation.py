"""Socket activation: parsing systemd's variables, handing sockets to listeners, and real child
processes started with sockets at fd 3, 4, ... as systemd starts the service."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from traits_agent.intake import activation
from traits_agent.intake.activation import ActivationError, InheritedSockets, Kind

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in activation.ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# --- the variables ----------------------------------------------------------------------------


def test_parse_gives_fds_from_3_with_their_names() -> None:
    """LISTEN_FDS=3 with names → fds 3, 4, 5 named in order."""
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "events:udp:forward_unix"}
    assert activation.parse_environment(env, 42) == [
        (3, "events"),
        (4, "udp"),
        (5, "forward_unix"),
    ]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": "41", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "x", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "42", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "42", "LISTEN_FDS": "many"},
    ],
)
def test_parse_ignores_variables_not_meant_for_us(env: dict[str, str]) -> None:
    """No LISTEN_PID, another process's PID, or no fds: nothing is ours."""
    assert activation.parse_environment(env, 42) == []


def test_names_default_to_unknown() -> None:
    """Without LISTEN_FDNAMES (or with an empty entry) an fd is named "unknown"."""
    assert activation.parse_environment({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, 7) == [
        (3, "unknown"),
        (4, "unknown"),
    ]
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "events:"}
    assert activation.parse_environment(env, 7) == [(3, "events"), (4, "unknown")]


def test_a_name_count_mismatch_is_logged_and_names_dropped() -> None:
    """LISTEN_FDNAMES with the wrong count is not trusted for any fd."""
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "events"}
    with capture_logs() as logs:
        assert activation.parse_environment(env, 7) == [(3, "unknown"), (4, "unknown")]
    assert [entry["event"] for entry in logs] == ["listen_fdnames_mismatch"]


def test_listen_fds_unsets_the_variables_even_when_not_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Variables inherited from a parent are removed and no fd is adopted."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "events")
    assert activation.listen_fds() == {}
    assert not set(activation.ENV_VARS) & set(os.environ)
    assert not InheritedSockets.from_environment()


# --- handing sockets to listeners (in process) ------------------------------------------------


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[dict[str, socket.socket]]:
    """One bound socket of each kind, as a socket unit would create them."""
    events = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    events.bind(str(tmp_path / "events.sock"))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(tmp_path / "forward.sock"))
    stream.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    made = {"events": events, "udp": udp, "forward_unix": stream, "forward": tcp}
    yield made
    for sock in made.values():
        sock.close()


def test_take_by_name_hands_each_socket_out_once(sockets: dict[str, socket.socket]) -> None:
    """A named socket goes to its listener once; then the pool is empty."""
    pool = InheritedSockets({name: [sock] for name, sock in sockets.items()})
    assert pool.take("events", Kind.UNIX_DATAGRAM) is sockets["events"]
    assert pool.take("events", Kind.UNIX_DATAGRAM) is None
    assert pool.take("udp", Kind.UDP) is sockets["udp"]
    assert pool.take("forward_unix", Kind.UNIX_STREAM) is sockets["forward_unix"]
    assert pool.take("forward", Kind.TCP) is sockets["forward"]
    assert not pool
    assert pool.close_unclaimed() == []


def test_unnamed_sockets_are_matched_by_configured_address(
    sockets: dict[str, socket.socket], tmp_path: Path
) -> None:
    """A unit without FileDescriptorName= still works: the configured address picks the fd."""
    pool = InheritedSockets({"traits-agent.socket": list(sockets.values())})
    udp_port = sockets["udp"].getsockname()[1]
    tcp_port = sockets["forward"].getsockname()[1]
    # the wrong kind at the right address is not taken
    assert pool.take("udp", Kind.TCP, f"127.0.0.1:{udp_port}") is None
    assert pool.take("udp", Kind.UDP, f"127.0.0.1:{udp_port}") is sockets["udp"]
    assert pool.take("forward", Kind.TCP, ("127.0.0.1", tcp_port)) is sockets["forward"]
    assert pool.take("events", Kind.UNIX_DATAGRAM, str(tmp_path / "x.sock")) is None
    events = str(tmp_path / "sub" / ".." / "events.sock")  # same file, spelled differently
    assert pool.take("events", Kind.UNIX_DATAGRAM, events) is sockets["events"]
    assert pool.take("events", Kind.UNIX_DATAGRAM) is None  # no address, no name: nothing


def test_a_named_socket_wins_over_a_different_configured_address(
    sockets: dict[str, socket.socket],
) -> None:
    """The socket unit is what clients reach: use it, and log that the config disagrees."""
    pool = InheritedSockets({"events": [sockets["events"]]})
    with capture_logs() as logs:
        got = pool.take("events", Kind.UNIX_DATAGRAM, "/elsewhere/events.sock")
    assert got is sockets["events"]
    assert [entry["event"] for entry in logs] == ["inherited_socket_address_differs"]


def test_a_named_socket_of_the_wrong_kind_is_an_error(sockets: dict[str, socket.socket]) -> None:
    """`events` passed as a stream socket is a unit mistake, reported with both sides."""
    pool = InheritedSockets({"events": [sockets["forward_unix"]]})
    with pytest.raises(ActivationError, match=r"SOCK_STREAM.*UNIX_DATAGRAM"):
        pool.take("events", Kind.UNIX_DATAGRAM)


def test_unclaimed_sockets_are_closed_and_reported(sockets: dict[str, socket.socket]) -> None:
    """A socket no listener wanted is closed (ours only) and logged with a hint."""
    pool = InheritedSockets({"udp": [sockets["udp"]]})
    port = sockets["udp"].getsockname()[1]
    with capture_logs() as logs:
        assert pool.close_unclaimed() == [("udp", f"127.0.0.1:{port}")]
    assert sockets["udp"].fileno() == -1
    assert logs[0]["event"] == "inherited_socket_unused"


def test_abstract_unix_addresses_match(tmp_path: Path) -> None:
    """An abstract socket is configured and matched as "@name"."""
    name = f"traits-agent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        pool = InheritedSockets({"unknown": [sock]})
        assert activation.describe(sock) == "@" + name
        assert pool.take("events", Kind.UNIX_DATAGRAM, "@" + name) is sock


# --- a real child process, started the way systemd starts the service -------------------------

# Stands in for PID 1 between fork and exec: moves the passed sockets to fd 3, 4, ..., sets
# LISTEN_PID to its own pid (which the exec keeps) and execs the agent stand-in.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    fds = [int(fd) for fd in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)  # inheritable, as systemd passes them
        os.close(fd)
    os.environ.update(
        LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2]
    )
    os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
    """
)

# Stands in for the agent: takes its sockets by name, reports, then serves one message each.
CHILD = textwrap.dedent(
    """
    import json, os, socket, subprocess, sys
    import structlog
    from traits_agent.intake.activation import InheritedSockets, Kind

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    pool = InheritedSockets.from_environment()
    kinds = {"events": Kind.UNIX_DATAGRAM, "udp": Kind.UDP,
             "forward_unix": Kind.UNIX_STREAM, "forward": Kind.TCP}
    taken = {name: pool.take(name, kind) for name, kind in kinds.items()}
    got = {name: sock for name, sock in taken.items() if sock is not None}
    grandchild = subprocess.run(
        [sys.executable, "-c",
         "import os, json; print(json.dumps([k for k in os.environ if k.startswith('LISTEN_')]))"],
        capture_output=True, text=True, check=True,
    ).stdout
    print(json.dumps({
        "pid": os.getpid(),
        "names": sorted(got),
        "fds": {name: sock.fileno() for name, sock in got.items()},
        "inheritable": any(os.get_inheritable(sock.fileno()) for sock in got.values()),
        "env_left": [k for k in os.environ if k.startswith("LISTEN_")],
        "grandchild_env": json.loads(grandchild),
    }), flush=True)
    for name, sock in sorted(got.items()):
        if sock.type == socket.SOCK_DGRAM:
            data = sock.recv(65536)
        else:
            conn, _ = sock.accept()
            with conn:
                data = conn.recv(65536)
                conn.sendall(b"ack " + data)
        print(json.dumps({name: data.decode()}), flush=True)
    """
)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_a_child_started_with_passed_fds_gets_working_sockets_by_name(
    sockets: dict[str, socket.socket], tmp_path: Path
) -> None:
    """The four listeners arrive at fd 3..6 under their names, are usable, close-on-exec,
    and the variables do not leak to the child's own children. A datagram sent before the
    child started (as during an agent restart) is waiting for it."""
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "child.py").write_text(CHILD)
    order = ["events", "udp", "forward_unix", "forward"]
    fds = [sockets[name].fileno() for name in order]

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"sent while no agent ran", str(tmp_path / "events.sock"))

    proc = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "launcher.py"),
            ",".join(map(str, fds)),
            ":".join(order),
            str(tmp_path / "child.py"),
        ],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        assert report["pid"] == proc.pid  # LISTEN_PID named the exec'd process
        assert report["names"] == sorted(order)
        assert report["fds"] == {"events": 3, "udp": 4, "forward_unix": 5, "forward": 6}
        assert report["inheritable"] is False
        assert report["env_left"] == []
        assert report["grandchild_env"] == []

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"udp hello", sockets["udp"].getsockname())
        replies = {}
        for name in ("forward", "forward_unix"):
            family = socket.AF_INET if name == "forward" else socket.AF_UNIX
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(sockets[name].getsockname())
                s.sendall(f"{name} hello".encode())
                replies[name] = s.recv(100).decode()

        lines = {}
        for _ in order:
            lines.update(json.loads(proc.stdout.readline()))
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert lines == {
        "events": "sent while no agent ran",
        "udp": "udp hello",
        "forward_unix": "forward_unix hello",
        "forward": "forward hello",
    }
    assert replies == {"forward": "ack forward hello", "forward_unix": "ack forward_unix hello"}


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
def test_systemds_own_socket_activate_starts_a_child_that_finds_its_sockets(
    tmp_path: Path,
) -> None:
    """With systemd's reference implementation of the protocol (systemd-socket-activate, which
    binds, waits for the first datagram, then execs the service), the `events` and `udp`
    sockets are found by name and the first datagram is there to read."""
    (tmp_path / "child.py").write_text(CHILD)
    path = tmp_path / "events.sock"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))  # find a free port; tiny race, local only
        port = probe.getsockname()[1]
    env = _child_env()
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--datagram",
            f"--listen={path}",
            f"--listen=127.0.0.1:{port}",
            "--fdname=events:udp",
            f"--setenv=PYTHONPATH={REPO}",
            sys.executable,
            str(tmp_path / "child.py"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        # it reports "Listening on ..." for each socket before it waits for traffic
        for _ in range(2):
            assert "Listening on" in proc.stderr.readline()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"first", str(path))
        report = json.loads(proc.stdout.readline())
        assert report["pid"] == proc.pid
        assert report["names"] == ["events", "udp"]
        assert report["env_left"] == [] and report["grandchild_env"] == []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"second", ("127.0.0.1", port))
        lines = {}
        for _ in range(2):
            lines.update(json.loads(proc.stdout.readline()))
        assert lines == {"events": "first", "udp": "second"}
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
