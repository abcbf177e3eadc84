"""Per-resource lanes: when to cut a batch from the queue and hand it to the uploader.

A lane owns one resource's queue reader and has at most one batch in flight, so the API sees
each resource's items in order while resources never wait for each other. A batch is cut when
`max_items` are pending, when the pending bytes reach the byte bound, or when the oldest pending
item has waited `linger_ms`; items that were already on disk at start are sent at once.

The lane never keeps items in memory beyond the batch it is sending: the queue is the buffer.
It commits a batch (which lets the queue delete it) only after the uploader has returned, i.e.
after every item was delivered (2xx) or written to the dead-letter file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import structlog
import trio

from traits_agent.errors import Stopping
from traits_agent.schema import Resource

log = structlog.get_logger(__name__)

#: how soon a lane looks again when items are counted but not yet readable
UNREADABLE_RETRY_S = 1.0
#: how long a lane waits after delivery failed with an unexpected error
FAILURE_RETRY_S = 30.0


class BatchLike(Protocol):
    payloads: list[bytes]
    first_seq: int


B = TypeVar("B", bound=BatchLike)


class QueueLike(Protocol[B]):
    """What a lane needs from the disk queue (`queue.DiskQueue` is one, with its `Batch`): a
    lane commits exactly the batches the same queue handed it."""

    @property
    def pending_items(self) -> int: ...
    @property
    def pending_bytes(self) -> int: ...
    def read_batch(self, max_items: int, max_bytes: int) -> B | None: ...
    def commit(self, batch: B, /) -> None: ...


Deliver = Callable[[Resource, list[bytes], int], Awaitable[None]]


class Lane:
    """Coalesces one resource's pending items into batches and sends them one at a time."""

    def __init__(
        self,
        resource: Resource,
        queue: QueueLike[Any],
        deliver: Deliver,
        *,
        max_items: int,
        max_bytes: int,
        linger_s: float,
    ) -> None:
        self.resource = resource
        self.queue = queue
        self.deliver = deliver
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self._wakeup = trio.Event()
        #: trio time since which the oldest pending item has been waiting; -inf: since before
        #: we started (a backlog recovered from disk is sent at once)
        self._waiting_since: float | None = -math.inf if queue.pending_items else None
        self.in_flight = 0
        self.failures = 0
        self._stopping = False

    @property
    def waiting_since(self) -> float | None:
        """trio time since which the oldest pending item has waited (None: nothing pending)."""
        return self._waiting_since

    def stop(self) -> None:
        """Finish the batch in flight (if any), then return from `run` without cutting more."""
        self._stopping = True
        self._wakeup.set()

    def notify(self) -> None:
        """Called by ingest after it appended (and flushed) items to this lane's queue."""
        if self._waiting_since is None:
            self._waiting_since = trio.current_time()
        self._wakeup.set()

    def _full(self) -> bool:
        return (
            self.queue.pending_items >= self.max_items or self.queue.pending_bytes >= self.max_bytes
        )

    async def _wait(self, deadline: float = math.inf) -> None:
        with trio.move_on_at(deadline):
            await self._wakeup.wait()
        self._wakeup = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Cut and send batches forever (cancel to stop; an unsent batch stays queued)."""
        task_status.started()
        while not self._stopping:
            if self.queue.pending_items == 0:
                self._waiting_since = None
                await self._wait()
                continue
            if self._waiting_since is None:
                self._waiting_since = trio.current_time()
            deadline = self._waiting_since + self.linger_s
            if not self._full() and trio.current_time() < deadline:
                await self._wait(deadline)
                continue
            if not await self.send_one():
                # the count says "pending" but nothing is readable yet: the bytes are held in
                # memory after a write error (full or read-only disk) until the syncer gets
                # them onto disk, or damage was skipped. Look again soon; never spin.
                await self._wait(trio.current_time() + UNREADABLE_RETRY_S)

    async def send_one(self) -> bool:
        """Cut one batch now and deliver it; False if nothing was pending."""
        cut_at = trio.current_time()
        batch = self.queue.read_batch(self.max_items, self.max_bytes)
        if batch is None:
            self._waiting_since = None
            return False
        full = len(batch.payloads) >= self.max_items
        self.in_flight = len(batch.payloads)
        try:
            await self.deliver(self.resource, batch.payloads, batch.first_seq)
        except Stopping:
            return True  # not committed: the batch stays queued for the next run
        except Exception:
            # a bug or an answer nobody foresaw must not take the agent (and every other
            # resource) down: keep the batch, say so, try again later
            self.failures += 1
            log.exception("delivery_failed", resource=self.resource.name, items=len(batch.payloads))
            self.in_flight = 0
            await trio.sleep(FAILURE_RETRY_S)
            return True
        finally:
            self.in_flight = 0
        self.queue.commit(batch)
        # What is left arrived after the cut (a partial batch took everything pending) or is
        # as old as what we just sent (a full batch); either way the bound stays correct.
        if not full:
            self._waiting_since = cut_at if self.queue.pending_items else None
        return True


def oldest_pending_age(queue: Any, lane: Any, now: float, started_at: float) -> float:
    """Seconds the oldest pending item has waited (`now` on the trio clock).

    A backlog recovered from disk has waited at least since the agent started (`started_at`,
    wall clock; the lane cannot know more), so that is the lower bound.
    """
    if not queue.pending_items or lane is None:
        return 0.0
    since = lane.waiting_since
    if since is None:
        return 0.0
    if math.isinf(since):
        return max(0.0, time.time() - started_at)
    return max(0.0, now - since)
