"""/metrics and /healthz: the exposition text, and a real server in front of a real agent."""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from traits_agent import __version__
from traits_agent.delivery.lane import Lane
from traits_agent.observe.metrics import LATENCY_BUCKETS, Counters
from traits_agent.observe.prometheus import (
    CONTENT_TYPE,
    UPSTREAM_STATES,
    read_udp_errors,
    render,
    serve_metrics,
)
from traits_agent.observe.status import AgentStatus, Received, ResourceStatus
from traits_agent.queue import DiskQueue
from traits_agent.schema import RESOURCES

# -- a small, strict parser of the text format 0.0.4 -------------------------------------------


class Exposition:
    """Parsed exposition text: families by name, each with its type, help and samples."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.order: list[str] = []
        assert text.endswith("\n"), "the exposition ends with a newline"
        # prometheus_client's own parser must take it too
        assert list(text_string_to_metric_families(text))
        current: str | None = None
        for line in text.splitlines():
            assert line, "no blank lines"
            if line.startswith("# HELP "):
                name, _, help_ = line[7:].partition(" ")
                assert name not in self.helps, f"HELP {name} twice"
                self.helps[name] = help_
                current = name
                self.order.append(name)
            elif line.startswith("# TYPE "):
                name, _, type_ = line[7:].partition(" ")
                assert name == current, f"TYPE {name} not right after its HELP"
                assert name not in self.types, f"TYPE {name} twice"
                assert type_ in ("counter", "gauge", "histogram", "summary", "untyped")
                self.types[name] = type_
            else:
                name, labels, value = _parse_sample(line)
                assert current is not None and _belongs(name, current, self.types[current]), (
                    f"{name} outside its family {current}"
                )
                key = (name, tuple(sorted(labels.items())))
                assert key not in self.samples, f"duplicate series {key}"
                self.samples[key] = value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def _belongs(name: str, family: str, type_: str) -> bool:
    if type_ == "histogram":
        return name in (f"{family}_bucket", f"{family}_sum", f"{family}_count")
    return name == family


def _parse_sample(line: str) -> tuple[str, dict[str, str], float]:
    i = 0
    while i < len(line) and (line[i].isalnum() or line[i] in "_:"):
        i += 1
    name = line[:i]
    assert name and not name[0].isdigit(), line
    labels: dict[str, str] = {}
    if line[i] == "{":
        i += 1
        while line[i] != "}":
            eq = line.index("=", i)
            label = line[i:eq]
            assert label.replace("_", "a").isalnum(), f"bad label name {label!r}"
            assert line[eq + 1] == '"', line
            j = eq + 2
            value = []
            while line[j] != '"':
                if line[j] == "\\":
                    value.append({"\\": "\\", '"': '"', "n": "\n"}[line[j + 1]])
                    j += 2
                else:
                    value.append(line[j])
                    j += 1
            assert label not in labels, f"label {label} twice"
            labels[label] = "".join(value)
            i = j + 1
            if line[i] == ",":
                i += 1
        i += 1
    assert line[i] == " ", line
    text = line[i + 1 :]
    value = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text)
    return name, labels, float(text) if value is None else value


def check_histogram(expo: Exposition, name: str) -> None:
    """Buckets ascend in `le` and never decrease; +Inf equals _count for every series."""
    assert expo.types[name] == "histogram"
    by_series: dict[tuple, list[tuple[float, float]]] = {}
    for labels, value in expo.series(f"{name}_bucket").items():
        rest = tuple((k, v) for k, v in labels if k != "le")
        le = float(dict(labels)["le"].replace("+Inf", "inf"))
        by_series.setdefault(rest, []).append((le, value))
    assert by_series
    for rest, buckets in by_series.items():
        buckets.sort()
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"buckets not cumulative: {buckets}"
        assert buckets[-1][0] == math.inf
        assert buckets[-1][1] == expo.samples[(f"{name}_count", rest)]
        assert (f"{name}_sum", rest) in expo.samples


# -- render() on hand-built state ---------------------------------------------------------------


def resource_status(queued: int, size: int, dropped_oldest: int, upstream: str) -> ResourceStatus:
    return ResourceStatus(
        queued_items=queued,
        queued_bytes=size,
        in_flight=0,
        accepted=0,
        delivered=0,
        dead_lettered=0,
        dropped={"drop_oldest": dropped_oldest} if dropped_oldest else {},
        oldest_age_s=0.0,
        unsynced_items=0,
        corrupt_skipped=0,
        upstream=upstream,
        last_error=None,
        next_retry_in_s=None,
        queue_drops={"drop_oldest": dropped_oldest, "drop_newest": 0, "write_error": 0},
    )


def stand_in() -> AgentStatus:
    """A status with two resources, built by hand (the model is plain typed values)."""
    return AgentStatus(
        version=__version__,
        pid=1,
        uptime_s=5.0,
        endpoint="http://127.0.0.1:9",
        listening={},
        upstream="retrying",
        last_error=None,
        received=Received(0, 0, 0),
        rejected={},
        stripped_fields=0,
        resources={
            "actions": resource_status(3, 300, 2, "retrying"),
            "logins": resource_status(0, 0, 0, "ok"),
        },
        csv=None,
        counters=Counters(),
        started_at=time.time() - 5,
    )


class Source:
    """What serve_metrics reads: anything with status()."""

    def __init__(self, status: AgentStatus) -> None:
        self.current = status

    def status(self) -> AgentStatus:
        return self.current


def real_agent(directory: Path, *, items: int = 0):
    """A real Agent (not running) with real queues and lanes for two resources, no uploader."""
    from traits_agent.agent import Agent

    agent = Agent(config=agent_config(directory), api_key="test-key")
    agent.started_at = time.time() - 5
    for name in ("actions", "logins"):
        queue = DiskQueue.open(directory / "queue" / name, fsync="never")
        agent.queues[name] = queue

        async def deliver(*_args) -> None:
            raise AssertionError("not running")

        agent.lanes[name] = Lane(
            RESOURCES[name], queue, deliver, max_items=10, max_bytes=1 << 20, linger_s=1.0
        )
    for i in range(items):
        agent.queues["actions"].append(b'{"user_id":"%d"}' % i)
    agent.queues["actions"].flush()
    return agent


async def test_every_counter_series_is_a_total_with_help():
    """Each counter series becomes traits_agent_<name>_total with a HELP, unknown names too."""
    agent = stand_in()
    c = agent.counters
    c.inc("received_datagrams", 4)
    c.inc("received_events", 7)
    c.inc("accepted_events", 5, resource="actions")
    c.inc("rejected_events", 2, reason="missing_field")
    c.inc("delivered_items", 5, resource="actions")
    c.inc("upload_retries", resource="actions", reason="503")
    c.inc("queue_write_errors", resource="actions", errno="28")
    c.inc("brand_new_thing", 9, kind="x")

    expo = Exposition(render(agent))

    assert expo.value("traits_agent_received_datagrams_total") == 4
    assert expo.value("traits_agent_received_events_total") == 7
    assert expo.value("traits_agent_accepted_events_total", resource="actions") == 5
    assert expo.value("traits_agent_rejected_events_total", reason="missing_field") == 2
    assert expo.value("traits_agent_upload_retries_total", resource="actions", reason="503") == 1
    assert expo.value("traits_agent_queue_write_errors_total", resource="actions", errno="28") == 1
    assert expo.value("traits_agent_brand_new_thing_total", kind="x") == 9
    assert expo.helps["traits_agent_brand_new_thing_total"]
    assert "Items the API accepted" in expo.helps["traits_agent_delivered_items_total"]
    for name, type_ in expo.types.items():
        if type_ == "counter":
            assert name.endswith("_total"), name
        assert name.startswith("traits_agent_"), name


async def test_per_resource_counters_start_at_zero():
    """Delivered/accepted/requests exist at 0 for every resource before the first event."""
    expo = Exposition(render(stand_in()))
    for resource in ("actions", "logins"):
        assert expo.value("traits_agent_delivered_items_total", resource=resource) == 0
        assert expo.value("traits_agent_accepted_events_total", resource=resource) == 0
        assert expo.value("traits_agent_upload_requests_total", resource=resource) == 0


async def test_queue_drops_merge_into_dropped_items_without_duplicates():
    """Queue drop counters appear as dropped_items_total{reason=drop_*}, once per series."""
    agent = stand_in()
    agent.counters.inc("dropped_items", 4, resource="actions", reason="dead_letter_rotated")
    # a counter series with the queue's own labels wins, as in `status`
    agent.counters.inc("dropped_items", 7, resource="logins", reason="drop_newest")

    expo = Exposition(render(agent))  # the parser rejects duplicate series

    dropped = "traits_agent_dropped_items_total"
    assert expo.types[dropped] == "counter"
    assert expo.value(dropped, resource="actions", reason="drop_oldest") == 2
    assert expo.value(dropped, resource="actions", reason="drop_newest") == 0
    assert expo.value(dropped, resource="actions", reason="dead_letter_rotated") == 4
    assert expo.value(dropped, resource="logins", reason="drop_newest") == 7
    assert list(expo.order).count(dropped) == 1


async def test_queue_gauges_and_upstream_state_set():
    """Queued items/bytes per resource are gauges; upstream state is 1 for the current state."""
    expo = Exposition(render(stand_in()))

    assert expo.types["traits_agent_queued_items"] == "gauge"
    assert expo.value("traits_agent_queued_items", resource="actions") == 3
    assert expo.value("traits_agent_queued_bytes", resource="actions") == 300
    assert expo.value("traits_agent_queued_items", resource="logins") == 0
    assert expo.value("traits_agent_in_flight_items", resource="actions") == 0
    for state in UPSTREAM_STATES:
        want = 1 if state == "retrying" else 0
        assert expo.value("traits_agent_upstream_state", resource="actions", state=state) == want
        want = 1 if state == "ok" else 0
        assert expo.value("traits_agent_upstream_state", resource="logins", state=state) == want
    assert expo.value("traits_agent_build_info", version=__version__) == 1
    assert expo.value("traits_agent_up") == 1
    assert expo.value("traits_agent_pipeline_progressing") == 1


async def test_before_the_uploader_exists_every_upstream_is_ok(short_dir):
    """With no uploader yet (start-up), upstream_state says ok for every resource."""
    agent = real_agent(short_dir)
    assert agent.uploader is None
    expo = Exposition(render(agent.status()))
    assert expo.value("traits_agent_upstream_state", resource="actions", state="ok") == 1


async def test_oldest_age_comes_from_the_lane(short_dir):
    """The oldest queued item's age is trio-now minus the lane's waiting_since; a recovered
    backlog (waiting since before start) is at least as old as the agent."""
    agent = real_agent(short_dir, items=3)
    agent.lanes["actions"]._waiting_since = trio.current_time() - 12.5
    expo = Exposition(render(agent.status()))
    assert 12.5 <= expo.value("traits_agent_oldest_queued_age_seconds", resource="actions") < 14
    assert expo.value("traits_agent_oldest_queued_age_seconds", resource="logins") == 0

    agent.lanes["actions"]._waiting_since = -math.inf
    expo = Exposition(render(agent.status()))
    assert 5 <= expo.value("traits_agent_oldest_queued_age_seconds", resource="actions") < 7


async def test_upload_histogram_is_consistent():
    """upload_seconds has cumulative buckets for every bound, +Inf == _count, and the sum."""
    agent = stand_in()
    for value in (0.001, 0.02, 0.02, 0.3, 7.0, 99.0):
        agent.counters.observe("upload_seconds", value, resource="actions")
    agent.counters.observe("upload_seconds", 0.004, resource="logins")

    expo = Exposition(render(agent))

    check_histogram(expo, "traits_agent_upload_seconds")
    buckets = expo.series("traits_agent_upload_seconds_bucket")
    assert len(buckets) == 2 * (len(LATENCY_BUCKETS) + 1)
    assert expo.value("traits_agent_upload_seconds_bucket", resource="actions", le="0.025") == 3
    assert expo.value("traits_agent_upload_seconds_bucket", resource="actions", le="30.0") == 5
    assert expo.value("traits_agent_upload_seconds_bucket", resource="actions", le="+Inf") == 6
    assert expo.value("traits_agent_upload_seconds_count", resource="actions") == 6
    assert expo.value("traits_agent_upload_seconds_sum", resource="actions") == pytest.approx(
        106.341
    )


async def test_label_values_are_escaped():
    """Backslashes, quotes and newlines in label values survive a round trip."""
    agent = stand_in()
    nasty = 'a "quoted"\\path\nnext'
    agent.counters.inc("rejected_events", reason=nasty)
    text = render(agent)
    assert "\nnext" not in text.replace("\\n", "")
    assert Exposition(text).value("traits_agent_rejected_events_total", reason=nasty) == 1


async def test_udp_errors_from_proc_net_snmp(tmp_path):
    """InErrors and RcvbufErrors of the Udp: table (plus Udp6) are exported; HELP says
    host-wide; no file, no family."""
    snmp = tmp_path / "snmp"
    snmp.write_text(
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "Udp: 100 2 17 90 11 0\n"
        "UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "UdpLite: 0 0 500 0 500 0\n"
    )
    snmp6 = tmp_path / "snmp6"
    snmp6.write_text("Udp6InDatagrams                 \t5\nUdp6InErrors 3\nUdp6RcvbufErrors 1\n")

    assert read_udp_errors(snmp, snmp6) == (20, 12)
    assert read_udp_errors(snmp, tmp_path / "absent") == (17, 11)
    assert read_udp_errors(tmp_path / "absent", snmp6) is None

    expo = Exposition(render(stand_in(), snmp_path=snmp, snmp6_path=snmp6))
    assert expo.value("traits_agent_udp_receive_errors_total") == 20
    assert expo.value("traits_agent_udp_rcvbuf_errors_total") == 12
    assert expo.types["traits_agent_udp_rcvbuf_errors_total"] == "counter"
    assert "Host-wide" in expo.helps["traits_agent_udp_rcvbuf_errors_total"]

    expo = Exposition(render(stand_in(), snmp_path=tmp_path / "absent"))
    assert "traits_agent_udp_receive_errors_total" not in expo.types


@pytest.mark.skipif(not Path("/proc/net/snmp").exists(), reason="needs Linux /proc/net/snmp")
async def test_udp_errors_from_the_real_proc():
    """On Linux the real /proc/net/snmp parses."""
    errors = read_udp_errors()
    assert errors is not None and all(v >= 0 for v in errors)


# -- a real HTTP server -------------------------------------------------------------------------


async def test_healthz_and_unknown_paths_on_a_stand_in(nursery):
    """/healthz is 200 `ok` while progressing, 503 JSON naming the backlog when stalled,
    503 while stopping; other paths 404, other methods 405."""
    agent = stand_in()
    agent.resources["actions"].waiting_s = 300.0
    host, port = await nursery.start(serve_metrics, Source(agent), "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        r = await http.get("/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")

        agent.progressing = False
        r = await http.get("/healthz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "stalled"
        assert body["resources"]["actions"]["queued_items"] == 3
        assert body["resources"]["actions"]["waiting_s"] >= 300
        assert "logins" not in body["resources"]

        r = await http.get("/metrics")
        assert Exposition(r.text).value("traits_agent_pipeline_progressing") == 0

        agent.stopping = True
        r = await http.get("/healthz")
        assert (r.status_code, r.json()["status"]) == (503, "stopping")

        assert (await http.get("/")).status_code == 404
        assert (await http.get("/metrics/x")).status_code == 404
        r = await http.post("/metrics")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        r = await http.head("/metrics")
        assert r.status_code == 200 and r.content == b""


# -- the real agent -----------------------------------------------------------------------------


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="ta-", dir="/tmp") as d:
        yield Path(d)


def agent_config(directory: Path):
    from traits_agent.config import from_mapping

    return from_mapping(
        {
            "listen": {
                "unix": str(directory / "events.sock"),
                "udp": "127.0.0.1:0",
                "forward_unix": "",
                "receive_buffer": 0,
            },
            "queue": {"dir": str(directory / "queue"), "fsync": "never"},
            "batch": {"linger_ms": 10},
            "control": {"socket": str(directory / "control.sock")},
        }
    )


def send_events(path: Path, count: int) -> None:
    """Raw datagrams in the Forward protocol's Message form (what every client sends)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for i in range(count):
            record = {"user_id": str(1000 + i), "action_id": "7", "action_name": "buy_item"}
            s.sendto(msgpack.packb(["actions", int(time.time()), record]), str(path))
        s.sendto(msgpack.packb(["actions", int(time.time()), {"user_id": "1"}]), str(path))
        s.sendto(msgpack.packb(["no_such_resource", int(time.time()), {}]), str(path))


