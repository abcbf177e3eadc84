"""The write side of the log: buffered frames → one write per segment → fsync.

It knows segments only as `SegmentInfo` objects handed to it by the queue, and nothing about
delivery. The queue's lock is held around every call, except `SegmentWriter.fsync`, which runs
without it (an fsync may take milliseconds; the event loop must not wait for it).

Memory: frames wait in `_pending` (joined into one bytes object per segment at flush), then in
`_outq` until the OS has taken them, then, until an fsync covers them, in `_retained`, so that
they can be written again if that fsync fails. Each stage is bounded by the queue.
"""

from __future__ import annotations

import os
from collections import deque
from typing import NamedTuple

from traits_agent.queue.errors import QueueWriteError
from traits_agent.queue.files import open_private
from traits_agent.queue.framing import (
    HEADER_SIZE,
    SEAL_SEQ,
    encode_frames,
    encode_header,
    frame_span,
    trim_frames,
)
from traits_agent.queue.segments import SegmentInfo, segment_name

_WRITE_FLAGS = os.O_WRONLY | os.O_APPEND


class _Chunk:
    """Appended frames of one segment, not yet handed to `flush`."""

    __slots__ = ("first_seq", "last_seq", "parts", "seg", "start")

    def __init__(self, seg: SegmentInfo, start: int, seq: int) -> None:
        self.seg, self.start = seg, start
        self.parts: list[bytes] = []
        self.first_seq = self.last_seq = seq


class _Blob:
    """Contiguous frames of one segment on their way to (or just written to) its file."""

    __slots__ = ("data", "first_seq", "id", "last_seq", "seg", "start", "whole", "written")

    def __init__(self, chunk: _Chunk, blob_id: int) -> None:
        self.seg, self.start, self.data = chunk.seg, chunk.start, b"".join(chunk.parts)
        self.first_seq, self.last_seq = chunk.first_seq, chunk.last_seq
        self.id = blob_id
        self.written = 0  # bytes the OS has taken
        self.whole = 0  # of those, bytes forming whole frames


class SyncTicket(NamedTuple):
    """What one sync() fsyncs, taken under the lock, fsynced outside it."""

    fds: list[int]
    sealed: list[int]
    seq: int
    dir_dirty: bool
    mark: int


