"""The game-server clients against the real agent: bursts at both kernel queue lengths, and
an agent that stops in the middle of a burst.

`net.unix.max_dgram_qlen` is per network namespace and read when a socket is created, so the
agent runs inside `unshare --net` with the sysctl set there: the host's value is untouched.
Where unshare is not permitted (not root, no user namespaces), those tests skip.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from tests.e2e.harness import AgentProcess, write_config
from traits_agent.client import Client

GUARD_S = 60
BURST = 20_000
QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")


def netns_prefix(qlen: int) -> tuple[str, ...]:
    """A command prefix that runs the agent in a new network namespace with `qlen`."""
    return (
        "unshare",
        "--net",
        "sh",
        "-c",
        f'echo {qlen} > {QLEN} && exec "$@"',
        "sh",
    )


def netns_works() -> bool:
    if shutil.which("unshare") is None or not QLEN.exists():
        return False
    probe = subprocess.run(
        [*netns_prefix(10), "cat", str(QLEN)], capture_output=True, text=True, timeout=30
    )
    return probe.returncode == 0 and probe.stdout.strip() == "10"


needs_netns = pytest.mark.skipif(
    not netns_works(), reason="unshare --net with a writable sysctl is not permitted here"
)


async def start_agent(workdir: Path, qlen: int | None = None) -> AgentProcess:
    """The agent, its upstream unreachable (the queue keeps everything), no UDP listener (a
    fresh namespace has no loopback address until someone brings `lo` up)."""
    config = write_config(workdir, "http://127.0.0.1:9", listen={"udp": ""})
    prefix = netns_prefix(qlen) if qlen is not None else ()
    agent = AgentProcess(workdir, config, prefix=prefix)
    await agent.start()
    return agent


async def received_events(agent: AgentProcess, at_least: int) -> int:
    """The agent's count of received events once it reaches `at_least` (hang guard)."""
    with trio.fail_after(GUARD_S):
        while True:
            received = agent.status()["received"]
            if received["events"] >= at_least:
                return received["events"]
            await trio.sleep(0.05)


@needs_netns
@pytest.mark.parametrize(
    ("qlen", "max_datagram"),
    [(10, None), (512, None), (10, 2048)],
    ids=["qlen10", "qlen512", "qlen10-small-datagrams"],
)
async def test_burst_is_delivered_whole(workdir: Path, qlen: int, max_datagram: int | None) -> None:
    """20,000 emits in a tight loop with the defaults: every event reaches the agent. With
    2 KiB datagrams (~250 of them) a 10-datagram queue overflows, so the held path is what
    delivers them."""
    agent = await start_agent(workdir, qlen)
    client = Client(agent.unix_socket, max_datagram=max_datagram)
    for i in range(BURST):
        client.level_up(str(i), i % 100 + 1)
    client.close(timeout=GUARD_S)
    assert (client.sent, client.dropped) == (BURST, 0)
    assert await received_events(agent, BURST) == BURST
    status = agent.status()
    assert status["received"]["accepted"] == BURST
    assert status["resources"]["level_ups"]["queued_items"] == BURST
    await agent.terminate()


async def test_agent_stops_mid_burst(workdir: Path) -> None:
    """The agent dies (SIGKILL) while a thread is emitting: the client never raises, every
    emit returns, and once closed sent + dropped is exactly what was emitted."""
    agent = await start_agent(workdir)
    client = Client(agent.unix_socket)
    agent_gone = threading.Event()
    emitted = 0
    errors: list[BaseException] = []

    def burst() -> None:
        """A 20,000-event burst, then game ticks of 100 events every 5 ms until 5,000 more
        were emitted after the agent was gone."""
        nonlocal emitted
        try:
            after = 0
            while after < 5_000:
                for _ in range(BURST if emitted == 0 else 100):
                    client.level_up(str(emitted), 1)
                    emitted += 1
                    if agent_gone.is_set():
                        after += 1
                time.sleep(0.005)
        except BaseException as e:  # pragma: no cover - the failure this test looks for
            errors.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, burst)
        await received_events(agent, 1)
        await agent.kill()
        agent_gone.set()
    client.close()
    assert errors == []
    assert client.sent + client.dropped == emitted
    assert client.dropped_by_reason.get("agent_down", 0) > 0
    assert set(client.dropped_by_reason) <= {"agent_down", "queue_full"}
