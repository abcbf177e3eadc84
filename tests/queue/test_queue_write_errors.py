"""Write and fsync failures: raise QueueWriteError, keep the data (bounded), recover later."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from queue_helpers import drain, fail_segment_fsyncs, fill, mount_tmpfs, payload_for

from traits_agent.queue import DiskQueue, QueueWriteError

ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent

# A real kernel write error without privileges: RLIMIT_FSIZE makes writes past the limit fail
# with EFBIG (after a short write up to it), exactly like a disk filling up mid-write.
FSIZE_CHILD = r"""
import errno, resource, signal, sys
from queue_helpers import drain, payload_for, seq_of
from traits_agent.queue import DiskQueue, QueueWriteError

directory = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
opts = dict(segment_bytes=1 << 20, max_bytes=1 << 30, max_buffer_bytes=64 * 1024)
q = DiskQueue.open(directory, **opts)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
seqs = []
for _ in range(300):
    seqs.append(q.next_seq)
    assert q.append(payload_for(seqs[-1]))
try:
    q.flush()
    raise SystemExit("flush should have failed")
except QueueWriteError as e:
    assert e.errno == errno.EFBIG and isinstance(e.__cause__, OSError), e
assert q.write_error is not None
written = q.written_seq
assert 0 < written < seqs[-1], written
# only whole frames are readable; the half-written one is not
batch = q.read_batch(10_000, 1 << 30)
assert [seq_of(p) for p in batch.payloads] == seqs[:written], written
# the disk still refuses: appends are buffered up to the bound, then dropped and counted
for _ in range(3000):
    seq = q.next_seq
    if q.append(payload_for(seq)):
        seqs.append(seq)
assert q.dropped_write_error > 0
assert len(seqs) < 3300
try:
    q.sync()
    raise SystemExit("sync should have failed")
except QueueWriteError:
    pass
assert q.durable_seq < seqs[-1]
# space comes back: the same calls now succeed and nothing buffered was lost
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
q.flush()
assert q.write_error is None
q.sync()
assert q.durable_seq == seqs[-1]
q.close()
with DiskQueue.open(directory, **opts) as q:
    assert q.recovery.torn_bytes_truncated == 0, q.recovery
    assert drain(q) == seqs
print("OK")
"""


def test_write_error_keeps_buffer_and_recovers(tmp_path):
    """EFBIG mid-write: flush/sync raise, buffered data waits (bounded), then goes out."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HELPERS)]))
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(tmp_path / "q")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]


def test_failed_fsync_rewrites_what_it_covered(tmp_path, monkeypatch):
    """After an fsync error (Linux may have dropped those pages) the unsynced records are
    written again to a new segment; durable_seq waits for that; each record is read once.

    Fault injection: only the result of fsync on segment files is faked; files are real.
    """
    failures = fail_segment_fsyncs(monkeypatch)
    opts = {"segment_bytes": 1 << 20, "max_bytes": 1 << 30}
    with DiskQueue.open(tmp_path, **opts) as q:
        fill(q, 100)
        q.sync()
        assert q.durable_seq == 100
        fill(q, 50)
        segments = q.segments
        failures["left"] = 1
        with pytest.raises(QueueWriteError) as info:
            q.sync()
        assert info.value.errno == errno.EIO
        assert q.durable_seq == 100
        fill(q, 10)
        q.sync()
        assert q.durable_seq == 160
        assert q.segments == segments + 1
        assert q.fsync_in_doubt == 0
        assert drain(q, max_items=7) == list(range(1, 161))
    with DiskQueue.open(tmp_path, **opts) as q:
        assert drain(q) == []


def test_failed_fsync_copies_are_skipped_after_reopen(tmp_path, monkeypatch):
    """The old copies left by a rewrite are not delivered twice after a restart either."""
    failures = fail_segment_fsyncs(monkeypatch)
    with DiskQueue.open(tmp_path) as q:
        fill(q, 40)
        failures["left"] = 1
        with pytest.raises(QueueWriteError):
            q.sync()
        q.sync()
        assert q.durable_seq == 40
    with DiskQueue.open(tmp_path) as q:
        assert drain(q) == list(range(1, 41))


