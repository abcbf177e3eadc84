"""The checkpoint: the delivered position and the seq lease, overwritten in place.

Format v2 (since issue 12): file `checkpoint`, three 4 KiB blocks; each block starts with a
*slot*, one line of text (so `cat` or `strings` shows it) padded with NUL bytes::

    tq-checkpoint v2 gen=42 segment=12 offset=4096 next_seq=93021 seq_lease=16870237 crc=1a2b3c4d

`crc` is crc32 of everything before " crc="; `gen` counts the stores. The checkpoint is the
valid slot with the highest `gen`; a slot that does not parse or check (torn, zeroed, never
written) is ignored, and no valid slot at all is "corrupt" (delivery restarts at the oldest
segment: re-delivery, no loss).

Why: the v1 file (one line, replaced by write temp + rename, fsync when durable) cost an
open, a write, a close and a rename per delivered batch in the event loop. A v2 store is one
`pwrite` of one slot on a descriptor kept open. A durable store is that pwrite plus an
`fdatasync` (the file never changes size: no metadata to sync), and the queue runs it in the
sync thread (see `DiskQueue.sync_requested`).

Why three slots, in separate blocks: a store never overwrites the slot holding the newest
*durable* checkpoint, nor the one being fsynced. A non-durable store may then be lost or torn
by a power cut, but it can only destroy a slot that held something older than the durable
one, so recovery finds the durable checkpoint (or a newer one that reached the disk whole).
The third slot lets non-durable stores go on while a durable one is being fsynced in another
thread, without waiting for it. Separate 4 KiB blocks: a torn write of one page or sector
cannot reach another slot.

Format v1 (``tq-checkpoint v1 segment=S offset=O next_seq=N seq_lease=L crc=XXXXXXXX``, one
line) is still read. The first store of each run (at open: durable) writes a fresh v2 file
(`checkpoint.tmp`, fsync, rename over `checkpoint`, fsync the directory: the only rename),
so a v1 file is upgraded at the first open, and a missing, damaged or deleted file is made
whole again. An agent older than v2 reads a v2 file as corrupt: it re-delivers from the
oldest segment, and loses nothing.

Disk-full headroom: a `reserve` file of RESERVE_BYTES is kept in the directory. If a checkpoint
write hits ENOSPC/EDQUOT, the reserve is deleted and the write retried once, so the queue can
still record deliveries, and delete delivered segments, on a full disk. The reserve is recreated
once segments have been deleted. (An in-place pwrite needs no new blocks on ext4/xfs; creating
the file, and a copy-on-write filesystem, may.)
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from zlib import crc32

from traits_agent.queue.files import open_private
from traits_agent.queue.segments import Position

CHECKPOINT_NAME = "checkpoint"
TEMP_NAME = "checkpoint.tmp"
RESERVE_NAME = "reserve"
RESERVE_BYTES = 64 * 1024
SLOTS = 3
SLOT_STRIDE = 4096
"""Each slot starts its own 4 KiB block (page and sector aligned)."""
SLOT_BYTES = 256
"""The bytes of a slot written by one store: the line and its NUL padding."""
FILE_BYTES = SLOTS * SLOT_STRIDE

_LINE_V1 = re.compile(
    rb"^(tq-checkpoint v1 segment=(\d{1,20}) offset=(\d{1,20}) next_seq=(\d{1,20})"
    rb" seq_lease=(\d{1,20})) crc=([0-9a-f]{8})\n$"
)
_SLOT_V2 = re.compile(
    rb"(tq-checkpoint v2 gen=(\d{1,20}) segment=(\d{1,20}) offset=(\d{1,20})"
    rb" next_seq=(\d{1,20}) seq_lease=(\d{1,20})) crc=([0-9a-f]{8})\n\x00*"
)
_V1_MAGIC = b"tq-checkpoint v1 "
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
        """The v1 line (the format before v2: kept to write old-format files in tests)."""
        p = self.position
        body = (
            f"tq-checkpoint v1 segment={p.segment} offset={p.offset} next_seq={p.next_seq}"
            f" seq_lease={self.seq_lease}"
        ).encode()
        return body + b" crc=%08x\n" % crc32(body)

    def encode_slot(self, gen: int) -> bytes:
        """One v2 slot: the line, NUL-padded to SLOT_BYTES."""
        p = self.position
        body = (
            f"tq-checkpoint v2 gen={gen} segment={p.segment} offset={p.offset}"
            f" next_seq={p.next_seq} seq_lease={self.seq_lease}"
        ).encode()
        line = body + b" crc=%08x\n" % crc32(body)
        return line.ljust(SLOT_BYTES, b"\0")

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint | None:
        """A v1 file's checkpoint, or None."""
        m = _LINE_V1.match(data)
        if m is None or int(m.group(6), 16) != crc32(m.group(1)):
            return None
        return cls._checked(*(int(m.group(i)) for i in range(2, 6)))

    @classmethod
    def decode_slot(cls, data: bytes) -> tuple[int, Checkpoint] | None:
        """(gen, checkpoint) of one v2 slot, or None if it does not parse and check."""
        m = _SLOT_V2.fullmatch(data)
        if m is None or int(m.group(7), 16) != crc32(m.group(1)):
            return None
        cp = cls._checked(*(int(m.group(i)) for i in range(3, 7)))
        return None if cp is None else (int(m.group(2)), cp)

    @classmethod
    def _checked(cls, segment: int, offset: int, next_seq: int, lease: int) -> Checkpoint | None:
        if max(segment, offset, next_seq, lease) >= MAX_VALUE:
            return None
        return cls(Position(segment, offset, next_seq), lease)


