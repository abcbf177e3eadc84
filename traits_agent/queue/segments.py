"""Segment files: names, positions, and the scans recovery needs.

A segment is one file `NNNNNNNNNNNNNNNNNNNN.seg` (the segment number, zero-padded to 20
digits so names sort like numbers) holding frames back to back from offset 0. Only the newest
segment is ever appended to, and only by the run that created it; older ones are only read,
then deleted whole. A segment that is complete ends with a seal record (count, first and last
seq), so recovery learns its summary from its last 56 bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from traits_agent.queue.framing import (
    SEAL_FRAME_SIZE,
    SEAL_SEQ,
    FrameReader,
    decode_seal,
)

SEGMENT_SUFFIX = ".seg"
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")


def segment_name(number: int) -> str:
    return f"{number:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: str) -> list[int]:
    """Numbers of the segment files in `directory`, oldest first (other files are ignored)."""
    numbers = []
    for name in os.listdir(directory):
        m = _SEGMENT_RE.match(name)
        if m:
            numbers.append(int(m.group(1)))
    return sorted(numbers)


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in the log: byte `offset` in segment `segment`, and the seq expected there.

    Opaque to callers (they get one in `Batch.end` and hand it back to `commit`). `offset` is
    the start of a frame (or the end of the data); `next_seq` says every record with a smaller
    seq is before this point, so a position can fall inside a several-records frame: at its
    start, with `next_seq` naming the first record not yet passed. Ordered by (segment,
    offset, next_seq).
    """

    segment: int
    offset: int
    next_seq: int


@dataclass(slots=True)
class SegmentInfo:
    """What the queue keeps in memory per segment: O(segments), never O(records)."""

    number: int
    first_seq: int
    """Seq of its first record (for an empty or unreadable segment: the next one's)."""
    last_seq: int = -1
    count: int = 0
    """Records in it (buffered ones too). Seqs within a segment are consecutive, so the
    records after a position are `last_seq - position.next_seq + 1`."""
    size: int = 0
    """Bytes it holds, including those still in the write buffer (quota and rotation)."""
    readable: int = 0
    """End of the last whole frame handed to the OS: readers stop here."""
    on_disk: bool = False
    """The file exists (it is created when its first bytes are flushed)."""
    verified: bool = True
    """False while recovery could not read it (EMFILE, EACCES, EIO...): its counts are
    unknown, readers stop before it and nothing is appended to it; `DiskQueue` reads its
    summary as soon as it can."""


@dataclass(slots=True)
class ScanResult:
    """What a full scan of one segment found."""

    end: int
    """Where valid data ends (a torn tail starts here)."""
    first_seq: int | None = None
    last_seq: int | None = None
    records: int = 0
    sealed: bool = False
    """It ends with a seal record."""
    damaged_regions: int = 0
    damaged_bytes: int = 0


def scan_segment(fd: int, size: int) -> ScanResult:
    """Walk every frame of a segment: count records and damage, find where valid data ends.

    Memory is one read block. Invalid bytes followed by a valid frame are a damaged region
    (skipped and counted); invalid bytes with no valid frame after them are a torn tail.
    """
    reader = FrameReader(fd, size)
    result = ScanResult(end=0)
    pos = 0
    while pos < reader.end:
        frame = reader.frame(pos)
        if frame is None and (found := reader.salvage(pos)) is not None:
            kept = found[0]  # a damaged payload, its header intact: keep what checks
            result.damaged_regions += 1
            if result.first_seq is None:
                result.first_seq = kept.seq
            result.last_seq = kept.last_seq
            # all of its records, as a seal or `append` counts them: the queue's pending count
            # is seq-based (`DiskQueue.pending_items`), and readers pass the lost ones
            result.records += kept.last_seq - kept.seq + 1
            result.sealed = False
            pos += kept.header_size + kept.length
            result.end = pos
            continue
        if frame is None:
            nxt = reader.after_damage(pos)
            if nxt >= reader.end:
                break
            head = reader.header(pos)
            if head is not None and head.seq != SEAL_SEQ:  # whole, its payload fails: its
                if result.first_seq is None:  # seqs are known, count them (as above)
                    result.first_seq = head.seq
                result.last_seq = head.last_seq
                result.records += head.last_seq - head.seq + 1
            result.damaged_regions += 1
            result.damaged_bytes += nxt - pos
            pos = nxt
            continue
        result.sealed = frame.seq == SEAL_SEQ
        if frame.seq != SEAL_SEQ:
            if result.first_seq is None:
                result.first_seq = frame.seq
            result.last_seq = frame.last_seq
            result.records += frame.last_seq - frame.seq + 1
        pos += frame.size
        result.end = pos
    return result


def summarize(fd: int, size: int) -> ScanResult:
    """A complete segment's summary: from its seal (one small read), else by a full scan."""
    if size >= SEAL_FRAME_SIZE:
        frame = FrameReader(fd, size).frame(size - SEAL_FRAME_SIZE)
        if frame is not None and frame.seq == SEAL_SEQ:
            seal = decode_seal(frame.payload)
            if seal is not None:
                count, first_seq, last_seq = seal
                return ScanResult(
                    end=size,
                    first_seq=first_seq if count else None,
                    last_seq=last_seq if count else None,
                    records=count,
                    sealed=True,
                )
    return scan_segment(fd, size)
