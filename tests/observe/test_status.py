"""The one status model (observe/status.py) on a real Agent: the JSON snapshot keeps its keys,
STATUS= includes the CSV spool, and the real stall check `Agent.is_progressing`."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from traits_agent.agent import STALL_AFTER_S, Agent
from traits_agent.config import from_mapping
from traits_agent.delivery.backoff import Backoff
from traits_agent.delivery.deadletter import DeadLetters
from traits_agent.delivery.lane import Lane
from traits_agent.delivery.spool import CsvSpool, spool_file
from traits_agent.delivery.uploader import Uploader
from traits_agent.queue import DiskQueue
from traits_agent.schema import RESOURCES

#: the keys of `status --json` (interface.md; the operator's `top` reads them): additions only
TOP_KEYS = {
    "version",
    "pid",
    "uptime_s",
    "endpoint",
    "listening",
    "upstream",
    "last_error",
    "last_error_at",
    "received",
    "rejected",
    "protocol_errors",  # messages that were not usable Forward entries (issue 11)
    "forward_process",  # the Forward intake process (listen.forward_process), or null
    "stripped_fields",
    "resources",
    "csv",
}
RESOURCE_KEYS = {
    "queued_items",
    "queued_bytes",
    "in_flight",
    "accepted",
    "delivered",
    "dead_lettered",
    "dropped",
    "oldest_age_s",
    "unsynced_items",
    "corrupt_skipped",
    "upstream",
    "last_error",
    "next_retry_in_s",
    # issue 7 items 2 and 13: a queue that cannot store, reads retried instead of skipped
    "queue_error",
    "read_retries",
}
CSV_KEYS = {
    "dir",
    "state",
    "last_error",
    "pending_files",
    "pending_bytes",
    "rejected_files",
    "kinds",
}
CSV_KIND_KEYS = {
    "pending_files",
    "pending_bytes",
    "rejected_files",
    "uploaded_files",
    "uploading",
    "state",
    "last_error",
    "next_retry_in_s",
}
LINGER_S = 1.0


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ta-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
async def agent(directory: Path) -> Agent:
    """A real Agent, wired but not running: queues, lanes, uploader and CSV spool."""
    config = from_mapping({"queue": {"dir": str(directory / "queue"), "fsync": "never"}})
    agent = Agent(config=config, api_key="test-key")
    client = httpx.AsyncClient(base_url="http://127.0.0.1:9")
    backoff = Backoff(rng=random.Random(1))
    agent.uploader = Uploader(
        client,
        api_key="test-key",
        counters=agent.counters,
        dead_letters=DeadLetters(directory / "dl"),
        backoff=backoff,
    )
    agent.csv_spool = CsvSpool(
        directory / "spool", client, api_key="test-key", counters=agent.counters, backoff=backoff
    )
    for name in ("actions", "logins"):
        queue = DiskQueue.open(directory / "queue" / name, fsync="never")
        agent.queues[name] = queue
        agent.lanes[name] = Lane(
            RESOURCES[name],
            queue,
            agent.uploader.deliver,
            max_items=10,
            max_bytes=1 << 20,
            linger_s=LINGER_S,
        )
    return agent


def add_items(agent: Agent, n: int) -> None:
    for i in range(n):
        agent.queues["actions"].append(b'{"user_id":"%d"}' % i)
    agent.queues["actions"].flush()
    agent.lanes["actions"].notify()


async def test_the_snapshot_keeps_its_keys(agent: Agent, directory: Path) -> None:
    """`status --json` has exactly the keys it had before the model (none lost, none leaked
    from the model's internal fields)."""
    add_items(agent, 2)
    snapshot = agent.snapshot()
    assert set(snapshot) == TOP_KEYS
    assert set(snapshot["received"]) == {"datagrams", "events", "accepted"}
    assert set(snapshot["resources"]) == {"actions", "logins"}
    assert set(snapshot["resources"]["actions"]) == RESOURCE_KEYS
    assert snapshot["resources"]["actions"]["queued_items"] == 2
    assert set(snapshot["csv"]) == CSV_KEYS
    assert set(snapshot["csv"]["kinds"]["kpis"]) == CSV_KIND_KEYS
    assert snapshot["upstream"] == "ok"


async def test_systemd_status_line_includes_the_csv_spool(agent: Agent, directory: Path) -> None:
    """STATUS= names the CSV backlog and a CSV upstream problem (it used to leave them out)."""
    (directory / "k.csv").write_bytes(b"a,b\n1,2\n")
    spool_file(directory / "spool", "kpis", directory / "k.csv")
    add_items(agent, 3)
    assert agent.describe() == "upstream ok, 3 queued, 0 delivered; csv 1 pending, 0 rejected"
    agent.csv_spool.states["kpis"].state = "auth_failed"
    line = agent.describe()
    assert line.startswith("upstream auth_failed, 3 queued")
    assert line.endswith("csv 1 pending, 0 rejected (auth_failed)")


async def test_is_progressing_is_false_only_for_a_wedged_lane(
    autojump_clock: trio.MockClock, agent: Agent
) -> None:
    """A backlog with a healthy upstream, nothing in flight, waiting past the stall bound
    plus linger: not progressing. In flight, retrying upstream or a young backlog: fine."""
    assert agent.is_progressing()  # nothing queued
    add_items(agent, 3)
    lane = agent.lanes["actions"]
    await trio.sleep(STALL_AFTER_S + LINGER_S - 1)
    assert agent.is_progressing()  # young backlog
    await trio.sleep(2)
    assert not agent.is_progressing()  # wedged
    assert not agent.status().progressing

    lane.in_flight = 3
    assert agent.is_progressing()  # a request is on the wire
    lane.in_flight = 0

    assert agent.uploader is not None
    agent.uploader.state("actions").state = "retrying"
    assert agent.is_progressing()  # waiting on upstream is known, not a hang