def read_slots(data: bytes) -> list[tuple[int, Checkpoint] | None]:
    """Each slot of a v2 file's bytes, decoded (None: not valid)."""
    return [
        Checkpoint.decode_slot(data[i * SLOT_STRIDE : i * SLOT_STRIDE + SLOT_BYTES])
        for i in range(SLOTS)
    ]


class CheckpointFile:
    """Reads and writes one queue directory's checkpoint. Thread-safe.

    Writes never go backwards: if asked to store a position older than one already stored
    (a thread that took its snapshot earlier), the newer one is written instead. A
    non-durable store never waits for a durable one being fsynced in another thread.
    """

    def __init__(self, directory: str, dir_fd: int) -> None:
        self._dir = directory
        self._dir_fd = dir_fd
        self._lock = threading.Lock()
        #: held for a whole durable store (fsync included): they run one at a time
        self._durable_lock = threading.Lock()
        self._last: Checkpoint | None = None
        self._fd: int | None = None
        self._gen = 0
        """The highest gen written or loaded."""
        self._slot_gen = [0] * SLOTS
        """The gen each slot holds (0: nothing valid)."""
        self._durable_slot: int | None = None
        self._syncing_slot: int | None = None
        self._durable_gen = 0

    def load(self) -> tuple[Checkpoint | None, str | None]:
        """The stored checkpoint, or None and why not ("missing", "corrupt", "unreadable")."""
        try:
            with open(os.path.join(self._dir, CHECKPOINT_NAME), "rb") as f:
                data = f.read(FILE_BYTES + 1)
        except FileNotFoundError:
            return None, "missing"
        except OSError as e:
            return None, f"unreadable ({e.strerror})"
        if data.startswith(_V1_MAGIC):
            found = Checkpoint.decode(data)  # the first store writes a v2 file
        else:  # v2: slot 0 may be the torn one, so no magic is required at offset 0
            valid = [s for s in read_slots(data) if s is not None]
            found = None
            if valid:
                self._gen, found = max(valid, key=lambda v: v[0])  # gens go on from there
        if found is None:
            return None, "corrupt"
        self._last = cp = found
        return cp, None

    def store(self, cp: Checkpoint, *, durable: bool, final: bool = False) -> None:
        """Record the checkpoint; `durable` also fsyncs it. Raises OSError on failure.

        `final` (a clean close) may lower the lease to exactly the next seq.
        """
        if not durable:
            with self._lock:
                newest = self._newest(cp, final)
                if newest is None:
                    return
                if self._fd is not None:
                    self._retrying(lambda: self._put(newest, self._free_slot()))
                    return
            # no file to write in place yet (not at open: the queue's first store is durable)
        with self._durable_lock:
            with self._lock:
                to_store = self._newest(cp, final, durable=True)
                if to_store is None:
                    return
                if self._fd is None or self._unlinked():
                    # the first store of this run (v1 or damaged file, or none) or the file
                    # was deleted behind our back: a fresh file, renamed into place
                    self._retrying(lambda: self._create(to_store))
                    return
                slot = self._free_slot()
                gen = self._retrying(lambda: self._put(to_store, slot))
                self._syncing_slot = slot
                fd = self._fd
            try:
                os.fdatasync(fd)  # outside the lock: non-durable stores go on meanwhile
            except BaseException:
                with self._lock:
                    self._syncing_slot = None
                raise
            with self._lock:
                self._syncing_slot = None
                self._durable_slot = slot  # (no other store wrote it: it was busy)
                self._durable_gen = max(self._durable_gen, gen)

    def _newest(self, cp: Checkpoint, final: bool, durable: bool = False) -> Checkpoint | None:
        """What to store instead of `cp` (never older than what is stored), or None if
        nothing needs writing (lock held)."""
        last = self._last
        if last is not None and not final:
            if cp.position < last.position:
                cp = Checkpoint(last.position, max(cp.seq_lease, last.seq_lease))
            elif cp.seq_lease < last.seq_lease:
                cp = Checkpoint(cp.position, last.seq_lease)
            if cp == last and (not durable or self._durable_gen >= self._gen):
                return None
        return cp

    @property
    def dirty(self) -> bool:
        """The last stored checkpoint has not been fsynced."""
        return self._durable_gen < self._gen

    def _free_slot(self) -> int:
        """A slot that holds neither the newest durable checkpoint nor one being fsynced:
        the one with the oldest gen among them (lock held)."""
        busy = (self._durable_slot, self._syncing_slot)
        return min((i for i in range(SLOTS) if i not in busy), key=lambda i: self._slot_gen[i])

    def _put(self, cp: Checkpoint, slot: int) -> int:
        """One pwrite of `cp` into `slot`; returns its gen (lock held)."""
        assert self._fd is not None
        gen = self._gen + 1
        data = cp.encode_slot(gen)
        self._slot_gen[slot] = 0  # whatever it held is being overwritten
        if os.pwrite(self._fd, data, slot * SLOT_STRIDE) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), CHECKPOINT_NAME)
        self._slot_gen[slot] = self._gen = gen
        self._last = cp
        return gen

    def _unlinked(self) -> bool:
        """The file we write in place was deleted (or renamed over) behind our back."""
        assert self._fd is not None
        try:
            st = os.fstat(self._fd)
            named = os.stat(os.path.join(self._dir, CHECKPOINT_NAME))
        except OSError:
            return True
        return st.st_nlink == 0 or (st.st_dev, st.st_ino) != (named.st_dev, named.st_ino)

    def _create(self, cp: Checkpoint) -> int:
        """Write a fresh v2 file holding `cp` in slot 0, durably (temp, fsync, rename, fsync
        the directory), and keep it open (lock held)."""
        tmp = os.path.join(self._dir, TEMP_NAME)
        gen = self._gen + 1
        data = bytearray(FILE_BYTES)
        data[:SLOT_BYTES] = cp.encode_slot(gen)
        fd = open_private(tmp, os.O_RDWR | os.O_TRUNC)
        try:
            if os.write(fd, data) != len(data):  # 12 KiB: short only on a full disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
            os.fsync(fd)
            os.replace(tmp, os.path.join(self._dir, CHECKPOINT_NAME))
            os.fsync(self._dir_fd)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self._fd = fd
        self._slot_gen = [gen, 0, 0]
        self._gen = self._durable_gen = gen
        self._durable_slot, self._syncing_slot = 0, None
        self._last = cp
        return gen

    def _retrying(self, write: Callable[[], int]) -> int:
        """`write()`, once more after releasing the reserve if the disk is full."""
        try:
            return write()
        except OSError as e:
            if e.errno not in _SPACE_ERRORS or not self.release_reserve():
                raise
            return write()

    def close(self) -> None:
        """Close the descriptor kept for in-place writes (a later store reopens the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
