"""Errors that say nothing about the data (EMFILE, ENFILE, EACCES, EIO, ...) never skip,
commit past or delete a record: only corruption proven by reading the bytes is skipped."""

from __future__ import annotations

import errno
import os

from fdtable import descriptors_exhausted
from queue_helpers import drain, fill, segment_files, seq_of

from traits_agent.queue import DiskQueue

SMALL = {"segment_bytes": 32 * 1024, "max_bytes": 1 << 30}


def test_emfile_while_delivering_loses_nothing(tmp_path):
    """The reported case: 6,000 events in more than 9 segments, the descriptor table full
    while a lane delivers. Before: 4,534 of 6,000 lost (skipped, committed, deleted)."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 6000)
    assert len(segment_files(tmp_path)) > 9
    delivered: list[int] = []
    with DiskQueue.open(tmp_path, **SMALL) as q:
        batch = q.read_batch(500, 4 << 20)
        delivered += [seq_of(p) for p in batch.payloads]
        q.commit(batch)
        with descriptors_exhausted():
            for _ in range(50):  # the lane keeps cutting batches while it cannot open files
                batch = q.read_batch(500, 4 << 20)
                if batch is None:
                    continue
                delivered += [seq_of(p) for p in batch.payloads]
                q.commit(batch)
            assert q.pending_items == 6000 - len(delivered)
            assert q.read_retries > 0
            assert isinstance(q.read_error, OSError) and q.read_error.errno == errno.EMFILE
        delivered += drain(q)
        assert q.read_error is None
        assert q.read_errors == q.missing_skipped == q.corrupt_skipped == 0
    assert delivered == seqs
    with DiskQueue.open(tmp_path, **SMALL) as q:  # no phantom backlog after a restart
        assert q.pending_items == 0
        assert drain(q) == []


def test_emfile_at_open_keeps_the_segment_and_delivers_it_later(tmp_path):
    """A segment recovery cannot open (EMFILE, EACCES...) is kept, not skipped: delivery
    waits at it and goes on once it opens; its records are counted when it is read."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 3000)
    files = segment_files(tmp_path)
    victim = files[1]
    victim.chmod(0)  # EACCES for a non-root opener; as root, simulate with a failing open
    real_open = os.open
    broken = {str(victim)}

    def failing_open(path, *args, **kw):
        if str(path) in broken:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kw)

    os.open = failing_open
    try:
        with DiskQueue.open(tmp_path, **SMALL) as q:
            assert q.recovery.unreadable_segments
            assert q.pending_items > 0
            first = drain(q)
            assert first and first == seqs[: len(first)]  # stopped at the victim
            assert q.read_retries > 0
            broken.clear()
            victim.chmod(0o600)
            rest = drain(q)
        assert first + rest == seqs
    finally:
        os.open = real_open
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.pending_items == 0
        assert drain(q) == []


def test_eio_mid_segment_is_retried_not_skipped(tmp_path, monkeypatch):
    """pread failing (EIO) inside a segment stops the batch there; nothing is skipped."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 3000)
    real_pread = os.pread
    state = {"calls": 0, "failed": 0}

    def flaky_pread(fd, n, offset):
        state["calls"] += 1
        if state["calls"] % 2 == 0 and state["failed"] < 3:  # the 2nd, 4th and 6th read
            state["failed"] += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pread(fd, n, offset)

    with DiskQueue.open(tmp_path, **SMALL) as q:
        monkeypatch.setattr(os, "pread", flaky_pread)
        got: list[int] = []
        for _ in range(200):
            batch = q.read_batch(100, 1 << 20)
            if batch is None:
                if not q.pending_items:
                    break
                continue
            got += [seq_of(p) for p in batch.payloads]
            q.commit(batch)
        assert got == seqs
        assert q.read_retries == 3
        assert q.read_errors == 0


def test_a_backlog_only_in_unread_segments_still_counts_as_pending(tmp_path, monkeypatch):
    """Every undelivered record is in a segment recovery could not open: pending_items must
    not say 0, or the lane would wait for new events before trying again."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 20)
    (victim,) = segment_files(tmp_path)
    real_open = os.open

    def failing_open(path, *args, **kw):
        if str(path) == str(victim):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", failing_open)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.pending_items >= 1
        assert q.read_batch(100, 1 << 20) is None
        assert q.read_retries == 1 and q.read_error.errno == errno.EMFILE
        monkeypatch.setattr(os, "open", real_open)
        assert drain(q) == seqs
        assert q.pending_items == 0
