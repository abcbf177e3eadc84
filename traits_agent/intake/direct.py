"""Events handed over the control socket: what `traits-agent send --wait` talks to.

The datagram socket cannot answer, so a shell script that must know what became of an event
asks the agent directly: `store` validates the records exactly as the datagram path does
(through the same `Ingest`, so counters and `event_rejected` lines are the same), appends them,
and returns only once they are durable (fsynced under the configured policy), with the seq
range they got. `outcome` then says whether the queue's delivered position has passed that
range, which of its seqs the API rejected (dead-lettered), and the upstream state meanwhile.

A resource's items are delivered in seq order, so "the delivered position passed the last seq"
means every item of the range was answered: delivered, or dead-lettered (listed), or dropped
by the disk quota (counted in `dropped`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from traits_agent.intake.durability import AckGate
from traits_agent.intake.ingest import Ingest
from traits_agent.intake.wire import Entry
from traits_agent.schema import RESOURCES, Rejected, normalize, resolve_tag

#: the most records one `store` request may carry
MAX_RECORDS = 1000


class DirectIntake:
    """`store` and `outcome` for the control socket, over the agent's own queues."""

    def __init__(
        self,
        queues: Mapping[str, Any],
        ingest: Ingest,
        durability: AckGate,
        uploader: Callable[[], Any],
    ) -> None:
        self.queues = queues
        self.ingest = ingest
        self.durability = durability
        #: the Uploader (its upstream states and dead-lettered seq ranges)
        self.uploader = uploader

    async def store(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and append `body["records"]` to one resource's queue; answer when durable
        (unless `body["sync"]` is false: a bulk sender's chunks before its last)."""
        resource = (
            resolve_tag(body.get("resource")) if isinstance(body.get("resource"), str) else None
        )
        if resource is None:
            return {"error": "unknown resource", "valid": sorted(RESOURCES)}
        records = body.get("records")
        if not isinstance(records, list) or len(records) > MAX_RECORDS:
            return {"error": f"records: a list of at most {MAX_RECORDS} events"}
        event_time = body.get("time")
        now = time.time()
        if not isinstance(event_time, int | float) or isinstance(event_time, bool):
            event_time = now
        queue = self.queues[resource.name]
        rejected = []
        entries = []
        for index, record in enumerate(records):
            try:
                normalize(resource, record, event_time)
            except Rejected as e:
                # counted and logged exactly like a datagram's invalid event
                self.ingest.counters.inc("received_events")
                self.ingest.reject(
                    e.reason, record, resource=resource.name, field=e.field, error=str(e)
                )
                rejected.append({"index": index, "reason": e.reason, "error": str(e)})
                continue
            entries.append(Entry(resource.name, event_time, record))
        first = queue.next_seq
        dropped_before = queue.dropped_newest
        touched = self.ingest.store_entries(entries, now)
        self.ingest.flush(touched)
        last = queue.next_seq - 1
        if body.get("sync", True):
            # a bulk sender asks only for its last chunk: in one queue, durable through the
            # last seq means durable through every earlier one
            mark = self.durability.mark([resource.name])
            self.durability.written()
            await self.durability.wait(mark)
        return {
            "resource": resource.name,
            "stored": last - first + 1,
            "first_seq": first,
            "last_seq": last,
            "refused_queue_full": queue.dropped_newest - dropped_before,
            "rejected": rejected,
        }

    def outcome(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Where the seq range `first_seq..last_seq` of `resource` is now."""
        name = body.get("resource")
        first, last = body.get("first_seq"), body.get("last_seq")
        if (
            not isinstance(name, str)
            or name not in self.queues
            or not isinstance(first, int)
            or not isinstance(last, int)
        ):
            return {"error": "outcome: needs resource, first_seq, last_seq"}
        queue = self.queues[name]
        delivered_before = queue.delivered.next_seq  # every seq below it is answered
        uploader = self.uploader()
        dead = []
        if uploader is not None:
            for lo, hi, status, message in uploader.dead_lettered_seqs.get(name, ()):
                if lo <= last and hi >= first:
                    dead.append(
                        {
                            "items": min(hi, last) - max(lo, first) + 1,
                            "status": status,
                            "message": message,
                        }
                    )
        st = uploader.state(name) if uploader is not None else None
        return {
            "resource": name,
            "done": last < delivered_before,
            "dead_lettered": dead,
            "dropped": {
                "drop_oldest": queue.dropped_oldest,
                "write_error": queue.dropped_write_error,
            },
            "upstream": st.state if st else "ok",
            "last_error": st.last_error if st else None,
            "next_retry_in_s": (
                round(max(0.0, st.next_retry_at - trio.current_time()), 1)
                if st is not None and st.next_retry_at is not None
                else None
            ),
        }
