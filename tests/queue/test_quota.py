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
