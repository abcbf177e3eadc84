"""Record framing: encode records, and read them back from a file, resyncing past damage.

Two kinds of frame, told apart by the magic's last byte (all integers little-endian):

*one record* (``F5 74 71 01``, 24-byte header)::

    0  magic       4   F5 74 71 01  (0xF5 never occurs in UTF-8)
    4  length      u32 payload length, at most MAX_PAYLOAD
    8  seq         u64 sequence number
    16 header_crc  u32 crc32(bytes 0..16)
    20 crc         u32 crc32(bytes 0..16 + payload)
    24 payload

*several records* (``F5 74 71 02``, 28-byte header), written for a burst of a resource's
records appended together (`DiskQueue.append_many`)::

    0  magic       4   F5 74 71 02
    4  length      u32 payload length, at most MAX_PAYLOAD
    8  seq         u64 seq of the first record; the others follow one by one
    16 count       u32 records in the frame, 2 to MANY_MAX_RECORDS
    20 header_crc  u32 crc32(bytes 0..20)
    24 crc         u32 crc32(bytes 0..20 + payload)
    28 payload     the records joined by b"\n" (so a record never holds a newline byte; the
                   writer frames one that does on its own), then a u32 crc32 of each record

Why several records per frame: the per-record costs of the hot paths were the framing (a
header, two CRC calls) on the way in and the same checks on the way out; per frame they are
one `join`, one `split` and two CRCs in C (plus one C-level `crc32` per record on the way in),
and the disk holds ~5 bytes of framing per record instead of 24. Reading a valid frame never
looks at the per-record CRCs: they are for *salvage*. When a frame's payload fails its CRC
but its header checks, the records whose own CRC still matches are kept (matched in order
from both ends if a newline byte was hit), so damage to the payload costs the damaged
records only, as with one-record frames. Damage to a header costs the whole frame, so a
frame holds at most MANY_MAX_RECORDS records and about MANY_TARGET_BYTES of payload. The
readers read both kinds, so segments written by an older version stay readable.

Why two CRCs: `header_crc` lets a reader trust `length` before it uses it, so a flipped bit in
a length field cannot make it swallow the records behind it; `crc` then proves the payload.
A frame is *valid* only if both check (and, for several records, the payload holds `count`
of them). After an invalid frame the reader scans forward for the next magic whose header and
payload both check (a false match needs the magic and two CRC32s to agree by chance), so
damage costs the damaged frame only. It starts scanning at the invalid frame's end if its
header checks, and inside it only if not: the per-record CRC table is not chance, a sender
can steer it (see `FrameReader.after_damage`).

The reader works through a sliding block of the file read with `os.pread`, so its memory is
one block (or one frame, if bigger) however long the file is.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import NamedTuple
from zlib import crc32

MAGIC = b"\xf5tq\x01"
MAGIC_MANY = b"\xf5tq\x02"
_MAGIC_STEM = MAGIC[:3]
HEADER_SIZE = 24
MANY_HEADER_SIZE = 28
MAX_PAYLOAD = 1 << 20
"""Largest payload a record may carry (1 MiB); the caller's events are at most ~70 KiB."""

MANY_MAX_RECORDS = 128
"""Most records one several-records frame holds: what one damaged frame can cost."""
MANY_TARGET_BYTES = 64 * 1024
"""A several-records frame is closed once its payload reaches this (one record bigger than
it is framed on its own)."""

MAX_SEQ = 1 << 60
"""A header with a seq at or above this does not check: far beyond any real seq (a million
records a second for 36,000 years), and far enough below the checkpoint's limit (2**62) that
a lease above it still stores. A frame a sender forged (see `FrameReader.after_damage`) can
then not move the queue's seqs where it cannot go on (u64 overflow, a corrupt checkpoint)."""

BLOCK_SIZE = 256 * 1024
"""How much the reader fetches per `pread`: big enough to amortise the syscall."""

SEAL_SEQ = 0
"""Seq of a seal record (real records start at 1): written at the end of a segment when the
next one is started, it summarises the segment so recovery need not scan it. Readers skip it
like any frame whose seq is not above the last one returned."""
_SEAL = struct.Struct("<8sQQQ")
_SEAL_TAG = b"tq-seal\x00"
SEAL_FRAME_SIZE = HEADER_SIZE + _SEAL.size

