"""Recovery: torn tails, corrupted records, missing files, bad checkpoints, bounded memory."""

from __future__ import annotations

import os
import random
import shutil
import tracemalloc

import pytest
from queue_helpers import (
    drain,
    fill,
    flip_byte,
    payload_for,
    record_offsets,
    segment_files,
    seq_of,
    stored_checkpoint,
)

from traits_agent.queue import DiskQueue

SMALL = {"segment_bytes": 2048, "max_bytes": 1 << 30}


def make_queue(path, n, **kw):
    with DiskQueue.open(path, **(SMALL | kw)) as q:
        return fill(q, n)


def test_torn_last_record_at_every_offset(tmp_path):
    """Cut anywhere inside the last record: earlier records survive, the torn one goes,
    and appends after reopening are readable after another reopen."""
    pristine = tmp_path / "pristine"
    seqs = make_queue(pristine, 30, segment_bytes=1 << 20)
    seg = segment_files(pristine)[-1]
    start, size = record_offsets(seg)[-1]
    for cut in range(start, start + size):
        case = tmp_path / f"cut{cut}"
        shutil.copytree(pristine, case)
        with open(case / seg.name, "r+b") as f:
            f.truncate(cut)
        with DiskQueue.open(case) as q:
            assert q.recovery.torn_bytes_truncated == cut - start
            assert q.recovery.corrupt_records_skipped == 0
            assert q.pending_items >= 29
            got = [seq_of(p) for p in q.read_batch(100, 1 << 20).payloads]
            assert got == seqs[:-1]
            more = fill(q, 3)
            assert more[0] > seqs[-1]
        with DiskQueue.open(case) as q:
            assert not q.recovery.torn_bytes_truncated
            assert drain(q) == seqs[:-1] + more


