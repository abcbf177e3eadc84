"""Write and fsync failures: raise QueueWriteError, keep the data (bounded), recover later."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from queue_helpers import drain, fill, payload_for

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
    real_fdatasync = os.fdatasync  # segments are synced with fdatasync (appends only)
    failures = {"left": 0}

    def flaky_fdatasync(fd: int) -> None:
        if failures["left"] and stat.S_ISREG(os.fstat(fd).st_mode):
            failures["left"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", flaky_fdatasync)
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
    real_fdatasync = os.fdatasync  # segments are synced with fdatasync (appends only)
    failures = {"left": 0}

    def flaky_fdatasync(fd: int) -> None:
        if failures["left"] and stat.S_ISREG(os.fstat(fd).st_mode):
            failures["left"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", flaky_fdatasync)
    with DiskQueue.open(tmp_path) as q:
        fill(q, 40)
        failures["left"] = 1
        with pytest.raises(QueueWriteError):
            q.sync()
        q.sync()
        assert q.durable_seq == 40
    with DiskQueue.open(tmp_path) as q:
        assert drain(q) == list(range(1, 41))


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


def test_real_disk_full_on_tmpfs(tmp_path):
    """ENOSPC on a real (tiny) filesystem: the queue keeps delivering and deleting thanks to
    the reserve, and takes writes again once delivery has freed space. Needs root to mount."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and mount(2) to make a tiny tmpfs")
    try:
        opts = {"segment_bytes": 64 * 1024, "max_bytes": 1 << 30}
        with DiskQueue.open(mnt / "q", **opts) as q:
            appended = []
            with pytest.raises(QueueWriteError) as info:
                for _ in range(100_000):
                    appended.append(q.next_seq)
                    assert q.append(payload_for(appended[-1]))
                    if len(appended) % 100 == 0:
                        q.flush()
            assert info.value.errno == errno.ENOSPC
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
