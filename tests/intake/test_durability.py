"""Group commit on virtual time: the interval bounds ack latency, it is not a floor.

Real DiskQueues; the fsyncs run inline instead of in a worker thread (MockClock would jump over
a thread's run time) and take FSYNC_S of virtual time after the round has taken its snapshot,
so "records that arrive during a round" is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from traits_agent.intake.durability import AckGate, Syncer
from traits_agent.observe.metrics import Counters
from traits_agent.queue import DiskQueue
from traits_agent.schema import RESOURCES

INTERVAL_S = 0.1
FSYNC_S = 0.004


async def slow_inline(fn):
    """Run the fsyncs now (they cover what was written so far) and finish FSYNC_S later."""
    result = fn()
    await trio.sleep(FSYNC_S)
    return result


class Rig:
    def __init__(self, directory: Path, policy: str = "interval") -> None:
        self.queues = {n: DiskQueue.open(directory / n, fsync=policy) for n in RESOURCES}
        self.syncer = Syncer(
            self.queues, Counters(), policy=policy, interval_s=INTERVAL_S, run_sync=slow_inline
        )
        self.durability = AckGate(
            self.queues,
            fsync=policy,
            request_sync=self.syncer.dirty,
            request_prompt_sync=self.syncer.prompt,
        )
        self.t0 = trio.current_time()
        #: virtual times (since t0) at which rounds ended
        self.rounds: list[float] = []
        #: virtual times at which each named waiter saw its records durable
        self.acked: dict[str, float] = {}

        def synced() -> None:
            self.rounds.append(round(trio.current_time() - self.t0, 6))
            self.durability.synced()

        self.syncer.on_synced = synced

    def write(self, resource: str = "level_ups") -> tuple:
        """Append one record and flush it to the OS, as Ingest does; its durability mark."""
        queue = self.queues[resource]
        assert queue.append(b'{"user_id":"1","level":1}')
        queue.flush()
        self.durability.written()
        return self.durability.mark([resource])

    async def ack(self, name: str, mark: tuple) -> None:
        await self.durability.wait(mark)
        self.acked[name] = round(trio.current_time() - self.t0, 6)

    def close(self) -> None:
        for q in self.queues.values():
            q.close()


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


async def at(rig: Rig, t: float) -> None:
    assert trio.current_time() <= rig.t0 + t, "the schedule is behind"
    await trio.sleep_until(rig.t0 + t)


async def test_an_ack_waits_for_one_fsync_not_for_the_interval(autojump_clock, nursery, rig):
    """A waiting ack starts a round at once; what arrives during it rides the next round,
    which starts when the first ends; records nobody waits for are fsynced one interval after
    the last round began; and a later waiter again starts a round at once."""
    nursery.start_soon(rig.syncer.run)
    nursery.start_soon(rig.ack, "a", rig.write())
    await at(rig, 0.001)  # round 1 (0 .. 0.004) is running
    nursery.start_soon(rig.ack, "b", rig.write())
    nursery.start_soon(rig.ack, "c", rig.write("logins"))
    await at(rig, 0.003)
    # round 1 took its snapshot before b and c were written: they ride round 2
    assert (rig.queues["level_ups"].durable_seq, rig.queues["logins"].durable_seq) == (1, 0)
    await at(rig, 0.02)
    rig.write()  # a datagram: nobody waits
    await at(rig, 0.3)
    nursery.start_soon(rig.ack, "e", rig.write())
    await at(rig, 0.5)
    # rounds end: a's; b+c's (started the moment a's ended, not an interval later); the
    # datagram's (0.004 + interval after b+c's began); e's (at once)
    assert rig.rounds == [0.004, 0.008, 0.108, 0.304]
    # b and c are durable once round 2 has run: at 0.008, or at 0.004 when their waiters
    # re-check after round 2 took its (inline, instant) snapshot; never an interval later
    assert rig.acked["a"] == 0.004 and rig.acked["e"] == 0.304
    assert rig.acked["b"] in (0.004, 0.008) and rig.acked["c"] in (0.004, 0.008)
    assert rig.queues["level_ups"].durable_seq == 4


async def test_without_waiters_rounds_are_one_interval_apart(autojump_clock, nursery, rig):
    """A steady stream of records nobody waits for costs one round per interval."""
    nursery.start_soon(rig.syncer.run)
    for i in range(50):
        await at(rig, i * 0.01)
        rig.write()
    await at(rig, 1.0)
    assert rig.rounds == [0.004, 0.104, 0.204, 0.304, 0.404, 0.504]
    assert rig.queues["level_ups"].durable_seq == 50


async def test_always_policy_syncs_after_every_burst(autojump_clock, nursery, tmp_path):
    rig = Rig(tmp_path, policy="always")
    try:
        nursery.start_soon(rig.syncer.run)
        rig.write()
        await at(rig, 0.05)
        rig.write()
        await at(rig, 0.2)
        assert rig.rounds == [0.004, 0.054]
    finally:
        rig.close()


class FailingQueue:
    """A queue whose disk refuses every fsync (what the Syncer sees of EIO)."""

    durable_seq = 0
    next_seq = 2

    def sync(self) -> None:
        raise OSError(5, "Input/output error")


async def test_a_failing_disk_is_retried_slowly_even_with_acks_waiting(autojump_clock, nursery):
    """Prompts do not turn a failing fsync into a busy loop: rounds stay >= 1 s apart."""
    queue = FailingQueue()
    counters = Counters()
    syncer = Syncer({"level_ups": queue}, counters, interval_s=INTERVAL_S, run_sync=slow_inline)
    durability = AckGate({"level_ups": queue}, request_prompt_sync=syncer.prompt)
    syncer.on_synced = durability.synced
    nursery.start_soon(syncer.run)
    syncer.dirty()
    nursery.start_soon(durability.wait, durability.mark(["level_ups"]))
    await trio.sleep(3.5)
    await wait_all_tasks_blocked()
    assert syncer.rounds == 4  # at 0, ~1, ~2, ~3 s
    assert counters.get("queue_write_errors", resource="level_ups", errno="5") == 4


def _deliver_two_segments(queue: DiskQueue) -> None:
    """Append past two small segments and commit all of it, as a lane does."""
    for _ in range(400):
        assert queue.append(b'{"user_id":"1","level":1}' * 4)
    queue.flush()
    while (batch := queue.read_batch(1000, 1 << 20)) is not None:
        queue.commit(batch)


@pytest.mark.parametrize("policy", ["interval", "never"])
async def test_delivered_segments_are_deleted_by_a_syncer_round(
    autojump_clock, nursery, tmp_path, policy
):
    """With `sync_requested` wired to `Syncer.settle` (as the agent wires it), a commit that
    completes segments leaves them to the syncer's next round, which deletes them behind a
    durable checkpoint, within one interval; with fsync="never" too (a checkpoint-only
    round: segment data is still never fsynced)."""
    queue = DiskQueue.open(tmp_path / "q", fsync=policy, segment_bytes=4096, max_bytes=1 << 30)
    try:
        syncer = Syncer(
            {"q": queue}, Counters(), policy=policy, interval_s=INTERVAL_S, run_sync=slow_inline
        )
        queue.sync_requested = syncer.settle
        nursery.start_soon(syncer.run)
        await wait_all_tasks_blocked()
        durable = queue.durable_seq
        _deliver_two_segments(queue)
        assert len(list((tmp_path / "q").glob("*.seg"))) > 2  # not deleted by commit
        await trio.sleep(INTERVAL_S + FSYNC_S)
        assert len(list((tmp_path / "q").glob("*.seg"))) == 1
        if policy == "never":
            assert queue.durable_seq == durable
    finally:
        queue.close()
