"""Prometheus exposition: `/metrics` (text format 0.0.4) and a `/healthz` that means "delivering".

The numbers come from the one status model (`observe.status.AgentStatus`, built once per scrape
in the trio thread, so one scrape is one consistent snapshot). `StatusCollector` is a
`prometheus_client` custom collector over it, and `generate_latest` writes the text (its escaping
and number formatting, not ours); process metrics (`traits_agent_process_*`: CPU, RSS, open
fds) come with `ProcessCollector`. What is exported:

- every series of the counters as a counter `traits_agent_<name>_total` (known names get a
  real HELP; a counter added later still shows up, with a generic one);
- every histogram of the counters (`upload_seconds`) as a histogram;
- per-resource gauges (queued items and bytes, age of the oldest queued item, items in flight,
  queue disk bytes and limit, upstream state as a state set);
- the queues' own drop counters merged into `traits_agent_dropped_items_total` exactly as
  `status` merges them (a counter series with the same labels wins), never as a second series;
- the host's UDP receive errors from `/proc/net/snmp` (and `snmp6`): kernel counters for the
  whole host, not only our socket, which is the only place the kernel reports datagrams it
  dropped because our receive buffer was full. Absent files (not Linux) → no family.

`serve_metrics` answers `GET /metrics` and `GET /healthz` on a small h11 server. `/healthz` is
200 only while the pipeline makes progress (`Agent.is_progressing`): a process that is alive but
forwards nothing (Fluent Bit #11847) must fail its health check, not pass it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from traits_agent import __version__
from traits_agent.delivery.policy import UpstreamHealth
from traits_agent.httpserver import Request, Response, json_response, serve_http
from traits_agent.observe.metrics import QUEUE_DROPS, Counters
from traits_agent.observe.status import AgentStatus

log = structlog.get_logger(__name__)

PREFIX = "traits_agent_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SNMP_PATH = Path("/proc/net/snmp")
SNMP6_PATH = Path("/proc/net/snmp6")
#: the values `traits_agent_upstream_state{state}` can take
UPSTREAM_STATES = ("ok", "retrying", "auth_failed", "endpoint_error")
assert set(UPSTREAM_STATES) == {h.value for h in UpstreamHealth}
#: the queue drop reasons (status.QUEUE_DROPS), merged into dropped_items_total
DROP_REASONS = tuple(reason for _, reason in QUEUE_DROPS)
#: other DiskQueue counters (attribute, metric name without _total, HELP); exported per
#: resource when the queue has the attribute
QUEUE_COUNTERS = (
    (
        "corrupt_skipped",
        "queue_corrupt_records",
        "Damaged records skipped while reading a queue (lost to disk corruption).",
    ),
    (
        "missing_skipped",
        "queue_missing_segments",
        "Queue segment files that vanished behind the agent's back while reading.",
    ),
    (
        "read_retries",
        "queue_read_retries",
        "Queue reads stopped by an error that proves nothing about the data (EMFILE, EIO...);"
        " nothing was skipped, the read is tried again.",
    ),
    (
        "read_errors",
        "queue_unreadable_segments",
        "Queue segment names taken by something other than a regular file (skipped).",
    ),
    (
        "dir_recreated",
        "queue_dir_recreated",
        "Times a queue directory was found deleted while running and made again.",
    ),
    (
        "checkpoint_errors",
        "queue_checkpoint_errors",
        "Failed writes of a queue's delivered position (they can only cause re-delivery).",
    ),
    (
        "fsync_in_doubt",
        "queue_fsync_in_doubt_items",
        "Items that may not have reached the disk because an fsync failed after they left memory.",
    ),
)

#: HELP text of the counters the agent increments (metrics.Counters names, without _total)
COUNTER_HELP: dict[str, str] = {
    "received_datagrams": "Datagrams read from the agent's sockets.",
    "received_events": "Events received on any source, valid or not (also those of a message "
    "rejected whole).",
    "accepted_events": "Events validated and written to a resource's queue.",
    "rejected_events": "Events rejected before storage, by reason (each event of a message "
    "rejected whole counts).",
    "protocol_errors": "Messages that were not usable Forward-protocol entries, by reason (a "
    "stream connection is closed without an ack; the client keeps the data and resends).",
    "stripped_fields": "Unknown fields removed from accepted events.",
    "delivered_items": "Items the API accepted (2xx).",
    "delivered_batches": "Batches (requests) the API accepted (2xx).",
    "dead_lettered_items": "Items the API rejected, written to the dead-letter file, by reason.",
    "dropped_items": "Items lost after acceptance, by reason: queue full (drop_oldest, "
    "drop_newest), queue write errors, dead-letter file rotation.",
    "upload_requests": "HTTP requests sent to the API, answered or not.",
    "upload_retries": "Requests that will be retried, by reason (HTTP status or transport).",
    "queue_write_errors": "Failed writes to a resource's queue, by errno.",
    "forward_connections": "Forward-protocol stream connections accepted, by listener.",
    "forward_acks": "Forward-protocol chunk acks sent (each after its events were fsynced).",
    "forward_connections_closed": "Forward-protocol connections closed by the agent, by reason.",
    "forward_silent_connections": "Forward-protocol connections that sent nothing for 10 s on a "
    "listener without a shared key (a client waiting for a HELO?).",
    "forward_buffer_waits": "Forward-protocol reads paused: a large message waited for the "
    "shared memory budget (back-pressure on the client).",
    "forward_acks_unencodable": "Forward-protocol chunk ids that could not be sent back (no ack).",
    "forward_intake_restarts": "Forward intake processes (listen.forward_process) that exited "
    "and were started again.",
    "metrics_requests_rejected": "Requests to /metrics refused, by reason (too_many_connections, "
    "method_not_allowed, too_large, bad_request, timeout).",
    "csv_uploaded_files": "CSV files the API accepted, by kind.",
    "csv_uploaded_bytes": "Bytes of CSV files the API accepted, by kind.",
    "csv_rejected_files": "CSV files the API rejected (set aside with a note), by kind and reason.",
    "csv_copies_refused": "CSV uploads the spool refused before copying, by reason (e.g. the "
    "free-space reserve).",
    "csv_copies_cancelled": "CSV copies into the spool cancelled (the agent stopped or the copy "
    "timed out); nothing is left behind.",
    "control_requests": "Control-socket requests (status, send, upload), by outcome.",
    "control_fds_refused": "Descriptors passed over the control socket beyond a request's "
    "limit, closed at once.",
    "fd_exhausted": "Times the agent ran out of file descriptors (EMFILE/ENFILE) and waited "
    "instead of failing, by where.",
}
HISTOGRAM_HELP: dict[str, str] = {
    "upload_seconds": "Time from sending a batch to the API's answer, in seconds.",
}
#: counters that get a zero series per resource before their first increment, so that rate()
#: and absent()-style alerts work from the first scrape
ZERO_PER_RESOURCE = ("accepted_events", "delivered_items", "delivered_batches", "upload_requests")


class StatusSource(Protocol):
    """What `/metrics` and `/healthz` read: the agent (anything with `status()`)."""

    def status(self) -> AgentStatus: ...


# -- the collector ------------------------------------------------------------------------------


def render(
    status: AgentStatus, *, snmp_path: Path = SNMP_PATH, snmp6_path: Path = SNMP6_PATH
) -> str:
    """`status` in the Prometheus text exposition format 0.0.4, process metrics included."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status, snmp_path=snmp_path, snmp6_path=snmp6_path))
    ProcessCollector(namespace=PREFIX.rstrip("_"), registry=registry)
    return generate_latest(registry).decode()


