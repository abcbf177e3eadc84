"""Record framing: encode one record, and read records back from a file, resyncing past damage.

A frame is a 24-byte header followed by the payload (all integers little-endian)::

    0  magic       4   F5 74 71 01  (0xF5 never occurs in UTF-8; the last byte is the version)
    4  length      u32 payload length, at most MAX_PAYLOAD
    8  seq         u64 sequence number
    16 header_crc  u32 crc32(bytes 0..16)
    20 crc         u32 crc32(bytes 0..16 + payload)
    24 payload

Why two CRCs: `header_crc` lets a reader trust `length` before it uses it, so a flipped bit in
a length field cannot make it swallow the records behind it; `crc` then proves the payload.
A frame is *valid* only if both check. After an invalid frame the reader scans forward for the
next magic whose header and payload both check (a false match needs the magic and two CRC32s
to agree by chance), so damage costs the damaged bytes only.

The reader works through a sliding block of the file read with `os.pread`, so its memory is
one block (or one frame, if bigger) however long the file is.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from zlib import crc32

MAGIC = b"\xf5tq\x01"
HEADER_SIZE = 24
MAX_PAYLOAD = 1 << 20
"""Largest payload a record may carry (1 MiB); the caller's events are at most ~70 KiB."""

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
_CRCS = struct.Struct("<II")
_HEADER = struct.Struct("<4sIQII")
_MAGIC_CRC = crc32(MAGIC)


def encode_header(seq: int, payload: bytes) -> bytes:
    """The 24-byte header for `payload` as record `seq` (the payload is written after it)."""
    prefix = _PREFIX.pack(MAGIC, len(payload), seq)
    header_crc = crc32(prefix)
    return prefix + _CRCS.pack(header_crc, crc32(payload, header_crc))


def encode_frames(first_seq: int, payloads: Iterable[bytes], out: list[bytes]) -> int:
    """Append header, payload, header, payload, ... to `out` for consecutive seqs from
    `first_seq` (what `encode_header` gives, one record at a time, without a call per record).
    Returns the frame bytes added."""
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

    __slots__ = ("_base", "_buf", "_fd", "end")

    def __init__(self, fd: int, end: int) -> None:
        self._fd = fd
        self.end = end
        self._base = 0
        self._buf = b""

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

    def header(self, pos: int) -> tuple[int, int, int, int] | None:
        """(payload length, seq, header crc, crc) of a frame at `pos` whose header checks."""
        rel = self._window(pos, HEADER_SIZE)
        if rel < 0:
            return None
        buf = self._buf
        magic, length, seq, header_crc, crc = _HEADER.unpack_from(buf, rel)
        if magic != MAGIC or length > MAX_PAYLOAD:
            return None
        if crc32(buf[rel + 4 : rel + 16], _MAGIC_CRC) != header_crc:
            return None
        return length, seq, header_crc, crc

    def frame(self, pos: int) -> tuple[int, bytes] | None:
        """(seq, payload) of a valid frame at `pos`, else None (damaged, torn or past end)."""
        head = self.header(pos)
        if head is None:
            return None
        length, seq, header_crc, crc = head
        rel = self._window(pos, HEADER_SIZE + length)
        if rel < 0:
            return None
        payload = self._buf[rel + HEADER_SIZE : rel + HEADER_SIZE + length]
        if crc32(payload, header_crc) != crc:
            return None
        return seq, payload

    def resync(self, pos: int) -> int:
        """Position of the first valid frame at or after `pos`, or `end` if there is none."""
        overlap = len(MAGIC) - 1
        while pos < self.end:
            rel = self._window(pos, min(BLOCK_SIZE, self.end - pos))
            if rel < 0:  # the file is shorter than `end`: _window has shrunk `end`
                continue
            idx = self._buf.find(MAGIC, rel)
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
        self, pos: int, after_seq: int, max_items: int, max_bytes: int, out: list[bytes]
    ) -> tuple[int, int, int, int, int]:
        """Append to `out` the payloads of consecutive valid frames from `pos` (the hot path).

        Frames whose seq is not above `after_seq` (or the last one taken) are stepped over:
        seal records, and copies left by a rewrite after a failed fsync (a seq is returned
        once). Stops at the limits (`out` always gets one payload if one is valid at `pos`
        and it is empty), at `end`, or at an invalid frame.

        Returns (status, position reached, last seq taken or `after_seq`, payload bytes taken,
        first seq taken or -1), status being FULL, END or DAMAGED (an invalid frame starts at
        the position reached).
        """
        taken = 0
        first = -1
        buf, base = self._buf, self._base
        unpack = _HEADER.unpack_from
        while len(out) < max_items:
            rel = pos - base
            if rel < 0 or rel + HEADER_SIZE > len(buf):
                if pos >= self.end:
                    return END, pos, after_seq, taken, first
                rel = self._window(pos, HEADER_SIZE)
                if rel < 0:
                    return (END if pos >= self.end else DAMAGED), pos, after_seq, taken, first
                buf, base = self._buf, self._base
            magic, length, seq, header_crc, crc = unpack(buf, rel)
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
            taken += length
            after_seq = seq
        return FULL, pos, after_seq, taken, first
