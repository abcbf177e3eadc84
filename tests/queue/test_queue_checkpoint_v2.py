"""Checkpoint format v2 (queue/checkpoint.py): slots overwritten in place, the old format read
and upgraded, torn and corrupted slots, and the rule that makes a torn write harmless: no
store overwrites the newest durable checkpoint or the one being fsynced."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from queue_helpers import drain, fill, segment_files, stored_checkpoint

from traits_agent.queue import DiskQueue, Position
from traits_agent.queue.checkpoint import (
    CHECKPOINT_NAME,
    FILE_BYTES,
    SLOT_BYTES,
    SLOT_STRIDE,
    SLOTS,
    Checkpoint,
    CheckpointFile,
    read_slots,
)

SMALL = {"segment_bytes": 2048, "max_bytes": 1 << 30}


def _slots(directory: Path) -> list[tuple[int, Checkpoint] | None]:
    return read_slots((directory / CHECKPOINT_NAME).read_bytes())


def _newest_slot(directory: Path) -> int:
    slots = _slots(directory)
    return max((s[0], i) for i, s in enumerate(slots) if s is not None)[1]


def _damage_slot(directory: Path, slot: int, data: bytes) -> None:
    with open(directory / CHECKPOINT_NAME, "r+b") as f:
        f.seek(slot * SLOT_STRIDE)
        f.write(data)


def _open_file(directory: Path) -> tuple[CheckpointFile, int]:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    cpf = CheckpointFile(str(directory), dir_fd)
    cpf.load()
    return cpf, dir_fd


def _cp(offset: int, lease: int = 1000) -> Checkpoint:
    return Checkpoint(Position(1, offset, offset + 1), lease)


def test_the_file_is_three_text_slots_in_separate_blocks(tmp_path):
    with DiskQueue.open(tmp_path, **SMALL) as q:
        fill(q, 30)
        q.commit(q.read_batch(10, 1 << 20))
        data = (tmp_path / CHECKPOINT_NAME).read_bytes()
        assert len(data) == FILE_BYTES == SLOTS * SLOT_STRIDE
        for i in range(SLOTS):
            block = data[i * SLOT_STRIDE : (i + 1) * SLOT_STRIDE]
            assert block[SLOT_BYTES:] == bytes(SLOT_STRIDE - SLOT_BYTES)  # only NULs after
        lines = [data[i * SLOT_STRIDE :].split(b"\0")[0] for i in range(SLOTS)]
        written = [line for line in lines if line]  # two stores so far: two slots
        assert len(written) == 2, lines
        assert all(line.startswith(b"tq-checkpoint v2 gen=") for line in written), lines
        assert all(line.endswith(b"\n") and line.isascii() for line in written), lines
        assert stored_checkpoint(tmp_path).position == q.delivered
        assert os.stat(tmp_path / CHECKPOINT_NAME).st_mode & 0o777 == 0o600


def test_a_commit_inside_a_segment_rewrites_a_slot_in_place(tmp_path):
    """No new file per commit: same inode, no temp file, and the position is readable by a
    restart at once (a process crash resumes there)."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        fill(q, 10)
        inode = os.stat(tmp_path / CHECKPOINT_NAME).st_ino
        for _ in range(5):
            batch = q.read_batch(2, 1 << 20)
            q.commit(batch)
            assert os.stat(tmp_path / CHECKPOINT_NAME).st_ino == inode
            assert not (tmp_path / "checkpoint.tmp").exists()
            assert stored_checkpoint(tmp_path).position == batch.end