class StatusCollector(Collector):
    """A `prometheus_client` collector over one `AgentStatus` (collected once, then dropped)."""

    def __init__(
        self, status: AgentStatus, *, snmp_path: Path = SNMP_PATH, snmp6_path: Path = SNMP6_PATH
    ) -> None:
        self.status = status
        self.snmp_path = snmp_path
        self.snmp6_path = snmp6_path

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def family(name: str, type_: str, help_: str) -> Metric:
            full = PREFIX + _metric_name(name)
            if full not in families:
                families[full] = Metric(full, help_, type_)
            return families[full]

        status = self.status
        _add(
            family("build_info", "gauge", "Always 1; the version label names the running agent."),
            1,
            {"version": __version__},
        )
        _add(family("up", "gauge", "Always 1 while the agent answers scrapes."), 1)
        _add(
            family(
                "start_time_seconds", "gauge", "Start time of the agent, seconds since the epoch."
            ),
            status.started_at,
        )
        _add(
            family(
                "pipeline_progressing",
                "gauge",
                "1 unless a resource has a backlog, a healthy upstream and has sent nothing for "
                "long (what /healthz and the systemd watchdog report).",
            ),
            1 if status.progressing else 0,
        )
        _queue_gauges(status, family)
        _upstream_states(status, family)
        _counters(status, family)
        _histograms(status, family)
        _udp_errors(family, self.snmp_path, self.snmp6_path)
        for metric in families.values():
            if metric.samples:
                yield metric


