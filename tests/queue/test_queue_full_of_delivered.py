"""A queue whose quota is taken by segments already delivered, waiting for the syncer to
delete them (`sync_requested` set, as the agent sets it: commits leave the deletion to the
sync thread's next round), must not refuse new records: those bytes are not a backlog."""

from __future__ import annotations

from queue_helpers import segment_files

from traits_agent.queue import DiskQueue

SMALL = {"segment_bytes": 4096, "max_bytes": 64 * 1024}


def test_drop_newest_does_not_drop_for_delivered_segments_awaiting_deletion(tmp_path) -> None:
    asked: list[int] = []
    with DiskQueue.open(tmp_path, on_full="drop_newest", **SMALL) as q:
        q.sync_requested = lambda: asked.append(1)
        while q.append(b"{%d}" % q.next_seq + b"x" * 200):  # up to the quota
            pass
        q.flush()
        dropped = q.dropped_newest
        assert dropped == 1
        while (batch := q.read_batch(50, 1 << 20)) is not None:
            q.commit(batch)
        assert asked and q.pending_items == 0
        assert len(segment_files(tmp_path)) > 2  # not deleted yet: the sync round does it
        assert q.append(b"{after}" + b"x" * 200)  # room: everything on disk was delivered
        assert q.dropped_newest == dropped


def test_the_deletion_is_left_to_the_sync_round_not_done_by_append(tmp_path) -> None:
    """Deleting delivered segments needs a durable checkpoint (an fsync): append, on the
    event loop, only asks for the round; the disk holds them past the quota until it runs."""
    asked: list[int] = []
    with DiskQueue.open(tmp_path, on_full="drop_oldest", **SMALL) as q:
        q.sync_requested = lambda: asked.append(1)
        while q.disk_bytes < SMALL["max_bytes"] - 1024:
            q.append(b"{%d}" % q.next_seq + b"x" * 200)
        q.flush()
        while (batch := q.read_batch(50, 1 << 20)) is not None:
            q.commit(batch)
        files = len(segment_files(tmp_path))
        asked.clear()
        for _ in range(20):  # past the quota, counting the delivered segments
            assert q.append(b"{more}" + b"x" * 200)
        q.flush()
        assert asked  # the round was asked for
        assert len(segment_files(tmp_path)) >= files  # nothing deleted on this thread
        assert q.dropped_oldest == 0 and q.dropped_newest == 0
        assert q.disk_bytes > SMALL["max_bytes"]  # held past the quota until the round
        q.settle()  # the syncer's round
        assert q.disk_bytes <= SMALL["max_bytes"]
        assert q.pending_items == 20
