"""`DiskQueue.append_many`: the same queue, byte for byte, as one `append` per record.

Its fast case (the whole run fits the buffer, the quota and the segment) frames the run in one
pass; everything else goes record by record. Both must leave the same files, seqs and counters
as `append`, including across segment changes, a full quota (either policy) and restarts.
"""

from __future__ import annotations

import pytest
from queue_helpers import drain, payload_for, segment_files

from traits_agent.queue import MAX_PAYLOAD, DiskQueue, QueueClosedError

COUNTERS = ("appended_total", "dropped_oldest", "dropped_newest", "pending_items", "next_seq")


def build(path, runs: list[int], many: bool, **options) -> tuple[dict, list[bytes], list[int]]:
    """Append `runs` (run lengths) of seq-stamped payloads; (counters, files, taken per run)."""
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
    files = [f.read_bytes() for f in segment_files(path)]
    return counters, files, taken


@pytest.mark.parametrize(
    ("runs", "options"),
    [
        ([1, 5, 50, 1, 200], {}),
        # runs that cross segment ends: seals and new segments as append makes them
        ([40] * 30, {"segment_bytes": 4096, "max_bytes": 1 << 20}),
        # short runs that fit until one does not: the seal sums up what the fast case took
        ([3] * 100, {"segment_bytes": 4096, "max_bytes": 1 << 20}),
        # a full quota: the oldest segments go, as they would one append at a time
        ([40] * 60, {"segment_bytes": 4096, "max_bytes": 16384}),
        ([3] * 300, {"segment_bytes": 4096, "max_bytes": 16384}),
        ([40] * 60, {"segment_bytes": 4096, "max_bytes": 16384, "on_full": "drop_newest"}),
        ([0, 3, 0], {}),
    ],
)
def test_the_same_as_append_per_record(tmp_path, runs, options) -> None:
    one = build(tmp_path / "one", runs, many=False, **options)
    many = build(tmp_path / "many", runs, many=True, **options)
    assert many == one
    assert sum(one[2]) > 0


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