Family = Callable[[str, str, str], Metric]


def _add(
    metric: Metric, value: float, labels: Mapping[str, str] | None = None, suffix: str = ""
) -> None:
    name = metric.name + ("_total" if metric.type == "counter" else "") + suffix
    metric.add_sample(name, dict(labels or {}), value)


def _queue_gauges(status: AgentStatus, family: Family) -> None:
    queued = family("queued_items", "gauge", "Items stored in a resource's queue, not delivered.")
    size = family("queued_bytes", "gauge", "Bytes of the items stored in a resource's queue.")
    age = family(
        "oldest_queued_age_seconds",
        "gauge",
        "How long the oldest queued item of a resource has waited (0 when the queue is empty).",
    )
    in_flight = family("in_flight_items", "gauge", "Items of a resource in the request now sent.")
    disk = family(
        "queue_disk_bytes", "gauge", "Bytes of a queue's segment files (what the quota bounds)."
    )
    limit = family(
        "queue_limit_bytes",
        "gauge",
        "A queue's share of queue.max_bytes; at this size on_full drops items.",
    )
    for name, res in sorted(status.resources.items()):
        labels = {"resource": name}
        _add(queued, res.queued_items, labels)
        _add(size, res.queued_bytes, labels)
        _add(age, res.oldest_age_s, labels)
        _add(in_flight, res.in_flight, labels)
        if res.disk_bytes is not None:
            _add(disk, res.disk_bytes, labels)
        if res.limit_bytes is not None:
            _add(limit, res.limit_bytes, labels)
    for attribute, metric, help_ in QUEUE_COUNTERS:
        fam = family(metric, "counter", help_)
        for name, res in sorted(status.resources.items()):
            if attribute in res.queue_counters:
                _add(fam, res.queue_counters[attribute], {"resource": name})


def _upstream_states(status: AgentStatus, family: Family) -> None:
    states = family(
        "upstream_state",
        "gauge",
        "1 for the state a resource's upstream is in (ok, retrying, auth_failed, "
        "endpoint_error), 0 for the others.",
    )
    for name, res in sorted(status.resources.items()):
        current = res.upstream
        choices = UPSTREAM_STATES if current in UPSTREAM_STATES else (*UPSTREAM_STATES, current)
        for state in choices:
            _add(states, 1 if state == current else 0, {"resource": name, "state": state})


