"""`DiskQueue`: the durable FIFO of one API resource (format and guarantees: package docstring).

Threading contract: one thread (the event loop) calls everything except `sync()`, which may
run at the same time in one worker thread (`trio.to_thread.run_sync(queue.sync)`). A lock
guards the in-memory state; it is held for memory work and single write syscalls, never
across an fsync of segment data.
"""

from __future__ import annotations

import fcntl
import os
import threading
from bisect import bisect_right
from enum import StrEnum
from itertools import accumulate
from types import TracebackType
from typing import TypeVar

from traits_agent.queue.checkpoint import Checkpoint
from traits_agent.queue.errors import QueueClosedError, QueueLockedError, QueueWriteError
from traits_agent.queue.framing import HEADER_SIZE, MAX_PAYLOAD, SEAL_FRAME_SIZE, encode_seal
from traits_agent.queue.reader import Batch, LogReader
from traits_agent.queue.recovery import RecoveryReport, recover
from traits_agent.queue.segments import Position, SegmentInfo, segment_name
from traits_agent.queue.writer import SegmentWriter

DEFAULT_SEGMENT_BYTES = 8 << 20
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_BUFFER_BYTES = 16 << 20
"""Bytes appended but not yet accepted by the OS (only grows while writes fail)."""
DEFAULT_RETAIN_BYTES = 32 << 20
"""Bytes written but not yet fsynced kept in memory to write again if the fsync fails."""
SEQ_LEASE = 1 << 24
LOCK_NAME = "lock"


class FsyncPolicy(StrEnum):
    """When the caller calls `sync()`; the queue only exposes the choice."""

    ALWAYS = "always"  # after every ingest burst, before acknowledging it
    INTERVAL = "interval"  # every fsync_interval_ms (group commit)
    NEVER = "never"  # only at close: the OS writes back when it likes


class OnFull(StrEnum):
    """What `append` does when the backlog would pass `max_bytes`."""

    DROP_OLDEST = "drop_oldest"  # delete the oldest whole segment(s), counted
    DROP_NEWEST = "drop_newest"  # refuse the new record, counted


