"""One disk quota (`queue.max_bytes`) shared by every resource's queue.

Each queue enforces its own `max_bytes` when it appends (dropping its own oldest segments, or
the new record, per `queue.on_full`). `SharedQuota.rebalance` sets each queue's cap to the
global quota minus what the other queues hold, after every ingest burst: so one busy resource
may use nearly all of the quota during an outage, while a flood of one resource can never
evict another resource's data (a full quota drops from the resource that is growing). The
total may pass the quota by at most one burst (4 MiB) between two rebalances.

Every queue keeps a floor of two segments, so the smallest workable quota is
2 * segment_bytes * number of resources (checked by the config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Sized(Protocol):
    max_bytes: int

    @property
    def disk_bytes(self) -> int: ...

    @property
    def held_bytes(self) -> int: ...


class SharedQuota:
    def __init__(self, queues: Mapping[str, Sized], max_bytes: int, floor: int) -> None:
        self.queues = queues
        self.max_bytes = max_bytes
        self.floor = floor

    def rebalance(self) -> None:
        """Give each queue room for what the others leave free (O(queues): runs per burst).

        The others count what they hold undelivered (`held_bytes`): their delivered segments
        waiting for the syncer's round to delete them must not make this queue drop its own
        oldest undelivered events. (The disk may then pass the quota by those delivered
        bytes, for at most one sync interval.)"""
        sizes = {name: q.held_bytes for name, q in self.queues.items()}
        total = sum(sizes.values())
        for name, queue in self.queues.items():
            others = total - sizes[name]
            queue.max_bytes = max(self.floor, self.max_bytes - others)

    @property
    def used(self) -> int:
        return sum(q.disk_bytes for q in self.queues.values())
