"""Ingest survives whatever one datagram does: the others in the burst are stored."""

from __future__ import annotations

import json

import msgpack
import pytest
from structlog.testing import capture_logs

from traits_agent.intake.ingest import Ingest
from traits_agent.intake.wire import encode_event
from traits_agent.observe.log import sample
from traits_agent.observe.metrics import Counters

T0 = 1546355045


class ListQueue:
    """A queue that keeps payloads in a list."""

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def append(self, payload: bytes) -> bool:
        self.items.append(payload)
        return True

    def append_many(
        self, payloads: list[bytes], crcs: bytes | None = None, *, lines: bool = False
    ) -> int:
        self.items.extend(payloads)
        return len(payloads)

    def flush(self) -> None:
        pass


class PoisonedFastPath:
    """The fast path with a bug that one datagram's bytes reach (a stand-in for a bug of ours:
    the real decoders cannot be made to raise on demand)."""

    def __init__(self, real, poison: bytes) -> None:
        self.real, self.poison = real, poison

    def payloads(self, data: bytes, now: float):
        if self.poison in data:
            raise RuntimeError("a bug")
        return self.real.payloads(data, now)

    def message(self, data: bytes, now: float):
        if self.poison in data:
            raise RuntimeError("a bug")
        return self.real.message(data, now)


class Lane:
    def __init__(self, queue: ListQueue) -> None:
        self.queue = queue

    def notify(self) -> None:
        pass


def test_nested_datagram_is_rejected_with_a_bounded_sample():
    """`["actions", t, <1000 deep>]` is not_a_map, counted and logged; no exception."""
    value: list = []
    for _ in range(1000):
        value = [value]
    counters = Counters()
    ingest = Ingest({}, counters)
    with capture_logs() as logs:
        ingest.handle([msgpack.packb(["actions", T0, value])])
    assert counters.get("rejected_events", reason="not_a_map") == 1
    (line,) = [e for e in logs if e["event"] == "event_rejected"]
    # the log chain's bound_sample turns it into bounded JSON, not the whole value
    assert len(json.dumps(sample(line["sample"]))) <= 600


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_log_samples_of_any_depth_are_bounded(depth):
    """repr() of a list nested 1,000 deep raises RecursionError; the log sample cuts it."""
    value: list = []
    for _ in range(depth):
        value = [value]
    with pytest.raises(RecursionError):
        repr(value)
    assert len(json.dumps(sample(value))) <= 600


def test_a_datagram_that_raises_costs_only_itself():
    """The datagram whose handling raises is counted (internal_error) and logged with its
    traceback (datagram_failed); the datagrams before and after it are stored."""
    queue = ListQueue()
    counters = Counters()
    ingest = Ingest({"level_ups": Lane(queue)}, counters)
    ingest._fast = PoisonedFastPath(ingest._fast, b"poison")
    burst = [
        encode_event("level_ups", {"user_id": u, "level": 1}, T0) for u in ("a", "poison", "b")
    ]
    with capture_logs() as logs:
        ingest.handle(burst)
    assert [b'"a"' in p for p in queue.items] == [True, False]
    assert b'"b"' in queue.items[1]
    assert counters.get("rejected_events", reason="internal_error") == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["datagram_failed"]
