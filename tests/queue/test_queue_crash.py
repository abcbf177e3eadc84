"""Crash safety with a real process: SIGKILL a writer at random moments, then check that
every acknowledged record is there exactly once, in order, and nothing else appears."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from queue_helpers import payload_for, seq_of

from traits_agent.queue import DiskQueue

ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent

# The writer: append, sync (fsync="always" style), then acknowledge by printing the seq.
# Now and then it delivers a batch, printing what it is about to commit and then committed.
CHILD = r"""
import random, sys
from queue_helpers import payload_for
from traits_agent.queue import DiskQueue

directory, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
q = DiskQueue.open(directory, segment_bytes=4096, max_bytes=1 << 30, fsync="always")
print("OPEN", q.next_seq, flush=True)
while True:
    seq = q.next_seq
    assert q.append(payload_for(seq))
    if rng.random() < 0.3:
        q.flush()
        continue  # not acknowledged until the next sync
    q.sync()
    print("A", q.durable_seq, flush=True)
    if rng.random() < 0.1:
        batch = q.read_batch(rng.randint(1, 40), 1 << 20)
        if batch is not None:
            print("R", batch.last_seq, flush=True)  # about to commit: may be gone from now on
            q.commit(batch)
            print("C", batch.last_seq, flush=True)
"""


# The same writer, but every drained active segment is replaced (rotate_drained_bytes=1),
# delivery often takes everything, and now and then the process cannot make a descriptor
# (RLIMIT_NOFILE 0: EMFILE) while it reads and commits.
CHILD_DRAINING = r"""
import random, resource, sys
from queue_helpers import payload_for
from traits_agent.queue import DiskQueue

directory, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
q = DiskQueue.open(
    directory, segment_bytes=4096, max_bytes=1 << 30, fsync="always", rotate_drained_bytes=1
)
print("OPEN", q.next_seq, flush=True)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
while True:
    seq = q.next_seq
    assert q.append(payload_for(seq))
    if rng.random() < 0.3:
        q.flush()
        continue
    q.sync()
    print("A", q.durable_seq, flush=True)
    if rng.random() < 0.1:  # a backlog of a few segments builds up between deliveries
        starved = rng.random() < 0.3
        if starved:
            resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
        limit = rng.choice([rng.randint(1, 40), rng.randint(1, 200), 1 << 20])
        batch = q.read_batch(limit, 1 << 20)
        if batch is not None:
            print("D", ",".join(map(str, batch.seqs)), flush=True)  # delivered: every seq
            print("R", batch.last_seq, flush=True)
            q.commit(batch)
            print("C", batch.last_seq, flush=True)
        if starved:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
"""


# The writer appending bursts with append_many (several-records frames), delivering batches
# whose limits fall inside frames (so checkpoints land inside frames), now and then cut short.
CHILD_MANY = r"""
import random, sys
from queue_helpers import payload_for
from traits_agent.queue import DiskQueue

directory, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
q = DiskQueue.open(directory, segment_bytes=16384, max_bytes=1 << 30, fsync="always")
print("OPEN", q.next_seq, flush=True)
while True:
    first = q.next_seq
    n = rng.choice([1, rng.randint(2, 60), rng.randint(100, 400)])
    assert q.append_many([payload_for(s) for s in range(first, first + n)]) == n
    if rng.random() < 0.3:
        q.flush()
        continue
    q.sync()
    print("A", q.durable_seq, flush=True)
    if rng.random() < 0.3:
        batch = q.read_batch(rng.randint(1, 300), rng.choice([1 << 20, rng.randint(1, 8000)]))
        if batch is not None:
            print("D", ",".join(map(str, batch.seqs)), flush=True)
            print("R", batch.last_seq, flush=True)
            q.commit(batch)
            print("C", batch.last_seq, flush=True)
"""


# Checkpoint v2 as the agent drives it: commits only pwrite the checkpoint and ask for a sync
# (`sync_requested`); a second thread syncs all the time (the group-commit Syncer), so its
# durable checkpoint stores, fdatasyncs and segment deletions overlap the commits.
CHILD_SYNCER = r"""
import random, sys, threading
from queue_helpers import payload_for
from traits_agent.queue import DiskQueue

directory, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
q = DiskQueue.open(
    directory, segment_bytes=4096, max_bytes=1 << 30, fsync="always", rotate_drained_bytes=1
)
q.sync_requested = lambda: None  # the thread below syncs anyway
print("OPEN", q.next_seq, flush=True)

