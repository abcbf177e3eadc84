"""Prometheus exposition: `/metrics` (text format 0.0.4) and a `/healthz` that means "delivering".

`render(agent)` turns what the agent already counts into Prometheus families, at scrape time,
in the trio thread (so one scrape is one consistent snapshot; nothing here awaits):

- every series of `agent.counters` as a counter `traits_agent_<name>_total` (known names get a
  real HELP; a counter added later still shows up, with a generic one);
- every histogram of `agent.counters.histograms` (`upload_seconds`) as a histogram;
- per-resource gauges read from the queues, lanes and uploader (queued items and bytes, age of
  the oldest queued item, items in flight, upstream state as a state set);
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

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from traits_agent import __version__
from traits_agent.delivery.lane import oldest_pending_age
from traits_agent.httpserver import Request, Response, json_response, serve_http

PREFIX = "traits_agent_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SNMP_PATH = Path("/proc/net/snmp")
SNMP6_PATH = Path("/proc/net/snmp6")
#: the values `traits_agent_upstream_state{state}` can take (uploader.UpstreamState.state)
UPSTREAM_STATES = ("ok", "retrying", "auth_failed", "endpoint_error")
#: queue drop counters (DiskQueue attribute → `reason` label), merged into dropped_items_total
QUEUE_DROPS = (
    ("dropped_oldest", "drop_oldest"),
    ("dropped_newest", "drop_newest"),
    ("dropped_write_error", "write_error"),
)
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
    "csv_uploaded_files": "CSV files the API accepted, by kind.",
    "csv_uploaded_bytes": "Bytes of CSV files the API accepted, by kind.",
    "csv_rejected_files": "CSV files the API rejected (set aside with a note), by kind and reason.",
}
HISTOGRAM_HELP: dict[str, str] = {
    "upload_seconds": "Time from sending a batch to the API's answer, in seconds.",
}
#: counters that get a zero series per resource before their first increment, so that rate()
#: and absent()-style alerts work from the first scrape
ZERO_PER_RESOURCE = ("accepted_events", "delivered_items", "delivered_batches", "upload_requests")


@dataclass
class Family:
    """One metric family: its HELP/TYPE and its samples (suffix, labels, value)."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, labels: Mapping[str, str] | None = None, suffix: str = "") -> None:
        self.samples.append((suffix, dict(labels or {}), value))


# -- rendering --------------------------------------------------------------------------------


def render(agent: Any, *, snmp_path: Path = SNMP_PATH, snmp6_path: Path = SNMP6_PATH) -> str:
    """The agent's metrics in the Prometheus text exposition format 0.0.4.

    `agent` needs `counters` (metrics.Counters), `queues` ({resource: queue with
    `pending_items`, `pending_bytes`, `dropped_oldest`, `dropped_newest`}), `lanes`, `uploader`
    (None or with `states`), `started_at` and `is_progressing()`; must run in the trio thread.
    """
    return format_families(collect(agent, snmp_path=snmp_path, snmp6_path=snmp6_path))


def collect(
    agent: Any, *, snmp_path: Path = SNMP_PATH, snmp6_path: Path = SNMP6_PATH
) -> list[Family]:
    """The families `render` formats, in output order."""
    families: dict[str, Family] = {}

    def family(name: str, type_: str, help_: str) -> Family:
        full = PREFIX + _metric_name(name)
        if full not in families:
            families[full] = Family(full, type_, help_)
        return families[full]

    family("build_info", "gauge", "Always 1; the version label names the running agent.").add(
        1, {"version": __version__}
    )
    family("up", "gauge", "Always 1 while the agent answers scrapes.").add(1)
    family("start_time_seconds", "gauge", "Start time of the agent, seconds since the epoch.").add(
        agent.started_at
    )
    family(
        "pipeline_progressing",
        "gauge",
        "1 unless a resource has a backlog, a healthy upstream and has sent nothing for long "
        "(what /healthz and the systemd watchdog report).",
    ).add(1 if agent.is_progressing() else 0)

    _queue_gauges(agent, family)
    _upstream_states(agent, family)
    _counters(agent, family)
    _histograms(agent, family)
    _udp_errors(family, snmp_path, snmp6_path)
    return list(families.values())


def _queue_gauges(agent: Any, family) -> None:
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
    now = trio.current_time()
    for name, queue in sorted(agent.queues.items()):
        labels = {"resource": name}
        queued.add(queue.pending_items, labels)
        size.add(queue.pending_bytes, labels)
        lane = agent.lanes.get(name)
        age.add(oldest_pending_age(queue, lane, now, agent.started_at), labels)
        in_flight.add(lane.in_flight if lane is not None else 0, labels)
        if hasattr(queue, "disk_bytes"):
            disk.add(queue.disk_bytes, labels)
        if hasattr(queue, "max_bytes"):
            limit.add(queue.max_bytes, labels)
    for attribute, metric, help_ in QUEUE_COUNTERS:
        fam = family(metric + "_total", "counter", help_)
        for name, queue in sorted(agent.queues.items()):
            if hasattr(queue, attribute):
                fam.add(getattr(queue, attribute), {"resource": name})


