"""sd_notify over a real Unix datagram socket standing in for systemd's, and the watchdog on a
mock clock."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from traits_agent.observe import systemd


class FakeSystemd:
    """The receiving end of `$NOTIFY_SOCKET`: a bound Unix datagram socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[float, str]] = []  # (trio time, datagram) from `collect`

    def messages(self) -> list[str]:
        """Every datagram queued so far, decoded, oldest first."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return out

    async def collect(self) -> None:
        """Record each datagram with the (mock) time it arrived, until cancelled."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            for message in self.messages():
                self.received.append((trio.current_time(), message))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(systemd, "_failure_logged", False)


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeSystemd]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        sock, env = _bind(path), path
    else:
        name = f"traits-agent-test-{os.getpid()}-{uuid.uuid4().hex}"
        sock, env = _bind("\0" + name), "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", env)
    with sock:
        yield FakeSystemd(sock)


# --- the notify protocol ----------------------------------------------------------------------


def test_notify_is_a_no_op_outside_systemd() -> None:
    """Without $NOTIFY_SOCKET every helper returns False and raises nothing."""
    assert systemd.notify("READY=1") is False
    assert systemd.ready("up") is False
    assert systemd.status("x") is False
    assert systemd.stopping() is False
    assert systemd.extend_timeout(5) is False
    assert systemd.watchdog() is False


def test_ready_sends_ready_and_status_in_one_datagram(fake_systemd: FakeSystemd) -> None:
    """READY=1 and STATUS= travel together, so `systemctl status` never shows READY blank."""
    assert systemd.ready("queue 0 items, upstream ok") is True
    assert fake_systemd.messages() == ["READY=1\nSTATUS=queue 0 items, upstream ok"]


def test_each_helper_sends_its_exact_message(fake_systemd: FakeSystemd) -> None:
    """status / stopping / extend_timeout / watchdog / raw notify put the documented bytes."""
    assert systemd.ready()
    assert systemd.status("delivering: 12 queued")
    assert systemd.stopping("flushing")
    assert systemd.stopping()
    assert systemd.extend_timeout(2.5)
    assert systemd.watchdog()
    assert systemd.notify("ERRNO=5", "STATUS=bad")
    assert fake_systemd.messages() == [
        "READY=1",
        "STATUS=delivering: 12 queued",
        "STOPPING=1\nSTATUS=flushing",
        "STOPPING=1",
        "EXTEND_TIMEOUT_USEC=2500000",
        "WATCHDOG=1",
        "ERRNO=5\nSTATUS=bad",
    ]


def test_status_text_stays_on_one_line(fake_systemd: FakeSystemd) -> None:
    """A newline in status text cannot inject another KEY=VALUE assignment."""
    systemd.status("upstream down\nREADY=1")
    assert fake_systemd.messages() == ["STATUS=upstream down READY=1"]


def test_a_dead_notify_socket_is_reported_once_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send that fails returns False and is logged once per process, not per call."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with capture_logs() as logs:
        assert systemd.ready("up") is False
        assert systemd.watchdog() is False
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "warning"


def test_an_unsupported_notify_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Addresses other than a path or @abstract name (vsock:, relative) are not guessed at."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with capture_logs() as logs:
        assert systemd.notify("READY=1") is False
    assert [entry["event"] for entry in logs] == ["sd_notify_unsupported_socket"]


# --- watchdog interval ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("30000000", "garbage", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval_is_half_the_period_for_our_pid_only(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """WATCHDOG_USEC/2, and nothing when WATCHDOG_PID names another process."""
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    assert systemd.watchdog_interval() == expected


# --- watchdog task (mock clock) ---------------------------------------------------------------


async def test_watchdog_pets_every_half_period(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.MockClock
) -> None:
    """With WatchdogSec=2s the task sends WATCHDOG=1 at once and then every second."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_systemd.collect)
        interval = await nursery.start(systemd.watchdog_task, lambda: True)
        assert interval == 1.0
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    assert fake_systemd.received == [(float(t), "WATCHDOG=1") for t in range(4)]


async def test_watchdog_stops_petting_when_not_progressing(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.MockClock
) -> None:
    """While the pipeline is stuck no WATCHDOG=1 is sent (systemd restarts us); once it
    moves again the pings resume; the stall and the recovery are each logged once."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    stuck = (2.5, 5.5)  # not progressing in this window of mock time

    def is_progressing() -> bool:
        return not stuck[0] <= trio.current_time() < stuck[1]

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_systemd.collect)
            await nursery.start(systemd.watchdog_task, is_progressing)
            await trio.sleep(7.5)
            nursery.cancel_scope.cancel()
    assert [t for t, _ in fake_systemd.received] == [0.0, 1.0, 2.0, 6.0, 7.0]
    assert {m for _, m in fake_systemd.received} == {"WATCHDOG=1"}
    events = [entry["event"] for entry in logs]
    assert events == ["watchdog_withheld", "watchdog_resumed"]


