"""The operator's view of the agent process: log order, failed starts, the heartbeat."""

from __future__ import annotations

import json
import socket

import trio

from tests.e2e.harness import AgentProcess, run_until_exit, write_config
from traits_agent.client import Client

GUARD_S = 60


async def test_restart_logs_agent_started_before_the_backlogs_first_delivery(workdir, api):
    """A backlog left by a run that could not deliver leaves at once after a restart, and
    the log says `agent_started` before its first `batch_delivered` (issue 10 item 8)."""
    down = AgentProcess(workdir, write_config(workdir, "http://127.0.0.1:9"))
    await down.start()
    Client(unix=down.unix_socket).level_up(user_id="1", level=2)
    with trio.fail_after(GUARD_S):
        while down.status()["received"]["accepted"] < 1:  # noqa: ASYNC110
            await trio.sleep(0.02)
    assert await down.terminate() == 0
    up = AgentProcess(workdir, write_config(workdir, api.url))
    await up.start()
    with trio.fail_after(GUARD_S):
        await api.wait_for_items(1)
        while "batch_delivered" not in up.log_text():  # noqa: ASYNC110
            await trio.sleep(0.02)
    assert await up.terminate() == 0
    events = [e["event"] for e in up.log_events()]
    assert events.index("agent_started") < events.index("batch_delivered")
    assert events.index("agent_started") < events.index("agent_ready")


async def test_a_failed_start_leaves_no_socket_and_logs_agent_failed(workdir, api):
    """The UDP port is taken after the Unix socket was bound: exit 1, the socket file is
    removed, and the log says `agent_failed` with no `agent_stopped` (issue 10 item 4)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        config = write_config(
            workdir,
            api.url,
            listen={"udp": f"127.0.0.1:{port}", "forward_unix": str(workdir / "forward.sock")},
        )
        proc = await run_until_exit(config)
    assert proc.returncode == 1
    events = [json.loads(line)["event"] for line in proc.stdout.decode().splitlines()]
    assert "agent_failed" in events and "agent_stopped" not in events
    assert sorted(p.name for p in workdir.iterdir() if p.suffix == ".sock") == []
