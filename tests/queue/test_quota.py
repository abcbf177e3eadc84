"""The shared disk quota: one busy queue may use what the others leave free."""

from __future__ import annotations

from traits_agent.queue import DiskQueue
from traits_agent.queue.quota import SharedQuota

SEG = 64 * 1024


def test_a_busy_queue_gets_what_the_others_leave(tmp_path):
    """Caps follow usage: an idle queue keeps its floor, the busy one gets the rest, and the
    total never passes the quota when appends go through the caps."""
    queues = {
        name: DiskQueue.open(tmp_path / name, segment_bytes=SEG, max_bytes=16 * SEG, fsync="never")
        for name in ("busy", "idle", "small")
    }
    try:
        quota = SharedQuota(queues, max_bytes=16 * SEG, floor=2 * SEG)
        for _ in range(100):
            queues["small"].append(b"x" * 100)
        quota.rebalance()
        small = queues["small"].disk_bytes
        assert queues["busy"].max_bytes == 16 * SEG - small
        payload = b"y" * 1000
        for _ in range(5000):  # ~5 MB into a ~1 MiB quota
            queues["busy"].append(payload)
            quota.rebalance()
        assert quota.used <= 16 * SEG
        assert queues["busy"].dropped_oldest > 0
        assert queues["small"].pending_items == 100  # never evicted by the flood
        assert queues["idle"].max_bytes >= 2 * SEG
    finally:
        for q in queues.values():
            q.close()


def test_delivered_segments_awaiting_deletion_do_not_evict_another_queue(tmp_path):
    """With the agent's deferred deletion (`sync_requested`: the syncer's next round deletes
    delivered segments), one queue's delivered bytes must not count against another's room:
    before, the other queue dropped its own oldest undelivered events for them."""
    queues = {
        name: DiskQueue.open(tmp_path / name, segment_bytes=SEG, max_bytes=16 * SEG, fsync="never")
        for name in ("done", "busy")
    }
    try:
        queues["done"].sync_requested = lambda: None  # the round that deletes never comes
        quota = SharedQuota(queues, max_bytes=16 * SEG, floor=2 * SEG)
        done = queues["done"]
        while done.disk_bytes < 10 * SEG:
            done.append(b"d" * 1000)
        done.flush()
        while (batch := done.read_batch(1000, 1 << 20)) is not None:
            done.commit(batch)
        assert done.pending_items == 0 and done.disk_bytes >= 9 * SEG  # delivered, not deleted
        payload = b"y" * 1000
        for _ in range(8 * SEG // 1000):  # half the quota: room, once the delivered is not held
            assert queues["busy"].append(payload)
            quota.rebalance()
        assert queues["busy"].dropped_oldest == 0
        assert queues["busy"].pending_items == 8 * SEG // 1000
    finally:
        for q in queues.values():
            q.close()
