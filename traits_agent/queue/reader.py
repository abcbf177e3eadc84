"""The read side of the log: batches from the delivered position, straight from the files.

Nothing is cached but the batch in flight: records are read with `pread` (the page cache
serves recent ones), so memory does not grow with the backlog. The queue's lock is held
around every call.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from traits_agent.queue.framing import DAMAGED, FULL, FrameReader
from traits_agent.queue.segments import Position, SegmentInfo, segment_name

_RDONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # a fifo in its place must not hang us


@dataclass(frozen=True, slots=True)
class Batch:
    """Records read from the delivered position. Hand it (or `end`) to `commit`.

    Do not mutate `payloads`: until committed, the same Batch may be returned again.
    """

    payloads: list[bytes]
    seqs: list[int]
    """The seq of each payload: increasing, consecutive unless damaged records were skipped
    between them (so a part of the batch is named by its own seqs, never by arithmetic)."""
    first_seq: int
    last_seq: int
    start: Position
    end: Position
    nbytes: int
    """Sum of payload lengths."""

    def __len__(self) -> int:
        return len(self.payloads)


class _OpenSegment:
    """One read-only fd at a time: the segment being delivered (never the writer's fd)."""

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._number: int | None = None
        self._fd: int | None = None
        self._reader: FrameReader | None = None
        self.gone = ""
        """Why the last `open` returned None: "missing" or "not_a_file"."""

    def open(self, seg: SegmentInfo) -> FrameReader | None:
        """A reader over `seg` up to `seg.readable`; None if its file is proven gone: no such
        name (deleted behind our back), or something other than a regular file in its place.

        Raises OSError for anything else (EMFILE, ENFILE, EACCES, EIO, ...): that says
        nothing about the data, so the caller must stop there and try again later.
        """
        if self._number != seg.number or self._reader is None:
            self.close()
            try:
                fd = os.open(os.path.join(self._dir, segment_name(seg.number)), _RDONLY)
            except FileNotFoundError:
                self.gone = "missing"
                return None
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
            except BaseException:
                os.close(fd)
                raise
            if not regular:
                os.close(fd)
                self.gone = "not_a_file"
                return None
            self._number, self._fd, self._reader = seg.number, fd, FrameReader(fd, seg.readable)
        else:
            self._reader.end = seg.readable
        return self._reader

    def forget(self, number: int) -> None:
        if self._number == number:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._number = self._fd = self._reader = None


class LogReader:
    """Cuts batches; remembers the one in flight so re-reads do not rescan."""

    def __init__(self, directory: str, start: Position) -> None:
        self._files = _OpenSegment(directory)
        self._last: Batch | None = None
        self._last_limits = (0, 0)
        self._last_full = False
        self._scanned = (start.segment, start.offset)  # damage before this is counted already
        self.corrupt_skipped = 0
        self.missing_skipped = 0
        self.read_errors = 0
        """Segments skipped because something other than a regular file took their name."""
        self.read_retries = 0
        """Reads stopped by an error that proves nothing about the data (tried again later)."""
        self.read_error: OSError | None = None
        """The error that stopped the last read, or None if it went through."""

    def read(
        self, segs: list[SegmentInfo], cursor: Position, max_items: int, max_bytes: int
    ) -> Batch | None:
        limits = (max_items, max_bytes)
        cached = self._last
        if cached is not None and (cached.start != cursor or self._last_limits != limits):
            cached = None
        if cached is None:
            payloads: list[bytes] = []
            seqs: list[int] = []
            start, nbytes, first = cursor, 0, -1
        elif self._last_full:
            return cached
        else:  # not full last time: carry on from where it ended
            payloads, seqs = list(cached.payloads), list(cached.seqs)
            start, nbytes, first = cached.end, cached.nbytes, cached.first_seq
        end, full, taken, first_new = self._read(
            segs, start, payloads, seqs, max_items, max_bytes - nbytes
        )
        if not payloads:
            self._last = None
            return None
        batch = Batch(
            payloads=payloads,
            seqs=seqs,
            first_seq=first if first >= 0 else first_new,
            last_seq=seqs[-1],
            start=cursor,
            end=end,
            nbytes=nbytes + taken,
        )
        self._last, self._last_limits, self._last_full = batch, limits, full
        return batch

    def _read(
        self,
        segs: list[SegmentInfo],
        pos: Position,
        out: list[bytes],
        seqs: list[int],
        max_items: int,
        max_bytes: int,
    ) -> tuple[Position, bool, int, int]:
        """Read frames from `pos` into `out`, across segments.

        Returns (end position, stopped at a limit, payload bytes, first seq taken or -1).
        """
        scanned = self._scanned
        idx = 0
        while idx < len(segs) - 1 and segs[idx].number < pos.segment:
            idx += 1
        offset = pos.offset if segs[idx].number == pos.segment else 0
        after, taken, first = pos.next_seq - 1, 0, -1
        while True:
            seg = segs[idx]
            if not seg.verified:  # recovery could not read it yet: never pass it
                return self._stop(segs, idx, offset, after, None), False, taken, first
            mark = len(out)
            try:
                reader = self._files.open(seg) if offset < seg.readable else None
                if reader is None and offset < seg.readable:  # proven gone: skip it
                    if (seg.number, offset) >= scanned:
                        if self._files.gone == "missing":
                            self.missing_skipped += 1
                        else:
                            self.read_errors += 1
                    offset = seg.readable
                while reader is not None and offset < reader.end:
                    mark = len(out)
                    status, offset, after, n, f = reader.read_run(
                        offset, after, max_items, max_bytes - taken, out, seqs
                    )
                    taken += n
                    if first < 0:
                        first = f
                    if reader.salvaged:  # damaged frames whose intact records were taken
                        self.corrupt_skipped += sum(
                            1 for p in reader.salvaged if (seg.number, p) >= scanned
                        )
                        reader.salvaged.clear()
                    if status == FULL:
                        return self._stop(segs, idx, offset, after), True, taken, first
                    if status != DAMAGED:
                        break
                    if (seg.number, offset) >= scanned:
                        self.corrupt_skipped += 1
                    head = reader.header(offset)
                    if head is not None and offset + head.header_size + head.length <= reader.end:
                        # a whole frame whose payload fails: its records are passed too (else
                        # the position names one of them next, and pending_items stays > 0)
                        after = max(after, head.last_seq)
                    offset = reader.after_damage(offset)
            except OSError as e:
                # EMFILE, EACCES, EIO...: says nothing about the bytes. Stop before them (the
                # batch ends here, the checkpoint cannot pass them) and read again later.
                del out[mark:]
                del seqs[mark:]
                self._files.forget(seg.number)
                return self._stop(segs, idx, offset, after, e), False, taken, first
            if idx == len(segs) - 1 or seg.readable < seg.size:
                break  # the newest segment, or one whose tail is still being written
            idx += 1
            offset = 0
        return self._stop(segs, idx, offset, after), False, taken, first

    def _stop(
        self,
        segs: list[SegmentInfo],
        idx: int,
        offset: int,
        after: int,
        error: OSError | None = None,
    ) -> Position:
        """Where a read ended; `error` (or None) is the read's outcome."""
        if error is not None:
            self.read_retries += 1
        self.read_error = error
        return self._end_at(segs, idx, offset, after)

    def _end_at(self, segs: list[SegmentInfo], idx: int, offset: int, after: int) -> Position:
        seg = segs[idx]
        if offset >= seg.size and idx + 1 < len(segs) and seg.verified:
            seg, offset = segs[idx + 1], 0  # normalise: the start of the next
        end = Position(seg.number, offset, after + 1)
        self._scanned = max(self._scanned, (end.segment, end.offset))
        return end

    def invalidate(self) -> None:
        """The delivered position moved: the batch in memory is no longer the next one."""
        self._last = None

    def forget(self, number: int) -> None:
        self._files.forget(number)

    def close(self) -> None:
        self._files.close()
        self._last = None