async def test_metrics_of_a_running_agent(nursery, short_dir):
    """A real agent with the fake API: after delivering, /metrics counts what was received,
    rejected, delivered and how long uploads took; /healthz is 200."""
    from traits_agent import agent as agent_module

    agent = await nursery.start(
        functools.partial(agent_module.run, fake_api=True), agent_config(short_dir), "test-key"
    )
    host, port = await nursery.start(serve_metrics, agent, "127.0.0.1", 0)
    send_events(short_dir / "events.sock", 5)
    with trio.fail_after(30):
        while agent.counters.total("delivered_items") < 5:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.01)

    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        r = await http.get("/metrics")
        health = await http.get("/healthz")
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE
    expo = Exposition(r.text)

    assert expo.value("traits_agent_received_datagrams_total") == 7
    assert expo.value("traits_agent_accepted_events_total", resource="actions") == 5
    assert expo.value("traits_agent_delivered_items_total", resource="actions") == 5
    assert sum(expo.series("traits_agent_rejected_events_total").values()) == 2
    assert expo.value("traits_agent_upload_requests_total", resource="actions") >= 1
    assert expo.value("traits_agent_queued_items", resource="actions") == 0
    assert expo.value("traits_agent_upstream_state", resource="actions", state="ok") == 1
    assert (
        expo.value("traits_agent_dropped_items_total", resource="actions", reason="drop_oldest")
        == 0
    )
    check_histogram(expo, "traits_agent_upload_seconds")
    assert expo.value("traits_agent_upload_seconds_count", resource="actions") >= 1
    resources = {dict(k)["resource"] for k in expo.series("traits_agent_queued_items")}
    assert resources == set(agent.queues)
    assert (health.status_code, health.text) == (200, "ok\n")
    status = agent.snapshot()
    assert status["resources"]["actions"]["delivered"] == 5


async def test_healthz_of_a_stalled_agent(nursery, short_dir):
    """A real agent whose pipeline reports no progress answers /healthz 503 with a reason."""
    from traits_agent import agent as agent_module

    agent = await nursery.start(
        functools.partial(agent_module.run, fake_api=True), agent_config(short_dir), "test-key"
    )
    host, port = await nursery.start(serve_metrics, agent, "127.0.0.1", 0)
    agent.is_progressing = lambda: False  # the stalled condition, constructed directly
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://{host}:{port}/healthz")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert json.loads(r.text)["status"] == "stalled"
