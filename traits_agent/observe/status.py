"""The one status model: what the agent is doing, built in one place, shown three ways.

`build(agent)` reads the queues, lanes, uploaders and counters once, in the trio thread (so one
status is one consistent snapshot; nothing here awaits), into typed values. Its renderers:

- `traits-agent status` (and `--json`): `AgentStatus.as_json()`, over the control socket;
- `/metrics`: `observe.prometheus` turns the same `AgentStatus` into Prometheus families;
- systemd `STATUS=`: `AgentStatus.summary()`, one line, the CSV spool included.

Fields marked INTERNAL feed /metrics and /healthz but are not part of the JSON snapshot,
whose keys are a contract (interface.md; the operator's `top` reads it).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

import trio

from traits_agent import __version__
from traits_agent.delivery.lane import oldest_pending_age
from traits_agent.delivery.policy import UpstreamHealth, worst_state
from traits_agent.observe.metrics import QUEUE_DROPS, Counters

if TYPE_CHECKING:
    from traits_agent.agent import Agent

#: other DiskQueue counters /metrics exports per resource (the attribute names)
QUEUE_COUNTERS = (
    "corrupt_skipped",
    "missing_skipped",
    "read_errors",
    "read_retries",
    "dir_recreated",
    "checkpoint_errors",
    "fsync_in_doubt",
)


#: `field(metadata=INTERNAL)`: for /metrics and /healthz, left out of the JSON snapshot
INTERNAL = {"internal": True}


def as_json(value: Any) -> Any:
    """A dataclass tree as plain JSON values, without the `internal` fields."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: as_json(getattr(value, f.name))
            for f in fields(value)
            if not f.metadata.get("internal")
        }
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


@dataclass
class Received:
    datagrams: int
    events: int
    accepted: int


@dataclass
class ResourceStatus:
    """One resource: its queue, its lane and its upstream."""

    queued_items: int
    queued_bytes: int
    in_flight: int
    accepted: int
    delivered: int
    dead_lettered: int
    #: reason → items lost after acceptance (only reasons with a count)
    dropped: dict[str, int]
    oldest_age_s: float
    unsynced_items: int
    corrupt_skipped: int
    upstream: str
    last_error: str | None
    next_retry_in_s: float | None
    #: why the queue cannot store events right now (a write the disk refused, a deleted
    #: queue directory that cannot be made again), or None; /healthz is 503 while set
    queue_error: str | None = None
    #: reads stopped by an error that proves nothing about the data (EMFILE, EIO...):
    #: nothing was skipped, the lane retries
    read_retries: int = 0
    #: the queue's own drop counters by reason, zeros included (for /metrics)
    queue_drops: dict[str, int] = field(default_factory=dict, metadata=INTERNAL)
    #: the queue's other counters by attribute (QUEUE_COUNTERS; for /metrics)
    queue_counters: dict[str, int] = field(default_factory=dict, metadata=INTERNAL)
    disk_bytes: int | None = field(default=None, metadata=INTERNAL)
    limit_bytes: int | None = field(default=None, metadata=INTERNAL)
    #: seconds the oldest pending item has waited for its lane (None: unknown; for /healthz)
    waiting_s: float | None = field(default=None, metadata=INTERNAL)


@dataclass
class CsvKindStatus:
    pending_files: int
    pending_bytes: int
    rejected_files: int
    uploaded_files: int
    uploading: str | None
    state: str
    last_error: str | None
    next_retry_in_s: float | None


@dataclass
class CsvStatus:
    dir: str
    state: str
    last_error: str | None
    pending_files: int
    pending_bytes: int
    rejected_files: int
    kinds: dict[str, CsvKindStatus]


@dataclass
class AgentStatus:
    """Everything `status`, /metrics and STATUS= show."""

    version: str
    pid: int
    uptime_s: float
    endpoint: str
    listening: dict[str, Any]
    upstream: str
    last_error: str | None
    received: Received
    #: events, by reason (each event of a message rejected whole counts)
    rejected: dict[str, int]
    stripped_fields: int
    resources: dict[str, ResourceStatus]
    csv: CsvStatus | None
    #: messages that were not usable Forward-protocol entries, by reason (once per message)
    protocol_errors: dict[str, int] = field(default_factory=dict)
    #: when `last_error` happened (UTC, ISO 8601), for the views that show it
    last_error_at: str | None = None
    #: the Forward intake process (`listen.forward_process`): {"pid", "state" (waiting: no
    #: Forward peer yet | running | restarting), "restarts"}; None when the Forward listeners
    #: run in the agent's own process
    forward_process: dict[str, Any] | None = None
    #: the counters behind the numbers (every series and histogram goes to /metrics)
    counters: Counters = field(default_factory=Counters, metadata=INTERNAL)
    started_at: float = field(default=0.0, metadata=INTERNAL)
    progressing: bool = field(default=True, metadata=INTERNAL)
    stopping: bool = field(default=False, metadata=INTERNAL)

    def as_json(self) -> dict[str, Any]:
        """The snapshot `traits-agent status --json` prints (keys as in interface.md)."""
        result: dict[str, Any] = as_json(self)
        return result

    def summary(self) -> str:
        """One line for systemd's STATUS=: upstream, queue, deliveries, and the CSV spool."""
        queued = sum(r.queued_items for r in self.resources.values())
        delivered = sum(r.delivered for r in self.resources.values())
        line = f"upstream {self.upstream}, {queued} queued, {delivered} delivered"
        if self.csv is not None:
            line += f"; csv {self.csv.pending_files} pending, {self.csv.rejected_files} rejected"
            if self.csv.state != UpstreamHealth.OK:
                line += f" ({self.csv.state})"
        return line