class DiskQueue:
    """A disk-backed FIFO of opaque byte records. Create with `DiskQueue.open`.

    Counters (plain ints, read them any time): appended_total, committed_total,
    dropped_oldest, dropped_newest, dropped_write_error, checkpoint_errors, delete_errors,
    fsync_in_doubt; and, as properties, corrupt_skipped, missing_skipped, read_errors.
    """

    def __init__(
        self,
        directory: str,
        *,
        lock_fd: int,
        dir_fd: int,
        segment_bytes: int,
        fsync: FsyncPolicy,
        max_bytes: int,
        on_full: OnFull,
        max_buffer_bytes: int,
        retain_bytes: int,
    ) -> None:
        self.directory = directory
        self.fsync_policy = fsync
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.on_full = on_full
        self._max_buffer = max_buffer_bytes
        self._lock_fd, self._dir_fd = lock_fd, dir_fd
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._closed = False

        state = recover(directory, dir_fd)
        self.recovery: RecoveryReport = state.report
        self._cp = state.checkpoint
        self._segs: list[SegmentInfo] = state.segments
        self._total = sum(s.size for s in self._segs)
        self._records = sum(s.count for s in self._segs)
        self._cursor = state.cursor
        self._next_seq = state.next_seq
        self._durable_seq = state.next_seq - 1
        self._lease = state.next_seq + SEQ_LEASE
        self._writer = SegmentWriter(
            directory,
            dir_fd,
            # with fsync="never" no fsync can fail before close: nothing worth keeping
            retain_bytes=0 if fsync is FsyncPolicy.NEVER else retain_bytes,
            written_seq=state.next_seq - 1,
        )
        self._reader = LogReader(directory, self._cursor)

        self.dropped_oldest = 0
        self.dropped_newest = 0
        self.dropped_write_error = 0
        self.appended_total = 0
        self.committed_total = 0
        self.checkpoint_errors = 0
        """Checkpoint writes that failed (each can only cause re-delivery)."""
        self.delete_errors = 0
        self.fsync_in_doubt = 0
        """Records whose fsync failed after they had left the retain buffer (see sync)."""

        # The lease and the (possibly adjusted) position must be durable before any append.
        self._cp.store(Checkpoint(self._cursor, self._lease), durable=True)
        self._cp.ensure_reserve()
        if state.to_seal is not None:
            self._seal(state.to_seal)
            self._flush_quietly()
        self.recovery.records_queued = self.pending_items

    # -- opening and closing ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: str = "interval",
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_full: str = "drop_oldest",
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        retain_bytes: int = DEFAULT_RETAIN_BYTES,
    ) -> DiskQueue:
        """Open (creating if needed) and recover the queue in `directory`.

        Raises QueueLockedError if another open queue holds the directory, ValueError for bad
        arguments, OSError if the directory cannot be used at all. Bad data never raises:
        see `recovery` for what was found.
        """
        policy = _choice(FsyncPolicy, fsync, "fsync")
        full = _choice(OnFull, on_full, "on_full")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        if max_bytes < 2 * segment_bytes:
            raise ValueError(
                f"max_bytes ({max_bytes}) must be at least twice segment_bytes ({segment_bytes})"
            )
        path = os.path.abspath(os.fspath(directory))
        os.makedirs(path, exist_ok=True)
        lock_fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise QueueLockedError(
                    f"queue directory {path} is already open (by this or another process)"
                ) from None
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return cls(
                    path,
                    lock_fd=lock_fd,
                    dir_fd=dir_fd,
                    segment_bytes=segment_bytes,
                    fsync=policy,
                    max_bytes=max_bytes,
                    on_full=full,
                    max_buffer_bytes=max_buffer_bytes,
                    retain_bytes=retain_bytes,
                )
            except BaseException:
                os.close(dir_fd)
                raise
        except BaseException:
            os.close(lock_fd)
            raise

    def close(self) -> None:
        """Flush, fsync, store the checkpoint durably, release the lock. Idempotent.

        Raises QueueWriteError if the final write or fsync failed (the queue is closed anyway;
        unwritten records are lost, and were never reported durable).
        """
        with self._sync_lock:
            if self._closed:
                return
            error: QueueWriteError | None = None
            for _ in range(2):  # a failed fsync queues its records for a fresh file: try that
                try:
                    self._sync()
                except QueueWriteError as e:
                    error = e
                else:
                    error = None
                    break
            with self._lock:
                self._closed = True
                # A clean close hands the next run exactly our next seq: no lease gap.
                lease = self._next_seq if error is None else self._lease
                try:
                    self._cp.store(Checkpoint(self._cursor, lease), durable=True, final=True)
                except OSError as e:
                    error = error or QueueWriteError.wrap("checkpoint", e)
                self._reader.close()
                self._writer.close()
                os.close(self._dir_fd)
                os.close(self._lock_fd)
        if error is not None:
            raise error

    def __enter__(self) -> DiskQueue:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """Buffer one record (cheap: no syscall). False if dropped (see the counters).

        Raises ValueError if the payload is over MAX_PAYLOAD.
        """
        size = HEADER_SIZE + len(payload)
        if size > HEADER_SIZE + MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD} limit")
        with self._lock:
            if self._closed:
                raise QueueClosedError("append on a closed queue")
            if self._writer.buffered + size > self._max_buffer and not self._flush_quietly():
                self.dropped_write_error += 1
                return False
            if self._total + size > self.max_bytes and not self._make_room(size):
                self.dropped_newest += 1
                return False
            seg = self._segs[-1]
            if seg.size + size + SEAL_FRAME_SIZE > self.segment_bytes and seg.size > 0:
                self._seal(seg)
                seg = SegmentInfo(seg.number + 1, first_seq=self._next_seq)
                self._segs.append(seg)
            seq = self._next_seq
            self._next_seq = seq + 1
            self._writer.add(seg, seg.size, seq, payload)
            seg.size += size
            seg.count += 1
            seg.last_seq = seq
            self._total += size
            self._records += 1
            self.appended_total += 1
            return True

    def append_many(self, payloads: list[bytes]) -> int:
        """`append` each of `payloads` in order; returns how many were taken.

        The same checks, counters and segment changes as one `append` per record: each run of
        records that fits the buffer, the quota and the current segment (the common case) is
        framed in one pass under one lock, and the record that does not fit goes through
        `append` (which starts the next segment, makes room or drops, as it always does).
        Raises ValueError, before taking any, if a payload is over MAX_PAYLOAD.
        """
        sizes = [HEADER_SIZE + len(p) for p in payloads]
        if sizes and max(sizes) > HEADER_SIZE + MAX_PAYLOAD:
            raise ValueError(f"a payload is over the {MAX_PAYLOAD} limit")
        ends = list(accumulate(sizes))  # ends[j]: bytes of payloads[:j + 1]
        taken = i = 0
        while i < len(payloads):
            with self._lock:
                if self._closed:
                    raise QueueClosedError("append on a closed queue")
                seg = self._segs[-1]
                room = min(
                    self._max_buffer - self._writer.buffered,
                    self.max_bytes - self._total,
                    self.segment_bytes - SEAL_FRAME_SIZE - seg.size,
                )
                before = ends[i - 1] if i else 0
                j = bisect_right(ends, before + room, i)  # payloads[i:j] fit
                if j > i:
                    size, n, seq = ends[j - 1] - before, j - i, self._next_seq
                    self._next_seq = seq + n
                    self._writer.add_many(seg, seg.size, seq, payloads[i:j])
                    seg.size += size
                    seg.count += n
                    seg.last_seq = seq + n - 1
                    self._total += size
                    self._records += n
                    self.appended_total += n
                    taken += n
                    i = j
                    continue
            taken += self.append(payloads[i])
            i += 1
        return taken

    def _seal(self, seg: SegmentInfo) -> None:
        """End `seg` with its summary, so a restart reads 56 bytes of it instead of all."""
        if not seg.count:
            return
        payload = encode_seal(seg.count, seg.first_seq, seg.last_seq)
        self._writer.add_seal(seg, seg.size, payload)
        seg.size += HEADER_SIZE + len(payload)
        self._total += HEADER_SIZE + len(payload)

    def flush(self) -> None:
        """Hand buffered records to the OS: one write call per segment touched.

        Raises QueueWriteError if the OS refused; what it did not take stays buffered and a
        later flush/sync retries it.
        """
        with self._lock:
            if self._closed:
                raise QueueClosedError("flush on a closed queue")
            self._flush_locked()

    def sync(self) -> None:
        """Flush, then fsync, so `durable_seq` covers everything appended before the call.

        Safe to run in a worker thread while the owner thread appends and flushes. A no-op
        after close. Raises QueueWriteError if a write or fsync failed; after a failed fsync
        the records it covered are queued to be written again to a fresh segment.
        """
        with self._sync_lock:
            if self._closed:
                return
            self._sync()

    def _sync(self) -> None:
        with self._lock:
            error: QueueWriteError | None = None
            try:
                self._flush_locked()
            except QueueWriteError as e:
                error = e
            ticket = self._writer.begin_sync()
        try:
            self._writer.fsync(ticket)
        except OSError as e:
            with self._lock:
                delta, in_doubt = self._writer.sync_failed(
                    self._segs, self._cursor.next_seq, self._next_seq, self._durable_seq
                )
                self._total += delta
                self._records = sum(s.count for s in self._segs)
                self.fsync_in_doubt += in_doubt
            raise QueueWriteError.wrap("fsync", e) from e
        with self._lock:
            self._writer.end_sync(ticket)
            self._durable_seq = max(self._durable_seq, ticket.seq)
            if self._segs[0].number < self._cursor.segment:
                self._delete_delivered()  # a commit could not store the checkpoint: retry
            cp = Checkpoint(self._cursor, self._lease)
        if self._cp.dirty:
            try:
                self._cp.store(cp, durable=True)
            except OSError:
                with self._lock:
                    self.checkpoint_errors += 1
        if error is not None:
            raise error

    def _flush_quietly(self) -> bool:
        """Flush from `append` when the buffer is full; False if the disk still refuses."""
        if self._writer.write_error is not None:
            return False
        try:
            self._flush_locked()
        except QueueWriteError:
            return False
        return True

    def _flush_locked(self) -> None:
        if self._writer.has_pending:
            self._check_lease()
        self._writer.flush()

    def _check_lease(self) -> None:
        """Durably raise the seq lease before records reach the OS with seqs beyond it.

        Every seq written is below a lease stored durably, and the next run starts at the
        lease unless closed cleanly, so seqs are never reused, even for records that were
        delivered but lost from disk in a power cut. Costs one durable checkpoint write per
        SEQ_LEASE/2 records.
        """
        if self._next_seq <= self._lease - SEQ_LEASE // 2:
            return
        lease = self._next_seq + SEQ_LEASE
        try:
            self._cp.store(Checkpoint(self._cursor, lease), durable=True)
        except OSError as e:
            if self._next_seq > self._lease:
                self._writer.write_error = e
                raise QueueWriteError.wrap("checkpoint", e) from e
            return
        self._lease = lease

    def _make_room(self, size: int) -> bool:
        """drop_oldest: delete whole oldest segments until `size` more bytes fit the quota.

        The checkpoint moves past them durably first. A batch in flight over a dropped
        segment is not disturbed: committing it later is a no-op (its records are counted as
        dropped even if that delivery succeeds).
        """
        if self.on_full is not OnFull.DROP_OLDEST:
            return False
        while self._total + size > self.max_bytes:
            if len(self._segs) < 2:
                return False
            victim, nxt = self._segs[0], self._segs[1]
            cur = self._cursor
            moved = Position(nxt.number, 0, max(cur.next_seq, nxt.first_seq))
            if moved <= cur:  # the victim is already delivered
                moved = cur
            try:
                self._cp.store(Checkpoint(moved, self._lease), durable=True)
            except OSError:
                self.checkpoint_errors += 1
                return False
            before = self.pending_items
            self._cursor = moved
            self._reader.invalidate()
            self._delete_segment(victim)
            self.dropped_oldest += before - self.pending_items
        return True

    # -- reading ----------------------------------------------------------------------------

    def read_batch(self, max_items: int, max_bytes: int) -> Batch | None:
        """The next records from the delivered position, or None if there are none.

        Returns the same records again until they are committed (extended by records
        flushed since, if the last batch was not full; it resumes where the last read ended
        rather than rescanning). `max_bytes` bounds the payload bytes, but a batch holds at
        least one record. Damaged records are skipped and counted in `corrupt_skipped`.
        """
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be positive")
        with self._lock:
            if self._closed:
                raise QueueClosedError("read_batch on a closed queue")
            return self._reader.read(self._segs, self._cursor, max_items, max_bytes)

    # -- committing -------------------------------------------------------------------------

    def commit(self, batch_or_end: Batch | Position) -> None:
        """Mark everything before the batch's end delivered.

        A position at or behind the delivered one (e.g. of a batch whose segment drop_oldest
        removed meanwhile) is a no-op. Inside a segment the checkpoint is written without
        fsync (the next `sync()` makes it durable); when segments become fully delivered it is
        written durably and then they are deleted. Write failures are counted in
        `checkpoint_errors`, never raised: they can only cause re-delivery.
        """
        end = batch_or_end.end if isinstance(batch_or_end, Batch) else batch_or_end
        with self._lock:
            if self._closed:
                raise QueueClosedError("commit on a closed queue")
            cur = self._cursor
            if end <= cur:
                return
            if end > Position(self._segs[-1].number, self._segs[-1].readable, 0):
                raise ValueError(f"{end} is beyond the end of the queue")
            before = self.pending_items
            self._cursor = end
            self.committed_total += before - self.pending_items
            self._reader.invalidate()
            if self._segs[0].number < end.segment:
                self._delete_delivered()
            else:
                try:
                    self._cp.store(Checkpoint(end, self._lease), durable=False)
                except OSError:
                    self.checkpoint_errors += 1

    def _delete_delivered(self) -> None:
        try:
            self._cp.store(Checkpoint(self._cursor, self._lease), durable=True)
        except OSError:
            self.checkpoint_errors += 1
            return  # keep them; the next commit or sync tries again
        while self._segs[0].number < self._cursor.segment:
            self._delete_segment(self._segs[0])
        self._cp.ensure_reserve()

    def _delete_segment(self, seg: SegmentInfo) -> None:
        """Forget and unlink a segment (never the newest; the checkpoint is past it)."""
        self._segs.remove(seg)
        self._total -= seg.size
        self._records -= seg.count
        self._reader.forget(seg.number)
        self._writer.forget(seg)
        if seg.on_disk:
            try:
                os.unlink(os.path.join(self.directory, segment_name(seg.number)))
            except FileNotFoundError:
                pass
            except OSError:
                self.delete_errors += 1  # stays on disk; removed at the next open

    # -- stats (all O(1)) -------------------------------------------------------------------

    @property
    def corrupt_skipped(self) -> int:
        """Damaged regions skipped by reads (each usually one record), counted once."""
        return self._reader.corrupt_skipped

    @property
    def missing_skipped(self) -> int:
        """Segment files that vanished while the queue was open (deleted by someone else)."""
        return self._reader.missing_skipped

    @property
    def read_errors(self) -> int:
        """Segments whose rest was skipped because reading them failed (EIO and the like)."""
        return self._reader.read_errors

    @property
    def pending_items(self) -> int:
        """Records appended and not yet delivered (damaged ones count until read past)."""
        cur = self._cursor
        done = 0
        for seg in self._segs:  # segments before the delivered one are normally gone already
            if seg.number < cur.segment:
                done += seg.count
                continue
            done += min(seg.count, max(0, cur.next_seq - seg.first_seq))
            break
        return max(0, self._records - done)

    @property
    def pending_bytes(self) -> int:
        """Frame bytes (headers included) from the delivered position to the end, buffered
        ones too: what delivery still has to get through."""
        before = self._cursor.offset
        for seg in self._segs:
            if seg.number >= self._cursor.segment:
                break
            before += seg.size
        return max(0, self._total - before)

    @property
    def disk_bytes(self) -> int:
        """Bytes of all segments, buffered ones included: what `max_bytes` bounds."""
        return self._total

    @property
    def segments(self) -> int:
        """Segment files (a segment is created when its first bytes are flushed)."""
        n = len(self._segs)
        while n and not self._segs[n - 1].on_disk:
            n -= 1
        return n

    @property
    def oldest_pending_seq(self) -> int | None:
        """Seq of the next record to deliver (its lower bound, if records were lost)."""
        if not self.pending_items:
            return None
        cur = self._cursor
        seg = next((s for s in self._segs if s.number >= cur.segment and s.count), None)
        return max(cur.next_seq, seg.first_seq) if seg is not None else cur.next_seq

    @property
    def next_seq(self) -> int:
        """The seq the next successful append gets."""
        return self._next_seq

    @property
    def written_seq(self) -> int:
        """Highest seq handed to the OS (readable, survives a crash of this process)."""
        return self._writer.written_seq

    @property
    def durable_seq(self) -> int:
        """Highest seq known fsynced: it and everything before it survive a power cut."""
        return self._durable_seq

    @property
    def delivered(self) -> Position:
        return self._cursor

    @property
    def write_error(self) -> OSError | None:
        """The error of the last failed write, until a write succeeds."""
        return self._writer.write_error

    def __repr__(self) -> str:
        return (
            f"<DiskQueue {self.directory} pending={self.pending_items}"
            f" segments={self.segments} next_seq={self._next_seq}>"
        )


_E = TypeVar("_E", FsyncPolicy, OnFull)


def _choice(enum: type[_E], value: str, name: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}") from None