FULL, END, DAMAGED = 0, 1, 2
"""Why `FrameReader.read_run` stopped."""

_PREFIX = struct.Struct("<4sIQ")  # the part covered by header_crc
_MANY_PREFIX = struct.Struct("<4sIQI")
_CRCS = struct.Struct("<II")
_HEADER = struct.Struct("<4sIQII")
_MANY_HEADER = struct.Struct("<4sIQIII")
_LENGTH_SEQ = struct.Struct("<IQ")
_COUNT = struct.Struct("<I")
_MAGIC_CRC = crc32(MAGIC)
_MAGIC_MANY_CRC = crc32(MAGIC_MANY)


class Head(NamedTuple):
    """A frame header whose CRC checks: what it says about the frame."""

    length: int
    seq: int
    """Seq of its (first) record; SEAL_SEQ for a seal."""
    last_seq: int
    header_size: int
    header_crc: int
    crc: int


class Frame(NamedTuple):
    """A valid frame: its records' seqs, its payload and its size on disk."""

    seq: int
    last_seq: int
    payload: bytes
    """One record's bytes, or several joined by b"\n" (see `records`; without the CRCs)."""
    size: int

    def records(self) -> list[bytes]:
        return [self.payload] if self.seq == self.last_seq else self.payload.split(b"\n")


def encode_header(seq: int, payload: bytes) -> bytes:
    """The 24-byte header for `payload` as record `seq` (the payload is written after it)."""
    prefix = _PREFIX.pack(MAGIC, len(payload), seq)
    header_crc = crc32(prefix)
    return prefix + _CRCS.pack(header_crc, crc32(payload, header_crc))


def record_crcs(payloads: list[bytes]) -> bytes:
    """The crc32 of each payload, as the CRC table of a several-records frame stores them
    (u32 little-endian each): `encode_frames` can take them computed elsewhere (the Forward
    intake process does, on its own core)."""
    return struct.pack(f"<{len(payloads)}I", *map(crc32, payloads))


