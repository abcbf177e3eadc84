"""DiskQueue basics: order, batches, commit, rotation, deletion, restarts, API edges."""

from __future__ import annotations

import os
import zlib

import pytest
from queue_helpers import drain, fill, payload_for, segment_files

from traits_agent.queue import (
    MAX_PAYLOAD,
    DiskQueue,
    QueueClosedError,
    QueueLockedError,
)


def test_round_trip_in_fifo_order(tmp_path):
    """Records come back byte for byte, in the order appended, with seqs from 1."""
    with DiskQueue.open(tmp_path) as q:
        seqs = fill(q, 1000)
        assert seqs == list(range(1, 1001))
        assert drain(q) == seqs
        assert q.pending_items == 0
        assert q.read_batch(10, 1000) is None


def test_empty_and_binary_payloads(tmp_path):
    """Payloads are opaque: empty, binary and magic-containing payloads round-trip."""
    payloads = [b"", bytes(range(256)), b"\xf5tq\x01" * 50, b"x" * MAX_PAYLOAD]
    with DiskQueue.open(tmp_path) as q:
        for p in payloads:
            assert q.append(p)
        q.flush()
        batch = q.read_batch(10, 10 * MAX_PAYLOAD)
        assert batch.payloads == payloads


def test_oversized_payload_raises(tmp_path):
    """A payload over MAX_PAYLOAD is the caller's error: ValueError, nothing appended."""
    with DiskQueue.open(tmp_path) as q:
        with pytest.raises(ValueError, match="limit"):
            q.append(b"x" * (MAX_PAYLOAD + 1))
        assert q.appended_total == 0 and q.next_seq == 1


def test_unflushed_records_are_not_read(tmp_path):
    """Reads see what was flushed to the OS, not the in-memory buffer."""
    with DiskQueue.open(tmp_path) as q:
        q.append(b"a")
        assert q.read_batch(10, 100) is None
        q.flush()
        assert q.read_batch(10, 100).payloads == [b"a"]


def test_read_batch_limits(tmp_path):
    """max_items and max_bytes bound a batch, but a batch always has at least one record."""
    with DiskQueue.open(tmp_path) as q:
        for n in (10, 20, 30, 40, 500):
            q.append(b"x" * n)
        q.flush()
        assert len(q.read_batch(2, 10_000)) == 2
        b = q.read_batch(10, 60)
        assert [len(p) for p in b.payloads] == [10, 20, 30] and b.nbytes == 60
        assert len(q.read_batch(10, 59)) == 2
        assert len(q.read_batch(10, 1)) == 1  # over the byte limit alone: still returned
        q.commit(q.read_batch(4, 10_000))
        b = q.read_batch(10, 1)
        assert [len(p) for p in b.payloads] == [500]


def test_same_batch_until_commit(tmp_path):
    """Re-reading returns the same records until they are committed; then the next ones."""
    with DiskQueue.open(tmp_path) as q:
        fill(q, 10)
        a = q.read_batch(4, 10_000)
        b = q.read_batch(4, 10_000)
        assert a.payloads == b.payloads and (a.first_seq, a.last_seq) == (1, 4)
        q.commit(a)
        c = q.read_batch(4, 10_000)
        assert (c.first_seq, c.last_seq) == (5, 8)
        q.commit(a)  # stale: a no-op
        assert q.read_batch(4, 10_000).first_seq == 5


def test_short_batch_grows_with_new_records(tmp_path):
    """A batch that was not full picks up records flushed since, without losing its start."""
    with DiskQueue.open(tmp_path) as q:
        fill(q, 3)
        assert len(q.read_batch(10, 10_000)) == 3
        fill(q, 4)
        b = q.read_batch(10, 10_000)
        assert (b.first_seq, b.last_seq, len(b)) == (1, 7, 7)
        q.commit(b)
        assert q.pending_items == 0


