"""Crash proof of the delivery side: SIGKILL the agent while it drains a backlog.

Checkpoint v2 is overwritten in place by each commit (one pwrite) and stored durably, with
the delivered segments deleted after it, by the syncer's thread (queue/checkpoint.py). Here a
backlog is built while the API answers 503, then the agent is killed at random moments while
it delivers, and restarted. At the end: every acknowledged event was delivered, duplicates
are at most one batch per kill (a commit reaches the file before the next batch is cut, so
only the batch in flight is sent again), the checkpoint file is v2 and the delivered
segments are gone from disk.
"""

from __future__ import annotations

import random
from collections import Counter

import trio

from tests.e2e.harness import AgentProcess, write_config
from tests.e2e.test_crash import BATCH, GUARD_S, Producer, delivered_ids
from traits_agent.fakeapi import Fault
from traits_agent.queue.checkpoint import CHECKPOINT_NAME, FILE_BYTES

BACKLOG = 30_000


async def test_kill_9_while_a_backlog_drains(workdir, api):
    rng = random.Random(5)
    config = write_config(
        workdir,
        api.url,
        listen={"forward_unix": str(workdir / "forward.sock")},
        queue={"fsync": "interval", "segment_bytes": 64 * 1024},
        batch={"max_items": BATCH, "linger_ms": 20},
        retry={"initial_backoff_ms": 20, "max_backoff_ms": 100},
        log={"format": "json", "level": "info"},
    )
    producer = Producer(str(workdir / "forward.sock"), per_chunk=500)
    api.inject(Fault(status=503, times=None))  # nothing delivered: the backlog builds up
    kills = 0
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            agent = AgentProcess(workdir, config)
            await agent.start()
            nursery.start_soon(producer.run)
            while len(producer.acked) < BACKLOG:  # noqa: ASYNC110
                await trio.sleep(0.02)
            producer.stop = True
        await agent.kill()
        kills += 1
        assert not delivered_ids(api)
        api.clear_faults()
        queued = len(producer.acked)
        mid_drain = []  # delivered so far at each kill
        for _ in range(4):  # kill it mid-drain, again and again
            agent = AgentProcess(workdir, config)
            before = len(api.received["level_ups"])
            await agent.start()
            # once it has delivered something (a batch, maybe more), at a random moment
            await api.wait_until(lambda: len(api.received["level_ups"]) > before)  # noqa: B023
            await trio.sleep(rng.uniform(0.0, 0.03))
            await agent.kill()
            kills += 1
            mid_drain.append(len(delivered_ids(api)))
        final = AgentProcess(workdir, config)
        await final.start()
        await api.wait_until(lambda: producer.acked <= delivered_ids(api))
        while final.status()["resources"]["level_ups"]["queued_items"]:  # noqa: ASYNC110
            await trio.sleep(0.05)
        assert await final.terminate() == 0

    counts = Counter(i["user_id"] for i in api.received["level_ups"])
    lost = {i for i in producer.acked if f"u{i:08d}" not in counts}
    duplicates = sum(c - 1 for c in counts.values())
    assert not lost, f"{len(lost)} acknowledged events lost"
    assert duplicates <= BATCH * kills, (duplicates, kills)
    # the kills did land while it was delivering (else this proves nothing about delivery)
    assert any(0 < n < queued for n in mid_drain), (mid_drain, queued)
    queue_dir = workdir / "queue" / "level_ups"
    data = (queue_dir / CHECKPOINT_NAME).read_bytes()
    assert len(data) == FILE_BYTES and b"tq-checkpoint v2 " in data
    # ~3 MB went through 64 KiB segments: the delivered ones were deleted
    assert len(list(queue_dir.glob("*.seg"))) <= 2
