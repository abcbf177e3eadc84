"""The log processors: rate limiting once, in the chain (observe/log.py)."""

from __future__ import annotations

import io
import json

import pytest
import structlog
from structlog.testing import LogCapture

from traits_agent.observe import log as agent_log
from traits_agent.observe.log import RATE_LIMITS, Limit, RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def logger(limit: RateLimit) -> tuple[structlog.BoundLogger, LogCapture]:
    capture = LogCapture()
    return structlog.wrap_logger(None, processors=[limit, capture]), capture


def test_one_line_per_interval_and_the_next_says_how_many_were_held() -> None:
    """Five identical lines in 10 s → one passes; the first after 10 s says suppressed=4."""
    clock = Clock()
    log, capture = logger(RateLimit({"event_rejected": Limit(10.0, ("reason",))}, clock))
    for _ in range(5):
        log.warning("event_rejected", reason="wrong_type")
        clock.now += 1.0
    clock.now = 10.0
    log.warning("event_rejected", reason="wrong_type")
    assert [e["suppressed"] for e in capture.entries] == [0, 4]


def test_keys_are_limited_apart_and_other_events_pass() -> None:
    """Another reason is another line; an event not in the table is never held."""
    log, capture = logger(RateLimit({"event_rejected": Limit(10.0, ("reason",))}, Clock()))
    for _ in range(3):
        log.warning("event_rejected", reason="wrong_type")
        log.warning("event_rejected", reason="too_long")
        log.info("batch_delivered", items=1)
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
    log, capture = logger(limit)
    for n in (5, 7, 11):
        log.warning("events_dropped", resource="actions", dropped=n)
    clock.now = 10.0
    log.warning("events_dropped", resource="actions", dropped=1)
    assert [(e["dropped"], e["suppressed"]) for e in capture.entries] == [(5, 0), (19, 2)]


@pytest.mark.parametrize("event", sorted(RATE_LIMITS))
def test_setup_puts_the_limits_in_the_chain(event: str) -> None:
    """After `setup`, a storm of each rate-limited event writes one line, not a thousand."""
    out = io.StringIO()
    agent_log.setup("debug", "json", stream=out)
    try:
        log = structlog.get_logger("test")
        fields = dict.fromkeys(RATE_LIMITS[event].key, "x")
        for _ in range(1000):
            log.error(event, **fields)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [line["event"] for line in lines] == [event]
    finally:
        structlog.reset_defaults()
