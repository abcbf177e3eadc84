"""The disk quota: drop_newest refuses, drop_oldest deletes whole oldest segments."""

from __future__ import annotations

from queue_helpers import drain, fill, payload_for, segment_files

from traits_agent.queue import DiskQueue

SEG = 4096
MAX = 4 * SEG


def test_drop_newest_refuses_and_counts(tmp_path):
    """Over the quota, appends return False and are counted; delivery makes room again."""
    with DiskQueue.open(tmp_path, segment_bytes=SEG, max_bytes=MAX, on_full="drop_newest") as q:
        accepted = 0
        for _ in range(1000):
            if q.append(b"x" * 100):
                accepted += 1
            else:
                assert q.disk_bytes + 124 > MAX
        q.flush()
        assert q.dropped_newest == 1000 - accepted > 0
        assert q.disk_bytes <= MAX
        assert sum(f.stat().st_size for f in segment_files(tmp_path)) <= MAX
        assert q.pending_items == accepted
        delivered = 0
        while batch := q.read_batch(100, 1 << 20):
            delivered += len(batch)
            q.commit(batch)
        assert delivered == accepted
        assert q.append(b"after")
        assert q.dropped_newest == 1000 - accepted


def test_drop_oldest_deletes_whole_segments_and_counts(tmp_path):
    """Over the quota, the oldest whole segments go; the newest records are all kept."""
    with DiskQueue.open(tmp_path, segment_bytes=SEG, max_bytes=MAX, on_full="drop_oldest") as q:
        seqs = []
        for _ in range(2000):
            seqs.append(q.next_seq)
            assert q.append(payload_for(seqs[-1]))
            q.flush()
        assert q.disk_bytes <= MAX
        assert sum(f.stat().st_size for f in segment_files(tmp_path)) <= MAX
        assert q.dropped_newest == 0
        got = drain(q)
        assert got == seqs[-len(got) :]  # a contiguous run ending at the newest
        assert q.dropped_oldest + len(got) == len(seqs)


def test_drop_oldest_is_durable_across_reopen(tmp_path):
    """The checkpoint moved past dropped segments before they were deleted: a reopen agrees."""
    with DiskQueue.open(tmp_path, segment_bytes=SEG, max_bytes=MAX) as q:
        fill(q, 2000)
        pending = q.pending_items
        first = q.oldest_pending_seq
    with DiskQueue.open(tmp_path, segment_bytes=SEG, max_bytes=MAX) as q:
        assert not q.recovery.has_findings, q.recovery
        assert q.pending_items == pending
        assert drain(q)[0] == first


def test_in_flight_batch_over_a_dropped_segment(tmp_path):
    """drop_oldest under a batch in flight: committing it later moves nothing but the count
    (delivered, not dropped), and reading continues from the oldest record kept."""
    with DiskQueue.open(tmp_path, segment_bytes=SEG, max_bytes=MAX) as q:
        fill(q, 50)
        batch = q.read_batch(10, 1 << 20)
        assert batch.first_seq == 1
        fill(q, 2000)
        assert q.dropped_oldest > 0
        first_kept = q.oldest_pending_seq
        dropped = q.dropped_oldest
        q.commit(batch)
        assert q.oldest_pending_seq == first_kept
        # the batch was delivered after all: its 10 records leave the dropped count
        assert q.dropped_oldest == dropped - 10
        nxt = q.read_batch(10, 1 << 20)
        assert nxt.first_seq == first_kept
        delivered = 10 + len(drain(q))
        assert delivered + q.dropped_oldest == 2050  # each record delivered or dropped, once


def test_drop_oldest_counts_only_undelivered(tmp_path):
    """Records already delivered are not counted as dropped."""
    with DiskQueue.open(tmp_path, segment_bytes=SEG, max_bytes=MAX) as q:
        fill(q, 100)
        drain(q)
        fill(q, 2000)
        kept = len(drain(q))
        assert q.dropped_oldest + kept == 2000
