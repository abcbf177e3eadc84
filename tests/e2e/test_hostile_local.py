"""A hostile local user against the real daemon (a subprocess): descriptor floods with a low
RLIMIT_NOFILE, and the modes of everything it creates under umask 000 (issue 7)."""

from __future__ import annotations

import contextlib
import os
import resource
import socket

import trio

from tests.e2e.harness import AgentProcess
from tests.e2e.test_pipeline import EVENT_TIME, send_blocking, start_agent
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
        await wait_for(lambda: open_fds(pid) == before, "the flood's descriptors closed")
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
    print(f"fds: before {before}, limit {limit}, peak {peak}, after {before}")
