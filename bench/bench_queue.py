"""Queue throughput and latency: prints figures, asserts nothing.

    .venv/bin/python bench/bench_queue.py [--records 1000000] [--size 200] [--dir PATH]

Measures, for N records of SIZE bytes: append+flush rate (flush every 1000 appends, as
after an ingest burst), sync latency (fsync after bursts of 1000), read_batch+commit rate
(batches of 1000 items / 1 MiB), and recovery time of the full backlog.

Then the same N records appended in runs of `--run` with `append_many` (several-records
frames, as ingest stores a burst) against one `append` each (one-record frames), in the same
run: append rate, bytes on disk per record, read+commit rate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from traits_agent.queue import DiskQueue


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--dir", default=None, help="where to put the queue (default: a tmpdir)")
    parser.add_argument("--run", type=int, default=100, help="records per append_many call")
    args = parser.parse_args()
    n, size = args.records, args.size
    base = tempfile.mkdtemp(prefix="bench-queue-", dir=args.dir)
    path = os.path.join(base, "q")
    payload = b'{"e":"' + b"x" * (size - 8) + b'"}'
    mb = n * size / 1e6
    print(f"{n:,} records of {len(payload)} bytes ({mb:.0f} MB payload) in {path}")
    try:
        with DiskQueue.open(path, max_bytes=16 << 30) as q:
            t0 = time.perf_counter()
            for i in range(n):
                q.append(payload)
                if i % 1000 == 999:
                    q.flush()
            q.flush()
            dt = time.perf_counter() - t0
            print(f"append+flush   {n / dt:12,.0f} records/s  {mb / dt:8.1f} MB/s")

            t0 = time.perf_counter()
            q.sync()
            print(f"first sync     {1000 * (time.perf_counter() - t0):12.1f} ms  (the backlog)")
            lat = []
            for _ in range(200):
                for _ in range(1000):
                    q.append(payload)
                t0 = time.perf_counter()
                q.sync()
                lat.append(1000 * (time.perf_counter() - t0))
            lat.sort()
            print(
                f"sync latency   p50 {statistics.median(lat):.2f} ms  p99 {lat[197]:.2f} ms"
                f"  max {lat[-1]:.2f} ms  (flush + fsync of 1000 records)"
            )

        t0 = time.perf_counter()
        q = DiskQueue.open(path, max_bytes=16 << 30)
        dt = time.perf_counter() - t0
        print(
            f"recovery       {1000 * dt:12.1f} ms"
            f"  ({q.segments} segments, {q.pending_items:,} records)"
        )
        with q:
            t0 = time.perf_counter()
            count = 0
            while batch := q.read_batch(1000, 1 << 20):
                count += len(batch)
                q.commit(batch)
            dt = time.perf_counter() - t0
            print(
                f"read+commit    {count / dt:12,.0f} records/s  {count * size / 1e6 / dt:8.1f} MB/s"
            )
        print(f"\none record per frame vs runs of {args.run} (append_many), same records:")
        for many in (False, True):
            frames(os.path.join(base, f"frames-{many}"), payload, n, args.run, many)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def frames(path: str, payload: bytes, n: int, run: int, many: bool) -> None:
    """Append n records (one by one, or in runs), then read and commit them all; one row."""
    with DiskQueue.open(path, max_bytes=16 << 30) as q:
        t0 = time.perf_counter()
        if many:
            block = [payload] * run
            for _ in range(n // run):
                q.append_many(block)
                q.flush()
        else:
            for i in range(n // run * run):
                q.append(payload)
                if i % run == run - 1:
                    q.flush()
        append = time.perf_counter() - t0
        per_record = q.disk_bytes / q.pending_items
        t0 = time.perf_counter()
        count = 0
        while batch := q.read_batch(1000, 1 << 20):
            count += len(batch)
            q.commit(batch)
        read = time.perf_counter() - t0
    label = f"append_many({run})" if many else "append"
    print(
        f"  {label:<18} append {count / append:10,.0f}/s   {per_record:6.1f} B/record on disk"
        f" ({per_record - len(payload):5.1f} framing)   read+commit {count / read:10,.0f}/s"
    )


if __name__ == "__main__":
    main()