def _upstream_states(agent: Any, family) -> None:
    states = family(
        "upstream_state",
        "gauge",
        "1 for the state a resource's upstream is in (ok, retrying, auth_failed, "
        "endpoint_error), 0 for the others.",
    )
    known = agent.uploader.states if agent.uploader is not None else {}
    for name in sorted(agent.queues):
        st = known.get(name)
        current = st.state if st is not None else "ok"
        choices = UPSTREAM_STATES if current in UPSTREAM_STATES else (*UPSTREAM_STATES, current)
        for state in choices:
            states.add(1 if state == current else 0, {"resource": name, "state": state})


def _counters(agent: Any, family) -> None:
    counters = agent.counters
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for name, labels, value in counters.series():
        values.setdefault(name, {})[_key(labels)] = value
    for name in ZERO_PER_RESOURCE:
        series = values.setdefault(name, {})
        for resource in agent.queues:
            series.setdefault(_key({"resource": resource}), 0)
    # The queues count their own drops; status shows them with a counter series of the same
    # labels taking precedence (agent.snapshot), and so do we.
    dropped = values.setdefault("dropped_items", {})
    for resource, queue in agent.queues.items():
        for attribute, reason in QUEUE_DROPS:
            dropped.setdefault(
                _key({"resource": resource, "reason": reason}), getattr(queue, attribute, 0)
            )
    for name in sorted(values):
        help_ = COUNTER_HELP.get(name, f"traits-agent counter {name}.")
        fam = family(_counter_name(name), "counter", help_)
        for key, value in sorted(values[name].items()):
            fam.add(value, dict(key))


def _histograms(agent: Any, family) -> None:
    for name, by_labels in sorted(agent.counters.histograms.items()):
        help_ = HISTOGRAM_HELP.get(name, f"traits-agent histogram {name}.")
        fam = family(name, "histogram", help_)
        for key, hist in sorted(by_labels.items()):
            labels = dict(key)
            # Histogram.counts are already cumulative (observe() counts every bound >= value)
            for bound, count in zip(hist.buckets, hist.counts, strict=True):
                fam.add(count, {**labels, "le": _format_value(float(bound))}, "_bucket")
            fam.add(hist.count, {**labels, "le": "+Inf"}, "_bucket")
            fam.add(hist.sum, labels, "_sum")
            fam.add(hist.count, labels, "_count")


def _udp_errors(family, snmp_path: Path, snmp6_path: Path) -> None:
    errors = read_udp_errors(snmp_path, snmp6_path)
    if errors is None:
        return
    in_errors, rcvbuf_errors = errors
    host_wide = " Host-wide kernel counter (all UDP sockets, IPv4 and IPv6), not only ours."
    family(
        "udp_receive_errors_total",
        "counter",
        "UDP datagrams the kernel could not deliver to a socket (Udp InErrors)." + host_wide,
    ).add(in_errors)
    family(
        "udp_rcvbuf_errors_total",
        "counter",
        "UDP datagrams dropped because a socket's receive buffer was full (Udp RcvbufErrors)."
        + host_wide,
    ).add(rcvbuf_errors)


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


# -- text format --------------------------------------------------------------------------------


def format_families(families: Iterable[Family]) -> str:
    """Families → exposition text (one HELP and TYPE per family, samples together)."""
    out: list[str] = []
    for fam in families:
        if not fam.samples:
            continue
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        for suffix, labels, value in fam.samples:
            out.append(f"{fam.name}{suffix}{_format_labels(labels)} {_format_value(value)}")
    return "\n".join(out) + "\n"


def _format_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{_label_name(k)}="{_escape_label(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _sanitize(name: str, first_ok: str) -> str:
    chars = [c if (c.isascii() and (c.isalnum() or c in first_ok)) else "_" for c in name]
    text = "".join(chars) or "_"
    return "_" + text if text[0].isdigit() else text


def _metric_name(name: str) -> str:
    return _sanitize(name, "_:")


def _label_name(name: str) -> str:
    return _sanitize(name, "_")


def _counter_name(name: str) -> str:
    return name if name.endswith("_total") else name + "_total"


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# -- the HTTP endpoint ----------------------------------------------------------------------


async def serve_metrics(
    agent: Any,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/metrics` and `/healthz` for `agent` on `host:port` until cancelled.

    `nursery.start(serve_metrics, agent, host, port)` returns the bound (host, port) (port 0
    lets the OS pick). Raises OSError if the address cannot be bound.
    """
    await serve_http(make_handler(agent), host, port, task_status=task_status)


def make_handler(agent: Any):
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
        if request.path == "/metrics":
            return Response(200, render(agent).encode(), {"content-type": CONTENT_TYPE})
        return health(agent)

    return handle


def health(agent: Any) -> Response:
    """200 `ok` while the pipeline makes progress; 503 and why (JSON) when it is stalled or
    the agent is stopping."""
    if getattr(agent, "stopping", False):
        return json_response(503, {"status": "stopping", "reason": "the agent is shutting down"})
    if agent.is_progressing():
        return Response(200, b"ok\n", {"content-type": "text/plain; charset=utf-8"})
    now = trio.current_time()
    backlog: dict[str, dict[str, Any]] = {}
    states = agent.uploader.states if agent.uploader is not None else {}
    for name, lane in sorted(agent.lanes.items()):
        if not lane.queue.pending_items:
            continue
        st = states.get(name)
        since = lane.waiting_since
        backlog[name] = {
            "queued_items": lane.queue.pending_items,
            "in_flight_items": lane.in_flight,
            "upstream": st.state if st is not None else "ok",
            "waiting_s": (
                round(now - since, 1) if since is not None and not math.isinf(since) else None
            ),
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
