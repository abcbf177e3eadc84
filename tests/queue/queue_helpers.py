"""Shared helpers for the queue tests (imported by name: tests/queue has no __init__.py)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

from traits_agent.queue import DiskQueue


def payload_for(seq: int) -> bytes:
    """A payload that says which seq it was written as, of varying length (33..~250 bytes)."""
    body = b"%d:" % seq
    return b"{" + body * (1 + (seq * 7919) % 23) + b"}"


def seq_of(payload: bytes) -> int:
    return int(payload[1:].split(b":", 1)[0])


def fill(q: DiskQueue, n: int) -> list[int]:
    """Append n records whose payload encodes their seq; flush; return the seqs."""
    seqs = []
    for _ in range(n):
        seq = q.next_seq
        assert q.append(payload_for(seq))
        seqs.append(seq)
    q.flush()
    return seqs


def drain(q: DiskQueue, *, max_items: int = 500, max_bytes: int = 1 << 20) -> list[int]:
    """Read and commit until empty; return the seqs delivered, checking every payload."""
    seqs: list[int] = []
    for _ in range(1_000_000):
        batch = q.read_batch(max_items, max_bytes)
        if batch is None:
            return seqs
        got = [seq_of(p) for p in batch.payloads]
        for seq, p in zip(got, batch.payloads, strict=True):
            assert p == payload_for(seq), f"payload of seq {seq} is not what was written"
        assert got[0] == batch.first_seq and got[-1] == batch.last_seq
        seqs.extend(got)
        q.commit(batch)
    raise AssertionError("drain did not terminate")


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))
        f.flush()
        os.fsync(f.fileno())


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, frame size) of each frame of records (not seal) in an undamaged segment file
    (a several-records frame has a 28-byte header)."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = 28 if data[pos + 3] == 2 else 24
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        seq = int.from_bytes(data[pos + 8 : pos + 16], "little")
        if seq:
            out.append((pos, header + length))
        pos += header + length
    return out


def stored_checkpoint(directory: Path):  # -> Checkpoint | None
    """The checkpoint a restart would read from `directory` (the newest valid slot of a v2
    file, or a v1 line), as the queue's own loader reads it."""
    from traits_agent.queue.checkpoint import CheckpointFile

    return CheckpointFile(str(directory), -1).load()[0]


def fail_segment_fsyncs(monkeypatch) -> dict[str, int]:
    """Make the next `failures["left"]` fdatasyncs of regular files (segments are synced with
    fdatasync: appends only) fail with EIO. Only the result is faked; the files are real."""
    real_fdatasync = os.fdatasync
    failures = {"left": 0}

    def flaky_fdatasync(fd: int) -> None:
        if failures["left"] and stat.S_ISREG(os.fstat(fd).st_mode):
            failures["left"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", flaky_fdatasync)
    return failures


def mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of `size` at `path` (made here) for a real full disk; False without
    root or mount(2). The caller umounts it."""
    if os.geteuid() != 0:
        return False
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0
