"""sync() in a worker thread while the owner thread appends, flushes, reads and commits."""

from __future__ import annotations

import threading

import trio
from queue_helpers import drain, payload_for, seq_of

from traits_agent.queue import DiskQueue

SMALL = {"segment_bytes": 16 * 1024, "max_bytes": 1 << 30}


def test_sync_thread_races_appends_without_corruption(tmp_path):
    """A thread syncing in a loop never corrupts the log or lets durable_seq go backwards."""
    stop = threading.Event()
    durable: list[int] = []
    errors: list[BaseException] = []

    def syncer(q: DiskQueue) -> None:
        try:
            while not stop.is_set():
                q.sync()
                durable.append(q.durable_seq)
        except BaseException as e:  # surfaced below
            errors.append(e)

    with DiskQueue.open(tmp_path, **SMALL) as q:
        thread = threading.Thread(target=syncer, args=(q,))
        thread.start()
        delivered = []
        try:
            for i in range(30_000):
                assert q.append(payload_for(q.next_seq))
                if i % 50 == 0:
                    q.flush()
                if i % 997 == 0:
                    batch = q.read_batch(300, 1 << 20)
                    if batch is not None:
                        delivered += [seq_of(p) for p in batch.payloads]
                        q.commit(batch)
            q.flush()
        finally:
            stop.set()
            thread.join()
        assert not errors, errors
        assert len(durable) > 5, "the sync thread barely ran"
        assert durable == sorted(durable)
        written = q.next_seq - 1
    with DiskQueue.open(tmp_path, **SMALL) as q:
        assert not q.recovery.has_findings, q.recovery
        assert delivered + drain(q) == list(range(1, written + 1))


async def test_sync_via_trio_to_thread(tmp_path):
    """The intended use: trio.to_thread.run_sync(queue.sync) between bursts of appends."""
    with DiskQueue.open(tmp_path, **SMALL) as q:
        for _ in range(20):
            for _ in range(500):
                q.append(payload_for(q.next_seq))
            q.flush()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, q.sync)
                for _ in range(100):  # the event loop keeps appending meanwhile
                    q.append(payload_for(q.next_seq))
            assert q.durable_seq >= q.next_seq - 101
        q.sync()
        assert q.durable_seq == q.next_seq - 1 == 12_000
        assert drain(q) == list(range(1, 12_001))
