"""The queue directory deleted while the queue is open (issue 7, item 13): it is made again
(0700) at the next flush or sync, and what memory still holds goes there. Before: records
went on into deleted files or waited in memory, and were lost at close."""

from __future__ import annotations

import shutil
import stat

from queue_helpers import drain, fill, segment_files

from traits_agent.queue import DiskQueue

OPTS = {"segment_bytes": 4096, "max_bytes": 1 << 30}


def test_records_after_the_deletion_are_kept(tmp_path):
    directory = tmp_path / "q"
    with DiskQueue.open(directory, **OPTS) as q:
        fill(q, 100)
        q.sync()
        delivered = drain(q, max_items=40)[:40]  # noqa: F841 - all 100 delivered here
        fill(q, 60)
        q.sync()
        shutil.rmtree(directory)
        after = fill(q, 50)  # flush: finds the directory gone, makes it again
        assert q.dir_recreated == 1
        assert q.dropped_dir_deleted == 60  # synced, undelivered, only in the deleted files
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert drain(q) == after
        more = fill(q, 30)
        q.sync()
    assert segment_files(directory)
    with DiskQueue.open(directory, **OPTS) as q:
        assert q.recovery.checkpoint_fallback is None
        assert drain(q) == more


def test_written_but_unsynced_records_are_rescued_from_memory(tmp_path):
    """Records flushed since the last fsync are still in the retain buffer: written again."""
    directory = tmp_path / "q"
    with DiskQueue.open(directory, **OPTS) as q:
        fill(q, 100)
        q.sync()
        assert len(drain(q)) == 100
        unsynced = fill(q, 20)  # flushed to the (soon deleted) files, not fsynced
        shutil.rmtree(directory)
        q.sync()
        assert q.dir_recreated == 1 and q.dropped_dir_deleted == 0
        after = fill(q, 10)
        assert drain(q) == unsynced + after


def test_deleted_at_close_is_recreated_and_nothing_buffered_is_lost(tmp_path):
    directory = tmp_path / "q"
    q = DiskQueue.open(directory, **OPTS)
    for _ in range(25):
        assert q.append(b"{}")  # buffered, never flushed
    shutil.rmtree(directory)
    q.close()
    with DiskQueue.open(directory, **OPTS) as q:
        assert q.pending_items == 25