def _fill_until_enospc(q: DiskQueue, appended: list[int]) -> None:
    """Append (flushing every 100) until the full filesystem refuses: ENOSPC, and within
    100 000 records. `appended` gets each record's seq, the refused one's included."""
    with pytest.raises(QueueWriteError) as info:
        for _ in range(100_000):
            appended.append(q.next_seq)
            assert q.append(payload_for(appended[-1]))
            if len(appended) % 100 == 0:
                q.flush()
    assert info.value.errno == errno.ENOSPC


def test_real_disk_full_on_tmpfs(tmp_path):
    """ENOSPC on a real (tiny) filesystem: the queue keeps delivering and deleting thanks to
    the reserve, and takes writes again once delivery has freed space. Needs root to mount."""
    mnt = tmp_path / "mnt"
    if not mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and mount(2) to make a tiny tmpfs")
    try:
        opts = {"segment_bytes": 64 * 1024, "max_bytes": 1 << 30}
        with DiskQueue.open(mnt / "q", **opts) as q:
            appended: list[int] = []
            _fill_until_enospc(q, appended)
            delivered = drain(q)  # commits need checkpoint writes on the full disk
            assert delivered == list(range(1, len(delivered) + 1))
            assert q.checkpoint_errors == 0
            q.flush()  # the segments delivered were deleted: room again
            delivered += drain(q)
            assert delivered == appended
            more = fill(q, 5000)  # ~500 KiB: the deleted files' space really is free
            assert drain(q) == more
            q.sync()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("segment_bytes", [8 << 20, 256 << 10])
def test_space_of_delivered_records_comes_back_on_a_disk_smaller_than_a_segment(
    tmp_path, segment_bytes
):
    """Issue 7, item 15: a 1 MiB filesystem, segments larger than it (or a few of them fit).
    Once everything written is delivered, the active segment must give its space back.
    Before: the one segment held the whole disk for good; no new record was ever stored."""
    mnt = tmp_path / "mnt"
    if not mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and mount(2) to make a tiny tmpfs")
    try:
        opts = {"segment_bytes": segment_bytes, "max_bytes": 1 << 30}
        with DiskQueue.open(mnt / "q", **opts) as q:
            appended: list[int] = []
            delivered: list[int] = []
            for _round in range(4):  # fill the disk, drain it: again and again
                _fill_until_enospc(q, appended)
                delivered += drain(q)
                q.flush()  # the delivered records' space is free again: the buffer goes out
                delivered += drain(q)
                assert delivered == appended
            assert q.dropped_write_error == 0
            q.sync()
        usage = shutil.disk_usage(mnt)
        assert usage.used < usage.total // 2, usage
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_crash_between_emptying_delivered_segments_and_the_checkpoint(tmp_path):
    """On a full disk delivered segments are truncated before the checkpoint that lets them
    be deleted is stored. A crash in between leaves the old checkpoint pointing into emptied
    files: recovery must resume after them and lose no undelivered record."""
    opts = {"segment_bytes": 4096, "max_bytes": 1 << 30}
    with DiskQueue.open(tmp_path, **opts) as q:
        seqs = fill(q, 600)
        q.sync()
    files = sorted(tmp_path.glob("*.seg"))
    assert len(files) > 6
    with DiskQueue.open(tmp_path, **opts) as q:
        batch = q.read_batch(40, 1 << 20)  # commit inside the first segment: checkpoint there
        q.commit(batch)
        q.sync()
        delivered = [int(p[1:].split(b":")[0]) for p in batch.payloads]
        # deliver up to the end of the fourth segment, then "crash" after emptying them
        more = q.read_batch(1 << 20, 1 << 20)
    stale = (tmp_path / "checkpoint").read_bytes()
    cut = [int(p[1:].split(b":")[0]) for p in more.payloads]
    last_in_fourth = max(s for s in cut if s <= _last_seq_of(files[3]))
    delivered += [s for s in cut if s <= last_in_fourth]
    for f in files[:4]:
        os.truncate(f, 0)
    (tmp_path / "checkpoint").write_bytes(stale)
    with DiskQueue.open(tmp_path, **opts) as q:
        rest = drain(q)
    assert rest == [s for s in seqs if s not in delivered]
    assert delivered + rest == seqs