def _counters(status: AgentStatus, family: Family) -> None:
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for name, labels, count in status.counters.series():
        values.setdefault(name, {})[_key(labels)] = count
    for name in ZERO_PER_RESOURCE:
        series = values.setdefault(name, {})
        for resource in status.resources:
            series.setdefault(_key({"resource": resource}), 0)
    # The queues count their own drops; status shows them with a counter series of the same
    # labels taking precedence, and so do we.
    dropped = values.setdefault("dropped_items", {})
    for resource, res in status.resources.items():
        for reason in DROP_REASONS:
            dropped.setdefault(
                _key({"resource": resource, "reason": reason}), res.queue_drops.get(reason, 0)
            )
    for name in sorted(values):
        help_ = COUNTER_HELP.get(name, f"traits-agent counter {name}.")
        fam = family(name.removesuffix("_total"), "counter", help_)
        for key, value in sorted(values[name].items()):
            _add(fam, value, {_label_name(k): str(v) for k, v in key})


def _histograms(status: AgentStatus, family: Family) -> None:
    for name, by_labels in sorted(status.counters.histograms.items()):
        help_ = HISTOGRAM_HELP.get(name, f"traits-agent histogram {name}.")
        fam = family(name, "histogram", help_)
        for key, hist in sorted(by_labels.items()):
            labels = dict(key)
            # Histogram.counts are already cumulative (observe() counts every bound >= value)
            for bound, count in zip(hist.buckets, hist.counts, strict=True):
                _add(fam, count, {**labels, "le": floatToGoString(bound)}, "_bucket")
            _add(fam, hist.count, {**labels, "le": "+Inf"}, "_bucket")
            _add(fam, hist.sum, labels, "_sum")
            _add(fam, hist.count, labels, "_count")


def _udp_errors(family: Family, snmp_path: Path, snmp6_path: Path) -> None:
    errors = read_udp_errors(snmp_path, snmp6_path)
    if errors is None:
        return
    in_errors, rcvbuf_errors = errors
    host_wide = " Host-wide kernel counter (all UDP sockets, IPv4 and IPv6), not only ours."
    _add(
        family(
            "udp_receive_errors",
            "counter",
            "UDP datagrams the kernel could not deliver to a socket (Udp InErrors)." + host_wide,
        ),
        in_errors,
    )
    _add(
        family(
            "udp_rcvbuf_errors",
            "counter",
            "UDP datagrams dropped because a socket's receive buffer was full (Udp RcvbufErrors)."
            + host_wide,
        ),
        rcvbuf_errors,
    )


def read_udp_errors(
    snmp_path: Path = SNMP_PATH, snmp6_path: Path = SNMP6_PATH
) -> tuple[int, int] | None:
    """(InErrors, RcvbufErrors) summed over `Udp:` in /proc/net/snmp and `Udp6` in snmp6;
    None when /proc/net/snmp cannot be read or has no usable `Udp:` table."""
    try:
        text = snmp_path.read_text()
    except OSError:
        return None
    header: list[str] | None = None
    v4: dict[str, int] | None = None
    for line in text.splitlines():
        if not line.startswith("Udp:"):
            continue
        fields_ = line.split()[1:]
        if header is None:
            header = fields_
        else:
            try:
                v4 = dict(zip(header, map(int, fields_), strict=True))
            except ValueError:
                return None
            break
    if v4 is None or "InErrors" not in v4 or "RcvbufErrors" not in v4:
        return None
    in_errors, rcvbuf = v4["InErrors"], v4["RcvbufErrors"]
    try:
        text6 = snmp6_path.read_text()
    except OSError:
        text6 = ""
    for line in text6.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "Udp6InErrors":
                in_errors += int(parts[1])
            elif parts[0] == "Udp6RcvbufErrors":
                rcvbuf += int(parts[1])
    return in_errors, rcvbuf


# -- names ------------------------------------------------------------------------------------


def _sanitize(name: str, first_ok: str) -> str:
    chars = [c if (c.isascii() and (c.isalnum() or c in first_ok)) else "_" for c in name]
    text = "".join(chars) or "_"
    return "_" + text if text[0].isdigit() else text


