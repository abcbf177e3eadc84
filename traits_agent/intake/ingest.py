"""Ingest: a burst of datagrams → decoded entries → validated items → appended to the queues.

Runs synchronously in the source task between socket reads, so it must be cheap: decode,
validate, JSON-encode once (the stored bytes are exactly what goes into the request body) —
in C for the common datagram (`fastpath`) and the common record (`schema.encode_record`) —
and hold the payloads per resource. At the end of the burst each queue takes its run in one
`append_many`, is flushed to the OS in one write and its lane is woken once; counters are added
once per burst; fsync happens elsewhere (group commit, see `agent`).

Every event that does not make it into a queue is counted by reason and logged at most once per
interval per reason, with a sample, so a broken client is visible without flooding the log.

Counting is per event everywhere: `rejected_events{reason}` counts events, also those of a
message rejected whole (a Forward array with one bad time rejects all its events, counted in
`received_events` too). A message that is not a usable Forward-protocol entry is also counted
once in `protocol_errors{reason}`: how often a client sent something unusable, whatever it held.
Bytes whose event count cannot be told (not msgpack, a broken gzip member) count as protocol
errors only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable

import structlog

from traits_agent.intake.fastpath import FastPath
from traits_agent.intake.wire import Entry, decode_datagram
from traits_agent.observe.metrics import QUEUE_DROPS, Counters
from traits_agent.queue import MAX_PAYLOAD
from traits_agent.schema import Rejected, Resource, encode_record, resolve_tag

log = structlog.get_logger(__name__)

#: events handled in one synchronous slice of a datagram burst (tens of ms)
BURST_ENTRIES = 8 * 1024


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
        self._fast = FastPath()

    def reject(
        self, reason: str, sample: object = None, events: int = 1, **context: object
    ) -> None:
        """Count `events` rejected events and log it (rate-limited per reason)."""
        self.counters.inc("rejected_events", events, reason=reason)
        # `sample` is bounded by the log chain (observe.log.bound_sample), after the rate limit:
        # a line held back costs no encoding
        log.warning("event_rejected", reason=reason, sample=sample, **context)

    def protocol_error(
        self, reason: str, sample: object = None, events: int = 0, **context: object
    ) -> None:
        """A message that is not a usable Forward-protocol entry: one `protocol_errors`, and its
        `events` (0: unknown) counted as received and rejected. Logged as an error (rate-limited
        per reason) with the likely cause: a client newer than this agent, or not a Forward
        client at all, is a configuration problem an operator must see."""
        self.counters.inc("protocol_errors", reason=reason)
        if events:
            self.counters.inc("received_events", events)
            self.counters.inc("rejected_events", events, reason=reason)
        log.error(  # rate-limited per reason (observe.log.RATE_LIMITS)
            "message_rejected",
            reason=reason,
            events=events,
            sample=sample,
            hint=likely_cause(reason),
            **context,
        )

    def handle(self, datagrams: list[bytes]) -> int:
        """The sink for a datagram source: the datagrams of `datagrams`, then flush.

        A datagram the fast path takes (`fastpath`: decoded, validated and encoded in C) needs
        nothing more; any other goes through `decode_datagram` and `_store_entries`. Either
        way the payloads are held per resource, in arrival order, and each queue takes its run
        once per burst; counters are added once per burst too, not per event.

        Returns how many it took: it stops after the datagram that brings this call past
        `BURST_ENTRIES` events, so that a burst of compressed datagrams (each up to
        `wire.DATAGRAM_BOUNDS`) is handled in slices between which the source lets the other
        tasks run; the source calls again with the rest.

        One datagram cannot stop the others: an exception while handling it (a bug of ours
        that a peer's bytes found) is counted as `rejected_events{reason=internal_error}` and
        logged with its traceback as `datagram_failed`; the rest of the burst goes on.
        """
        now = self.wall_clock()
        held: dict[str, tuple[Resource, list[bytes]]] = {}
        taken = events = 0
        fast = self._fast.payloads
        message = self._fast.message
        for data in datagrams:
            taken += 1
            try:
                one = message(data, now)
                got = None if one is not None else fast(data, now)
                if one:  # the common datagram: one Message, fast (see FastPath.message)
                    resource, payload = one  # type: ignore[misc]
                    run = held.get(resource.name)
                    if run is None:
                        held[resource.name] = (resource, [payload])
                    else:
                        run[1].append(payload)
                    events += 1
                elif got is not None:
                    for resource, payloads in got:
                        events += len(payloads)
                        self._hold(held, resource, payloads)
                else:
                    result = decode_datagram(data)
                    for error, lost in zip(result.errors, result.lost, strict=True):
                        self.protocol_error(error, data[:64], lost)
                    # a datagram's entries are held only once all of them were validated, so
                    # one that raises half-way leaves nothing of itself behind
                    mine: dict[str, tuple[Resource, list[bytes]]] = {}
                    events += self._store_entries(result.entries, now, mine)
                    for resource, payloads in mine.values():
                        self._hold(held, resource, payloads)
            except Exception:
                self._failed(data)
            if events >= BURST_ENTRIES:
                break
        self.counters.inc("received_datagrams", taken)
        self.flush(self._append_held(held, events))
        return taken

    def _failed(self, data: bytes) -> None:
        """Count and log a datagram whose handling raised (never raises itself)."""
        self.counters.inc("rejected_events", reason="internal_error")
        # rate-limited (observe.log.RATE_LIMITS); if the log line itself fails, the count
        # above is what remains
        with contextlib.suppress(Exception):
            log.exception("datagram_failed", size=len(data), sample=data[:64])

    def store_entries(self, entries: Iterable[Entry], now: float) -> set[str]:
        """Validate decoded entries and append them to their queues (buffered: `flush` after).

        For every source: `handle` uses it, and so does the Forward stream listener, which
        decodes for itself. `now` is the receive time, used for events sent without one.
        Counts received, accepted and rejected events. Returns the names of the resources
        whose queues took at least one item.
        """
        held: dict[str, tuple[Resource, list[bytes]]] = {}
        return self._append_held(held, self._store_entries(entries, now, held))

    def store_payloads(self, resource: Resource, payloads: list[bytes]) -> set[str]:
        """Append payloads the stream fast path already validated and encoded (each at most
        `MAX_PAYLOAD`) to `resource`'s queue (buffered: `flush` after), counted as
        `store_entries` counts them; the names of the queues that took any."""
        return self._append_held({resource.name: (resource, payloads)}, len(payloads))

    def store_runs(self, runs: list[tuple[Resource, list[bytes], bytes]], events: int) -> set[str]:
        """Append runs of payloads already validated and encoded elsewhere (the Forward intake
        process, `forward_process`), each with its `framing.record_crcs`, counting `events` as
        received; the names of the queues that took any (buffered: `flush` after). The
        payloads were split off the b"\n"-joined run the process sent (`lines`)."""
        held = {resource.name: (resource, payloads) for resource, payloads, _ in runs}
        return self._append(held, events, {r.name: crcs for r, _, crcs in runs}, lines=True)

    @staticmethod
    def _hold(
        held: dict[str, tuple[Resource, list[bytes]]], resource: Resource, payloads: list[bytes]
    ) -> None:
        run = held.get(resource.name)
        if run is None:
            held[resource.name] = (resource, payloads)
        else:
            run[1].extend(payloads)

    def _append_held(self, held: dict[str, tuple[Resource, list[bytes]]], events: int) -> set[str]:
        """Append each resource's run of validated payloads to its queue; count; the names
        of the queues that took at least one. (The Forward intake process's `LinkIngest`
        sends them to the agent instead.)"""
        return self._append(held, events, None, lines=False)

    def _append(
        self,
        held: dict[str, tuple[Resource, list[bytes]]],
        events: int,
        crcs: dict[str, bytes] | None,
        *,
        lines: bool,
    ) -> set[str]:
        """`_append_held`, with each run's record CRCs when `crcs` has them and `lines` as
        `DiskQueue.append_many` takes it (`store_runs`)."""
        self.counters.inc("received_events", events)
        touched = set()
        for name, (_, payloads) in held.items():
            queue = self.lanes[name].queue
            try:
                taken = queue.append_many(payloads, crcs.get(name) if crcs else None, lines=lines)
            except ValueError:  # a payload over the queue's limit: `_store` lets none through
                taken = sum(queue.append(p) for p in payloads if len(p) <= MAX_PAYLOAD)
            if taken:
                self.counters.inc("accepted_events", taken, resource=name)
                touched.add(name)
        return touched

    def _store_entries(
        self, entries: Iterable[Entry], now: float, held: dict[str, tuple[Resource, list[bytes]]]
    ) -> int:
        """Validate and encode `entries` into `held`; returns how many there were."""
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
                events += len(entry.record) - 1
                for one in entry.record:
                    self._store(resource, one, event_time, held)
            else:
                self._store(resource, entry.record, event_time, held)
        return events

    def _store(
        self,
        resource: Resource,
        record: object,
        event_time: float,
        held: dict[str, tuple[Resource, list[bytes]]],
    ) -> None:
        try:
            payload, stripped = encode_record(resource, record, event_time)
        except Rejected as e:
            self.reject(e.reason, record, resource=resource.name, field=e.field, error=str(e))
            return
        if stripped:
            self.counters.inc("stripped_fields", len(stripped), resource=resource.name)
        if len(payload) > MAX_PAYLOAD:  # larger than a queue record may be
            error = f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD} limit"
            self.reject("too_large", record, resource=resource.name, error=error)
            return
        self._hold(held, resource, [payload])

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

    async def room(self) -> None:
        """Return when the store can take more (at once: it appends in this process; the
        Forward intake process's `LinkIngest` waits while its link to the agent is full)."""

    def full(self) -> bool:
        """Whether the store cannot take more without waiting (never here: the queues buffer
        and write synchronously; see `LinkIngest.full`)."""
        return False

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


_CAUSES = {
    "not_an_entry": "not one of the Forward entry forms (Message, Forward, PackedForward): an "
    "entry shape from a client newer than this agent, or not a Forward client at all",
    "bad_time": "the event time is not a number, an EventTime or [time, metadata]: an entry "
    "shape from a client newer than this agent, or a client bug",
    "bad_tag": "the tag is not a non-empty UTF-8 string of at most 1024 bytes",
    "bad_option": "the option (last element) is not a map",
    "bad_packed": "the PackedForward stream is not [time, record] pairs: an entry shape from a "
    "client newer than this agent, or a corrupted stream",
    "bad_compressed": "the CompressedPackedForward payload is not gzip (or inflates past the "
    "limit)",
    "not_msgpack": "the bytes are neither msgpack nor JSON: not a Forward client (TLS to a "
    "plain listener? HTTP?)",
    "truncated": "a msgpack value cut short (a datagram larger than the sender's buffer?)",
    "auth_failed": "the client's shared key (or username/password) differs from the "
    "listener's: the same key must be configured on both sides",
    "handshake_expected": "this listener has a shared key (listen.forward_shared_key) and the "
    "client sent entries without the handshake: configure the key on the client too",
    "unexpected_handshake": "the client sent a PING (it has a shared key configured) to a "
    "listener without one: configure the same key on the listener or remove it from the client",
    "not_json": "a connection that began with [ or { (JSON) sent something that is not JSON",
    "too_large": "one message is larger than the connection may buffer; lower the client's "
    "chunk size",
}


def likely_cause(reason: str) -> str:
    """A short explanation of a protocol error for the operator reading the log."""
    return _CAUSES.get(reason, "the peer does not speak the Forward protocol as expected")
