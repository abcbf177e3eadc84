"""Several-records frames (what `append_many` writes): torn, corrupted, cut by batches inside,
rewritten after a failed fsync, mixed with one-record frames of older segments.

The rule each test holds the queue to: damage costs the frame it hits (at most
MANY_MAX_RECORDS records) and nothing else; a batch boundary inside a frame, a restart there,
or a rewrite of part of it never duplicates, skips or reorders a record.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from queue_helpers import (
    drain,
    fail_segment_fsyncs,
    flip_byte,
    mount_tmpfs,
    payload_for,
    record_offsets,
    segment_files,
    seq_of,
)

from traits_agent.queue import DiskQueue, QueueWriteError
from traits_agent.queue.framing import (
    MAGIC,
    MAGIC_MANY,
    MANY_HEADER_SIZE,
    MANY_MAX_RECORDS,
    FrameReader,
    encode_frames,
    record_crcs,
    trim_frames,
)

BIG = {"segment_bytes": 1 << 20, "max_bytes": 1 << 30}


def fill_many(q: DiskQueue, n: int, run: int = 300) -> list[int]:
    """Append n seq-stamped records in runs of `run` with append_many; flush; their seqs."""
    seqs: list[int] = []
    while len(seqs) < n:
        first = q.next_seq
        k = min(run, n - len(seqs))
        assert q.append_many([payload_for(s) for s in range(first, first + k)]) == k
        seqs += range(first, first + k)
    q.flush()
    return seqs


def frames_of(path: Path) -> list[tuple[int, int, list[int]]]:
    """(offset, size, payload seqs) of each frame of records in an undamaged segment."""
    data = path.read_bytes()
    out = []
    for start, size in record_offsets(path):
        if data[start : start + 4] == MAGIC_MANY:  # records, then a CRC32 per record
            count = int.from_bytes(data[start + 16 : start + 20], "little")
            records = data[start + MANY_HEADER_SIZE : start + size - 4 * count].split(b"\n")
        else:
            records = [data[start + 24 : start + size]]
        out.append((start, size, [seq_of(r) for r in records]))
    return out


def test_a_run_is_written_as_several_records_frames(tmp_path) -> None:
    with DiskQueue.open(tmp_path, **BIG) as q:
        fill_many(q, 300)
    frames = frames_of(segment_files(tmp_path)[0])
    assert [len(s) for _, _, s in frames] == [128, 128, 44]
    assert [s for _, _, f in frames for s in f] == list(range(1, 301))
    data = segment_files(tmp_path)[0].read_bytes()
    assert all(data[o : o + 4] == MAGIC_MANY for o, _, _ in frames)


def test_a_record_with_a_newline_byte_is_framed_on_its_own(tmp_path) -> None:
    payloads = [b'{"a":1}', b"line one\nline two", b'{"b":2}', b"\n", b""]
    with DiskQueue.open(tmp_path, **BIG) as q:
        assert q.append_many(payloads) == 5
        q.flush()
        assert q.read_batch(100, 1 << 20).payloads == payloads
    with DiskQueue.open(tmp_path, **BIG) as q:
        batch = q.read_batch(100, 1 << 20)
        assert batch.payloads == payloads and batch.seqs == [1, 2, 3, 4, 5]
    data = segment_files(tmp_path)[0].read_bytes()
    assert data[:4] == MAGIC  # that run went out as one-record frames


@pytest.mark.parametrize("seed", range(4))
def test_crcs_computed_elsewhere_write_the_same_bytes(tmp_path, seed) -> None:
    """`append_many` with `record_crcs` passed in (the Forward intake process computes them)
    and `lines` writes byte for byte what it writes computing them itself, across segment
    ends, the quota and records of every size, and they read back."""
    rng = random.Random(seed)
    runs, seq = [], 1
    for _ in range(30):
        n = rng.randint(1, 700)
        runs.append([payload_for(s) * rng.choice([1, 1, 20, 200]) for s in range(seq, seq + n)])
        seq += n
    small = {"segment_bytes": 64 * 1024, "max_bytes": 1 << 30}
    for name, given in (("own", False), ("given", True)):
        with DiskQueue.open(tmp_path / name, **small) as q:
            for run in runs:
                # given: as the Forward path appends, the payloads split off a joined run
                # (`lines`: newlines are not looked for)
                if given:
                    taken = q.append_many(run, record_crcs(run), lines=True)
                else:
                    taken = q.append_many(run)
                assert taken == len(run)
            q.flush()
    own, given_files = segment_files(tmp_path / "own"), segment_files(tmp_path / "given")
    assert [f.name for f in own] == [f.name for f in given_files] and len(own) > 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(own, given_files, strict=True))
    with DiskQueue.open(tmp_path / "given", **small) as q:
        got = []
        while (batch := q.read_batch(500, 1 << 20)) is not None:
            got += batch.payloads
            q.commit(batch)
        assert got == [p for run in runs for p in run]


def test_a_crc_valid_frame_whose_newlines_disagree_with_its_count_is_damage(tmp_path) -> None:
    """A several-records frame whose CRCs check but whose payload splits into more or fewer
    records than its header counts was never written by us: the read path (which learns
    the count from its split) treats it as damage, as it does a frame whose CRC fails: it
    keeps the records whose own CRC matches (salvage), counts the frame, and never hands
    out a record the header does not name (the extra line)."""
    before, after = [b'{"n":1}', b'{"n":2}'], [b'{"n":6}', b'{"n":7}']
    with DiskQueue.open(tmp_path, **BIG) as q:
        assert q.append_many(before) == 2
        q.flush()
    path = segment_files(tmp_path)[0]
    out: list[bytes] = []
    # seqs 3..5 as three records, but the payload holds four lines (one CRC per record)
    forged = [b'{"n":3}', b'{"n":4}', b'{"n":5}\n{"x":0}']
    encode_frames(3, forged, out, crcs=record_crcs(forged), lines=True)
    with path.open("ab") as f:
        f.write(b"".join(out))
    with DiskQueue.open(tmp_path, **BIG) as q:
        assert q.append_many(after) == 2
        q.flush()
        got, seqs = [], []
        while (batch := q.read_batch(100, 1 << 20)) is not None:
            got += batch.payloads
            seqs += batch.seqs
            q.commit(batch)
        assert got == [*before, b'{"n":3}', b'{"n":4}', *after]
        assert seqs == [1, 2, 3, 4, 6, 7]
        assert q.corrupt_skipped == 1


@pytest.mark.parametrize("seed", range(6))
def test_batches_cut_inside_frames_resume_exactly_across_restarts(tmp_path, seed) -> None:
    """Batch limits (items and bytes) that fall inside frames, commits there, and restarts
    with the checkpoint inside a frame: every record once, in order, counts exact."""
    rng = random.Random(seed)
    with DiskQueue.open(tmp_path, segment_bytes=16384, max_bytes=1 << 30) as q:
        seqs = fill_many(q, 2000, run=rng.choice([7, 100, 300, 1000]))
    got: list[int] = []
    while len(got) < len(seqs):
        with DiskQueue.open(tmp_path, segment_bytes=16384, max_bytes=1 << 30) as q:
            assert q.recovery.checkpoint_adjusted is None
            assert q.pending_items == len(seqs) - len(got)
            for _ in range(rng.randint(1, 8)):
                batch = q.read_batch(rng.randint(1, 300), rng.randint(1, 20000))
                if batch is None:
                    break
                assert batch.seqs == [seq_of(p) for p in batch.payloads]
                assert all(p == payload_for(seq_of(p)) for p in batch.payloads)
                got += batch.seqs
                q.commit(batch)
                assert q.pending_items == len(seqs) - len(got)
    assert got == seqs


def test_a_batch_returned_again_until_committed_is_the_same(tmp_path) -> None:
    with DiskQueue.open(tmp_path, **BIG) as q:
        fill_many(q, 300)
        first = q.read_batch(50, 1 << 20)
        assert first.seqs == list(range(1, 51))
        assert q.read_batch(50, 1 << 20).seqs == first.seqs  # not committed: again
        q.commit(first)
        assert q.read_batch(100, 1 << 20).seqs == list(range(51, 151))


def test_a_frame_bigger_than_max_bytes_gives_one_record_at_least(tmp_path) -> None:
    with DiskQueue.open(tmp_path, **BIG) as q:
        fill_many(q, 10)
        assert drain(q, max_bytes=1) == list(range(1, 11))


def test_torn_last_frame_at_every_offset(tmp_path) -> None:
    """Cut anywhere inside the last frame: its records go (never acknowledged: not synced),
    every earlier one is kept, and the queue goes on."""
    pristine = tmp_path / "pristine"
    with DiskQueue.open(pristine, **BIG) as q:
        seqs = fill_many(q, 300)
    seg = segment_files(pristine)[-1]
    start, size, lost = frames_of(seg)[-1]
    for cut in range(start, start + size, 7):
        case = tmp_path / f"cut{cut}"
        shutil.copytree(pristine, case)
        with open(case / seg.name, "r+b") as f:
            f.truncate(cut)
        with DiskQueue.open(case, **BIG) as q:
            assert q.recovery.torn_bytes_truncated == cut - start
            assert q.recovery.corrupt_records_skipped == 0
            assert q.pending_items == len(seqs) - len(lost)
            more = fill_many(q, 5)
            assert drain(q, max_items=77) == seqs[: -len(lost)] + more


# byte offsets inside a several-records frame, and the records its damage costs there:
# a header that does not check costs the frame; a damaged payload costs the damaged records
# only (salvaged by their own CRCs); the frame's CRC itself, none
FIELDS = {"magic": 3, "length": 5, "seq": 9, "count": 16, "header_crc": 21, "crc": 25}
WHOLE_FRAME = {"magic", "length", "seq", "count", "header_crc"}


@pytest.mark.parametrize("where", ["older_segment", "newest_segment"])
@pytest.mark.parametrize("field", [*FIELDS, "record", "newline", "record_crc"])
def test_a_damaged_frame_costs_the_damaged_records(tmp_path, field, where) -> None:
    with DiskQueue.open(tmp_path, segment_bytes=32768, max_bytes=1 << 30) as q:
        seqs = fill_many(q, 1200)
        while len(frames_of(segment_files(tmp_path)[-1])) < 3:  # the newest needs 3 too
            seqs += fill_many(q, 128)
    files = segment_files(tmp_path)
    seg = files[0] if where == "older_segment" else files[-1]
    assert len(files) >= 2
    frames = frames_of(seg)
    assert len(frames) >= 3
    start, size, in_frame = frames[1]
    data = seg.read_bytes()
    newlines = [i for i in range(start + MANY_HEADER_SIZE, start + size) if data[i] == 10]
    if field in FIELDS:
        offset = start + FIELDS[field]
        lost = set(in_frame) if field in WHOLE_FRAME else set()
    elif field == "record":  # a byte inside the 11th record
        offset = newlines[9] + 3
        lost = {in_frame[10]}
    elif field == "newline":  # two records run together: both fail their CRCs
        offset = newlines[9]
        lost = {in_frame[9], in_frame[10]}
    else:  # the 11th entry of the CRC table
        offset = start + size - 4 * len(in_frame) + 4 * 10
        lost = {in_frame[10]}
    flip_byte(seg, offset, 0x01)
    with DiskQueue.open(tmp_path, segment_bytes=32768, max_bytes=1 << 30) as q:
        assert q.recovery.torn_bytes_truncated == 0
        if where == "newest_segment":
            assert q.recovery.corrupt_records_skipped == 1
        assert drain(q, max_items=100) == [s for s in seqs if s not in lost]
        assert q.corrupt_skipped == 1
        assert drain(q) == []
        assert q.corrupt_skipped == 1  # counted once, not per read


def test_a_salvaged_frame_cut_by_batch_limits_gives_each_record_once(tmp_path) -> None:
    with DiskQueue.open(tmp_path, **BIG) as q:
        seqs = fill_many(q, 300)
    seg = segment_files(tmp_path)[0]
    start, _, in_frame = frames_of(seg)[1]
    data = seg.read_bytes()
    flip_byte(seg, data.index(b"\n", start + MANY_HEADER_SIZE + 2000) + 3, 0x01)
    with DiskQueue.open(tmp_path, **BIG) as q:
        got = drain(q, max_items=7, max_bytes=900)
        lost = set(seqs) - set(got)
        assert len(lost) == 1 and lost <= set(in_frame)
        assert q.corrupt_skipped == 1


@pytest.mark.parametrize("seed", range(20))
def test_random_byte_flips_cost_at_most_a_frame_each(tmp_path, seed) -> None:
    """Random damage across segments of both kinds of frame: open never fails, reads end,
    every record delivered was written, in order, at most once; a flip costs one frame."""
    rng = random.Random(seed)
    opts = {"segment_bytes": 8192, "max_bytes": 1 << 30}
    with DiskQueue.open(tmp_path, **opts) as q:
        seqs: list[int] = []
        for _ in range(20):  # old-style one-record frames between runs
            seqs += fill_many(q, rng.randint(1, 200), run=rng.randint(1, 150))
            seqs.append(q.next_seq)
            assert q.append(payload_for(seqs[-1]))
        q.flush()
    files = segment_files(tmp_path)
    flips = rng.randint(1, 30)
    for _ in range(flips):
        f = rng.choice(files)
        flip_byte(f, rng.randrange(f.stat().st_size), rng.randint(1, 255))
    with DiskQueue.open(tmp_path, **opts) as q:
        got = drain(q, max_items=rng.randint(1, 300), max_bytes=rng.randint(1, 20000))
        assert got == sorted(set(got))
        assert set(got) <= set(seqs)
        assert len(seqs) - len(got) <= flips * MANY_MAX_RECORDS  # a header hit: its frame
        assert drain(q, max_items=1) == []
        more = fill_many(q, 50)
        assert drain(q) == more


def test_one_record_frames_of_an_older_version_are_read_with_new_ones(tmp_path) -> None:
    """A queue directory written record by record (the only format before several-records
    frames) upgrades in place: its records are delivered, then the new ones."""
    with DiskQueue.open(tmp_path, segment_bytes=4096, max_bytes=1 << 30) as q:
        old = [q.next_seq + i for i in range(100)]
        for s in old:
            assert q.append(payload_for(s))
        q.flush()
    assert all(
        segment_files(tmp_path)[0].read_bytes()[o : o + 4] == MAGIC
        for o, _ in record_offsets(segment_files(tmp_path)[0])
    )
    with DiskQueue.open(tmp_path, segment_bytes=4096, max_bytes=1 << 30) as q:
        assert q.pending_items == 100
        new = fill_many(q, 500)
        assert drain(q, max_items=33) == old + new


def test_trim_frames_reframes_a_straddling_frame() -> None:
    out: list[bytes] = []
    encode_frames(1, [payload_for(s) for s in range(1, 301)], out)
    data = b"".join(out)
    for keep_from in (1, 2, 128, 129, 200, 300):
        trimmed, first = trim_frames(data, keep_from)
        assert first == keep_from
        got = _records_in(trimmed)
        assert got == list(range(keep_from, 301))
    assert trim_frames(data, 301) == (b"", 0)


def _records_in(data: bytes) -> list[int]:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trim-{os.getpid()}"
    path.write_bytes(data)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            reader, pos, got = FrameReader(fd, len(data)), 0, []
            while pos < len(data):
                frame = reader.frame(pos)
                assert frame is not None
                got += [seq_of(r) for r in frame.records()]
                assert [seq_of(r) for r in frame.records()] == list(
                    range(frame.seq, frame.last_seq + 1)
                )
                pos += frame.size
            return got
        finally:
            os.close(fd)
    finally:
        path.unlink()


def test_failed_fsync_rewrites_from_inside_a_frame(tmp_path, monkeypatch) -> None:
    """Records delivered from part of a frame, then an fsync fails: the rewrite starts at the
    first undelivered record (the frame is framed again without the delivered ones), and
    every record is delivered once, before and after a restart."""
    failures = fail_segment_fsyncs(monkeypatch)
    with DiskQueue.open(tmp_path, **BIG) as q:
        seqs = fill_many(q, 300)
        delivered = drain_some(q, 150)  # the checkpoint inside the second frame
        failures["left"] = 1
        with pytest.raises(QueueWriteError):
            q.sync()
        q.sync()
        assert q.durable_seq == 300
        assert q.fsync_in_doubt == 0
        assert drain(q, max_items=40) == seqs[150:]
        assert delivered == seqs[:150]
        assert q.pending_items == 0
    with DiskQueue.open(tmp_path, **BIG) as q:
        assert drain(q) == []


def drain_some(q: DiskQueue, n: int) -> list[int]:
    batch = q.read_batch(n, 1 << 20)
    q.commit(batch)
    return batch.seqs


def test_a_write_cut_short_by_a_full_disk_inside_frames(tmp_path) -> None:
    """One big write of several-records frames cut short by a full disk: the whole frames
    written are readable, the rest waits in memory and follows once there is room."""
    mnt = tmp_path / "mnt"
    if not mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and mount(2) to make a tiny tmpfs")
    try:
        opts = {"segment_bytes": 8 << 20, "max_bytes": 1 << 30}
        with DiskQueue.open(mnt / "q", **opts) as q:
            appended: list[int] = []
            while q.disk_bytes < 1536 << 10:  # ~1.5 MiB in one write: 2/3 of it fits
                first = q.next_seq
                assert q.append_many([payload_for(s) for s in range(first, first + 200)]) == 200
                appended += range(first, first + 200)
            with pytest.raises(QueueWriteError):
                q.flush()
            delivered = drain(q)
            assert 0 < len(delivered) < len(appended)
            q.flush()
            delivered += drain(q)
            assert delivered == appended
            q.sync()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