def test_commit_and_reopen_resume_after_committed(tmp_path):
    """After a commit and a restart, delivery resumes right after the committed record."""
    with DiskQueue.open(tmp_path, segment_bytes=2048, max_bytes=1 << 20) as q:
        fill(q, 200)
        b = q.read_batch(77, 1 << 20)
        q.commit(b)
    with DiskQueue.open(tmp_path, segment_bytes=2048, max_bytes=1 << 20) as q:
        assert not q.recovery.has_findings, q.recovery
        assert q.pending_items == 123
        assert drain(q) == list(range(78, 201))


def test_seqs_monotonic_across_restarts(tmp_path):
    """Seqs continue across clean restarts and never repeat."""
    seen = []
    for _ in range(5):
        with DiskQueue.open(tmp_path) as q:
            seen += fill(q, 7)
            drain(q)
    assert seen == list(range(1, 36))


def test_rotation_and_deletion_after_commit(tmp_path):
    """Segments rotate at segment_bytes; committed segments' files are really deleted."""
    with DiskQueue.open(tmp_path, segment_bytes=1024, max_bytes=1 << 20) as q:
        fill(q, 200)
        files = segment_files(tmp_path)
        assert len(files) == q.segments > 10
        assert all(f.stat().st_size <= 1024 for f in files)
        b = q.read_batch(100, 1 << 20)
        q.commit(b)
        left = segment_files(tmp_path)
        assert files[0] not in left
        assert len(left) == q.segments < len(files)
        assert left[0].name == f"{b.end.segment:020d}.seg"
        drain(q)
        assert len(segment_files(tmp_path)) == 1  # the newest is kept to append to


def test_checkpoint_is_written_before_segments_go(tmp_path):
    """Once segments are deleted the durable checkpoint is already past them."""
    with DiskQueue.open(tmp_path, segment_bytes=1024, max_bytes=1 << 20) as q:
        fill(q, 100)
        b = q.read_batch(60, 1 << 20)
        q.commit(b)
        text = (tmp_path / "checkpoint").read_text()
        assert f"segment={b.end.segment} offset={b.end.offset} next_seq={b.last_seq + 1}" in text


def test_temp_checkpoint_left_behind_is_ignored(tmp_path):
    """A checkpoint.tmp from a crash mid-write is ignored and removed at open."""
    with DiskQueue.open(tmp_path) as q:
        fill(q, 10)
        q.commit(q.read_batch(4, 1 << 20))
    (tmp_path / "checkpoint.tmp").write_bytes(b"tq-checkpoint v1 segment=9 offset=9 junk")
    with DiskQueue.open(tmp_path) as q:
        assert q.recovery.stale_temp_removed
        assert not q.recovery.has_findings
        assert drain(q) == list(range(5, 11))
    assert not (tmp_path / "checkpoint.tmp").exists()


def test_second_opener_is_refused(tmp_path):
    """Two queues on one directory would corrupt it: the second open fails clearly."""
    with DiskQueue.open(tmp_path), pytest.raises(QueueLockedError, match="already open"):
        DiskQueue.open(tmp_path)
    DiskQueue.open(tmp_path).close()  # the lock is released by close


def test_closed_queue_refuses_use_but_close_and_sync_are_idempotent(tmp_path):
    """After close, writes and reads raise; close and sync are harmless no-ops."""
    q = DiskQueue.open(tmp_path)
    fill(q, 3)
    q.close()
    q.close()
    q.sync()
    for call in (lambda: q.append(b"x"), q.flush, lambda: q.read_batch(1, 1)):
        with pytest.raises(QueueClosedError):
            call()
    assert q.pending_items == 3


def test_bad_arguments(tmp_path):
    """Configuration mistakes are ValueErrors naming the argument."""
    with pytest.raises(ValueError, match="fsync"):
        DiskQueue.open(tmp_path, fsync="sometimes")
    with pytest.raises(ValueError, match="on_full"):
        DiskQueue.open(tmp_path, on_full="block")
    with pytest.raises(ValueError, match="max_bytes"):
        DiskQueue.open(tmp_path, segment_bytes=1 << 20, max_bytes=1 << 20)
    with DiskQueue.open(tmp_path) as q, pytest.raises(ValueError):
        q.read_batch(0, 100)