def test_old_format_checkpoint_is_read_and_upgraded(tmp_path):
    """A queue directory from before v2 (segments + a one-line v1 checkpoint) opens where
    the v1 checkpoint says, delivers the rest once, and its checkpoint becomes v2."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 200)
        batch = q.read_batch(70, 1 << 20)
        end = batch.end
        lease = q.next_seq + 100
    old = Checkpoint(end, lease).encode()
    assert old.startswith(b"tq-checkpoint v1 segment=")
    (tmp_path / CHECKPOINT_NAME).write_bytes(old)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback is None
        assert q.recovery.checkpoint_adjusted is None
        assert q.delivered == end
        assert q.next_seq >= lease  # the v1 lease is honoured
        assert drain(q) == seqs[70:]
    data = (tmp_path / CHECKPOINT_NAME).read_bytes()
    assert len(data) == FILE_BYTES and data.startswith(b"tq-checkpoint v2 ")
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback is None
        assert drain(q) == []


def test_a_torn_newest_slot_falls_back_to_the_one_before(tmp_path):
    """The newest slot half written (a power cut mid-write): the one before it is used;
    that can only re-deliver, never lose."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 40)
        first = q.read_batch(10, 1 << 20)
        q.commit(first)
        q.sync()  # durable at first.end
        q.commit(q.read_batch(10, 1 << 20))  # the newest: at 20
        newest = _newest_slot(tmp_path)
        # a crash: nothing stored at close (copy the file now, put it back after close)
        saved = (tmp_path / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(saved)
    line = saved[newest * SLOT_STRIDE : newest * SLOT_STRIDE + SLOT_BYTES]
    _damage_slot(tmp_path, newest, line[:40] + b"\xa5" * 30)  # the first 40 bytes made it
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback is None
        assert q.delivered == first.end
        assert drain(q) == seqs[10:]


@pytest.mark.parametrize("damage", ["zeros", "flipped_digit", "garbage"])
def test_every_slot_damaged_is_a_corrupt_checkpoint(tmp_path, damage):
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 50)
        q.commit(q.read_batch(20, 1 << 20))
    data = bytearray((tmp_path / CHECKPOINT_NAME).read_bytes())
    for i in range(SLOTS):
        at = i * SLOT_STRIDE
        if damage == "zeros":
            data[at : at + SLOT_BYTES] = bytes(SLOT_BYTES)
        elif damage == "garbage":
            data[at : at + SLOT_BYTES] = os.urandom(SLOT_BYTES)
        else:
            line = bytes(data[at : at + SLOT_BYTES])
            if line.startswith(b"tq-checkpoint v2"):
                k = line.index(b"offset=") + len(b"offset=")
                data[at + k] = ord("9") if line[k] != ord("9") else ord("8")
    (tmp_path / CHECKPOINT_NAME).write_bytes(bytes(data))
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback == "corrupt"
        assert drain(q) == seqs  # from the oldest segment: duplicates, never loss


def test_non_durable_stores_never_overwrite_the_durable_slot(tmp_path):
    """Any slot written after the last durable store may be torn by a power cut; what is
    left is always the durable checkpoint or a newer one."""
    cpf, dir_fd = _open_file(tmp_path)
    try:
        cpf.store(_cp(0), durable=True)
        for round_ in range(1, 6):
            cpf.store(_cp(100 * round_), durable=True)
            durable_slot = _newest_slot(tmp_path)
            durable_bytes = _slot_bytes(tmp_path, durable_slot)
            for k in range(1, 8):
                cpf.store(_cp(100 * round_ + k), durable=False)
                assert _slot_bytes(tmp_path, durable_slot) == durable_bytes
            # the power cut: every other slot torn
            saved = (tmp_path / CHECKPOINT_NAME).read_bytes()
            for i in range(SLOTS):
                if i != durable_slot:
                    _damage_slot(tmp_path, i, b"\xff" * 50)
            assert stored_checkpoint(tmp_path) == _cp(100 * round_)
            (tmp_path / CHECKPOINT_NAME).write_bytes(saved)
            assert stored_checkpoint(tmp_path) == _cp(100 * round_ + 7)
    finally:
        cpf.close()
        os.close(dir_fd)


def _slot_bytes(directory: Path, slot: int) -> bytes:
    data = (directory / CHECKPOINT_NAME).read_bytes()
    return data[slot * SLOT_STRIDE : slot * SLOT_STRIDE + SLOT_BYTES]


