"""When is what was received on disk: the group-commit `Syncer` and the Forward `AckGate`.

Intake appends to the queues without fsyncing; the Syncer fsyncs the queues that took writes,
as a group, on the `queue.fsync` policy, and after every round tells the `AckGate`, which wakes
the Forward connections whose acks wait for their records to be durable. An ack therefore never
covers a record that only exists in memory or in the page cache.

Group commit, "interval" policy: `fsync_interval_ms` is an upper bound on how long a record
stays un-fsynced, not a floor on ack latency. Records nobody waits for (datagrams, Forward
messages without `chunk`) are fsynced at most one interval after the previous round began, so
a flood of them costs one round per interval. When a Forward ack waits (`AckGate.wait`) and
no round is running, one starts at once; records that arrive during a round ride the next one,
which starts as soon as it ends. A client that waits for each event's ack therefore gets one
ack per fsync of the disk (0.5-5 ms on the bench VM), not one per interval (it was: 9 acked
events/s per connection), and many such clients share each fsync.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import structlog
import trio

from traits_agent.observe.metrics import Counters

log = structlog.get_logger(__name__)


class SyncableQueue(Protocol):
    """What the Syncer needs of a queue (`DiskQueue` has it)."""

    def sync(self) -> None: ...

    def settle(self) -> None: ...


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
        request_prompt_sync: Callable[[], None] | None = None,
    ) -> None:
        self.queues = queues
        self.waits_for_fsync = fsync != "never"
        self._request_sync = request_sync
        #: asks for a round now (an ack waits): `Syncer.prompt`
        self._request_prompt_sync = request_prompt_sync or request_sync
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
        """Return once `mark` is durable (no polling: woken by `synced`). Asks for a round
        now, once: an ack is waiting, so the interval must not be waited out."""
        if self.reached(mark):
            return
        self._request_prompt_sync()
        while not self.reached(mark):
            await self._synced.wait()

    def written(self) -> None:
        """Records were handed to the queues: have them fsynced soon."""
        self._request_sync()

    def synced(self) -> None:
        """Called by the Syncer after each round of fsyncs: wake the waiters to re-check."""
        event, self._synced = self._synced, trio.Event()
        event.set()


class Syncer:
    """Group commit: fsync the queues that took writes, at most one interval after the last
    round ("interval", or at once when an ack waits: `prompt`), as soon as possible after each
    burst ("always"), or only at shutdown ("never"). See the module docstring."""

    def __init__(
        self,
        queues: Mapping[str, SyncableQueue],
        counters: Counters,
        *,
        policy: str = "interval",
        interval_s: float = 0.1,
        run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    ) -> None:
        self.queues = queues
        self.counters = counters
        self.policy = policy
        self.interval = interval_s
        #: runs the blocking fsyncs off the event loop (a test runs them inline on MockClock)
        self._run_sync = run_sync
        self._dirty = trio.Event()
        self._prompt = trio.Event()
        #: fsync="never": delivered segments wait for a durable checkpoint (`settle`)
        self._settle = trio.Event()
        #: when the next round is due if nobody prompts (trio time)
        self._due = -math.inf
        #: called after every round of fsyncs (the Forward source's acks wait for it)
        self.on_synced: Callable[[], None] = lambda: None
        #: rounds done (bench and tests)
        self.rounds = 0

    def dirty(self) -> None:
        """Records were written: have them fsynced within the interval."""
        self._dirty.set()

    def settle(self) -> None:
        """Delivery completed segments (`DiskQueue.sync_requested`): they are deleted behind
        a durable checkpoint, written in a round off the event loop, within the interval.
        With fsync="never" that round stores the checkpoints only (`DiskQueue.settle`)."""
        if self.policy == "never":
            self._settle.set()
        else:
            self._dirty.set()

    def prompt(self) -> None:
        """Someone waits for a round (a Forward ack): start one now, or right after the one
        running."""
        self._dirty.set()
        self._prompt.set()

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
        """fsync every queue (all in one worker thread call); False if any failed."""
        failures = await self._run_sync(self._sync_each)
        for name, error in failures:
            self.write_failed(name, error)
        self.rounds += 1
        self.on_synced()
        return not failures

    def _sync_each(self) -> list[tuple[str, OSError]]:
        failures = []
        for name, queue in self.queues.items():
            try:
                queue.sync()
            except OSError as e:
                failures.append((name, e))
        return failures

    def _settle_each(self) -> None:
        for name, queue in self.queues.items():
            try:
                queue.settle()
            except OSError as e:  # (counted in the queue's checkpoint_errors; never raised)
                self.write_failed(name, e)

    async def _settle_rounds(self) -> None:
        """fsync="never": no fsync of segment data, but the checkpoints that let delivered
        segments go are stored durably (in a worker thread), at most once per interval."""
        while True:
            await self._settle.wait()
            self._settle = trio.Event()
            await self._run_sync(self._settle_each)
            await trio.sleep(self.interval)

    async def run(self) -> None:
        if self.policy == "never":
            await self._settle_rounds()
        while True:
            await self._dirty.wait()
            if self.policy == "interval" and not self._prompt.is_set():
                with trio.move_on_at(self._due):
                    await self._prompt.wait()
            self._dirty = trio.Event()
            self._prompt = trio.Event()
            self._due = trio.current_time() + self.interval
            if not await self.sync_all():
                # held bytes (and Forward acks waiting on them) need another try even if no
                # new event arrives to mark the queues dirty; prompts wait for it too, so a
                # failing disk is not hammered
                self._dirty.set()
                await trio.sleep(max(self.interval, 1.0))
