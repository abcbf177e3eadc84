"""Open-time recovery: turn whatever is in the directory into a consistent starting state.

It never refuses to start on bad data, and it reads only what it must: the whole newest segment
(to find the tail) and the seal record of each older one (its count and seqs; a segment with
no seal, from a crash mid-rotation, is scanned). Memory is O(segments).
The rules are listed in the package docstring; `RecoveryReport` says what was found.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import asdict, dataclass, field

from traits_agent.queue.checkpoint import (
    CHECKPOINT_NAME,
    TEMP_NAME,
    Checkpoint,
    CheckpointFile,
    remove_stale_temp,
)
from traits_agent.queue.framing import SEAL_SEQ, FrameReader
from traits_agent.queue.segments import (
    Position,
    ScanResult,
    SegmentInfo,
    list_segments,
    scan_segment,
    segment_name,
    summarize,
)


@dataclass
class RecoveryReport:
    """What `DiskQueue.open` found. Every non-zero field but the first three is a finding."""

    records_queued: int = 0
    """Records waiting for delivery after recovery."""
    segments: int = 0
    bytes_queued: int = 0
    torn_bytes_truncated: int = 0
    """Bytes cut from the end of the newest segment: a record whose write never finished."""
    corrupt_records_skipped: int = 0
    """Damaged regions in the newest segment with good records after them (each usually one
    record). Older segments are not scanned at open; damage there is counted by reads."""
    corrupt_bytes_skipped: int = 0
    missing_segments: list[int] = field(default_factory=list)
    """Segment numbers absent between the checkpoint and the newest segment (the first
    MAX_LISTED of them: a stray file numbered 10**7 must not cost a list of 10**7)."""
    missing_segment_count: int = 0
    checkpoint_fallback: str | None = None
    """Why the checkpoint was unusable ("missing", "corrupt", ...): delivery restarts at the
    oldest segment, so records may be delivered twice (never lost)."""
    checkpoint_adjusted: str | None = None
    """The checkpoint was usable but pointed at a missing or shortened segment: how it moved."""
    delivered_segments_deleted: int = 0
    """Segments wholly before the checkpoint (a crash between checkpoint and delete)."""
    unreadable_segments: list[str] = field(default_factory=list)
    """Segment files that could not be read. Something other than a regular file under a
    segment's name is left in place and skipped; any other error (EMFILE, EACCES, EIO...)
    proves nothing about the data: the segment is kept, and delivery waits at it until it
    can be read (`DiskQueue.read_retries`). The first MAX_LISTED; the count is exact."""
    unreadable_segment_count: int = 0
    stale_temp_removed: bool = False
    moved_aside: list[str] = field(default_factory=list)
    """Non-files (a directory...) found where the checkpoint, its temp file or the lock go,
    renamed to ``<name>.stray-N`` so that the queue can use the name."""

    @property
    def has_findings(self) -> bool:
        """Anything beyond a clean shutdown's state (a leftover temp file is not worth it)."""
        return bool(
            self.torn_bytes_truncated
            or self.corrupt_records_skipped
            or self.missing_segments
            or self.checkpoint_fallback
            or self.checkpoint_adjusted
            or self.delivered_segments_deleted
            or self.unreadable_segments
            or self.moved_aside
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Recovered:
    """The state the queue starts from."""

    segments: list[SegmentInfo]
    """Oldest first; the last one is the one appends go to (maybe not yet created)."""
    cursor: Position
    next_seq: int
    checkpoint: CheckpointFile
    report: RecoveryReport
    to_seal: SegmentInfo | None
    """The previous run's newest segment, if it still needs its seal record."""


def recover(directory: str, dir_fd: int) -> Recovered:
    """Recover the queue in `directory` (which the caller has locked)."""
    report = RecoveryReport()
    for name in (TEMP_NAME, CHECKPOINT_NAME):
        aside = move_aside(directory, name)
        if aside is not None:
            report.moved_aside.append(f"{name} -> {aside}")
    report.stale_temp_removed = remove_stale_temp(directory)
    cp_file = CheckpointFile(directory, dir_fd)
    cp, problem = cp_file.load()
    numbers = list_segments(directory)
    if cp is None and numbers:
        report.checkpoint_fallback = problem
    if cp is not None:
        for n in [n for n in numbers if n < cp.position.segment]:
            _unlink(directory, n)
            report.delivered_segments_deleted += 1
        numbers = [n for n in numbers if n >= cp.position.segment]
    if numbers:
        low = cp.position.segment if cp is not None else numbers[0]
        report.missing_segment_count, report.missing_segments = _gaps(low, numbers)

    segments: list[SegmentInfo] = []
    newest_sealed = False
    for n in numbers:
        try:
            if n == numbers[-1]:
                info, newest_sealed = _recover_tail(directory, n, report)
            else:
                info = summarize_file(directory, n)
        except NotASegmentError as e:  # not our data: leave it alone, deliver the rest
            report.unreadable_segment_count += 1
            if len(report.unreadable_segments) < MAX_LISTED:
                report.unreadable_segments.append(f"{segment_name(n)}: {e}")
            continue
        except OSError as e:  # proves nothing about the data: keep it, read it later
            report.unreadable_segment_count += 1
            if len(report.unreadable_segments) < MAX_LISTED:
                report.unreadable_segments.append(f"{segment_name(n)}: {e.strerror} (kept)")
            info = SegmentInfo(n, first_seq=-1, on_disk=True, verified=False)
        segments.append(info)

    last_seq = max((s.last_seq for s in segments), default=0)
    floor = 1
    if cp is not None:
        floor = max(cp.position.next_seq, cp.seq_lease)
    next_seq = max(floor, last_seq + 1)
    unverified = sum(1 for s in segments if not s.verified)
    if cp is None and unverified:
        # No lease tells which seqs the unread segments hold: start far above anything they
        # can (each run starts at most 2**24 above the last; seqs are u64).
        next_seq += unverified << 40
    # Segments with no readable record take the first seq of the one after them; unread
    # ones the lowest their records can have (readers then skip none of them).
    following = next_seq
    for seg in reversed(segments):
        if seg.count == 0 and seg.verified:
            seg.first_seq = following
        following = seg.first_seq
    lowest = cp.position.next_seq if cp is not None else 1
    for seg in segments:
        if not seg.verified:
            seg.first_seq = lowest
        elif seg.last_seq >= 0:
            lowest = seg.last_seq + 1

    # Appends go to a segment of their own: each segment is written by one run only, so its
    # seqs are consecutive (a restart after a crash starts higher: see the seq lease).
    to_seal = None
    newest = segments[-1] if segments else None
    if newest is not None and newest.number == numbers[-1] and newest.size == 0 and newest.verified:
        pass  # an empty newest segment: append to it
    else:
        if (
            newest is not None
            and newest.number == numbers[-1]
            and newest.verified
            and not newest_sealed
        ):
            to_seal = newest if newest.count else None
        number = numbers[-1] + 1 if numbers else cp.position.segment if cp is not None else 0
        segments.append(SegmentInfo(number, first_seq=next_seq))
    cursor = _place_cursor(directory, cp, segments, report)
    report.segments = sum(1 for s in segments if s.on_disk)
    report.bytes_queued = sum(s.size for s in segments)
    return Recovered(segments, cursor, next_seq, cp_file, report, to_seal)


MAX_LISTED = 100
"""Longest list a report carries (the counts are exact)."""


def _gaps(low: int, numbers: list[int]) -> tuple[int, list[int]]:
    """How many numbers in [low, numbers[-1]) are absent, and the first MAX_LISTED of them.

    Walks the gaps between present numbers: O(len(numbers)), whatever the numbers are.
    """
    count, expected = 0, low
    listed: list[int] = []
    for n in numbers:
        if n > expected:
            count += n - expected
            listed.extend(range(expected, min(n, expected + MAX_LISTED - len(listed))))
        expected = max(expected, n + 1)
    return count, listed


def move_aside(directory: str, name: str) -> str | None:
    """If `name` is not a regular file (a directory, a fifo...), rename it out of the way.

    Returns the new name, or None if `name` is a regular file or absent. Raises OSError if
    it is in the way and cannot be moved (the caller cannot go on then).
    """
    path = os.path.join(directory, name)
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            return None
    except FileNotFoundError:
        return None
    for n in range(1, 1000):
        aside = f"{name}.stray-{n}"
        if not os.path.lexists(os.path.join(directory, aside)):
            os.rename(path, os.path.join(directory, aside))
            return aside
    raise OSError(f"{path} is not a regular file and no free name to move it aside")


def _path(directory: str, number: int) -> str:
    return os.path.join(directory, segment_name(number))


def _unlink(directory: str, number: int) -> None:
    """Remove a delivered segment; one that will not go (a directory in its place, EACCES)
    is left for the next open: it is before the checkpoint, so nothing reads it."""
    with contextlib.suppress(OSError):
        os.unlink(_path(directory, number))


class NotASegmentError(OSError):
    """Something other than a regular file has a segment's name (a directory, a fifo...)."""


def open_segment(directory: str, number: int, flags: int) -> int:
    """Open a segment file; NotASegmentError if its name is not a regular file.

    O_NONBLOCK: a fifo under the name must not hang start-up (no effect on regular files).
    """
    path = _path(directory, number)
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    except IsADirectoryError:
        raise NotASegmentError(f"{path} is a directory") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotASegmentError(f"{path} is not a regular file (mode {mode:o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _info(number: int, scan: ScanResult, size: int) -> SegmentInfo:
    return SegmentInfo(
        number,
        first_seq=scan.first_seq if scan.first_seq is not None else -1,
        last_seq=scan.last_seq if scan.last_seq is not None else -1,
        count=scan.records,
        size=size,
        readable=size,
        on_disk=True,
    )


def summarize_file(directory: str, number: int) -> SegmentInfo:
    """An older segment: its summary from the seal record (a full scan only if it has none).

    It is fsynced too: the previous run may have crashed before doing so, and records found
    here count as durable from now on (a no-op for a clean file).
    """
    fd = open_segment(directory, number, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        scan = summarize(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _info(number, scan, size)


def _recover_tail(directory: str, number: int, report: RecoveryReport) -> tuple[SegmentInfo, bool]:
    """Scan the newest segment whole; cut off a torn tail. Returns (info, ends with a seal)."""
    fd = open_segment(directory, number, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        scan = scan_segment(fd, size)
        if scan.end < size:
            os.ftruncate(fd, scan.end)
            report.torn_bytes_truncated += size - scan.end
        os.fsync(fd)
        report.corrupt_records_skipped += scan.damaged_regions
        report.corrupt_bytes_skipped += scan.damaged_bytes
    finally:
        os.close(fd)
    return _info(number, scan, scan.end), scan.sealed


def _place_cursor(
    directory: str, cp: Checkpoint | None, segments: list[SegmentInfo], report: RecoveryReport
) -> Position:
    """Where delivery resumes: the checkpoint if it checks out, else the nearest safe place."""
    oldest = segments[0]
    if cp is None:
        return Position(oldest.number, 0, oldest.first_seq)
    pos = cp.position
    if not oldest.verified:  # cannot check it yet: trust it
        return pos
    if oldest.number != pos.segment or not oldest.on_disk:
        # Its segment is gone: resume at the start of the next one (all segments before the
        # checkpoint have been removed above, so that is the oldest).
        if pos.offset or oldest.number != pos.segment:
            report.checkpoint_adjusted = (
                f"segment {pos.segment} missing, resuming at segment {oldest.number}"
            )
        return Position(oldest.number, 0, pos.next_seq)
    if pos.offset == oldest.readable:
        return pos
    if pos.offset < oldest.readable:
        try:
            fd = os.open(_path(directory, oldest.number), os.O_RDONLY | os.O_CLOEXEC)
            try:
                reader = FrameReader(fd, oldest.readable)
                head = reader.header(pos.offset)
                if head is not None and (
                    head.seq == SEAL_SEQ or head.seq <= pos.next_seq <= head.last_seq
                ):
                    return pos
                offset = _first_at_or_after(reader, pos.next_seq)
            finally:
                os.close(fd)
        except OSError:  # cannot check it: trust it (reads will skip what is unreadable)
            return pos
    else:
        offset = oldest.readable
    report.checkpoint_adjusted = (
        f"segment {pos.segment} offset {pos.offset} is not a record boundary with seq"
        f" {pos.next_seq}; resuming at offset {offset}"
    )
    return Position(oldest.number, offset, pos.next_seq)


def _first_at_or_after(reader: FrameReader, seq: int) -> int:
    """Offset of the first valid frame holding a seq >= `seq` (or the end): one segment
    scan. (A several-records frame holding `seq` and earlier ones: readers step over those.)"""
    pos = 0
    while pos < reader.end:
        frame = reader.frame(pos)
        if frame is None:
            pos = reader.after_damage(pos)
            continue
        if frame.last_seq >= seq:
            return pos
        pos += frame.size
    return reader.end
