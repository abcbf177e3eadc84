"""`DiskQueue.append_many`: the same records, seqs and counters as one `append` per record,
in fewer bytes.

Its fast case (the run fits the buffer, the quota and the segment) frames the run in
several-records frames; everything else goes record by record. Read back, both must give the
same records with the same seqs, across segment changes and restarts; under a full quota both
account for every record (kept or counted dropped), and the smaller frames never keep fewer.
"""

from __future__ import annotations

import pytest
from queue_helpers import drain, payload_for, segment_files, seq_of

from traits_agent.queue import MAX_PAYLOAD, DiskQueue, QueueClosedError

COUNTERS = ("appended_total", "dropped_oldest", "dropped_newest", "pending_items", "next_seq")


def build(path, runs: list[int], many: bool, **options) -> tuple[dict, list[int], list[int]]:
    """Append `runs` (run lengths) of seq-stamped payloads, reopen and read everything back:
    (counters before close, seqs read back, taken per run). `drain` checks every payload."""
    taken = []
    with DiskQueue.open(path, **options) as q:
        seq = 1
        for n in runs:
            payloads = [payload_for(s) for s in range(seq, seq + n)]
            seq += n
            if many:
                taken.append(q.append_many(payloads))
            else:
                taken.append(sum(q.append(p) for p in payloads))
            q.flush()
        counters = {name: getattr(q, name) for name in COUNTERS}
    with DiskQueue.open(path, **options) as q:
        seqs = read_back(q)
    return counters, seqs, taken


def read_back(q: DiskQueue) -> list[int]:
    """The payloads' own seqs (the test's numbering), read and committed until empty. Under
    drop_newest they are not the queue's seqs: a dropped record takes no seq."""
    got: list[int] = []
    while (batch := q.read_batch(500, 1 << 20)) is not None:
        for p in batch.payloads:
            assert p == payload_for(seq_of(p)), "a payload is not what was written"
        got += map(seq_of, batch.payloads)
        q.commit(batch)
    return got


@pytest.mark.parametrize(
    ("runs", "options"),
    [
        ([1, 5, 50, 1, 200], {}),
        # runs that cross segment ends: seals and new segments as append makes them
        ([40] * 30, {"segment_bytes": 4096, "max_bytes": 1 << 20}),
        # short runs that fit until one does not: the seal sums up what the fast case took
        ([3] * 100, {"segment_bytes": 4096, "max_bytes": 1 << 20}),
        # runs longer than one several-records frame holds
        ([1000, 129, 128, 127], {}),
        ([0, 3, 0], {}),
    ],
)
def test_the_same_records_as_append_per_record(tmp_path, runs, options) -> None:
    one = build(tmp_path / "one", runs, many=False, **options)
    many = build(tmp_path / "many", runs, many=True, **options)
    assert many == one
    assert one[1] == list(range(1, sum(runs) + 1))
    with DiskQueue.open(tmp_path / "many", **options) as q:  # and the queue's seqs are theirs
        assert q.append_many([payload_for(s) for s in range(q.next_seq, q.next_seq + 300)]) == 300
        q.flush()
        assert drain(q, max_items=77) == list(range(sum(runs) + 1, sum(runs) + 301))


@pytest.mark.parametrize(
    "options",
    [
        {"segment_bytes": 4096, "max_bytes": 16384},
        {"segment_bytes": 4096, "max_bytes": 16384, "on_full": "drop_newest"},
    ],
)
@pytest.mark.parametrize("runs", [[40] * 60, [3] * 300])
def test_a_full_quota_accounts_for_every_record(tmp_path, runs, options) -> None:
    """Dropped (oldest or newest) or read back, each record once; the frames that hold a run
    are smaller than a frame per record, so append_many keeps at least as many."""
    results = {}
    for many in (False, True):
        counters, seqs, taken = build(tmp_path / str(many), runs, many=many, **options)
        total = sum(runs)
        dropped = counters["dropped_oldest"] + counters["dropped_newest"]
        assert counters["appended_total"] == sum(taken) == total - counters["dropped_newest"]
        assert len(seqs) + dropped == total
        assert seqs == sorted(set(seqs))
        if options.get("on_full") == "drop_newest":
            # the newest went (a smaller record after a refused one may still fit)
            assert seqs[0] == 1 and set(seqs) <= set(range(1, total + 1))
        else:
            assert seqs == list(range(total - len(seqs) + 1, total + 1))  # the oldest went
        results[many] = len(seqs)
    assert results[True] >= results[False] > 0


def test_a_run_takes_fewer_bytes_than_a_frame_per_record(tmp_path) -> None:
    sizes = {}
    for many in (False, True):
        build(tmp_path / str(many), [1000], many=many)
        sizes[many] = sum(f.stat().st_size for f in segment_files(tmp_path / str(many)))
    payload_bytes = sum(len(payload_for(s)) for s in range(1, 1001))
    seal = 56  # the reopen in `build` seals the segment
    assert sizes[False] == payload_bytes + 1000 * 24 + seal
    # a newline and a CRC per record, and a 28-byte header per 128 records
    assert sizes[True] == payload_bytes + 1000 * 5 - 8 + 28 * 8 + seal


def test_read_back_after_restart(tmp_path) -> None:
    with DiskQueue.open(tmp_path, segment_bytes=4096, max_bytes=1 << 20) as q:
        for start in range(1, 1001, 100):
            assert q.append_many([payload_for(s) for s in range(start, start + 100)]) == 100
    with DiskQueue.open(tmp_path, segment_bytes=4096, max_bytes=1 << 20) as q:
        assert drain(q) == list(range(1, 1001))


def test_an_oversized_payload_raises_before_any_is_taken(tmp_path) -> None:
    with DiskQueue.open(tmp_path) as q:
        with pytest.raises(ValueError, match="limit"):
            q.append_many([b"ok", b"x" * (MAX_PAYLOAD + 1)])
        assert q.appended_total == 0 and q.next_seq == 1


def test_closed_queue_raises(tmp_path) -> None:
    q = DiskQueue.open(tmp_path)
    q.close()
    with pytest.raises(QueueClosedError):
        q.append_many([b"x"])