def test_a_commit_does_not_wait_for_a_checkpoint_fsync_in_another_thread(tmp_path, monkeypatch):
    """The sync thread's durable store holds no lock across its fdatasync: a commit's store
    goes on meanwhile, into the third slot (neither the durable one nor the one being
    synced), and the durable one becomes the synced slot once it is done."""
    cpf, dir_fd = _open_file(tmp_path)
    cpf.store(_cp(0), durable=True)
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:  # the disk is slow: hold the fsync open
        entered.set()
        release.wait()
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    durable_slot = _newest_slot(tmp_path)
    syncer = threading.Thread(target=cpf.store, args=(_cp(10),), kwargs={"durable": True})
    syncer.start()
    try:
        assert entered.wait(60)
        syncing_slot = _newest_slot(tmp_path)
        syncing_bytes = _slot_bytes(tmp_path, syncing_slot)
        done = threading.Event()

        def commits() -> None:
            for offset in (20, 21, 22):
                cpf.store(_cp(offset), durable=False)
            done.set()

        committer = threading.Thread(target=commits)
        committer.start()
        committer.join(60)
        assert done.is_set(), "the commit waited for the fsync"
        third = _newest_slot(tmp_path)
        assert len({durable_slot, syncing_slot, third}) == 3
        assert _slot_bytes(tmp_path, syncing_slot) == syncing_bytes
        assert stored_checkpoint(tmp_path) == _cp(22)
        assert cpf.dirty
    finally:
        release.set()
        syncer.join()
    cpf.store(_cp(30), durable=False)  # may now reuse the old durable slot, never the new
    cpf.store(_cp(31), durable=False)
    assert _slot_bytes(tmp_path, syncing_slot).startswith(b"tq-checkpoint v2")
    assert Checkpoint.decode_slot(_slot_bytes(tmp_path, syncing_slot))[1] == _cp(10)
    cpf.close()
    os.close(dir_fd)


def test_a_deleted_checkpoint_file_is_made_again_by_the_next_durable_store(tmp_path):
    with DiskQueue.open(tmp_path, **SMALL) as q:
        seqs = fill(q, 40)
        q.commit(q.read_batch(10, 1 << 20))
        (tmp_path / CHECKPOINT_NAME).unlink()
        q.commit(q.read_batch(10, 1 << 20))
        q.sync()
        assert (tmp_path / CHECKPOINT_NAME).exists()
        assert stored_checkpoint(tmp_path).position == q.delivered
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback is None
        assert drain(q) == seqs[20:]


def test_commits_with_a_syncer_delete_segments_in_the_sync_not_in_commit(tmp_path):
    """`sync_requested` set (as the agent sets it): a commit completing segments stores the
    checkpoint without fsync and asks for a sync; that sync deletes them."""
    asked = []
    with DiskQueue.open(tmp_path, **SMALL) as q:
        q.sync_requested = lambda: asked.append(1)
        seqs = fill(q, 200)
        q.flush()
        before = len(segment_files(tmp_path))
        assert before > 3
        batch = q.read_batch(150, 1 << 20)
        q.commit(batch)
        assert asked == [1]
        assert len(segment_files(tmp_path)) == before  # not in commit
        assert stored_checkpoint(tmp_path).position == batch.end  # but recorded at once
        q.sync()
        assert len(segment_files(tmp_path)) < before
        assert segment_files(tmp_path)[0].stem == f"{batch.end.segment:020d}"
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback is None
        assert drain(q) == seqs[150:]


def test_settle_deletes_delivered_segments_without_a_data_fsync(tmp_path):
    """fsync="never": the syncer's rounds only `settle` (checkpoint durable, then delete)."""
    with DiskQueue.open(tmp_path, fsync="never", **SMALL) as q:
        q.sync_requested = lambda: None
        seqs = fill(q, 200)
        q.flush()
        before = len(segment_files(tmp_path))
        q.commit(q.read_batch(150, 1 << 20))
        durable = q.durable_seq
        q.settle()
        assert q.durable_seq == durable  # no fsync of segment data
        assert len(segment_files(tmp_path)) < before
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert drain(q) == seqs[150:]
