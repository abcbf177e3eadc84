"""Run the real daemon as a subprocess, the way systemd would, for end-to-end tests.

Readiness comes from the daemon itself: the harness binds a Unix datagram socket, passes it as
`$NOTIFY_SOCKET`, and waits for `READY=1` (the sd_notify protocol), so no test sleeps until
the agent is up. Addresses the agent bound (UDP port 0 → a real port) come from `status`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from traits_agent.observe.control import request_status

#: a hang guard, not a speed assertion: generous so a loaded CI machine never trips it
READY_TIMEOUT_S = 60.0


def short_tmpdir() -> Path:
    """A directory with a short path (AF_UNIX paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="ta-", dir="/tmp"))


def write_config(directory: Path, endpoint: str, **sections: dict[str, Any]) -> Path:
    """An agent.toml with every path inside `directory` and the given overrides."""
    base: dict[str, dict[str, Any]] = {
        "api": {"endpoint": endpoint},
        "listen": {
            "unix": str(directory / "events.sock"),
            "udp": "127.0.0.1:0",
            "forward_unix": "",
        },
        "queue": {"dir": str(directory / "queue")},
        "batch": {"linger_ms": 50},
        "retry": {"initial_backoff_ms": 50, "max_backoff_ms": 500},
        "control": {"socket": str(directory / "control.sock")},
        "log": {"format": "json", "level": "debug"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path = directory / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


#: every agent started by a test, so the fixture can kill what a failed test left running
STARTED: list[AgentProcess] = []


def kill_leftovers() -> None:
    """SIGKILL every agent a test started and did not stop (a failed assertion skips the
    test's own terminate): no orphan outlives its test."""
    while STARTED:
        agent = STARTED.pop()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()


async def run_until_exit(config: Path) -> subprocess.CompletedProcess[bytes]:
    """`traits-agent run --config CONFIG` in the foreground, with the shared fake API's key,
    output captured: for an agent that must fail at start-up (one that starts instead runs
    until the test's guard, `trio.fail_after`, gives up on it)."""
    return await trio.run_process(
        [sys.executable, "-m", "traits_agent", "run", "--config", str(config)],
        check=False,
        capture_stdout=True,
        capture_stderr=True,
        env={**os.environ, "TRAITS_API_KEY": "test-key"},
    )


class AgentProcess:
    """One `traits-agent run` subprocess with its own config, sockets and log file."""

    def __init__(
        self,
        directory: Path,
        config: Path,
        *,
        api_key: str = "test-key",
        args: tuple = (),
        prefix: tuple = (),
    ) -> None:
        """`prefix`: a command that execs the agent, e.g. `unshare --net ...`."""
        self.directory = directory
        self.config = config
        self.api_key = api_key
        self.args = args
        self.prefix = prefix
        self.log_path = directory / f"agent-{os.urandom(3).hex()}.log"
        self.proc: trio.Process | None = None
        self._notify: socket.socket | None = None
        self.notifications: list[str] = []

    @property
    def unix_socket(self) -> str:
        return str(self.directory / "events.sock")

    async def start(self) -> None:
        notify_path = self.directory / f"notify-{os.urandom(3).hex()}.sock"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        self._notify.setblocking(False)
        env = dict(os.environ)
        env.update(
            NOTIFY_SOCKET=str(notify_path),
            TRAITS_API_KEY=self.api_key,
            PYTHONUNBUFFERED="1",
        )
        for var in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"):
            env.pop(var, None)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = await trio.lowlevel.open_process(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "traits_agent",
                "run",
                "--config",
                str(self.config),
                *self.args,
            ],
            env=env,
            stdout=self._log_file,
            stderr=self._log_file,
        )
        STARTED.append(self)
        with trio.fail_after(READY_TIMEOUT_S):
            while "READY=1" not in self.notifications:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
                with trio.move_on_after(0.5):
                    await trio.lowlevel.wait_readable(self._notify)
                self._drain_notify()

    def _drain_notify(self) -> None:
        assert self._notify is not None
        while True:
            try:
                data = self._notify.recv(4096)
            except BlockingIOError:
                return
            self.notifications.extend(data.decode().splitlines())

    def status(self) -> dict[str, Any]:
        return request_status(self.directory / "control.sock")

    def udp_address(self) -> tuple[str, int]:
        host, _, port = self.status()["listening"]["udp"].rpartition(":")
        return host, int(port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    async def terminate(self) -> int:
        """SIGTERM and wait for exit; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(READY_TIMEOUT_S):
            code = await self.proc.wait()
        self._cleanup()
        return code

    async def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._notify is not None:
            self._drain_notify()
            self._notify.close()
            self._notify = None
        self._log_file.close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
