"""`DiskQueue`: the durable FIFO of one API resource (format and guarantees: package docstring).

Threading contract: one thread (the event loop) calls everything except `sync()`, which may
run at the same time in one worker thread (`trio.to_thread.run_sync(queue.sync)`). A lock
guards the in-memory state; it is held for memory work and single write syscalls, never
across an fsync of segment data.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from bisect import bisect_right
from collections.abc import Callable
from enum import StrEnum
from itertools import accumulate
from types import TracebackType
from typing import TypeVar

from traits_agent.queue.checkpoint import Checkpoint, CheckpointFile
from traits_agent.queue.errors import QueueClosedError, QueueLockedError, QueueWriteError
from traits_agent.queue.files import make_dirs, open_private
from traits_agent.queue.framing import HEADER_SIZE, MAX_PAYLOAD, SEAL_FRAME_SIZE, encode_seal
from traits_agent.queue.reader import Batch, LogReader
from traits_agent.queue.recovery import (
    NotASegmentError,
    RecoveryReport,
    move_aside,
    recover,
    summarize_file,
)
from traits_agent.queue.segments import Position, SegmentInfo, segment_name
from traits_agent.queue.writer import SegmentWriter

DEFAULT_SEGMENT_BYTES = 8 << 20
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_BUFFER_BYTES = 16 << 20
"""Bytes appended but not yet accepted by the OS (only grows while writes fail)."""
DEFAULT_RETAIN_BYTES = 32 << 20
"""Bytes written but not yet fsynced kept in memory to write again if the fsync fails."""
SEQ_LEASE = 1 << 24
ROTATE_DRAINED_BYTES = 1 << 20
#: drop_oldest ranges remembered for a batch in flight (one lane, one batch at a time)
_DROPPED_RANGES_KEPT = 16
"""A fully delivered active segment this big is replaced by a fresh one (and deleted), so
delivered records hold at most this much of it whatever `segment_bytes` is; after a write
error (a full disk: their space is what is missing) at any size."""
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
    dropped_oldest, dropped_newest, dropped_write_error, dropped_dir_deleted, checkpoint_errors,
    delete_errors, fsync_in_doubt, dir_recreated, rotated_drained; and, as properties,
    corrupt_skipped, missing_skipped, read_errors, read_retries (with read_error).
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
        rotate_drained_bytes: int = ROTATE_DRAINED_BYTES,
        moved_aside: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.fsync_policy = fsync
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.on_full = on_full
        self._max_buffer = max_buffer_bytes
        self._lock_fd, self._dir_fd = lock_fd, dir_fd
        st = os.fstat(dir_fd)
        self._dir_id = (st.st_dev, st.st_ino)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._closed = False

        state = recover(directory, dir_fd)
        self.recovery: RecoveryReport = state.report
        self.recovery.moved_aside[:0] = moved_aside or []
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
        self._unverified = sum(1 for s in self._segs if not s.verified)
        self._verify_retries = 0
        self._verify_error: OSError | None = None

        self.dropped_oldest = 0
        self.dropped_newest = 0
        self.dropped_write_error = 0
        self.appended_total = 0
        self.committed_total = 0
        #: seq ranges [lo, hi) that drop_oldest passed over, newest last (see `_undrop_delivered`)
        self._dropped_seqs: list[tuple[int, int]] = []
        self.checkpoint_errors = 0
        """Checkpoint writes that failed (each can only cause re-delivery)."""
        self.delete_errors = 0
        self.fsync_in_doubt = 0
        """Records whose fsync failed after they had left the retain buffer (see sync)."""
        self.dir_recreated = 0
        self._dir_error: QueueWriteError | None = None
        """Times the queue directory was found deleted (or replaced) and made again."""
        self.dropped_dir_deleted = 0
        """Records lost with a deleted queue directory (in its files and no longer in memory)."""
        self.emptied_for_space = 0
        """Delivered segments truncated to make room for the checkpoint on a full disk."""
        self.rotated_drained = 0
        """Active segments replaced because all they held was delivered (space returned)."""
        self._rotate_bytes = rotate_drained_bytes
        self.sync_requested: Callable[[], None] | None = None
        """Set by the owner (the agent: its group-commit Syncer) to have `commit` keep every
        fsync out of the caller's thread: segments that a commit completes are then deleted
        by the next `sync()` or `settle()`, behind the durable checkpoint they wait for, and
        `commit` calls this (on the owner thread) to ask for one soon. None (the default):
        `commit` stores that checkpoint durably and deletes them itself."""

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
        rotate_drained_bytes: int = ROTATE_DRAINED_BYTES,
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
        make_dirs(path)
        moved = move_aside(path, LOCK_NAME)  # a directory there must not stop start-up
        lock_fd = open_private(os.path.join(path, LOCK_NAME), os.O_RDWR)
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
                    rotate_drained_bytes=max(1, rotate_drained_bytes),
                    moved_aside=[f"{LOCK_NAME} -> {moved}"] if moved else [],
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
                self._cp.close()
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
            if self._total + size > self.max_bytes and not self._room_past_delivered(size):
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

    def append_many(
        self, payloads: list[bytes], crcs: bytes | None = None, *, lines: bool = False
    ) -> int:
        """`append` each of `payloads` in order; returns how many were taken. `crcs`: their
        `framing.record_crcs`, when the caller computed it (not checked here: a wrong one
        makes the records read back as damaged). `lines`: the caller split `payloads` off a
        b"\n"-joined blob, so none holds a newline (not checked either: see `encode_frames`).

        The same checks, counters and segment changes as one `append` per record: each run of
        records that fits the buffer, the quota and the current segment (the common case) is
        framed in one pass under one lock, and the record that does not fit goes through
        `append` (which starts the next segment, makes room or drops, as it always does).
        Raises ValueError, before taking any, if a payload is over MAX_PAYLOAD.
        """
        nbytes = sum(map(len, payloads))
        # (the largest is looked for only when all of them together could hold one too big)
        if nbytes > MAX_PAYLOAD and max(map(len, payloads)) > MAX_PAYLOAD:
            raise ValueError(f"a payload is over the {MAX_PAYLOAD} limit")
        whole = nbytes + HEADER_SIZE * len(payloads)
        with self._lock:  # the common case: all of it fits (checked as one-record frames)
            if self._closed:
                raise QueueClosedError("append on a closed queue")
            seg = self._segs[-1]
            if payloads and whole <= min(
                self._max_buffer - self._writer.buffered,
                self.max_bytes - self._total,
                self.segment_bytes - SEAL_FRAME_SIZE - seg.size,
            ):
                self._took_run(seg, payloads, crcs, lines)
                return len(payloads)
        ends = list(accumulate(HEADER_SIZE + len(p) for p in payloads))  # of payloads[:j + 1]
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
                if j > i:  # (sized as one-record frames: what they take is never more)
                    self._took_run(
                        seg, payloads[i:j], None if crcs is None else crcs[4 * i : 4 * j], lines
                    )
                    taken += j - i
                    i = j
                    continue
            taken += self.append(payloads[i])
            i += 1
        return taken

    def _took_run(
        self, seg: SegmentInfo, payloads: list[bytes], crcs: bytes | None, lines: bool
    ) -> None:
        """Frame `payloads` (known to fit) at the end of `seg`, the lock held."""
        n, seq = len(payloads), self._next_seq
        self._next_seq = seq + n
        size = self._writer.add_many(seg, seg.size, seq, payloads, crcs, lines=lines)
        seg.size += size
        seg.count += n
        seg.last_seq = seq + n - 1
        self._total += size
        self._records += n
        self.appended_total += n

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
            if self._dir_gone() and self._sync_lock.acquire(blocking=False):
                try:  # (a sync running now holds fds it fsyncs: it does this itself)
                    self._recreate_dir()
                finally:
                    self._sync_lock.release()
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
            if self._dir_gone():
                self._recreate_dir()
            if self._drained_active():  # a commit could not rotate while we were syncing
                self._rotate_locked()
                # (the segment it leaves is deleted by _settle below, behind its checkpoint)
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
        self._settle()
        if error is not None:
            raise error

    def settle(self) -> None:
        """Store the checkpoint durably if it is not, then delete the segments it has passed
        (what `sync()` does after its fsyncs, without fsyncing segment data: for
        fsync="never"). Blocking, like `sync()`: run it in a worker thread. A no-op after
        close."""
        with self._sync_lock:
            if self._closed:
                return
            self._settle()

    def _settle(self) -> None:
        """The checkpoint work of a sync (sync lock held, queue lock not): one durable store
        if needed, with the queue lock released so that appends and commits go on meanwhile;
        then the segments wholly before the stored position are deleted. Also raises the seq
        lease ahead of need, so that `flush` (the caller's thread) practically never has to."""
        with self._lock:
            if self._next_seq > self._lease - (3 * SEQ_LEASE) // 4:
                lease = self._next_seq + SEQ_LEASE
            else:
                lease = self._lease
            cp = Checkpoint(self._cursor, lease)
            deletable = self._segs[0].number < cp.position.segment
            if not (deletable or lease != self._lease or self._cp.dirty):
                return
            checkpoint = self._cp
        try:
            checkpoint.store(cp, durable=True)
        except OSError as e:
            with self._lock:
                # a full disk without reserve: the delivered segments hold the space the
                # checkpoint needs; empty them first (see _delete_delivered)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not (
                    deletable and checkpoint is self._cp and self._empty_delivered()
                ):
                    self.checkpoint_errors += 1
                    return
            try:
                checkpoint.store(cp, durable=True)
            except OSError:
                with self._lock:
                    self.checkpoint_errors += 1
                return
        with self._lock:
            if checkpoint is not self._cp:  # the directory was made again meanwhile
                return
            self._lease = max(self._lease, lease)
            while len(self._segs) > 1 and self._segs[0].number < cp.position.segment:
                self._delete_segment(self._segs[0])
        if deletable:
            checkpoint.ensure_reserve()

    def _dir_gone(self) -> bool:
        """The queue directory was deleted (or replaced) behind our back: writes would go to
        files nobody can open again. One stat per flush."""
        try:
            st = os.stat(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False  # EACCES, EMFILE...: says nothing; the writes will tell
        return (st.st_dev, st.st_ino) != self._dir_id

    def _recreate_dir(self) -> None:
        """Make the directory again (0700), lock it, and go on there (both locks held).

        What was in its files is gone with them, except what memory still holds: bytes not
        yet written and those written since the last fsync (the retain buffer, as after a
        failed fsync) are written again to a fresh segment. The undelivered records lost are
        counted in `dropped_dir_deleted`. Raises QueueWriteError if it cannot be made.
        """
        try:
            make_dirs(self.directory)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self._dir_error = QueueWriteError.wrap(f"recreate {self.directory}", e)
            raise self._dir_error from e
        lock_fd = -1
        try:
            lock_fd = open_private(os.path.join(self.directory, LOCK_NAME), os.O_RDWR)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # (EWOULDBLOCK: another queue opened the new one first)
            os.close(dir_fd)
            if lock_fd >= 0:
                os.close(lock_fd)
            self._dir_error = QueueWriteError.wrap(f"lock recreated {self.directory}", e)
            raise self._dir_error from e
        self._dir_error = None
        before = self.pending_items
        os.close(self._lock_fd)
        os.close(self._dir_fd)
        self._lock_fd, self._dir_fd = lock_fd, dir_fd
        st = os.fstat(dir_fd)
        self._dir_id = (st.st_dev, st.st_ino)
        self._reader.close()
        self._writer.set_dir_fd(dir_fd)
        self._writer.sync_failed(
            self._segs, self._cursor.next_seq, self._next_seq, self._durable_seq
        )
        fresh = self._segs[-1]
        del self._segs[:-1]
        self._unverified = 0
        self._total, self._records = fresh.size, fresh.count
        self._cursor = Position(fresh.number, 0, self._cursor.next_seq)
        self.dropped_dir_deleted += max(0, before - self.pending_items)
        self.dir_recreated += 1
        self._cp.close()
        self._cp = CheckpointFile(self.directory, dir_fd)
        try:
            self._cp.store(Checkpoint(self._cursor, self._lease), durable=True)
        except OSError:
            self.checkpoint_errors += 1
        self._cp.ensure_reserve()

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

    def _room_past_delivered(self, size: int) -> bool:
        """The quota is reached: whether `size` more bytes may go in (making room per
        `on_full`). Delivered segments that wait for the syncer's round (`sync_requested`)
        are no backlog: they do not count, and the round is asked for (their deletion needs
        a durable checkpoint: an fsync, kept off the caller's thread); the disk holds them
        past the quota until then. Without a syncer they are deleted here."""
        if self._segs[0].number < self._cursor.segment:
            if self.sync_requested is None:
                self._delete_delivered()
            elif self.held_bytes + size <= self.max_bytes:
                self.sync_requested()
                return True
        return self._total + size <= self.max_bytes or self._make_room(size)

    def _make_room(self, size: int) -> bool:
        """drop_oldest: delete whole oldest segments until `size` more bytes fit the quota.

        The checkpoint moves past them durably first. A batch in flight over a dropped
        segment is not disturbed: its records are counted as dropped now (after a crash they
        are gone), and when that batch is committed after all they are counted back out of
        `dropped_oldest` (see `commit`), so a record is never both dropped and delivered.
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
            if moved.next_seq > cur.next_seq:
                ranges = self._dropped_seqs
                if ranges and ranges[-1][1] == cur.next_seq:  # drops follow each other
                    ranges[-1] = (ranges[-1][0], moved.next_seq)
                else:
                    ranges.append((cur.next_seq, moved.next_seq))
                    del ranges[:-_DROPPED_RANGES_KEPT]
        return True

    def _undrop_delivered(self, batch: Batch) -> None:
        """Records of `batch` that drop_oldest passed over while it was in flight, and that
        were delivered after all: count them delivered, not dropped."""
        ranges = self._dropped_seqs
        if not ranges or batch.seqs[0] >= ranges[-1][1]:
            return
        overtaken = sum(1 for s in batch.seqs if any(lo <= s < hi for lo, hi in ranges))
        self.dropped_oldest -= overtaken
        self.committed_total += overtaken
        # a batch is committed once, and later batches start after it
        self._dropped_seqs = [
            (max(lo, batch.seqs[-1] + 1), hi) for lo, hi in ranges if hi > batch.seqs[-1] + 1
        ]

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
            if self._unverified:
                self._verify()
            return self._reader.read(self._segs, self._cursor, max_items, max_bytes)

    def _verify(self) -> None:
        """Read the summary of segments recovery could not read (EMFILE, EACCES, EIO...).

        Until one is read, readers stop before it: its records are never skipped. Something
        other than a regular file in its place is skipped and counted in `read_errors`.
        """
        self._verify_error = None
        for seg in list(self._segs):
            if seg.verified:
                continue
            try:
                info = summarize_file(self.directory, seg.number)
            except NotASegmentError:
                self._segs.remove(seg)
                self._reader.read_errors += 1
            except OSError as e:
                self._verify_retries += 1
                self._verify_error = e
                return  # the ones after it wait too: delivery is in order
            else:
                if info.count:
                    seg.first_seq, seg.last_seq = info.first_seq, info.last_seq
                seg.count, seg.size, seg.readable = info.count, info.size, info.size
                self._total += info.size
                self._records += info.count
            seg.verified = True
            self._unverified -= 1
            self._reader.invalidate()

    # -- committing -------------------------------------------------------------------------

    def commit(self, batch_or_end: Batch | Position) -> None:
        """Mark everything before the batch's end delivered.

        A position at or behind the delivered one (e.g. of a batch whose segment drop_oldest
        removed meanwhile) is a no-op, but for the count: records of such a batch leave
        `dropped_oldest`, since they were delivered. Inside a segment the checkpoint is
        written without fsync (the next `sync()` makes it durable); when segments become fully
        delivered it is written durably and then they are deleted. Write failures are counted in
        `checkpoint_errors`, never raised: they can only cause re-delivery.
        """
        end = batch_or_end.end if isinstance(batch_or_end, Batch) else batch_or_end
        with self._lock:
            if self._closed:
                raise QueueClosedError("commit on a closed queue")
            cur = self._cursor
            if isinstance(batch_or_end, Batch) and batch_or_end.seqs:
                self._undrop_delivered(batch_or_end)
            if end <= cur:
                return
            if (end.segment, end.offset) > (self._segs[-1].number, self._segs[-1].readable):
                raise ValueError(f"{end} is beyond the end of the queue")
            before = self.pending_items
            self._cursor = end
            self.committed_total += before - self.pending_items
            self._reader.invalidate()
            if self._drained_active():
                self._rotate_drained()
            deletable = self._segs[0].number < self._cursor.segment
            if deletable and self.sync_requested is None:
                self._delete_delivered()
                return
            try:  # one pwrite: a process crash resumes here (the next sync makes it durable)
                self._cp.store(Checkpoint(self._cursor, self._lease), durable=False)
            except OSError:
                self.checkpoint_errors += 1
        if deletable and self.sync_requested is not None:
            self.sync_requested()  # deleted by that sync, behind a durable checkpoint

    def _drained_active(self) -> bool:
        """Everything the OS holds of the active segment is delivered, and it is worth
        replacing: big, or the disk refused a write (its space is what is missing)."""
        seg, cur = self._segs[-1], self._cursor
        return (
            seg.on_disk
            and seg.readable > 0  # an empty file frees nothing: no churn on a full disk
            and cur.segment == seg.number
            and cur.offset >= seg.readable
            and (seg.readable >= self._rotate_bytes or self._writer.write_error is not None)
        )

    def _rotate_drained(self) -> None:
        """From `commit`: rotate unless a sync is fsyncing in a worker thread right now (it
        holds fds of the old file); that sync rotates when it is done."""
        if not self._sync_lock.acquire(blocking=False):
            return
        try:
            self._rotate_locked()
        finally:
            self._sync_lock.release()

    def _rotate_locked(self) -> None:
        """Start a fresh active segment so the drained one can be deleted (both locks held).

        Bytes not yet taken by the OS (a short write on a full disk leaves a partial frame
        at the end of the old file) move to the new segment whole, as after a failed fsync.
        The caller then deletes the old segment behind a durable checkpoint.
        """
        delta, _ = self._writer.sync_failed(
            self._segs, self._cursor.next_seq, self._next_seq, self._durable_seq
        )
        # what sync_failed would count as in doubt was written, so read, so delivered: the
        # cursor is past everything the OS took
        self._total += delta
        self._records = sum(s.count for s in self._segs)
        self._cursor = Position(self._segs[-1].number, 0, self._cursor.next_seq)
        self._reader.invalidate()
        self.rotated_drained += 1

    def _delete_delivered(self) -> None:
        cp = Checkpoint(self._cursor, self._lease)
        try:
            self._cp.store(cp, durable=True)
        except OSError as e:
            # A full disk whose reserve the writer's retries have eaten: the delivered
            # segments hold the space the checkpoint needs. Their records are all delivered,
            # so emptying them first loses nothing (a crash before the checkpoint is stored
            # can only skip re-delivering them); then the checkpoint fits.
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._empty_delivered():
                self.checkpoint_errors += 1
                return  # keep them; the next commit or sync tries again
            try:
                self._cp.store(cp, durable=True)
            except OSError:
                self.checkpoint_errors += 1
                return
        while self._segs[0].number < self._cursor.segment:
            self._delete_segment(self._segs[0])
        self._cp.ensure_reserve()

    def _empty_delivered(self) -> bool:
        """Truncate the fully delivered segments to 0 bytes; True if any space came back."""
        freed = False
        for seg in self._segs:
            if seg.number >= self._cursor.segment:
                break
            if not seg.on_disk or not seg.readable:
                continue
            self._reader.forget(seg.number)
            try:
                os.truncate(os.path.join(self.directory, segment_name(seg.number)), 0)
            except OSError:
                continue
            self.emptied_for_space += 1
            freed = True
        return freed

    def _delete_segment(self, seg: SegmentInfo) -> None:
        """Forget and unlink a segment (never the newest; the checkpoint is past it)."""
        self._segs.remove(seg)
        self._total -= seg.size
        self._records -= seg.count
        if not seg.verified:
            self._unverified -= 1
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
        """Segments skipped because something other than a regular file took their name."""
        return self._reader.read_errors

    @property
    def read_retries(self) -> int:
        """Reads stopped by an error that proves nothing about the data (EMFILE, ENFILE,
        EACCES, EIO...): nothing was skipped; the next read tries again from there."""
        return self._reader.read_retries + self._verify_retries

    @property
    def read_error(self) -> OSError | None:
        """What stopped the last read (or a segment recovery could not read), else None."""
        return self._reader.read_error or self._verify_error

    @property
    def pending_items(self) -> int:
        """Records appended and not yet delivered (damaged ones count until read past; a
        segment recovery could not read yet counts as one, so that delivery keeps trying)."""
        cur = self._cursor
        done = 0
        for seg in self._segs:  # segments before the delivered one are normally gone already
            if seg.number < cur.segment:
                done += seg.count
                continue
            done += min(seg.count, max(0, cur.next_seq - seg.first_seq))
            break
        return max(0, self._records - done) + self._unverified

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
    def held_bytes(self) -> int:
        """`disk_bytes` but for segments wholly delivered that wait for the syncer's round to
        delete them (`sync_requested`): what the other queues of a shared quota must leave
        room for (those bytes go within one sync interval, and are no backlog)."""
        cur = self._cursor.segment
        return self._total - sum(seg.size for seg in self._segs if seg.number < cur)

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
        """The error of the last failed write (or of making a deleted queue directory
        again), until a write succeeds."""
        return self._dir_error or self._writer.write_error

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
