"""The per-record CRC table of a several-records frame is binary data that a sender steers.

CRC32 is affine in its input, so an event sender who controls ~40 characters of a record
(any string field) can give the record any CRC32 it likes, with printable characters only.
Six records in a row can so spell a whole valid one-record frame (magic, length 0, a seq of
the sender's choosing, both CRCs) inside the CRC table of the frame they are written in.

A reader never looks inside a valid frame, so this matters only where a reader scans past
damage: a torn several-records frame at the tail after a power cut (recovery resyncs), or a
damaged header. There, `resync` finds the forged frame and takes it for ours: a record that
was never sent, with a seq that moves the queue's seq counter wherever the sender chose.
"""

from __future__ import annotations

import struct
from zlib import crc32

from queue_helpers import flip_byte, segment_files

from traits_agent.queue import DiskQueue
from traits_agent.queue.framing import MAGIC, MAGIC_MANY, MANY_HEADER_SIZE

BIG = {"segment_bytes": 1 << 20, "max_bytes": 1 << 30}
_FREE = 48  # printable characters the sender varies ('a' or 'b' each)


def forge(head: bytes, tail: bytes, target: int) -> bytes | None:
    """A printable record head + [ab]*_FREE + tail whose crc32 is `target` (None if the
    choices do not span it: try another head)."""
    base = crc32(head + b"a" * _FREE + tail)
    basis: dict[int, tuple[int, int]] = {}
    for i in range(_FREE):
        flipped = bytearray(b"a" * _FREE)
        flipped[i] = ord("b")
        v, m = crc32(head + bytes(flipped) + tail) ^ base, 1 << i
        for b in range(31, -1, -1):
            if (v >> b) & 1:
                if b not in basis:
                    basis[b] = (v, m)
                    break
                v, m = v ^ basis[b][0], m ^ basis[b][1]
    want, choice = target ^ base, 0
    for b in range(31, -1, -1):
        if (want >> b) & 1:
            if b not in basis:
                return None
            want, choice = want ^ basis[b][0], choice ^ basis[b][1]
    free = bytes(ord("b") if (choice >> i) & 1 else ord("a") for i in range(_FREE))
    record = head + free + tail
    assert crc32(record) == target
    return record


def forged_records(fake_seq: int) -> list[bytes]:
    """Six printable JSON records whose CRC32s are the words of a valid empty one-record
    frame with seq `fake_seq`."""
    prefix = struct.pack("<4sIQ", MAGIC, 0, fake_seq)
    header_crc = crc32(prefix)
    words = struct.unpack("<6I", prefix + struct.pack("<II", header_crc, header_crc))
    out = []
    for i, word in enumerate(words):
        k = 0
        while (r := forge(b'{"n":%d,"k":%d,"pad":"' % (i, k), b'"}', word)) is None:
            k += 1
        out.append(r)
    return out


def test_a_forged_frame_in_a_torn_crc_table_is_not_taken_for_a_record(tmp_path) -> None:
    """A torn frame whose header checks ends the data: its length is vouched for, so what
    lies inside it is never scanned for frames (it was: the forged frame became a record
    with seq 2**40, the queue's next seq jumped there, and the torn frame was kept)."""
    records = forged_records(fake_seq=1 << 40) + [b'{"n":%d}' % i for i in range(6, 10)]
    with DiskQueue.open(tmp_path, **BIG) as q:
        assert q.append_many(records) == len(records)
        q.flush()
    seg = segment_files(tmp_path)[-1]
    data = seg.read_bytes()
    assert data[:4] == MAGIC_MANY
    table = MANY_HEADER_SIZE + len(b"\n".join(records))
    assert data[table : table + 4] == MAGIC  # the table starts with the forged frame
    # a power cut tears the frame's last write: the table is on disk up to the forged frame
    with open(seg, "r+b") as f:
        f.truncate(table + 24)
    with DiskQueue.open(tmp_path, **BIG) as q:
        got = []
        while (batch := q.read_batch(100, 1 << 20)) is not None:
            got += batch.payloads
            q.commit(batch)
        assert got == []  # the torn frame is lost whole; nothing else was ever appended
        assert q.next_seq < 1 << 40  # the sender did not choose our seqs
        assert q.recovery.torn_bytes_truncated == table + 24
        assert q.recovery.corrupt_records_skipped == 0


def test_a_forged_frame_found_past_a_damaged_header_cannot_wedge_the_queue(tmp_path) -> None:
    """A damaged header leaves nothing to vouch for the frame's length, so the reader scans
    its bytes and can find the forged frame. Its seq must not be one the queue cannot go on
    from: with 2**64 - 1 every later append raised struct.error, at every restart."""
    records = forged_records(fake_seq=(1 << 64) - 1) + [b'{"n":%d}' % i for i in range(6, 10)]
    with DiskQueue.open(tmp_path, **BIG) as q:
        assert q.append_many(records) == len(records)
        q.flush()
    seg = segment_files(tmp_path)[-1]
    flip_byte(seg, 17)  # the count: the header no longer checks
    with DiskQueue.open(tmp_path, **BIG) as q:
        assert q.next_seq < 1 << 60
        assert q.append(b'{"after":1}')
        q.flush()
        got = []
        while (batch := q.read_batch(100, 1 << 20)) is not None:
            got += batch.payloads
            q.commit(batch)
        assert got == [b'{"after":1}']  # the damaged frame is lost whole, nothing forged