async def test_watchdog_treats_a_failing_check_as_no_progress(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.MockClock
) -> None:
    """An exception from is_progressing withholds the ping instead of killing the task."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")

    def is_progressing() -> bool:
        raise RuntimeError("stage table corrupted")

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_systemd.collect)
            await nursery.start(systemd.watchdog_task, is_progressing)
            await trio.sleep(2.5)
            nursery.cancel_scope.cancel()
    assert fake_systemd.received == []
    assert "watchdog_check_failed" in [entry["event"] for entry in logs]


async def test_watchdog_task_returns_at_once_without_a_watchdog(
    autojump_clock: trio.MockClock,
) -> None:
    """No WATCHDOG_USEC: `nursery.start` reports None and the task is already done."""
    async with trio.open_nursery() as nursery:
        assert await nursery.start(systemd.watchdog_task, lambda: True) is None
    assert trio.current_time() == 0.0


async def test_watchdog_interval_can_be_given_explicitly(
    fake_systemd: FakeSystemd, autojump_clock: trio.MockClock
) -> None:
    """An explicit interval overrides the environment (used when the caller computed it)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_systemd.collect)
        start = functools.partial(systemd.watchdog_task, lambda: True, interval=0.25)
        assert await nursery.start(start) == 0.25
        await trio.sleep(0.6)
        nursery.cancel_scope.cancel()
    assert [t for t, _ in fake_systemd.received] == [0.0, 0.25, 0.5]


# --- status refresh ---------------------------------------------------------------------------


async def test_status_task_sends_only_changes(
    fake_systemd: FakeSystemd, autojump_clock: trio.MockClock
) -> None:
    """STATUS= is re-read every interval and sent when the text changed."""
    texts = iter(["queued 3", "queued 3", "queued 0", "queued 0"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_systemd.collect)
        await nursery.start(functools.partial(systemd.status_task, lambda: next(texts)))
        await trio.sleep(16)
        nursery.cancel_scope.cancel()
    assert fake_systemd.received == [(0.0, "STATUS=queued 3"), (10.0, "STATUS=queued 0")]


async def test_status_task_is_idle_outside_systemd(autojump_clock: trio.MockClock) -> None:
    """Without $NOTIFY_SOCKET the task returns at once and never calls describe()."""
    calls = []
    async with trio.open_nursery() as nursery:
        await nursery.start(systemd.status_task, lambda: calls.append(1) or "x")
    assert calls == []


# --- the shipped units and config agree (systemd/) --------------------------------------------

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"


def _unit(name: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file (all sections; repeated keys accumulate)."""
    values: dict[str, list[str]] = {}
    for raw in (SYSTEMD_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def _shipped_config() -> dict:
    import tomllib

    with open(SYSTEMD_DIR / "agent.toml", "rb") as f:
        return tomllib.load(f)


def test_socket_units_pass_the_names_and_addresses_the_config_expects() -> None:
    """Each socket unit's FileDescriptorName= is the listener it feeds, and its address is
    the one agent.toml configures for that listener (clients use either)."""
    from traits_agent.intake import activation

    listen = _shipped_config()["listen"]
    expected = {
        "traits-agent.socket": ("ListenDatagram", activation.EVENTS, listen["unix"]),
        "traits-agent-udp.socket": ("ListenDatagram", activation.UDP, listen["udp"]),
        "traits-agent-forward.socket": (
            "ListenStream",
            activation.FORWARD_UNIX,
            listen["forward_unix"],
        ),
        "traits-agent-forward-tcp.socket": ("ListenStream", activation.FORWARD, "127.0.0.1:24224"),
    }
    for name, (listen_key, fd_name, address) in expected.items():
        unit = _unit(name)
        assert unit[listen_key] == [address], name
        assert unit["FileDescriptorName"] == [fd_name], name
        assert unit["Service"] == ["traits-agent.service"], name
    assert listen["forward"] == ""  # the TCP socket unit is opt-in, and so is the listener


def test_unix_sockets_are_group_writable_and_outside_the_runtime_directory() -> None:
    """Sockets live where a service stop cannot delete them, writable by group traits-agent."""
    service = _unit("traits-agent.service")
    (runtime,) = service["RuntimeDirectory"]
    runtime_path = "/run/" + runtime
    for name in ("traits-agent.socket", "traits-agent-forward.socket"):
        unit = _unit(name)
        path = (unit.get("ListenDatagram") or unit["ListenStream"])[0]
        assert not path.startswith(runtime_path + "/"), (name, path)
        assert unit["SocketGroup"] == ["traits-agent"] == service["Group"]
        assert unit["SocketMode"] == ["0660"]
    config = _shipped_config()
    assert config["control"]["socket"].startswith(runtime_path + "/")


def test_the_service_is_the_documented_one() -> None:
    """Type=notify with the watchdog, key by credential, queue in StateDirectory=."""
    service = _unit("traits-agent.service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30s"]
    assert service["ExecStart"] == [
        "/usr/bin/traits-agent run --config /etc/traits-agent/agent.toml"
    ]
    assert service["LoadCredential"] == ["api_key:/etc/traits-agent/api_key"]
    (state,) = service["StateDirectory"]
    assert _shipped_config()["queue"]["dir"].startswith(f"/var/lib/{state}/")
    assert "IPAddressDeny" not in service  # upstream is HTTPS to the internet


def test_the_sysctl_drop_in_raises_the_datagram_queue() -> None:
    """max_dgram_qlen >= 512 and rmem_max covering ReceiveBuffer=8M."""
    text = (SYSTEMD_DIR / "60-traits-agent.conf").read_text()
    settings = dict(
        (k.strip(), int(v))
        for k, _, v in (
            line.partition("=")
            for line in text.splitlines()
            if line.strip() and not line.startswith("#")
        )
    )
    assert settings["net.unix.max_dgram_qlen"] >= 512
    assert settings["net.core.rmem_max"] >= 8 * 1024 * 1024
    assert _unit("traits-agent-udp.socket")["ReceiveBuffer"] == ["8M"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_check_script_passes() -> None:
    """systemd/check.sh: verify prints nothing and exposure is at most 1.5."""
    result = subprocess.run(
        ["sh", str(SYSTEMD_DIR / "check.sh")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   verify" in result.stdout and "ok   security" in result.stdout