def _metric_name(name: str) -> str:
    return _sanitize(name, "_:")


def _label_name(name: str) -> str:
    return _sanitize(name, "_")


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# -- the HTTP endpoint ----------------------------------------------------------------------


#: a scrape is one short request: Prometheus uses one connection per target
METRICS_MAX_CONNECTIONS = 16
METRICS_TIMEOUT_S = 10.0


async def serve_metrics(
    source: StatusSource,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    counters: Counters | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/metrics` and `/healthz` for `source` (the agent) on `host:port` until cancelled.

    `nursery.start(serve_metrics, agent, host, port)` returns the bound (host, port) (port 0
    lets the OS pick). Raises OSError if the address cannot be bound.

    Bounded, since any local user can connect (issue 7 item 9: 40 connections with request
    bodies took 678 MiB): at most `METRICS_MAX_CONNECTIONS` at once (more are closed unread),
    GET and HEAD only (405 before any body is read), no request body at all (413), and
    `METRICS_TIMEOUT_S` to send a request. Each refusal counts in
    `metrics_requests_rejected{reason}` of `counters` (the agent's).
    """

    def rejected(reason: str) -> None:
        if counters is not None:
            counters.inc("metrics_requests_rejected", reason=reason)
        log.info("metrics_request_rejected", reason=reason)  # rate-limited: observe.log

    await serve_http(
        make_handler(source),
        host,
        port,
        max_body_size=0,
        idle_timeout=METRICS_TIMEOUT_S,
        max_connections=METRICS_MAX_CONNECTIONS,
        methods=frozenset({"GET", "HEAD"}),
        on_reject=rejected,
        task_status=task_status,
    )


def make_handler(source: StatusSource) -> Callable[[Request], Any]:
    """The request handler: GET/HEAD /metrics, GET/HEAD /healthz, 405 or 404 for the rest."""

    async def handle(request: Request) -> Response:
        if request.path not in ("/metrics", "/healthz"):
            return Response(404, b"not found\n", {"content-type": "text/plain; charset=utf-8"})
        if request.method not in ("GET", "HEAD"):
            return Response(
                405,
                b"method not allowed\n",
                {"content-type": "text/plain; charset=utf-8", "allow": "GET, HEAD"},
            )
        status = source.status()
        if request.path == "/metrics":
            return Response(200, render(status).encode(), {"content-type": CONTENT_TYPE})
        return health(status)

    return handle


def health(status: AgentStatus) -> Response:
    """200 `ok` while the pipeline makes progress; 503 and why (JSON) when a queue cannot
    store events, when it is stalled, or when the agent is stopping."""
    if status.stopping:
        return json_response(503, {"status": "stopping", "reason": "the agent is shutting down"})
    errors = {name: r.queue_error for name, r in sorted(status.resources.items()) if r.queue_error}
    if errors:
        return json_response(
            503,
            {
                "status": "queue_error",
                "reason": "a queue cannot store events (they wait in memory, bounded); "
                "see queue_write_failed in the logs",
                "pid": os.getpid(),
                "resources": errors,
            },
        )
    if status.progressing:
        return Response(200, b"ok\n", {"content-type": "text/plain; charset=utf-8"})
    backlog: dict[str, dict[str, Any]] = {}
    for name, res in sorted(status.resources.items()):
        if not res.queued_items:
            continue
        backlog[name] = {
            "queued_items": res.queued_items,
            "in_flight_items": res.in_flight,
            "upstream": res.upstream,
            "waiting_s": res.waiting_s,
        }
    return json_response(
        503,
        {
            "status": "stalled",
            "reason": "a resource has queued items and a healthy upstream but has sent nothing "
            "for too long; the pipeline is stuck (see the logs, then restart the agent)",
            "pid": os.getpid(),
            "resources": backlog,
        },
    )
