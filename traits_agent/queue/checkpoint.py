"""The checkpoint: the delivered position and the seq lease, replaced atomically.

File `checkpoint`, one line of text (so `cat` shows it)::

    tq-checkpoint v1 segment=12 offset=4096 next_seq=93021 seq_lease=16870237 crc=1a2b3c4d

`crc` is crc32 of everything before " crc=". Anything else (missing, short, bad crc) is treated
as no checkpoint: the queue re-delivers from its oldest segment, which is safe.

Writes go to `checkpoint.tmp`, then rename over `checkpoint`; a durable write fsyncs the temp
file before the rename and the directory after it. A leftover temp file is ignored (and removed
at open). `seq_lease` bounds the seqs the running queue may have handed out (see the package
docstring).

Disk-full headroom: a `reserve` file of RESERVE_BYTES is kept in the directory. If a checkpoint
write hits ENOSPC/EDQUOT, the reserve is deleted and the write retried once, so the queue can
still record deliveries, and delete delivered segments, on a full disk. The reserve is recreated
once segments have been deleted.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from dataclasses import dataclass
from zlib import crc32

from traits_agent.queue.files import open_private
from traits_agent.queue.segments import Position

CHECKPOINT_NAME = "checkpoint"
TEMP_NAME = "checkpoint.tmp"
RESERVE_NAME = "reserve"
RESERVE_BYTES = 64 * 1024

_LINE = re.compile(
    rb"^(tq-checkpoint v1 segment=(\d{1,20}) offset=(\d{1,20}) next_seq=(\d{1,20})"
    rb" seq_lease=(\d{1,20})) crc=([0-9a-f]{8})\n$"
)
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)
MAX_VALUE = 1 << 62
"""Larger numbers in a checkpoint are corrupt: seqs are u64 on disk and the queue adds
leases (2**24) and jumps to them; 2**62 seqs outlast any disk."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    position: Position
    """Everything before it has been delivered (or dropped)."""
    seq_lease: int
    """No seq at or above this has been written; the next run starts at or above it."""

    def encode(self) -> bytes:
        p = self.position
        body = (
            f"tq-checkpoint v1 segment={p.segment} offset={p.offset} next_seq={p.next_seq}"
            f" seq_lease={self.seq_lease}"
        ).encode()
        return body + b" crc=%08x\n" % crc32(body)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint | None:
        m = _LINE.match(data)
        if m is None or int(m.group(6), 16) != crc32(m.group(1)):
            return None
        segment, offset, next_seq, lease = (int(m.group(i)) for i in range(2, 6))
        if max(segment, offset, next_seq, lease) >= MAX_VALUE:
            return None
        return cls(Position(segment, offset, next_seq), lease)


class CheckpointFile:
    """Reads and writes one queue directory's checkpoint. Thread-safe.

    Writes never go backwards: if asked to store a position older than one already stored
    (a thread that took its snapshot earlier), the newer one is written instead.
    """

    def __init__(self, directory: str, dir_fd: int) -> None:
        self._dir = directory
        self._dir_fd = dir_fd
        self._lock = threading.Lock()
        self._last: Checkpoint | None = None
        self._last_durable = False

    def load(self) -> tuple[Checkpoint | None, str | None]:
        """The stored checkpoint, or None and why not ("missing", "corrupt", "unreadable")."""
        try:
            with open(os.path.join(self._dir, CHECKPOINT_NAME), "rb") as f:
                data = f.read(512)
        except FileNotFoundError:
            return None, "missing"
        except OSError as e:
            return None, f"unreadable ({e.strerror})"
        cp = Checkpoint.decode(data)
        if cp is None:
            return None, "corrupt"
        self._last, self._last_durable = cp, True
        return cp, None

    def store(self, cp: Checkpoint, *, durable: bool, final: bool = False) -> None:
        """Replace the checkpoint; `durable` also fsyncs it. Raises OSError on failure.

        `final` (a clean close) may lower the lease to exactly the next seq.
        """
        with self._lock:
            last = self._last
            if last is not None and not final:
                if cp.position < last.position:
                    cp = Checkpoint(last.position, max(cp.seq_lease, last.seq_lease))
                elif cp.seq_lease < last.seq_lease:
                    cp = Checkpoint(cp.position, last.seq_lease)
                if cp == last and (self._last_durable or not durable):
                    return
            try:
                self._write(cp, durable)
            except OSError as e:
                if e.errno not in _SPACE_ERRORS or not self.release_reserve():
                    raise
                self._write(cp, durable)
            self._last, self._last_durable = cp, durable

    @property
    def dirty(self) -> bool:
        """The last stored checkpoint has not been fsynced."""
        return not self._last_durable

    def _write(self, cp: Checkpoint, durable: bool) -> None:
        tmp = os.path.join(self._dir, TEMP_NAME)
        data = cp.encode()
        fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            if os.write(fd, data) != len(data):  # 80 bytes: short only on a full disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(self._dir, CHECKPOINT_NAME))
        if durable:
            os.fsync(self._dir_fd)

    def ensure_reserve(self) -> bool:
        """Create the reserve file if missing; False if the disk has no room for it yet."""
        path = os.path.join(self._dir, RESERVE_NAME)
        try:
            if os.stat(path).st_size == RESERVE_BYTES:
                return True
        except FileNotFoundError:
            pass
        except OSError:
            return False
        try:
            fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
            try:
                # real zero bytes, not a sparse file or fallocate: the space must be ours
                if os.write(fd, bytes(RESERVE_BYTES)) != RESERVE_BYTES:
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self.release_reserve()
            return False
        return True

    def release_reserve(self) -> bool:
        """Delete the reserve to free its space; False if there was none."""
        try:
            os.unlink(os.path.join(self._dir, RESERVE_NAME))
        except OSError:
            return False
        return True


def remove_stale_temp(directory: str) -> bool:
    """Remove a temp file left by a crash between write and rename; True if there was one."""
    try:
        os.unlink(os.path.join(directory, TEMP_NAME))
    except FileNotFoundError:
        return False
    return True
