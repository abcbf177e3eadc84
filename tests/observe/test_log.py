"""The log's shape for operators: JSON samples, NO_COLOR, no warning per retry, a heartbeat;
and rate limiting once, as a processor in the chain (observe/log.py)."""

from __future__ import annotations

import io
import json
import os

import pytest
import structlog
import trio
from structlog.testing import LogCapture, capture_logs

from tests.delivery.test_delivery import Rig, level_ups
from traits_agent.fakeapi import Fault
from traits_agent.intake.ingest import Ingest
from traits_agent.intake.wire import encode_event
from traits_agent.observe import log
from traits_agent.observe.log import RATE_LIMITS, Limit, RateLimit
from traits_agent.observe.metrics import Counters
from traits_agent.observe.summary import run_summary


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


def test_event_rejected_sample_is_json_jq_can_read_into():
    """`sample` is the record itself (a JSON object in the line), not its Python repr."""
    stream = io.StringIO()
    log.setup("info", "json", stream=stream)
    ingest = Ingest({}, Counters())
    ingest.handle([encode_event("purchases", {"user_id": "1001", "count": 1}, 1.0)])
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["event"] == "event_rejected"
    assert line["sample"]["user_id"] == "1001"


def test_a_huge_rejected_record_gives_a_bounded_sample():
    """A 100 KB field and 500 keys: the logged sample stays under a kilobyte."""
    record = {"user_id": "x" * 100_000, **{f"k{i}": i for i in range(500)}}
    stream = io.StringIO()
    log.setup("info", "json", stream=stream)
    Ingest({}, Counters()).reject("missing_field", record, resource="purchases")
    line = stream.getvalue().splitlines()[-1]
    assert len(line) < 1024
    sample = json.loads(line)["sample"]
    assert sample["user_id"].startswith("xxx") and "…" in sample


def test_no_color_is_honoured_on_a_terminal(monkeypatch):
    """On a TTY the console log is coloured, unless $NO_COLOR is set."""
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            monkeypatch.delenv("NO_COLOR", raising=False)
            log.setup("info", "console", stream=tty)
            structlog.get_logger("t").info("coloured", n=1)
            tty.flush()
            coloured = os.read(master, 65536)
            monkeypatch.setenv("NO_COLOR", "1")
            log.setup("info", "console", stream=tty)
            structlog.get_logger("t").info("plain", n=1)
            tty.flush()
            plain = os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    assert b"\x1b[" in coloured
    assert b"plain" in plain and b"\x1b[" not in plain


async def test_an_outage_is_not_a_warning_per_attempt(
    autojump_clock, nursery, api, client, tmp_path
):
    """30 failed attempts over minutes of virtual time: one upload_retrying warning per minute
    (with suppressed=N), every attempt at debug."""
    api.inject(Fault(status=503, times=30))
    rig = Rig(tmp_path, api, client, "level_ups", linger_s=0.0)
    t0 = trio.current_time()
    # through the real limiter (capture_logs alone would bypass the processor chain)
    logs: list[dict] = []

    def keep(_logger, method, event_dict):
        logs.append({**event_dict, "log_level": event_dict.get("level", method)})
        raise structlog.DropEvent

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            RateLimit(clock=trio.current_time),
            keep,
        ]
    )
    await nursery.start(rig.lane.run)
    rig.add(level_ups(1))
    await api.wait_for_items(1)
    elapsed = trio.current_time() - t0
    retrying = [e for e in logs if e["event"] == "upload_retrying"]
    warnings = [e for e in retrying if e["log_level"] == "warning"]
    assert len(retrying) == 30
    assert 1 <= len(warnings) <= elapsed // 60 + 1 < 30
    assert sum(w.get("suppressed", 0) for w in warnings) + len(warnings) <= 30


async def test_summary_once_a_minute_while_anything_happened(autojump_clock, nursery):
    """One `summary` per minute with the deltas; none in a quiet minute."""
    snap = {
        "upstream": "ok",
        "received": {"events": 0},
        "rejected": {},
        "resources": {"level_ups": {"delivered": 0, "queued_items": 0, "dropped": {}}},
    }
    with capture_logs() as logs:
        await nursery.start(run_summary, lambda: snap)
        snap["received"]["events"] = 10
        snap["rejected"] = {"missing_field": 2}
        snap["resources"]["level_ups"].update(delivered=7, queued_items=1, queued_bytes=40)
        await trio.sleep(60.5)
        await trio.sleep(60)  # a quiet minute
        snap["resources"]["level_ups"]["dropped"] = {"drop_oldest": 1}
        await trio.sleep(60)
    lines = [e for e in logs if e["event"] == "summary"]
    assert len(lines) == 2
    first = lines[0]
    assert (first["in"], first["out"], first["rejected"], first["queued"]) == (10, 7, 2, 1)
    assert first["queued_bytes"] == 40 and first["upstream"] == "ok"
    assert (lines[1]["in"], lines[1]["dropped"]) == (0, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limited(limit: RateLimit) -> tuple[structlog.BoundLogger, LogCapture]:
    capture = LogCapture()
    return structlog.wrap_logger(None, processors=[limit, capture]), capture


def test_one_line_per_interval_and_the_next_says_how_many_were_held() -> None:
    """Five identical lines in 10 s → one passes; the first after 10 s says suppressed=4."""
    clock = Clock()
    logger, capture = limited(RateLimit({"event_rejected": Limit(10.0, ("reason",))}, clock))
    for _ in range(5):
        logger.warning("event_rejected", reason="wrong_type")
        clock.now += 1.0
    clock.now = 10.0
    logger.warning("event_rejected", reason="wrong_type")
    assert [e["suppressed"] for e in capture.entries] == [0, 4]


def test_keys_are_limited_apart_and_other_events_pass() -> None:
    """Another reason is another line; an event not in the table is never held."""
    logger, capture = limited(RateLimit({"event_rejected": Limit(10.0, ("reason",))}, Clock()))
    for _ in range(3):
        logger.warning("event_rejected", reason="wrong_type")
        logger.warning("event_rejected", reason="too_long")
        logger.info("batch_delivered", items=1)
    events = [(e["event"], e.get("reason")) for e in capture.entries]
    assert events == [
        ("event_rejected", "wrong_type"),
        ("event_rejected", "too_long"),
        ("batch_delivered", None),
        ("batch_delivered", None),
        ("batch_delivered", None),
    ]


def test_sums_add_up_what_was_held_back() -> None:
    """events_dropped: the counts of the lines held back are added to the next one."""
    clock = Clock()
    limit = RateLimit({"events_dropped": Limit(10.0, ("resource",), sums=("dropped",))}, clock)
    logger, capture = limited(limit)
    for n in (5, 7, 11):
        logger.warning("events_dropped", resource="actions", dropped=n)
    clock.now = 10.0
    logger.warning("events_dropped", resource="actions", dropped=1)
    assert [(e["dropped"], e["suppressed"]) for e in capture.entries] == [(5, 0), (19, 2)]


@pytest.mark.parametrize("event", sorted(RATE_LIMITS))
def test_setup_puts_the_limits_in_the_chain(event: str) -> None:
    """After `setup`, a storm of each rate-limited event writes one line, not a thousand."""
    out = io.StringIO()
    log.setup("info", "json", stream=out)
    logger = structlog.get_logger("test")
    fields = dict.fromkeys(RATE_LIMITS[event].key, "x")
    for _ in range(1000):
        logger.error(event, **fields)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [event]
