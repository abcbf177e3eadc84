"""Stray files in a queue directory (issue 7, item 14), and the modes of what the queue
creates whatever the umask (item 4, the queue's part)."""

from __future__ import annotations

import os
import stat
import tracemalloc

import pytest
from queue_helpers import drain, fill, segment_files

from traits_agent.queue import DiskQueue
from traits_agent.queue.checkpoint import CHECKPOINT_NAME, TEMP_NAME, Checkpoint
from traits_agent.queue.segments import Position, segment_name

SMALL = {"segment_bytes": 2048, "max_bytes": 1 << 30}


def make_queue(path, n, **kw):
    with DiskQueue.open(path, **(SMALL | kw)) as q:
        return fill(q, n)


def test_empty_segment_numbered_ten_million_costs_nothing(tmp_path):
    """Before: a 10**7-entry missing_segments list (758 MB, an 89 MB log line)."""
    seqs = make_queue(tmp_path, 100)
    (tmp_path / segment_name(10**7)).touch()
    tracemalloc.start()
    try:
        with DiskQueue.open(tmp_path, **SMALL) as q:
            _, peak = tracemalloc.get_traced_memory()
            report = q.recovery
            assert report.missing_segment_count > 10**7 - 100
            assert len(report.missing_segments) <= 100
            assert len(repr(report.as_dict())) < 10_000
            assert drain(q) == seqs
            fill(q, 10)
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"recovery peak {peak} bytes"
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.pending_items == 10


@pytest.mark.parametrize("name", [CHECKPOINT_NAME, TEMP_NAME, "lock"])
def test_directory_in_place_of_a_queue_file_is_moved_aside(tmp_path, name):
    """Before: a directory named `checkpoint` made every start fail (rename over it)."""
    seqs = make_queue(tmp_path, 100)
    if (tmp_path / name).exists():
        (tmp_path / name).unlink()
    (tmp_path / name).mkdir()
    (tmp_path / name / "inside").write_text("x")
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.moved_aside == [f"{name} -> {name}.stray-1"]
        assert q.recovery.has_findings
        got = drain(q)
        # without a checkpoint, delivery starts over at the oldest segment (no loss)
        assert got == seqs
    assert (tmp_path / f"{name}.stray-1" / "inside").read_text() == "x"
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.moved_aside == []
        assert drain(q) == []


def test_directory_in_place_of_a_delivered_segment_does_not_stop_start(tmp_path):
    """A segment before the checkpoint is deleted at open; a directory there cannot be,
    and must not stop any start."""
    make_queue(tmp_path, 200)
    with DiskQueue.open(tmp_path, **SMALL) as q:
        drain(q)
        rest = fill(q, 50)
    first = segment_files(tmp_path)[0]
    number = int(first.stem) - 1
    (tmp_path / segment_name(number)).mkdir()
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert drain(q) == rest
    with DiskQueue.open(tmp_path, **SMALL) as q:  # and again: it is still there
        assert drain(q) == []


def test_directory_in_place_of_the_newest_segment(tmp_path):
    seqs = make_queue(tmp_path, 100)
    newest = segment_files(tmp_path)[-1]
    newest.rename(tmp_path / "aside")
    newest.mkdir()
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.unreadable_segment_count == 1
        got = drain(q)
        assert got == [s for s in seqs if s in got] and len(got) < len(seqs)
        more = fill(q, 20)
        assert drain(q) == more


@pytest.mark.parametrize(
    "field", ["next_seq", "seq_lease", "both", "offset", "segment"], ids=lambda f: f
)
def test_checkpoint_seq_beyond_u64_is_a_corrupt_checkpoint(tmp_path, field):
    """Before: seq_lease = 2**64 made every `append` raise struct.error into ingest."""
    seqs = make_queue(tmp_path, 50)
    values = {"segment": 0, "offset": 0, "next_seq": 1, "seq_lease": 1}
    if field == "both":
        values |= {"next_seq": 2**64, "seq_lease": 2**64 + 5}
    else:
        values[field] = 2**64 + 1
    cp = Checkpoint(Position(values["segment"], values["offset"], values["next_seq"]), 0)
    cp = Checkpoint(cp.position, values["seq_lease"])
    (tmp_path / CHECKPOINT_NAME).write_bytes(cp.encode())
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert q.recovery.checkpoint_fallback == "corrupt"
        assert q.next_seq < 2**62
        more = fill(q, 3)
        assert drain(q) == seqs + more
    with DiskQueue.open(tmp_path, **SMALL) as q:
        fill(q, 3)
        q.sync()


def _modes(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_everything_the_queue_creates_is_private_whatever_the_umask(tmp_path, umask):
    """Before: with umask 000 segments and checkpoints were 0666... and dirs 0777."""
    old = os.umask(umask)
    try:
        directory = tmp_path / "deep" / "queue"
        with DiskQueue.open(directory, segment_bytes=2048, max_bytes=1 << 20) as q:
            fill(q, 100)
            drain(q, max_items=7)  # commits: checkpoint and its temp file are rewritten
            fill(q, 30)
            q.sync()
        with DiskQueue.open(directory, segment_bytes=2048, max_bytes=1 << 20) as q:
            fill(q, 5)
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "deep")
    names = set(modes)
    assert {"queue", "queue/lock", "queue/checkpoint", "queue/reserve"} <= names
    assert any(n.endswith(".seg") for n in names)
    wrong = {
        n: oct(m)
        for n, m in modes.items()
        if m != (0o700 if os.path.isdir(tmp_path / "deep" / n) else 0o600)
    }
    assert not wrong
    assert stat.S_IMODE(os.stat(tmp_path / "deep").st_mode) == 0o700