class SegmentWriter:
    """Buffers frames and writes them to segment files; tracks what is written and synced."""

    def __init__(self, directory: str, dir_fd: int, *, retain_bytes: int, written_seq: int) -> None:
        self._dir, self._dir_fd = directory, dir_fd
        self._retain_limit = retain_bytes
        self._pending: list[_Chunk] = []
        self._outq: deque[_Blob] = deque()
        self._retained: deque[_Blob] = deque()
        self._retained_bytes = 0
        self._unprotected_seq = 0  # highest seq let go from _retained before an fsync
        self._blob_ids = 0
        self._wfd: int | None = None
        self._wseg: SegmentInfo | None = None
        self._sealed: list[tuple[int, int]] = []  # (segment number, fd) awaiting fsync
        self._syncing: set[int] = set()  # fds a sync is fsyncing right now: not to be closed
        self._dir_dirty = False
        #: the current write file took bytes since the last sync began (a clean file is not
        #: fsynced again: on a real disk each fsync is a cache flush, clean or not)
        self._wfd_dirty = False
        self.buffered = 0
        """Bytes appended that the OS has not taken yet."""
        self.written_seq = written_seq
        self.write_error: OSError | None = None

    def set_dir_fd(self, dir_fd: int) -> None:
        """The directory was made again: fsync this one from now on."""
        self._dir_fd = dir_fd
        self._dir_dirty = True

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def add(self, seg: SegmentInfo, start: int, seq: int, payload: bytes) -> None:
        """Buffer one frame at offset `start` of `seg` (the hot path: no syscall)."""
        chunk = self._pending[-1] if self._pending else None
        if chunk is None or chunk.seg is not seg:
            chunk = _Chunk(seg, start, seq)
            self._pending.append(chunk)
        parts = chunk.parts
        parts.append(encode_header(seq, payload))
        parts.append(payload)
        chunk.last_seq = seq
        self.buffered += HEADER_SIZE + len(payload)

    def add_many(
        self,
        seg: SegmentInfo,
        start: int,
        first_seq: int,
        payloads: list[bytes],
        crcs: bytes | None = None,
        *,
        lines: bool = False,
    ) -> int:
        """Buffer `payloads` as consecutive seqs from `first_seq`, in several-records frames
        (see `framing`; `crcs` and `lines` as `encode_frames` takes them). Returns the frame
        bytes added: never more than one `add` each."""
        chunk = self._pending[-1] if self._pending else None
        if chunk is None or chunk.seg is not seg:
            chunk = _Chunk(seg, start, first_seq)
            self._pending.append(chunk)
        size = encode_frames(first_seq, payloads, chunk.parts, crcs, lines=lines)
        self.buffered += size
        chunk.last_seq = first_seq + len(payloads) - 1
        return size

    def add_seal(self, seg: SegmentInfo, start: int, payload: bytes) -> None:
        """Buffer the seal record that closes `seg` (it carries no seq of its own)."""
        chunk = self._pending[-1] if self._pending else None
        if chunk is None or chunk.seg is not seg:
            chunk = _Chunk(seg, start, -1)
            self._pending.append(chunk)
        chunk.parts.append(encode_header(SEAL_SEQ, payload))
        chunk.parts.append(payload)
        self.buffered += HEADER_SIZE + len(payload)

    def flush(self) -> None:
        """Hand everything buffered to the OS, one writev per segment.

        Raises QueueWriteError; what the OS did not take stays queued, and a short write is
        resumed exactly where it stopped (the file is opened O_APPEND and nothing else
        writes to it), so the file ends up byte-identical to an uninterrupted write.
        """
        for chunk in self._pending:
            self._outq.append(_Blob(chunk, self._blob_ids))
            self._blob_ids += 1
        self._pending.clear()
        while self._outq:
            seg = self._outq[0].seg
            group = []
            for blob in self._outq:
                if blob.seg is not seg:
                    break
                group.append(blob)
            try:
                fd = self._fd_for(seg)
                self._wfd_dirty = True  # before the write: a failed one may have left bytes
                n = os.writev(fd, [memoryview(b.data)[b.written :] for b in group])
            except OSError as e:
                self.write_error = e
                raise QueueWriteError.wrap("write", e) from e
            self._took(group, n)
        self.write_error = None

    def _took(self, group: list[_Blob], n: int) -> None:
        """Account for `n` bytes of `group` accepted by the OS (all, or a short write)."""
        self.buffered -= n
        for blob in group:
            left = len(blob.data) - blob.written
            if n < left:
                blob.written += n
                self._whole_frames(blob)
                return
            n -= left
            blob.written = blob.whole = len(blob.data)
            self._outq.popleft()
            blob.seg.readable = blob.start + len(blob.data)
            self.written_seq = max(self.written_seq, blob.last_seq)
            if self._retain_limit:
                self._retained.append(blob)
                self._retained_bytes += len(blob.data)
                while self._retained_bytes > self._retain_limit:
                    old = self._retained.popleft()
                    self._retained_bytes -= len(old.data)
                    self._unprotected_seq = max(self._unprotected_seq, old.last_seq)

    def _whole_frames(self, blob: _Blob) -> None:
        """After a short write: how much of `blob` is whole frames (readers stop there)."""
        pos, data = blob.whole, blob.data
        while (span := frame_span(data, pos)) is not None:
            size, _, last_seq = span
            if pos + size > blob.written:
                break
            pos += size
            self.written_seq = max(self.written_seq, last_seq)
        blob.whole = pos
        blob.seg.readable = blob.start + pos

    def _fd_for(self, seg: SegmentInfo) -> int:
        """The write fd of `seg`, creating its file (and retiring the previous one) if new."""
        if seg is self._wseg and self._wfd is not None:
            return self._wfd
        fd = open_private(os.path.join(self._dir, segment_name(seg.number)), _WRITE_FLAGS)
        if not seg.on_disk:
            seg.on_disk = True
            self._dir_dirty = True  # the new name must be fsynced too
        self._retire()
        self._wfd, self._wseg = fd, seg
        return fd

    def _retire(self) -> None:
        """The current file takes no more writes: fsync it at the next sync, then close it.

        (With fsync="never" that is at close: the fds of undelivered segments stay open until
        then, at most max_bytes / segment_bytes of them.)
        """
        if self._wfd is not None and self._wseg is not None:
            self._sealed.append((self._wseg.number, self._wfd))
        self._wfd = self._wseg = None
        self._wfd_dirty = False  # a sealed file is always fsynced before it is closed

    # -- fsync ------------------------------------------------------------------------------

    def begin_sync(self) -> SyncTicket:
        sealed = [fd for _, fd in self._sealed]
        current = [self._wfd] if self._wfd is not None and self._wfd_dirty else []
        fds = [*sealed, *current]
        self._wfd_dirty = False  # this ticket covers it; a write from now on marks it again
        self._syncing = set(fds)
        ticket = SyncTicket(fds, sealed, self.written_seq, self._dir_dirty, self._blob_ids)
        self._dir_dirty = False
        return ticket

    def fsync(self, ticket: SyncTicket) -> None:
        """fsync the files (and the directory, if names were added). Without the lock.

        Segments only grow by appends, so fdatasync is enough: it flushes the data and the
        metadata needed to read it back (the file size), not the timestamps; about 2.5x
        faster than fsync per round here, which is what a client waiting for each event's ack
        waits for. New names in the directory still need the directory's fsync."""
        for fd in ticket.fds:
            os.fdatasync(fd)
        if ticket.dir_dirty:
            os.fsync(self._dir_fd)

    def end_sync(self, ticket: SyncTicket) -> None:
        """The ticket's fsync succeeded: close retired files, let go of retained data."""
        self._syncing = set()
        for entry in [e for e in self._sealed if e[1] in ticket.sealed]:
            self._sealed.remove(entry)
            os.close(entry[1])
        while self._retained and self._retained[0].id < ticket.mark:
            self._retained_bytes -= len(self._retained.popleft().data)

    def sync_failed(
        self, segs: list[SegmentInfo], keep_from: int, next_seq: int, durable_seq: int
    ) -> tuple[int, int]:
        """After a failed fsync: queue everything not known durable for a fresh segment.

        Linux may drop dirty pages when writeback fails and report the error only once, so
        what was written since the last good fsync cannot be trusted to be on disk. We still
        hold it (up to the retain bound): it is written again to a new segment appended to
        `segs`. Readers skip the copies they have already seen (a seq is returned once).
        Records with seqs below `keep_from` (delivered) are not rewritten.

        Returns (change in the segments' total size, records that were let go of before
        their fsync and so cannot be rewritten: in doubt). Segment record counts are updated.
        """
        self._syncing = set()
        parts: list[bytes] = []
        firsts: list[int] = []
        for blob in (*self._retained, *self._outq):
            if blob.last_seq < keep_from:
                continue
            # a blob can hold delivered frames before undelivered ones (a big write cut
            # short by a full disk): rewrite from the first undelivered one only, or the
            # copies alone may fill the disk again
            data, seq = trim_frames(blob.data, keep_from)
            if data:
                parts.append(data)
                firsts.append(seq)
        for chunk in self._pending:
            parts.extend(chunk.parts)
            if chunk.first_seq > 0:
                firsts.append(chunk.first_seq)
        in_doubt = max(0, self._unprotected_seq - durable_seq)
        self.close()
        delta = 0
        for seg in segs:  # partial frames at the ends of the old files are abandoned
            if seg.on_disk and seg.size > seg.readable:
                delta -= seg.size - seg.readable
                seg.size = seg.readable
        while len(segs) > 1 and not segs[-1].on_disk:
            delta -= segs.pop().size
        first = firsts[0] if firsts else next_seq
        last = segs[-1]
        if last.on_disk:
            last = SegmentInfo(last.number + 1, first_seq=first)
            segs.append(last)
        else:
            delta -= last.size
            last.size = 0
        # the rewritten records are consecutive: those of the queue from `first` on
        last.first_seq, last.last_seq, last.count = first, next_seq - 1, next_seq - first
        self._pending.clear()
        self._outq.clear()
        self._retained.clear()
        self._retained_bytes = 0
        self.buffered = 0
        self.write_error = None
        if parts:
            chunk = _Chunk(last, 0, first)
            chunk.parts, chunk.last_seq = parts, next_seq - 1
            size = sum(len(p) for p in parts)
            last.size = size
            delta += size
            self.buffered = size
            self._pending.append(chunk)
        return delta, in_doubt

    # -- segments going away ------------------------------------------------------------------

    def forget(self, seg: SegmentInfo) -> None:
        """`seg` is being deleted: drop its unwritten frames and close its fd.

        An unlinked file's space comes back only when its last fd closes, so ours is closed
        now, unless a sync is fsyncing it (that sync closes it afterwards).
        """
        for chunk in [c for c in self._pending if c.seg is seg]:
            self._pending.remove(chunk)
            self.buffered -= sum(len(p) for p in chunk.parts)
        for blob in [b for b in self._outq if b.seg is seg]:
            self._outq.remove(blob)
            self.buffered -= len(blob.data) - blob.written
        if self._wseg is seg:
            self._retire()
        for entry in [e for e in self._sealed if e[0] == seg.number]:
            if entry[1] not in self._syncing:
                self._sealed.remove(entry)
                os.close(entry[1])

    def close(self) -> None:
        """Close every write fd (no fsync: the caller has synced, or given up)."""
        for _, fd in self._sealed:
            os.close(fd)
        self._sealed.clear()
        if self._wfd is not None:
            os.close(self._wfd)
        self._wfd = self._wseg = None
