"""Ingest: a burst of datagrams → decoded entries → validated items → appended to the queues.

Runs synchronously in the source task between socket reads, so it must be cheap: decode,
validate, JSON-encode once (the stored bytes are exactly what goes into the request body), append
to the resource's queue buffer. At the end of the burst each touched queue is flushed to the OS
in one write and its lane is woken; fsync happens elsewhere (group commit, see `agent`).

Every event that does not make it into a queue is counted by reason and logged at most once per
interval per reason, with a sample, so a broken client is visible without flooding the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

import structlog

from traits_agent.intake.wire import Entry, decode_datagram
from traits_agent.observe.metrics import QUEUE_DROPS, Counters
from traits_agent.schema import Rejected, Resource, normalize, resolve_tag

log = structlog.get_logger(__name__)

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Ingest:
    """Turns bursts of raw datagrams into queued items."""

    def __init__(
        self,
        lanes: dict,
        counters: Counters,
        *,
        wall_clock: Callable[[], float] = time.time,
        on_write_error: Callable[[str, OSError], None] | None = None,
        after_flush: Callable[[], None] | None = None,
    ) -> None:
        #: canonical resource name → Lane (its `.queue` and `.notify()`)
        self.lanes = lanes
        self.counters = counters
        self.wall_clock = wall_clock
        self.on_write_error = on_write_error
        #: runs after every burst (the shared disk quota rebalances the queues' caps)
        self.after_flush = after_flush
        self._drops_seen: dict[tuple[str, str], int] = {}

    def reject(self, reason: str, sample: object = None, **context: object) -> None:
        """Count one rejected event (or datagram) and log it (rate-limited per reason)."""
        self.counters.inc("rejected_events", reason=reason)
        # `sample` is bounded by the log chain (observe.log.bound_sample), after the rate limit:
        # a line held back costs no encoding
        log.warning("event_rejected", reason=reason, sample=sample, **context)

    def handle(self, datagrams: list[bytes]) -> None:
        """The sink for a datagram source: everything in `datagrams`, then flush."""
        now = self.wall_clock()
        touched: set[str] = set()
        for data in datagrams:
            result = decode_datagram(data)
            for error in result.errors:
                self.reject(error, data[:64])
            touched |= self.store_entries(result.entries, now)
        self.counters.inc("received_datagrams", len(datagrams))
        self.flush(touched)

    def store_entries(self, entries: Iterable[Entry], now: float) -> set[str]:
        """Validate decoded entries and append them to their queues (buffered: `flush` after).

        For every source: `handle` uses it, and so does the Forward stream listener, which
        decodes for itself. `now` is the receive time, used for events sent without one.
        Counts received, accepted and rejected events. Returns the names of the resources
        whose queues took at least one item.
        """
        touched: set[str] = set()
        events = 0
        for entry in entries:
            events += 1
            resource = resolve_tag(entry.tag) if isinstance(entry.tag, str) else None
            if resource is None:
                self.reject("unknown_resource", entry.tag)
                continue
            event_time = now if entry.time is None else entry.time
            if resource.passthrough and isinstance(entry.record, list):
                # PlayFab posts arrays of events: store each as its own item
                stored = [self._store(resource, one, event_time) for one in entry.record]
                if any(stored):
                    touched.add(resource.name)
            elif self._store(resource, entry.record, event_time):
                touched.add(resource.name)
        self.counters.inc("received_events", events)
        return touched

    def _store(self, resource: Resource, record: object, event_time: float) -> bool:
        try:
            normalized = normalize(resource, record, event_time)
        except Rejected as e:
            self.reject(e.reason, record, resource=resource.name, field=e.field, error=str(e))
            return False
        if normalized.stripped:
            self.counters.inc("stripped_fields", len(normalized.stripped), resource=resource.name)
        payload = _encode(normalized.item).encode()
        try:
            accepted = self.lanes[resource.name].queue.append(payload)
        except ValueError as e:  # larger than a queue record may be
            self.reject("too_large", record, resource=resource.name, error=str(e))
            return False
        if accepted:
            self.counters.inc("accepted_events", resource=resource.name)
        return accepted

    def flush(self, names: set[str]) -> None:
        """Write the touched queues' buffers to the OS and wake their lanes."""
        for name in names:
            lane = self.lanes[name]
            try:
                lane.queue.flush()
            except OSError as e:
                if self.on_write_error:
                    self.on_write_error(name, e)
            lane.notify()
            self._report_drops(name, lane.queue)
        if names and self.after_flush is not None:
            self.after_flush()

    def _report_drops(self, name: str, queue: object) -> None:
        """Log what the queue's quota (or a write error) dropped since last time (rate-limited
        per resource and reason, the held-back counts added up: a full disk is loud but short)."""
        for reason, _label in QUEUE_DROPS:
            total = getattr(queue, reason, 0)
            key = (name, reason)
            seen = self._drops_seen.get(key, 0)
            if total <= seen:
                continue
            self._drops_seen[key] = total
            log.warning(
                "events_dropped",
                resource=name,
                reason=reason.removeprefix("dropped_"),
                dropped=total - seen,
                dropped_total=total,
                hint=(
                    "the disk refused writes (full or read-only) for too long"
                    if reason == "dropped_write_error"
                    else "the queue is at queue.max_bytes: upstream is down or too slow"
                ),
            )