def test_stats(tmp_path):
    """Counters and gauges follow appends, reads and commits."""
    with DiskQueue.open(tmp_path, fsync="always") as q:
        assert q.fsync_policy == "always"
        assert (q.pending_items, q.pending_bytes, q.oldest_pending_seq) == (0, 0, None)
        fill(q, 10)
        assert q.appended_total == 10 and q.pending_items == 10
        assert q.pending_bytes == sum(24 + len(payload_for(s)) for s in range(1, 11))
        assert q.written_seq == 10 and q.durable_seq == 0
        q.sync()
        assert q.durable_seq == 10
        q.commit(q.read_batch(4, 1 << 20))
        assert q.committed_total == 4 and q.pending_items == 6 and q.oldest_pending_seq == 5
        assert q.pending_bytes == sum(24 + len(payload_for(s)) for s in range(5, 11))


def test_directory_is_created(tmp_path):
    """open creates missing parent directories."""
    path = tmp_path / "a" / "b"
    with DiskQueue.open(path) as q:
        fill(q, 1)
    assert os.path.isdir(path) and segment_files(path)


def test_commit_accepts_a_position(tmp_path):
    """commit takes a Batch or its end Position."""
    with DiskQueue.open(tmp_path) as q:
        fill(q, 10)
        q.commit(q.read_batch(3, 1 << 20).end)
        assert q.read_batch(1, 1).first_seq == 4
        assert q.committed_total == 3


def test_on_disk_frame_format(tmp_path):
    """The bytes on disk are exactly the documented frame (pins the format)."""
    with DiskQueue.open(tmp_path) as q:
        q.append(b'{"a":1}')
    data = segment_files(tmp_path)[0].read_bytes()
    assert data[:4] == b"\xf5tq\x01"
    assert int.from_bytes(data[4:8], "little") == 7
    assert int.from_bytes(data[8:16], "little") == 1
    header_crc = zlib.crc32(data[:16])
    assert int.from_bytes(data[16:20], "little") == header_crc
    assert int.from_bytes(data[20:24], "little") == zlib.crc32(data[:16] + b'{"a":1}')
    assert data[24:] == b'{"a":1}'


def test_checkpoint_just_before_a_seal_is_not_a_finding(tmp_path):
    """Delivered up to the end of the active segment, which is sealed later: a clean reopen
    resumes there without any recovery finding."""
    opts = {"segment_bytes": 1024, "max_bytes": 1 << 20}
    with DiskQueue.open(tmp_path, **opts) as q:
        for _ in range(7):  # 7 frames of 124 bytes: the 8th (plus a seal) no longer fits
            q.append(b"x" * 100)
        q.flush()
        q.commit(q.read_batch(100, 1 << 20))
        assert q.delivered.offset == 7 * 124
        q.append(b"y" * 100)  # rotation: the seal lands exactly where the checkpoint points
        q.flush()
        assert q.segments == 2
    with DiskQueue.open(tmp_path, **opts) as q:
        assert not q.recovery.has_findings, q.recovery
        assert q.read_batch(100, 1 << 20).payloads == [b"y" * 100]


def test_a_sync_with_nothing_new_does_not_flush_the_disk_again(tmp_path, monkeypatch):
    """Each fdatasync is a disk cache flush even for a clean file, and the group commit syncs
    every queue per round: a queue with nothing new since its last sync must cost nothing
    (or per-event Forward acks slow down with every resource that ever received an event)."""
    calls: list[int] = []
    real_fdatasync = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    with DiskQueue.open(tmp_path, fsync="interval") as q:
        fill(q, 3)
        q.sync()
        assert len(calls) == 1 and q.durable_seq == 3
        q.sync()
        q.sync()
        assert len(calls) == 1  # clean: not synced again
        fill(q, 2)
        q.sync()
        assert len(calls) == 2 and q.durable_seq == 5