def _last_seq_of(path: Path) -> int:
    data = path.read_bytes()
    pos, last = 0, 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        seq = int.from_bytes(data[pos + 8 : pos + 16], "little")
        last = seq or last
        pos += 24 + length
    return last


@pytest.mark.parametrize("checkpoint_file", ["to_create", "in_place"])
def test_full_disk_without_reserve_empties_delivered_segments_for_the_checkpoint(
    tmp_path, checkpoint_file
):
    """The reserve is gone (the writer's retries ate the space it freed) and the disk is
    100 % full: the checkpoint that lets the delivered segment go cannot be written. The
    delivered segment is emptied first, then the checkpoint fits. Before: it stayed full.

    A v2 checkpoint is overwritten in place and needs no room ("in_place": the segment goes
    without emptying); one that must be written as a new file does ("to_create": the file
    was deleted, as when a v1 file is upgraded or a damaged one replaced)."""
    mnt = tmp_path / "mnt"
    if not mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and mount(2) to make a tiny tmpfs")
    try:
        opts = {"segment_bytes": 8 << 20, "max_bytes": 1 << 30}
        with DiskQueue.open(mnt / "q", **opts) as q:
            appended: list[int] = []
            with pytest.raises(QueueWriteError):
                for _ in range(100_000):
                    appended.append(q.next_seq)
                    assert q.append(payload_for(appended[-1]))
                    if len(appended) % 100 == 0:
                        q.flush()
            (mnt / "q" / "reserve").unlink(missing_ok=True)
            fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:  # every byte the reserve held, taken
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            if checkpoint_file == "to_create":
                (mnt / "q" / "checkpoint").unlink()
            delivered = drain(q)
            if checkpoint_file == "to_create":
                assert q.emptied_for_space >= 1
            else:
                assert q.emptied_for_space == 0 and q.segments <= 1  # the delivered one went
            q.flush()  # room again: the records held in memory go out
            delivered += drain(q)
            assert delivered == appended
            q.sync()
        with DiskQueue.open(mnt / "q", **opts) as q:
            assert q.recovery.checkpoint_fallback is None
            assert q.pending_items == 0 and drain(q) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_rotation_rewrites_only_undelivered_frames_of_a_write_cut_short(tmp_path):
    """One big write cut short by a full disk: its written frames are delivered, the rest
    waits in memory. Rotating the drained segment must rewrite only the frames not yet
    delivered; before, the whole write went again (copies of delivered records included)
    and filled the disk again for good."""
    mnt = tmp_path / "mnt"
    if not mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and mount(2) to make a tiny tmpfs")
    try:
        opts = {"segment_bytes": 8 << 20, "max_bytes": 1 << 30}
        with DiskQueue.open(mnt / "q", **opts) as q:
            appended = []
            while q.disk_bytes < 1536 << 10:  # ~1.5 MiB in one write: 2/3 of it fits
                appended.append(q.next_seq)
                assert q.append(payload_for(appended[-1]))
            with pytest.raises(QueueWriteError):
                q.flush()
            delivered = drain(q)
            assert 0 < len(delivered) < len(appended)
            q.flush()  # the rest (~0.5 MiB) fits once the delivered part is gone
            delivered += drain(q)
            assert delivered == appended
            q.sync()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