def test_torn_tail_in_a_multi_segment_queue(tmp_path):
    """Only the newest segment's tail is cut; older segments are untouched."""
    seqs = make_queue(tmp_path, 100)
    last = segment_files(tmp_path)[-1]
    start, size = record_offsets(last)[-1]
    with open(last, "r+b") as f:
        f.truncate(start + size // 2)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.torn_bytes_truncated == size // 2
        assert drain(q) == seqs[:-1]


# byte offsets inside a frame: magic, length (low and high byte), seq, header crc, crc, payload
FIELDS = {"magic": 1, "length": 4, "length_high": 7, "seq": 9, "header_crc": 17, "crc": 21}


@pytest.mark.parametrize("where", ["older_segment", "newest_segment"])
@pytest.mark.parametrize("field", [*FIELDS, "payload"])
def test_corrupt_middle_record_is_skipped_and_counted(tmp_path, field, where):
    """A damaged record in the middle is skipped and counted; every other one is delivered."""
    seqs = make_queue(tmp_path, 60)
    files = segment_files(tmp_path)
    seg = files[1] if where == "older_segment" else files[-1]
    offsets = record_offsets(seg)
    assert len(offsets) >= 3
    start, size = offsets[1]
    victim = seq_of(seg.read_bytes()[start + 24 : start + size])
    offset = start + (FIELDS[field] if field != "payload" else 24 + (size - 24) // 2)
    flip_byte(seg, offset, 0x80 if field == "length_high" else 0x01)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.torn_bytes_truncated == 0
        if where == "newest_segment":
            assert q.recovery.corrupt_records_skipped == 1
        assert drain(q) == [s for s in seqs if s != victim]
        assert q.corrupt_skipped == 1
        assert drain(q) == []
        assert q.corrupt_skipped == 1  # counted once, not per read


def test_huge_length_cannot_swallow_following_records(tmp_path):
    """A length field set to the maximum is caught by the header CRC; nothing after is lost."""
    seqs = make_queue(tmp_path, 20, segment_bytes=1 << 20)
    seg = segment_files(tmp_path)[0]
    start, _ = record_offsets(seg)[5]
    with open(seg, "r+b") as f:
        f.seek(start + 4)
        f.write((2**20).to_bytes(4, "little"))
    with DiskQueue.open(tmp_path) as q:
        assert q.recovery.corrupt_records_skipped == 1
        assert drain(q) == seqs[:5] + seqs[6:]


@pytest.mark.parametrize("seed", range(25))
def test_random_byte_flips_never_break_delivery(tmp_path, seed):
    """Random damage across a multi-segment queue: open never fails, reads terminate, and
    every payload delivered is one that was written, in order, at most once."""
    rng = random.Random(seed)
    seqs = make_queue(tmp_path, 800, segment_bytes=4096)
    files = segment_files(tmp_path)
    last_frames = record_offsets(files[-1])
    flips = rng.randint(1, 40)
    for _ in range(flips):
        f = rng.choice(files)
        flip_byte(f, rng.randrange(f.stat().st_size), rng.randint(1, 255))
    cut_records = 0
    if rng.random() < 0.3:  # sometimes a torn tail too
        cut = rng.randrange(files[-1].stat().st_size)
        with open(files[-1], "r+b") as fh:
            fh.truncate(cut)
        cut_records = sum(1 for start, size in last_frames if start + size > cut)
    with DiskQueue.open(tmp_path, segment_bytes=4096, max_bytes=1 << 30) as q:
        got = drain(q, max_items=rng.randint(1, 100), max_bytes=rng.randint(1, 5000))
        assert got == sorted(set(got))
        assert set(got) <= set(seqs)
        assert len(seqs) - len(got) <= flips + cut_records  # a flip costs one record at most
        fill(q, 5)
        assert len(drain(q)) == 5


def test_missing_middle_segment_is_skipped_and_reported(tmp_path):
    """A segment file gone from the middle: reported, and everything else is delivered."""
    seqs = make_queue(tmp_path, 200)
    files = segment_files(tmp_path)
    gone = files[3]
    gone_seqs = {seq_of(gone.read_bytes()[o + 24 : o + n]) for o, n in record_offsets(gone)}
    gone.unlink()
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.missing_segments == [int(gone.stem)]
        assert q.recovery.has_findings
        assert drain(q) == [s for s in seqs if s not in gone_seqs]


def test_missing_checkpoint_falls_back_to_oldest_segment(tmp_path):
    """No checkpoint: re-deliver from the oldest segment left (duplicates, never loss)."""
    seqs = make_queue(tmp_path, 200)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        q.commit(q.read_batch(90, 1 << 20))
        oldest = int(segment_files(tmp_path)[0].stem)
    (tmp_path / "checkpoint").unlink()
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback == "missing"
        got = drain(q)
        assert got[-110:] == seqs[90:]  # every undelivered record
        assert got[0] <= 91 and got == sorted(set(got))
    with DiskQueue.open(tmp_path, **SMALL) as q:  # and the fallback is not repeated
        assert q.recovery.checkpoint_fallback is None
        assert drain(q) == []
    assert oldest >= 0


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00" * 80, b"hello", b"tq-checkpoint v1 segment=1 offset=2 next_seq=3 crc=00000000\n"],
)
def test_garbage_checkpoint_falls_back(tmp_path, garbage):
    """An unreadable checkpoint is reported and ignored; the queue still delivers it all."""
    seqs = make_queue(tmp_path, 50)
    (tmp_path / "checkpoint").write_bytes(garbage)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback == "corrupt"
        assert drain(q) == seqs


def test_checkpoint_with_flipped_bit_falls_back(tmp_path):
    """The checkpoint CRC catches a single changed digit."""
    seqs = make_queue(tmp_path, 50)
    text = (tmp_path / "checkpoint").read_bytes()
    (tmp_path / "checkpoint").write_bytes(text.replace(b"offset=0", b"offset=8"))
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback == "corrupt"
        assert drain(q) == seqs


def _write_checkpoint(path, segment, offset, next_seq, lease):
    from traits_agent.queue.checkpoint import Checkpoint
    from traits_agent.queue.segments import Position

    (path / "checkpoint").write_bytes(
        Checkpoint(Position(segment, offset, next_seq), lease).encode()
    )


def test_checkpoint_pointing_at_missing_segment_moves_to_next(tmp_path):
    """The checkpoint's segment is gone: resume at the next existing segment."""
    seqs = make_queue(tmp_path, 200)
    files = segment_files(tmp_path)
    first_of_3 = seq_of(files[3].read_bytes()[24 : record_offsets(files[3])[0][1]])
    for f in files[:3]:
        f.unlink()
    _write_checkpoint(tmp_path, int(files[2].stem), 100, 10, 1000)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert "missing" in q.recovery.checkpoint_adjusted
        assert drain(q) == [s for s in seqs if s >= first_of_3]
        assert q.next_seq > seqs[-1]


def test_checkpoint_inside_a_record_resyncs_to_next_seq(tmp_path):
    """A checkpoint offset that is not a record boundary (file rewritten by a power cut):
    resume at the first record with seq >= next_seq in that segment."""
    seqs = make_queue(tmp_path, 50, segment_bytes=1 << 20)
    offsets = record_offsets(segment_files(tmp_path)[0])
    _write_checkpoint(tmp_path, 0, offsets[10][0] + 5, 11, 100)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_adjusted
        assert drain(q) == seqs[10:]


def test_checkpoint_past_end_of_shortened_segment(tmp_path):
    """A checkpoint beyond the end of its (shortened) segment resumes at its end; new seqs
    start above the checkpoint's, so a seq is never reused."""
    make_queue(tmp_path, 10, segment_bytes=1 << 20)
    _write_checkpoint(tmp_path, 0, 1 << 19, 5000, 6000)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_adjusted
        assert drain(q) == []
        assert fill(q, 2) == [6000, 6001]
        assert drain(q) == [6000, 6001]


def test_leftover_delivered_segments_are_deleted_at_open(tmp_path):
    """A crash between checkpoint and unlink leaves delivered segments: removed at open."""
    make_queue(tmp_path, 400)
    files = segment_files(tmp_path)
    _write_checkpoint(tmp_path, int(files[4].stem), 0, 1, 1000)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.delivered_segments_deleted == 4
        assert segment_files(tmp_path) == files[4:]


def _crash(q: DiskQueue) -> None:
    """Abandon an open queue as a killed process would (its flushed data stays in the files)."""
    q._writer.close()
    q._reader.close()
    os.close(q._dir_fd)
    os.close(q._lock_fd)


def test_unclean_restarts_jump_seqs_but_keep_counts_exact(tmp_path):
    """Without a clean close the next run starts at the lease, so a seq is never reused; the
    jump does not show up as phantom pending records."""
    expected = []
    for _ in range(3):
        q = DiskQueue.open(tmp_path, **SMALL)
        assert q.pending_items == len(expected) == q.recovery.records_queued
        expected += fill(q, 40)
        _crash(q)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.pending_items == 120
        assert expected[40] > expected[39] + 1_000_000
        assert q.oldest_pending_seq == 1
        b = q.read_batch(50, 1 << 20)
        q.commit(b)
        assert q.pending_items == 70 and q.committed_total == 50
        assert drain(q) == expected[50:]
        assert q.pending_items == 0


def test_older_segments_end_with_a_seal(tmp_path):
    """A segment that is complete ends with a seq-0 seal frame: count, first and last seq."""
    make_queue(tmp_path, 300)
    for seg in segment_files(tmp_path)[:-1]:
        data = seg.read_bytes()
        frame = data[-56:]
        assert frame[:4] == b"\xf5tq\x01" and int.from_bytes(frame[8:16], "little") == 0
        assert frame[24:32] == b"tq-seal\x00"
        count = int.from_bytes(frame[32:40], "little")
        first, last = (int.from_bytes(frame[i : i + 8], "little") for i in (40, 48))
        seqs = [seq_of(data[o + 24 : o + n]) for o, n in record_offsets(seg)]
        assert (count, first, last) == (len(seqs), seqs[0], seqs[-1])


def test_segment_without_seal_is_scanned(tmp_path):
    """A crash mid-rotation leaves an older segment without its seal: counted by a scan."""
    seqs = make_queue(tmp_path, 300)
    victim = segment_files(tmp_path)[2]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 56)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert not q.recovery.has_findings
        assert q.pending_items == 300
        assert drain(q) == seqs