def encode_frames(
    first_seq: int,
    payloads: list[bytes],
    out: list[bytes],
    crcs: bytes | None = None,
    *,
    lines: bool = False,
) -> int:
    """Frame `payloads` as consecutive seqs from `first_seq`: header and payload pieces are
    appended to `out`. Runs of records go into several-records frames (MANY_MAX_RECORDS and
    about MANY_TARGET_BYTES each); a lone record, and a run holding a newline byte, get
    one-record frames. `crcs`: `record_crcs(payloads)`, when the caller has it (then the
    per-record CRCs, most of the framing's cost, are not computed again). `lines`: the caller
    split `payloads` off a b"\n"-joined blob, so none holds a newline and the runs are not
    counted for one (~0.1 µs a record). Returns the frame bytes added."""
    total = 0
    seq = first_seq
    n = len(payloads)
    i = 0
    while i < n:
        j = min(n, i + MANY_MAX_RECORDS)
        run = payloads[i:j]
        joined = b"\n".join(run)
        while len(joined) > MANY_TARGET_BYTES and j - i > 1:  # big records: fewer per frame
            j = i + max(1, (j - i) // 2)
            run = payloads[i:j]
            joined = b"\n".join(run)
        count = j - i
        if count == 1 or (not lines and joined.count(b"\n") != count - 1):
            total += _encode_singles(seq, run, out)
        else:
            payload = joined + (record_crcs(run) if crcs is None else crcs[4 * i : 4 * j])
            prefix = _MANY_PREFIX.pack(MAGIC_MANY, len(payload), seq, count)
            header_crc = crc32(prefix)
            out.append(prefix + _CRCS.pack(header_crc, crc32(payload, header_crc)))
            out.append(payload)
            total += MANY_HEADER_SIZE + len(payload)
        seq += count
        i = j
    return total


def _encode_singles(first_seq: int, payloads: Iterable[bytes], out: list[bytes]) -> int:
    """One-record frames for consecutive seqs from `first_seq`; the bytes added."""
    pack_prefix, pack_crcs, add = _PREFIX.pack, _CRCS.pack, out.append
    seq = first_seq
    total = 0
    for payload in payloads:
        size = len(payload)
        prefix = pack_prefix(MAGIC, size, seq)
        header_crc = crc32(prefix)
        add(prefix + pack_crcs(header_crc, crc32(payload, header_crc)))
        add(payload)
        seq += 1
        total += HEADER_SIZE + size
    return total


def frame_span(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(size, seq, last seq) of the frame at `pos` of bytes we framed ourselves (no CRC
    check: the writer's own buffers), or None if its header is not all there."""
    if pos + HEADER_SIZE > len(data):
        return None
    length, seq = _LENGTH_SEQ.unpack_from(data, pos + 4)
    if data[pos + 3] == MAGIC_MANY[3]:
        if pos + MANY_HEADER_SIZE > len(data):
            return None
        (count,) = _COUNT.unpack_from(data, pos + 16)
        return MANY_HEADER_SIZE + length, seq, seq + count - 1
    return HEADER_SIZE + length, seq, seq


def trim_frames(data: bytes, seq: int) -> tuple[bytes, int]:
    """The frames of `data` (whole ones, ours) holding records with seq `seq` or more, and
    the first such seq. A several-records frame holding records before `seq` is framed again
    without them; seals and frames wholly before `seq` are dropped. (b"", 0) if none."""
    pos = 0
    while (span := frame_span(data, pos)) is not None:
        size, first, last = span
        if first >= seq:
            return (data[pos:] if pos else data), first
        if last >= seq:  # a several-records frame straddling `seq`
            area = data[pos + MANY_HEADER_SIZE : pos + size - 4 * (last - first + 1)]
            records = area.split(b"\n")[seq - first :]
            out: list[bytes] = []
            encode_frames(seq, records, out)
            return b"".join(out) + data[pos + size :], seq
        pos += size
    return b"", 0


def encode_seal(count: int, first_seq: int, last_seq: int) -> bytes:
    """The payload of a seal record: how many records the segment holds, first and last seq."""
    return _SEAL.pack(_SEAL_TAG, count, first_seq, last_seq)


def decode_seal(payload: bytes) -> tuple[int, int, int] | None:
    """(count, first seq, last seq) from a seal payload, or None if it is not one."""
    if len(payload) != _SEAL.size:
        return None
    tag, count, first_seq, last_seq = _SEAL.unpack(payload)
    return (count, first_seq, last_seq) if tag == _SEAL_TAG else None


class FrameReader:
    """Reads frames from the byte range [0, end) of one open file.

    `end` is how far the caller knows the file to be complete (for the segment being written:
    the end of the last whole frame handed to the OS). If the file turns out shorter, `end`
    shrinks to what is there.
    """

    __slots__ = ("_base", "_buf", "_fd", "end", "salvaged")

    def __init__(self, fd: int, end: int) -> None:
        self._fd = fd
        self.end = end
        self._base = 0
        self._buf = b""
        self.salvaged: list[int] = []
        """Positions of damaged frames `read_run` took the intact records of (and passed):
        the caller counts and clears them."""

    def _window(self, pos: int, n: int) -> int:
        """Make bytes [pos, pos+n) available in `_buf`; their offset in it, or -1 if past end."""
        if pos + n > self.end:
            return -1
        rel = pos - self._base
        if rel >= 0 and rel + n <= len(self._buf):
            return rel
        want = min(max(n, BLOCK_SIZE), self.end - pos)
        data = os.pread(self._fd, want, pos)
        self._base, self._buf = pos, data
        if len(data) < want:  # the file is shorter than we were told
            self.end = pos + len(data)
            if len(data) < n:
                return -1
        return 0

    def header(self, pos: int) -> Head | None:
        """The header of a frame at `pos`, if it checks (the payload is not checked)."""
        rel = self._window(pos, HEADER_SIZE)
        if rel < 0:
            return None
        buf = self._buf
        if buf[rel : rel + 4] == MAGIC_MANY:
            rel = self._window(pos, MANY_HEADER_SIZE)
            if rel < 0:
                return None
            buf = self._buf
            _, length, seq, count, header_crc, crc = _MANY_HEADER.unpack_from(buf, rel)
            if length > MAX_PAYLOAD or not 2 <= count <= MANY_MAX_RECORDS or length < 5 * count - 1:
                return None
            if seq >= MAX_SEQ:
                return None
            if crc32(buf[rel + 4 : rel + 20], _MAGIC_MANY_CRC) != header_crc:
                return None
            return Head(length, seq, seq + count - 1, MANY_HEADER_SIZE, header_crc, crc)
        magic, length, seq, header_crc, crc = _HEADER.unpack_from(buf, rel)
        if magic != MAGIC or length > MAX_PAYLOAD or seq >= MAX_SEQ:
            return None
        if crc32(buf[rel + 4 : rel + 16], _MAGIC_CRC) != header_crc:
            return None
        return Head(length, seq, seq, HEADER_SIZE, header_crc, crc)

    def _whole(self, pos: int) -> tuple[Head, int, int] | None:
        """(header, its offset in `_buf`, frame size) of a frame at `pos` whose header checks
        and whose bytes are all in `_buf` now; None if not (the payload is not checked)."""
        head = self.header(pos)
        if head is None:
            return None
        size = head.header_size + head.length
        rel = self._window(pos, size)
        return None if rel < 0 else (head, rel, size)

    def frame(self, pos: int) -> Frame | None:
        """The valid frame at `pos`, else None (damaged, torn or past end)."""
        whole = self._whole(pos)
        if whole is None:
            return None
        head, rel, size = whole
        payload = self._buf[rel + head.header_size : rel + size]
        if crc32(payload, head.header_crc) != head.crc:
            return None
        if head.last_seq != head.seq:
            payload = payload[: len(payload) - 4 * (head.last_seq - head.seq + 1)]
            if payload.count(b"\n") != head.last_seq - head.seq:
                return None  # CRC-valid but not what the header says: never written by us
        return Frame(head.seq, head.last_seq, payload, size)

    def frame_records(self, pos: int) -> tuple[int, int, list[bytes], int, int] | None:
        """`frame` for the read path, which wants the records one by one: (seq, last seq,
        records, frame size, record bytes) of the valid frame at `pos`, else None. Checked
        as `frame` checks, for less: the payload's CRC over a view, one copy of the records'
        bytes, and the newline count read off the split (a batch of 1000 records spent a
        fifth of its read time counting newlines and copying the payload twice)."""
        whole = self._whole(pos)
        if whole is None:
            return None
        head, rel, size = whole
        buf = self._buf
        start = rel + head.header_size
        with memoryview(buf) as view, view[start : rel + size] as payload_view:
            if crc32(payload_view, head.header_crc) != head.crc:
                return None
        count = head.last_seq - head.seq + 1
        if count == 1:
            return head.seq, head.seq, [buf[start : rel + size]], size, head.length
        stop = rel + size - 4 * count
        records = buf[start:stop].split(b"\n")
        if len(records) != count:
            return None  # CRC-valid but not what the header says: never written by us
        return head.seq, head.last_seq, records, size, stop - start - (count - 1)

    def salvage(self, pos: int) -> tuple[Head, list[int], list[bytes]] | None:
        """The records still intact in a several-records frame at `pos` whose header checks
        but whose payload does not: (its header, their seqs, their bytes). None if there is
        no such frame there (a bad header, a one-record frame, or not all of it in the file).

        A record is kept only if its own CRC matches its entry in the frame's table. If the
        damage changed the number of newlines, the records are matched in order from the
        start and from the end up to the damage."""
        head = self.header(pos)
        if head is None or head.seq == head.last_seq:
            return None
        size = head.header_size + head.length
        rel = self._window(pos, size)
        if rel < 0:
            return None
        count = head.last_seq - head.seq + 1
        area_end = rel + size - 4 * count
        crcs = struct.unpack_from(f"<{count}I", self._buf, area_end)
        pieces = self._buf[rel + head.header_size : area_end].split(b"\n")
        keep: list[int] = []
        if len(pieces) == count:
            keep = [i for i, piece in enumerate(pieces) if crc32(piece) == crcs[i]]
        else:
            i = 0
            while i < min(count, len(pieces)) and crc32(pieces[i]) == crcs[i]:
                keep.append(i)
                i += 1
            back: list[int] = []
            k = 1
            while k <= min(count - i, len(pieces) - i) and crc32(pieces[-k]) == crcs[-k]:
                back.append(count - k)
                k += 1
            keep += reversed(back)
            pieces = pieces[:i] + pieces[len(pieces) - len(back) :]
            return head, [head.seq + n for n in keep], pieces
        return head, [head.seq + n for n in keep], [pieces[n] for n in keep]

    def after_damage(self, pos: int) -> int:
        """Position of the first valid frame after the invalid one at `pos` (a frame start
        reached by walking valid frames), or `end`.

        If its header checks, the search starts at its end: `header_crc` vouches for its
        length, so a frame torn at the tail ends the data there. Scanning its bytes instead
        would be unsafe: the CRC table of a several-records frame holds the CRC32s of records
        a sender wrote, and CRC32 is affine, so a sender who controls ~40 characters of six
        records can make their CRCs spell a whole valid frame, with a seq of its choosing.
        Only a frame whose header is damaged is scanned from `pos + 1` (and `MAX_SEQ` bounds
        what a forged frame found there can do)."""
        head = self.header(pos)
        if head is None:
            return self.resync(pos + 1)
        return self.resync(pos + head.header_size + head.length)

    def resync(self, pos: int) -> int:
        """Position of the first valid frame at or after `pos`, or `end` if there is none."""
        overlap = len(MAGIC) - 1
        while pos < self.end:
            rel = self._window(pos, min(BLOCK_SIZE, self.end - pos))
            if rel < 0:  # the file is shorter than `end`: _window has shrunk `end`
                continue
            idx = self._buf.find(_MAGIC_STEM, rel)
            if idx < 0:
                block_end = self._base + len(self._buf)
                if block_end >= self.end:
                    return self.end
                pos = max(pos + 1, block_end - overlap)
                continue
            candidate = self._base + idx
            if self.frame(candidate) is not None:
                return candidate
            pos = candidate + 1
        return self.end

    def read_run(
        self,
        pos: int,
        after_seq: int,
        max_items: int,
        max_bytes: int,
        out: list[bytes],
        seqs: list[int],
    ) -> tuple[int, int, int, int, int]:
        """Append to `out` the records of consecutive valid frames from `pos` (the hot path).

        Records whose seq is not above `after_seq` (or the last one taken) are stepped over:
        seal records, records of a several-records frame a batch took part of, and copies left
        by a rewrite after a failed fsync (a seq is returned once). The seq of each record goes
        to `seqs`. Stops at the limits (`out` always gets one record if one is valid at `pos`
        and it is empty), at `end`, or at an invalid frame. `max_bytes` counts record bytes.

        Returns (status, position reached, last seq taken or `after_seq`, record bytes taken,
        first seq taken or -1), status being FULL, END or DAMAGED (an invalid frame starts at
        the position reached). Stopped at a limit inside a several-records frame, the position
        reached is that frame's start: the next read steps over what this one took of it.
        """
        taken = 0
        first = -1
        buf, base = self._buf, self._base
        unpack = _HEADER.unpack_from
        while len(out) < max_items:
            rel = pos - base
            if rel < 0 or rel + MANY_HEADER_SIZE > len(buf):
                if pos >= self.end:
                    return END, pos, after_seq, taken, first
                rel = self._window(pos, min(MANY_HEADER_SIZE, self.end - pos))
                if rel < 0 or pos + HEADER_SIZE > self.end:  # past the end, or a torn header
                    return (END if pos >= self.end else DAMAGED), pos, after_seq, taken, first
                buf, base = self._buf, self._base
            magic, length, seq, header_crc, crc = unpack(buf, rel)
            if magic == MAGIC_MANY:
                status, pos, after_seq, n, f = self._many(
                    pos, after_seq, max_items, max_bytes - taken, out, seqs
                )
                taken += n
                if first < 0:
                    first = f
                if status != END:
                    return status, pos, after_seq, taken, first
                buf, base = self._buf, self._base
                continue
            if magic != MAGIC or length > MAX_PAYLOAD:
                return DAMAGED, pos, after_seq, taken, first
            if crc32(buf[rel + 4 : rel + 16], _MAGIC_CRC) != header_crc:
                return DAMAGED, pos, after_seq, taken, first
            if seq <= after_seq:  # a seal, or a copy left by a rewrite: the header suffices
                if pos + HEADER_SIZE + length > self.end:
                    return DAMAGED, pos, after_seq, taken, first
                pos += HEADER_SIZE + length
                continue
            if out and taken + length > max_bytes:
                return FULL, pos, after_seq, taken, first
            stop = rel + HEADER_SIZE + length
            if stop > len(buf):
                rel = self._window(pos, HEADER_SIZE + length)
                if rel < 0:
                    return DAMAGED, pos, after_seq, taken, first
                buf, base = self._buf, self._base
                stop = rel + HEADER_SIZE + length
            payload = buf[rel + HEADER_SIZE : stop]
            if crc32(payload, header_crc) != crc:
                return DAMAGED, pos, after_seq, taken, first
            pos += HEADER_SIZE + length
            if first < 0:
                first = seq
            out.append(payload)
            seqs.append(seq)
            taken += length
            after_seq = seq
        return FULL, pos, after_seq, taken, first

    def _many(
        self,
        pos: int,
        after_seq: int,
        max_items: int,
        max_bytes: int,
        out: list[bytes],
        seqs: list[int],
    ) -> tuple[int, int, int, int, int]:
        """`read_run` for the several-records frame at `pos`: END means "all of it taken or
        stepped over, go on at the position returned"."""
        frame = self.frame_records(pos)
        if frame is None:
            return self._take_salvaged(pos, after_seq, max_items, max_bytes, out, seqs)
        seq, last, records, size, nbytes = frame
        if last <= after_seq:  # taken already (or copies from a rewrite)
            return END, pos + size, after_seq, 0, -1
        skip = after_seq + 1 - seq
        if skip > 0:
            del records[:skip]
            seq += skip
            nbytes = sum(map(len, records))
        room = max_items - len(out)
        if len(records) <= room and nbytes <= max_bytes:
            out += records
            seqs += range(seq, last + 1)
            return END, pos + size, last, nbytes, seq
        # a limit falls inside this frame: take what fits, stay at its start
        return self._take_some(
            pos, after_seq, list(range(seq, last + 1)), records, max_items, max_bytes, out, seqs
        )

    def _take_salvaged(
        self,
        pos: int,
        after_seq: int,
        max_items: int,
        max_bytes: int,
        out: list[bytes],
        seqs: list[int],
    ) -> tuple[int, int, int, int, int]:
        """`_many` for a frame whose payload is damaged: its intact records, if its header
        checks (its position goes to `salvaged` once it is passed), else DAMAGED."""
        found = self.salvage(pos)
        if found is None:
            return DAMAGED, pos, after_seq, 0, -1
        head, numbers, records = found
        keep = [i for i, seq in enumerate(numbers) if seq > after_seq]
        numbers, records = [numbers[i] for i in keep], [records[i] for i in keep]
        nbytes = sum(map(len, records))
        if len(records) <= max_items - len(out) and nbytes <= max_bytes:
            out += records
            seqs += numbers
            self.salvaged.append(pos)
            # passed: its lost records too (else a position after it names one of them as
            # next to deliver, and the pending count never reaches 0)
            size = head.header_size + head.length
            last = max(after_seq, head.last_seq)
            return END, pos + size, last, nbytes, numbers[0] if numbers else -1
        return self._take_some(pos, after_seq, numbers, records, max_items, max_bytes, out, seqs)

    @staticmethod
    def _take_some(
        pos: int,
        after_seq: int,
        numbers: list[int],
        records: list[bytes],
        max_items: int,
        max_bytes: int,
        out: list[bytes],
        seqs: list[int],
    ) -> tuple[int, int, int, int, int]:
        """A limit falls inside the frame at `pos`: take what fits, stay at its start."""
        taken = n = 0
        for record in records[: max_items - len(out)]:
            if out and taken + len(record) > max_bytes:
                break
            out.append(record)
            taken += len(record)
            n += 1
        if not n:
            return FULL, pos, after_seq, 0, -1
        seqs += numbers[:n]
        return FULL, pos, numbers[n - 1], taken, numbers[0]
