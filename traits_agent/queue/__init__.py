"""Disk-backed durable FIFO, one per API resource: an append-only segmented log.

This docstring is the format spec and the list of guarantees. Modules: `framing` (records),
`segments` (segment files and scans), `checkpoint` (delivered position), `recovery` (open),
`writer` (buffer, write, fsync), `reader` (batches), `disk_queue` (the `DiskQueue` class that
ties them together under one lock), `files` (private modes), `errors`.

The rule for errors
-------------------
**Only proven corruption is skipped; every other error is retried and never moves the
checkpoint.** Proven means shown by reading the bytes (a bad magic, header CRC or payload
CRC), or by the name itself: no file under it any more (ENOENT), or something that is not
a regular file (a directory, a fifo). Those are skipped, counted and reported. Any other
error opening or reading a segment -- EMFILE, ENFILE, EACCES, EIO, ... -- says nothing about
the data: the read stops before it (the batch ends there, so a commit cannot pass it), it is
counted in ``read_retries`` (``read_error`` says which), and the next read tries again from
the same place. A segment that recovery cannot read is kept as *unverified*: readers stop
before it and nothing is appended to it until its summary can be read.

Files (one queue directory)
---------------------------
``NNNNNNNNNNNNNNNNNNNN.seg``  segments: the segment number, zero-padded to 20 digits; numbers
                             increase by one. Only the newest is appended to.
``checkpoint``               the delivered position and the seq lease (v2: three slots, each
                             a text line + crc32, overwritten in place; see Checkpoint)
``checkpoint.tmp``           a fresh checkpoint file being written (once per open: upgrade
                             from v1, or a missing/damaged file); ignored and removed at open
``lock``                     held with an exclusive ``flock`` while open (a second opener gets
                             QueueLockedError: two writers would interleave records)
``<name>.stray-N``           something that was not a regular file where ``checkpoint``,
                             ``checkpoint.tmp`` or ``lock`` go, moved aside at open
``reserve``                  64 KiB of zeros, deleted to make room for a checkpoint on a full
                             disk (so deliveries can still be recorded and segments deleted)

Records
-------
Frames back to back from offset 0 of each segment, no padding. Little-endian. A frame holds
one record::

    magic F5 74 71 01 | length u32 | seq u64 | header_crc u32 | crc u32 | payload

or several (2 to 128, written by ``append_many`` for a run of records appended together)::

    magic F5 74 71 02 | length u32 | seq u64 | count u32 | header_crc u32 | crc u32 |
    record b"\n" record ... b"\n" record | crc32 of each record, u32 each

``header_crc`` = crc32 of the header up to it; ``crc`` = crc32 of those bytes + payload.
A frame is valid only if magic, both CRCs and ``length <= 1 MiB`` check (and the count of
newlines, and ``seq < 2**60``). After an invalid frame, readers look for the next valid frame
(resync): from its end if its header checks (a torn frame at the tail ends the data), else
from the next byte, so a corrupted length never hides the records behind it. (Never scanning
inside a frame whose header checks matters: a several-records frame's CRC table holds CRC32s
that a sender can steer to spell a valid frame.) A several-records frame whose payload
fails while its header checks gives up the records whose own CRC fails and no others
(salvage); one whose header fails costs its records (at most 128). A record holding a newline
byte is framed on its own. Seqs start at 1, increase by one per record and never repeat,
across restarts too. Payloads are opaque bytes (the caller's compact JSON events). Segments
written before several-records frames existed hold one-record frames only and read as ever.

Every directory the queue creates is 0700 and every file 0600, whatever the umask (the
mode is set again with chmod after creating: the umask can only take bits away).

A frame with seq 0 is a *seal*: payload ``"tq-seal\0" | count u64 | first_seq u64 |
last_seq u64`` (56-byte frame). It ends a segment that is complete: written when the next
segment is started (rotation, which happens when the next record would take the segment, seal
included, past ``segment_bytes``, default 8 MiB; a larger record gets a segment to itself), and
at open for the previous run's newest segment. Readers skip it like any frame whose seq is not
above the last one returned.

A fully delivered active segment is replaced by a fresh one and deleted once it holds 1 MiB
(``rotate_drained_bytes``), or at any size after a write error (a full disk: its space is
what is missing); bytes the OS has not taken yet move to the fresh segment whole. So the
space of delivered records comes back whatever ``segment_bytes`` is, even on a filesystem
smaller than one segment.

Each run appends to a segment of its own (a fresh one at open, unless the newest is empty), so
within a segment seqs are consecutive: record counts are exact from (count, first_seq) alone.

Checkpoint
----------
Three 4 KiB blocks, each starting with a 256-byte slot: the line
``tq-checkpoint v2 gen=G segment=S offset=O next_seq=N seq_lease=L crc=XXXXXXXX`` padded with
NULs. Every record before byte O of segment S (and every seq below N) has been delivered or
dropped; no seq at or above L has been written. O is the start of a frame; when a batch ended
inside a several-records frame, O is that frame's start and N its first record not delivered.
The checkpoint is the valid slot (it parses, its crc32 checks) with the highest G; none valid
is a corrupt checkpoint. A store is one ``pwrite`` of one slot on a descriptor kept open (a
durable one adds ``fdatasync``); it never overwrites the slot of the newest durable checkpoint
nor the slot being fsynced, so a torn write can only lose positions newer than the durable one
(re-delivery). The first store of each open writes a fresh file (``checkpoint.tmp``, fsync,
rename, fsync the directory). The v1 format (one line ``tq-checkpoint v1 segment=S offset=O
next_seq=N seq_lease=L crc=X``, replaced by rename) is still read, and so upgraded at open.
Details: ``checkpoint`` module.

* A commit inside a segment rewrites a slot without fsync; the next ``sync()`` makes it
  durable. So a process crash re-delivers at most the batch in flight, and a power cut at most
  the batches committed in one sync interval (with fsync="never": since the last segment
  boundary). Re-delivery is acceptable; loss is not.
* When a commit completes one or more segments, the checkpoint is written durably *first*,
  then those segments are deleted: by ``commit`` itself, or, when the owner sets
  ``DiskQueue.sync_requested`` (the agent does), by the next ``sync()``/``settle()`` in the
  owner's worker thread, so that ``commit`` never fsyncs. Whole segments only, never a part of
  a file. One
  exception, on a full disk (ENOSPC even after the reserve): the delivered segments are
  truncated to 0 bytes first, to make room for that checkpoint. Their records are all
  delivered, so a crash in between can only skip re-delivering them.
* Seq lease: before records with seqs near L reach the OS, L is raised durably by 2**24. The
  next run starts at ``max(L, tail + 1)`` unless we closed cleanly (then L = next seq). So a
  record that was read (delivered) before it was fsynced and then lost in a power cut can never
  have its seq reused by a different record: seqs stay usable as idempotency keys.

When segments are deleted
-------------------------
1. fully delivered (commit), after the durable checkpoint (the active one too: see above);
2. quota (``on_full="drop_oldest"``): the oldest whole segments, after a durable checkpoint
   past them; their undelivered records are counted in ``dropped_oldest``;
3. at open: segments wholly before a valid checkpoint (a crash between checkpoint and unlink).

The durable checkpoint of case 1 is written by ``commit`` on the caller's thread unless
``sync_requested`` is set (then by ``sync()``/``settle()``, whose caller runs them in a worker
thread); that of case 2 by ``append`` on the caller's thread (only when the quota is full).
Everything that fsyncs segment data runs in ``sync()``, which also raises the seq lease ahead
of need so that ``flush`` practically never has to store it durably itself.

Recovery (``DiskQueue.open``; never refuses to start on bad data)
----------------------------------------------------------------
* Reads the newest segment whole (block by block) and the 56-byte seal of each older segment
  (one without a seal, from a crash during rotation, is scanned); memory is O(segments), never
  O(records). Older segments are fsynced (clean ones cost nothing).
* Newest segment: invalid bytes with no valid frame after them are a torn tail: truncated.
  Invalid bytes followed by valid frames are skipped and counted.
* Missing or corrupt checkpoint: delivery restarts at the oldest segment (re-delivery, no loss),
  reported as ``checkpoint_fallback``.
* Checkpoint naming a missing segment: resume at the next existing one; checkpoint offset that is
  not a record with the expected seq (a power cut shortened the file): resume at the first
  record with seq >= next_seq in that segment. Reported as ``checkpoint_adjusted``.
* Gaps in segment numbers after the checkpoint: counted in ``missing_segment_count`` (the
  first 100 listed in ``missing_segments``: a stray file numbered 10**7 costs nothing),
  skipped. A segment name that is not a regular file: left in place, reported, skipped.
  A segment that cannot be read for any other reason (EMFILE, EACCES, EIO): kept, reported
  in ``unreadable_segments``, read later (see the rule above).
* ``checkpoint``, ``checkpoint.tmp`` or ``lock`` that is not a regular file: moved aside
  (``moved_aside``). A checkpoint value of 2**62 or more is a corrupt checkpoint.
* The result is in ``DiskQueue.recovery`` (a ``RecoveryReport``) and is written back as a
  durable checkpoint before the first append.

Reads
-----
``read_batch`` reads the files from the delivered position (the page cache serves them), up
to the end of the last whole frame handed to the OS: flushed records are readable before they
are fsynced. Damaged frames found at read time are skipped and counted in ``corrupt_skipped``
(once each); a frame whose seq is not above the last one returned is skipped (seals, copies
from a rewrite). A segment file deleted behind our back is skipped (``missing_skipped``),
one replaced by a non-file too (``read_errors``); any other error ends the batch and is
retried (``read_retries``). ``Batch.seqs`` gives each record's seq: after a skipped damaged
record they are not consecutive. Memory per read is one 256 KiB block plus the batch.

Crash guarantees
----------------
* Process crash (SIGKILL, OOM): every record handed to the OS (``written_seq``) survives.
* Power cut / kernel crash: every record up to ``durable_seq`` survives; later ones may be lost
  or torn (torn ones are cut off at open). Acknowledge producers only up to ``durable_seq``.
* Delivery is at-least-once: a record is deleted only after it is committed and the commit is
  durable; the checkpoint may lag (re-delivery), never lead undelivered data (loss).
* Write errors (ENOSPC, EIO, EROFS, ...): ``flush``/``sync`` raise QueueWriteError; unwritten
  bytes stay buffered (up to 16 MiB; beyond that ``append`` returns False and counts
  ``dropped_write_error``) and go out on a later call once the disk takes them. After a failed
  fsync, whose pages Linux may have dropped, everything written since the last good fsync
  (kept in memory up to 32 MiB) is written again to a new segment; ``durable_seq`` does not
  advance past it until that succeeds.
* The queue directory deleted (or replaced) while open: the next flush or sync finds it gone
  (one stat), makes it again (0700) and locks it; what memory still holds (unwritten bytes,
  and those written since the last fsync) is written to a fresh segment there. Undelivered
  records that only the deleted files held are counted in ``dropped_dir_deleted``
  (``dir_recreated`` counts the times). If it cannot be made, writes fail as above.
"""

from traits_agent.queue.disk_queue import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_MAX_BYTES,
    DEFAULT_SEGMENT_BYTES,
    DiskQueue,
    FsyncPolicy,
    OnFull,
)
from traits_agent.queue.errors import (
    QueueClosedError,
    QueueError,
    QueueLockedError,
    QueueWriteError,
)
from traits_agent.queue.framing import MAX_PAYLOAD
from traits_agent.queue.reader import Batch
from traits_agent.queue.recovery import RecoveryReport
from traits_agent.queue.segments import Position

__all__ = [
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "MAX_PAYLOAD",
    "Batch",
    "DiskQueue",
    "FsyncPolicy",
    "OnFull",
    "Position",
    "QueueClosedError",
    "QueueError",
    "QueueLockedError",
    "QueueWriteError",
    "RecoveryReport",
]