def csv_status(spool: Any) -> CsvStatus:
    """The CSV spool's part (`spool` is a `delivery.spool.CsvSpool`)."""
    from traits_agent.delivery.spool import KINDS, scan
    from traits_agent.observe.fdlimit import is_fd_shortage, note_shortage

    now = trio.current_time()
    kinds: dict[str, CsvKindStatus] = {}
    for kind in KINDS:
        try:
            files = scan(spool.kind_dir(kind), kind)
            rejected = len(scan(spool.rejected_dir(kind), kind))
        except OSError as e:
            if not is_fd_shortage(e):
                raise
            # status must still answer while descriptors run out: show what is known
            note_shortage("csv_spool_status", e, spool.counters)
            files, rejected = [], 0
        st = spool.states[kind]
        kinds[kind] = CsvKindStatus(
            pending_files=len(files),
            pending_bytes=sum(f.size for f in files),
            rejected_files=rejected,
            uploaded_files=spool.counters.get("csv_uploaded_files", kind=kind),
            uploading=spool.uploading[kind],
            state=st.state,
            last_error=st.last_error,
            next_retry_in_s=st.next_retry_in(now),
        )
    errors = [(s.last_error_at, s.last_error) for s in spool.states.values() if s.last_error]
    return CsvStatus(
        dir=str(spool.directory),
        state=worst_state([k.state for k in kinds.values()]),
        last_error=max(errors)[1] if errors else None,
        pending_files=sum(k.pending_files for k in kinds.values()),
        pending_bytes=sum(k.pending_bytes for k in kinds.values()),
        rejected_files=sum(k.rejected_files for k in kinds.values()),
        kinds=kinds,
    )


def queue_error(queue: Any) -> str | None:
    """Why the queue cannot store events right now, or None."""
    error = getattr(queue, "write_error", None)
    return None if error is None else str(error)


def build(agent: Agent) -> AgentStatus:
    """Read the running agent into an `AgentStatus` (in the trio thread)."""
    c = agent.counters
    now = trio.current_time()
    resources: dict[str, ResourceStatus] = {}
    for name, queue in agent.queues.items():
        st = agent.uploader.state(name) if agent.uploader else None
        lane = agent.lanes.get(name)
        queue_drops = {reason: getattr(queue, attr, 0) for attr, reason in QUEUE_DROPS}
        # a counter series with the queue's own labels wins (it is what /metrics shows too)
        dropped = {**queue_drops, **c.by_label("dropped_items", "reason", resource=name)}
        since = lane.waiting_since if lane is not None else None
        resources[name] = ResourceStatus(
            queued_items=queue.pending_items,
            queued_bytes=queue.pending_bytes,
            in_flight=lane.in_flight if lane is not None else 0,
            accepted=c.get("accepted_events", resource=name),
            delivered=c.total("delivered_items", resource=name),
            dead_lettered=c.total("dead_lettered_items", resource=name),
            dropped={k: v for k, v in dropped.items() if v},
            oldest_age_s=round(oldest_pending_age(queue, lane, now, agent.started_at), 1),
            unsynced_items=max(0, queue.next_seq - 1 - queue.durable_seq),
            corrupt_skipped=queue.corrupt_skipped,
            upstream=st.state if st else UpstreamHealth.OK.value,
            last_error=st.last_error if st else None,
            next_retry_in_s=st.next_retry_in(now) if st else None,
            queue_error=queue_error(queue),
            read_retries=getattr(queue, "read_retries", 0),
            queue_drops=queue_drops,
            queue_counters={a: getattr(queue, a) for a in QUEUE_COUNTERS if hasattr(queue, a)},
            disk_bytes=getattr(queue, "disk_bytes", None),
            limit_bytes=getattr(queue, "max_bytes", None),
            waiting_s=round(now - since, 1) if since is not None and math.isfinite(since) else None,
        )
    states = [r.upstream for r in resources.values()]
    errors = []
    if agent.uploader:
        errors = [
            (s.last_error_at, s.last_error) for s in agent.uploader.states.values() if s.last_error
        ]
    csv = csv_status(agent.csv_spool) if agent.csv_spool else None
    if csv is not None:
        states.append(csv.state)
        if agent.csv_spool is not None:
            errors += [
                (s.last_error_at, s.last_error)
                for s in agent.csv_spool.states.values()
                if s.last_error
            ]
    # the newest error of any upload, events or CSV
    last_error_at, last_error = max(errors, key=lambda e: str(e[0])) if errors else (None, None)
    return AgentStatus(
        version=__version__,
        pid=os.getpid(),
        uptime_s=round(time.time() - agent.started_at, 1),
        endpoint=agent.base_url,
        listening=agent.listening,
        upstream=worst_state(states),
        last_error=last_error,
        last_error_at=last_error_at,
        received=Received(
            datagrams=c.total("received_datagrams"),
            events=c.total("received_events"),
            accepted=c.total("accepted_events"),
        ),
        rejected=c.by_label("rejected_events", "reason"),
        protocol_errors=c.by_label("protocol_errors", "reason"),
        forward_process=(
            None
            if agent.forward_process is None
            else {
                "pid": agent.forward_process.pid,
                "state": agent.forward_process.state,
                "restarts": c.total("forward_intake_restarts"),
            }
        ),
        stripped_fields=c.total("stripped_fields"),
        resources=resources,
        csv=csv,
        counters=c,
        started_at=agent.started_at,
        progressing=agent.is_progressing(),
        stopping=agent.stopping,
    )