def syncer():
    while True:
        q.sync()

threading.Thread(target=syncer, daemon=True).start()
while True:
    seq = q.next_seq
    assert q.append(payload_for(seq))
    if rng.random() < 0.3:
        q.flush()
        continue
    q.sync()
    print("A", q.durable_seq, flush=True)
    if rng.random() < 0.15:
        limit = rng.choice([rng.randint(1, 40), rng.randint(1, 200), 1 << 20])
        batch = q.read_batch(limit, 1 << 20)
        if batch is not None:
            print("D", ",".join(map(str, batch.seqs)), flush=True)  # delivered: every seq
            print("R", batch.last_seq, flush=True)
            q.commit(batch)
            print("C", batch.last_seq, flush=True)
"""


# The same at the quota (drop_newest: a refused record takes no seq and is not acknowledged):
# commits leave delivered segments to a sync thread that runs only when asked, now and then
# late, so appends meet the quota with delivered segments still on disk and must not delete
# them themselves (`DiskQueue._room_past_delivered`).
CHILD_QUOTA = r"""
import random, sys, threading, time
from queue_helpers import payload_for
from traits_agent.queue import DiskQueue

directory, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
q = DiskQueue.open(directory, segment_bytes=4096, max_bytes=24576, on_full="drop_newest")
asked = threading.Event()
q.sync_requested = asked.set
print("OPEN", q.next_seq, flush=True)

def syncer():
    while True:
        asked.wait()
        asked.clear()
        time.sleep(rng.choice([0.001, 0.01, 0.03]))  # a slow disk: the round comes late
        q.sync()

threading.Thread(target=syncer, daemon=True).start()
while True:
    seq = q.next_seq
    if not q.append(payload_for(seq)):
        time.sleep(0.001)  # refused at the quota: not acknowledged
    elif rng.random() < 0.9:
        q.flush()
        continue
    else:
        q.sync()
        print("A", q.durable_seq, flush=True)
    if rng.random() < 0.02:  # the quota fills between deliveries of everything queued
        batch = q.read_batch(1 << 20, 1 << 20)
        if batch is not None:
            print("D", ",".join(map(str, batch.seqs)), flush=True)
            print("R", batch.last_seq, flush=True)
            q.commit(batch)
            print("C", batch.last_seq, flush=True)
"""


def _run_and_kill(directory: Path, rng: random.Random, child: str = CHILD) -> list[str]:
    """Start the writer, SIGKILL it after a random number of acks; its complete lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HELPERS)]))
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(directory), str(rng.randrange(1 << 30))],
        stdout=subprocess.PIPE,
        env=env,
    )
    target = rng.choice([0, rng.randint(1, 40), rng.randint(1, 200)])
    data = b""
    deadline = time.monotonic() + 20
    try:
        if target == 0:  # kill during start-up or recovery
            time.sleep(rng.uniform(0, 0.15))
        while data.count(b"\nA ") < target:
            ready, _, _ = select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))
            assert ready, "writer stalled"
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    finally:
        proc.send_signal(signal.SIGKILL)
        data += proc.stdout.read()
        proc.stdout.close()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, data[-2000:]
    return data.decode().split("\n")[:-1]  # the last piece is partial or empty


def _check(directory: Path, lines: list[str], state: dict) -> None:
    opened = [int(line.split()[1]) for line in lines if line.startswith("OPEN")]
    acks = [int(line.split()[1]) for line in lines if line.startswith("A")]
    commits = [int(line.split()[1]) for line in lines if line[0] in "RC"]
    if commits:
        state["committed"] = max(state["committed"], *commits)
    if opened:
        # "A n" acknowledges every seq of this run up to n (durable_seq)
        start = opened[0]
        acked_to = max(acks) if acks else start - 1
        state["acked"].update(range(start, acked_to + 1))
        # appended after the last ack: flushed maybe, never acknowledged; a short run
        state["possible"].update(range(acked_to + 1, acked_to + state.get("run", 64)))
    with DiskQueue.open(directory, segment_bytes=4096, max_bytes=1 << 30) as q:
        batch = q.read_batch(1 << 30, 1 << 40)
        got = [] if batch is None else [seq_of(p) for p in batch.payloads]
        if batch is not None:
            assert all(p == payload_for(s) for s, p in zip(got, batch.payloads, strict=True))
        assert got == sorted(set(got)), "out of order or duplicated"
        must = {s for s in state["acked"] if s > state["committed"]}
        assert must <= set(got), f"acknowledged records lost: {sorted(must - set(got))[:10]}"
        unexpected = set(got) - state["acked"] - state["possible"]
        assert not unexpected, f"records that were never written: {sorted(unexpected)[:10]}"
        if "delivered" in state:  # the child names every seq it delivers: none may vanish
            for line in lines:
                if line.startswith("D "):
                    state["delivered"].update(int(x) for x in line[2:].split(","))
            lost = state["acked"] - state["delivered"] - set(got)
            assert not lost, f"acknowledged records neither delivered nor queued: {sorted(lost)}"