def test_unreadable_segment_is_reported_and_skipped(tmp_path):
    """A segment that cannot be read at all (here: a directory in its place) is left alone,
    reported, and everything else is delivered."""
    seqs = make_queue(tmp_path, 300)
    victim = segment_files(tmp_path)[2]
    lost = {seq_of(victim.read_bytes()[o + 24 : o + n]) for o, n in record_offsets(victim)}
    victim.unlink()
    victim.mkdir()
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.unreadable_segments and q.recovery.has_findings
        assert drain(q) == [s for s in seqs if s not in lost]
    assert victim.is_dir()


def test_read_error_skips_the_rest_of_a_segment(tmp_path):
    """A segment that fails to read while open is skipped and counted; delivery goes on."""
    seqs = make_queue(tmp_path, 300)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        victim = segment_files(tmp_path)[2]
        lost = {seq_of(victim.read_bytes()[o + 24 : o + n]) for o, n in record_offsets(victim)}
        victim.unlink()
        victim.mkdir()  # os.open works, pread fails with EISDIR
        assert drain(q) == [s for s in seqs if s not in lost]
        assert q.read_errors == 1
        victim.rmdir()


def test_recovery_memory_does_not_grow_with_backlog(tmp_path):
    """Opening a 200k-record backlog reads the newest segment and one header per older one."""
    n = 200_000
    payload = b"x" * 200
    with DiskQueue.open(tmp_path) as q:
        for _ in range(n):
            q.append(payload)
        q.flush()
        backlog = q.disk_bytes
    assert backlog > 40 << 20
    tracemalloc.start()
    try:
        with DiskQueue.open(tmp_path) as q:
            _, peak = tracemalloc.get_traced_memory()
            assert q.pending_items == n
            assert q.recovery.records_queued == n
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"recovery peak {peak} bytes for a {backlog}-byte backlog"


def test_payload_for_is_self_checking():
    assert seq_of(payload_for(12345)) == 12345


def test_seq_lease_is_raised_durably_before_seqs_pass_it(tmp_path, monkeypatch):
    """The stored lease stays ahead of every seq written, so a crash never reuses one."""
    from traits_agent.queue import disk_queue

    monkeypatch.setattr(disk_queue, "SEQ_LEASE", 64)
    q = DiskQueue.open(tmp_path, **SMALL)
    for _ in range(10):
        fill(q, 25)
        lease = stored_checkpoint(tmp_path).seq_lease
        assert lease > q.written_seq
    _crash(q)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.next_seq >= lease
        assert q.pending_items == 250
        assert drain(q) == list(range(1, 251))


def test_fsync_never_still_syncs_at_close(tmp_path):
    """fsync="never" never needs sync(); close makes everything durable and it all comes back."""
    with DiskQueue.open(tmp_path, fsync="never", **SMALL) as q:
        seqs = fill(q, 500)
        assert q.durable_seq == 0
    with DiskQueue.open(tmp_path, fsync="never", **SMALL) as q:
        assert drain(q) == seqs
