"""When is what was received on disk: the group-commit `Syncer` and the Forward `AckGate`.

Intake appends to the queues without fsyncing; the Syncer fsyncs the queues that took writes,
as a group, on the `queue.fsync` policy, and after every round tells the `AckGate`, which wakes
the Forward connections whose acks wait for their records to be durable. An ack therefore never
covers a record that only exists in memory or in the page cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import structlog
import trio

from traits_agent.observe.metrics import Counters

log = structlog.get_logger(__name__)


class SyncableQueue(Protocol):
    """What the Syncer needs of a queue (`DiskQueue` has it)."""

    def sync(self) -> None: ...


class _Queue(Protocol):
    @property
    def next_seq(self) -> int: ...
    @property
    def durable_seq(self) -> int: ...


#: (queue, seq) pairs: durable once every queue's durable_seq has reached its seq
Mark = tuple[tuple[_Queue, int], ...]


def _nothing() -> None:
    pass


class AckGate:
    """Tells stream sources when the records they appended are durable (fsynced).

    The source calls `mark(names)` right after appending to the queues `names` and later
    `await wait(mark)`; the Syncer calls `synced()` after each round of fsyncs (whether every
    queue succeeded or not: `wait` re-checks `durable_seq`, which only a good fsync advances).
    `written()` asks the Syncer for a round (group commit). With `fsync="never"` a mark is
    empty and `wait` returns at once: the caller flushes to the OS first, and that is all.

    Marks use `next_seq - 1` rather than `written_seq`: if a write fails, the records stay
    buffered in the queue and `durable_seq` does not pass them until a later flush and fsync
    succeed, so an ack never covers records that only exist in memory.
    """

    def __init__(
        self,
        queues: Mapping[str, _Queue],
        *,
        fsync: str = "interval",
        request_sync: Callable[[], None] = _nothing,
    ) -> None:
        self.queues = queues
        self.waits_for_fsync = fsync != "never"
        self._request_sync = request_sync
        self._synced = trio.Event()

    def mark(self, names: Iterable[str]) -> Mark:
        """What must be durable for every record appended so far to the queues `names`."""
        if not self.waits_for_fsync:
            return ()
        return tuple((q, q.next_seq - 1) for q in (self.queues[name] for name in names))

    @staticmethod
    def reached(mark: Mark) -> bool:
        return all(queue.durable_seq >= seq for queue, seq in mark)

    async def wait(self, mark: Mark) -> None:
        """Return once `mark` is durable (no polling: woken by `synced`)."""
        while not self.reached(mark):
            await self._synced.wait()

    def written(self) -> None:
        """Records were handed to the queues: have them fsynced soon."""
        self._request_sync()

    def synced(self) -> None:
        """Called by the Syncer after each round of fsyncs: wake the waiters to re-check."""
        event, self._synced = self._synced, trio.Event()
        event.set()


#: the gate's old name; forward.py and its tests still use it (another branch is changing them)
Durability = AckGate


class Syncer:
    """Group commit: fsync the queues that took writes, every `fsync_interval_ms` ("interval"),
    as soon as possible after each burst ("always"), or only at shutdown ("never")."""

    def __init__(
        self,
        queues: Mapping[str, SyncableQueue],
        counters: Counters,
        *,
        policy: str = "interval",
        interval_s: float = 0.1,
    ) -> None:
        self.queues = queues
        self.counters = counters
        self.policy = policy
        self.interval = interval_s
        self._dirty = trio.Event()
        #: called after every round of fsyncs (the Forward source's acks wait for it)
        self.on_synced: Callable[[], None] = lambda: None

    def dirty(self) -> None:
        self._dirty.set()

    def write_failed(self, resource: str, error: OSError) -> None:
        self.counters.inc("queue_write_errors", resource=resource, errno=str(error.errno))
        log.error(
            "queue_write_failed",
            resource=resource,
            errno=error.errno,
            error=str(error),
            hint="events stay buffered in memory (bounded) until the disk takes them",
        )

    async def sync_all(self) -> bool:
        """fsync every queue (in a worker thread); False if any failed."""
        ok = True
        for name, queue in self.queues.items():
            try:
                await trio.to_thread.run_sync(queue.sync)
            except OSError as e:
                ok = False
                self.write_failed(name, e)
        self.on_synced()
        return ok

    async def run(self) -> None:
        if self.policy == "never":
            await trio.sleep_forever()
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if not await self.sync_all():
                # held bytes (and Forward acks waiting on them) need another try even if no
                # new event arrives to mark the queues dirty
                self._dirty.set()
                await trio.sleep(max(self.interval, 1.0))
            elif self.policy == "interval":
                await trio.sleep(self.interval)