def _crash_loop(tmp_path: Path, iterations: int, seed: int, child: str = CHILD) -> None:
    rng = random.Random(seed)
    state = {"acked": set(), "committed": 0, "possible": set()}
    if child is not CHILD:
        state["delivered"] = set()
    if child is CHILD_MANY:
        state["run"] = 64 * 400  # bursts of up to 400, several unacknowledged in a row
    if child is CHILD_QUOTA:
        # 9 appends in 10 are only flushed, so the unacknowledged tail at the kill is
        # geometric (mean 10): 64 or more in a row comes once in ~760 kills (12 % of the
        # 100-kill runs, 1.3 % of the 10-kill one), and was reported as "never written"
        # from the last ack + 64 on. 0.9 ** 1024 is ~1e-47.
        state["run"] = 1024
    for _ in range(iterations):
        lines = _run_and_kill(tmp_path / "q", rng, child)
        _check(tmp_path / "q", lines, state)
    assert state["acked"], "the writer never got going"


def test_sigkill_loses_no_acknowledged_record(tmp_path):
    """10 kills at random moments: acknowledged records survive, exactly once, in order."""
    _crash_loop(tmp_path, 10, seed=1234)


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_record_100(tmp_path):
    """The same, 100 kills."""
    _crash_loop(tmp_path, 100, seed=99)


def test_sigkill_with_several_records_frames(tmp_path):
    """10 kills of a writer appending bursts (several-records frames) and delivering batches
    cut inside frames: acknowledged records survive exactly once, in order."""
    _crash_loop(tmp_path, 10, seed=2468, child=CHILD_MANY)


@pytest.mark.slow
def test_sigkill_with_several_records_frames_100(tmp_path):
    _crash_loop(tmp_path, 100, seed=1357, child=CHILD_MANY)


def test_sigkill_while_rotating_drained_segments_and_starved_of_fds(tmp_path):
    """Kills while drained active segments are replaced and reads hit EMFILE: acknowledged
    records survive exactly once, in order; nothing unread is ever committed past."""
    _crash_loop(tmp_path, 10, seed=4321, child=CHILD_DRAINING)


@pytest.mark.slow
def test_sigkill_while_rotating_drained_segments_and_starved_of_fds_100(tmp_path):
    _crash_loop(tmp_path, 100, seed=77, child=CHILD_DRAINING)


def test_sigkill_with_checkpoint_stores_in_a_sync_thread(tmp_path):
    """Checkpoint v2 driven as the agent drives it (commits pwrite; a sync thread stores
    durably, fdatasyncs and deletes segments meanwhile), killed at random moments:
    acknowledged records survive exactly once, in order; nothing delivered comes back past
    a commit, nothing undelivered is skipped."""
    _crash_loop(tmp_path, 10, seed=2468, child=CHILD_SYNCER)


@pytest.mark.slow
def test_sigkill_with_checkpoint_stores_in_a_sync_thread_100(tmp_path):
    _crash_loop(tmp_path, 100, seed=1357, child=CHILD_SYNCER)


def test_sigkill_at_the_quota_with_deletions_left_to_the_sync_thread(tmp_path):
    """Appends at the quota while delivered segments wait for the sync thread, killed at
    random moments: acknowledged records survive exactly once, in order; what was refused
    was never acknowledged."""
    _crash_loop(tmp_path, 10, seed=97, child=CHILD_QUOTA)


@pytest.mark.slow
def test_sigkill_at_the_quota_with_deletions_left_to_the_sync_thread_100(tmp_path):
    _crash_loop(tmp_path, 100, seed=79, child=CHILD_QUOTA)
