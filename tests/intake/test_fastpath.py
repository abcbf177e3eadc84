"""The datagram fast path against the general path (`decode_datagram` + `normalize`).

The fast path never decides anything: it either hands back exactly the payloads the general path
would store for a datagram (all of its events accepted, none stripped), or None. Checked on
generated datagrams, well-formed and broken, and through `Ingest` for the counters.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack
import pytest

from tests.generated_events import datagrams
from tests.reference_examples import EXAMPLES
from traits_agent.intake.fastpath import FastPath
from traits_agent.intake.ingest import Ingest
from traits_agent.intake.wire import Entry, decode_datagram, encode_event, encode_forward
from traits_agent.observe.metrics import Counters
from traits_agent.queue import MAX_PAYLOAD, DiskQueue
from traits_agent.schema import RESOURCES, Rejected, normalize, resolve_tag

NOW = 1700000000.5


def general(data: bytes) -> tuple[list[str], list[tuple[Any, ...]]]:
    """What the general path makes of a datagram: its errors, and per event the decision."""
    result = decode_datagram(data)
    outcomes: list[tuple[Any, ...]] = []
    for entry in result.entries:
        resource = resolve_tag(entry.tag)
        if resource is None:
            outcomes.append(("rejected", "unknown_resource"))
            continue
        event_time = NOW if entry.time is None else entry.time
        try:
            n = normalize(resource, entry.record, event_time)
        except Rejected as e:
            outcomes.append(("rejected", e.reason, e.field))
        else:
            outcomes.append(("ok", resource.name, n.item, n.stripped))
    return result.errors, outcomes


def test_the_fast_path_takes_only_what_the_general_path_stores_whole() -> None:
    fast = FastPath()
    taken = handed_over = several = 0
    for data in datagrams(seed=12, count=20_000):
        got = fast.payloads(data, NOW)
        if got is None:
            handed_over += 1
            continue
        taken += 1
        several += len(got) > 1
        errors, outcomes = general(data)
        assert errors == [], data
        assert all(o[0] == "ok" and o[3] == () for o in outcomes), (data, outcomes)
        items = [(r.name, json.loads(p)) for r, payloads in got for p in payloads]
        assert items == [(o[1], o[2]) for o in outcomes], data
    assert taken > 3000 and handed_over > 10_000 and several > 100, (taken, handed_over, several)


def test_the_one_message_shortcut_agrees_with_payloads() -> None:
    """`FastPath.message` (what `Ingest.handle` tries first) gives, for every generated
    datagram, exactly what `payloads` gives for a one-Message datagram, or hands over: None
    (ask `payloads`) or False (only when `payloads` refuses it too)."""
    fast, reference = FastPath(), FastPath()
    outcomes = {"taken": 0, "ask payloads": 0, "general": 0}
    for data in [
        *datagrams(seed=13, count=20_000),
        encode_event("level_ups", EXAMPLES["level_ups"]) * 2,  # two entries: `payloads` splits
        encode_event("level_ups", {**EXAMPLES["level_ups"], "user_id": 1001}),  # refused
    ]:
        one = fast.message(data, NOW)
        expected = reference.payloads(data, NOW)
        if one is None:
            outcomes["ask payloads"] += 1
        elif one is False:
            outcomes["general"] += 1
            assert expected is None, data
        else:
            outcomes["taken"] += 1
            resource, payload = one
            assert expected == [(resource, [payload])], data
    assert min(outcomes.values()) > 100, outcomes


def event_time(seconds: int, nanoseconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanoseconds))


@pytest.mark.parametrize(
    "value",
    [
        ["level_ups", 1546355045, EXAMPLES["level_ups"]],
        ["12traits.actions", event_time(1546355045, 5), EXAMPLES["actions"]],
        ["users", None, EXAMPLES["logins"]],
        ["items", 1.5, EXAMPLES["items"]],
        ["purchases", [[1, EXAMPLES["purchases"]], [None, EXAMPLES["purchases"]]]],
        ["x" * 200 + ".virtual-purchases", [[1, EXAMPLES["virtual_purchases"]]]],
        ["social_dynamics", []],
        # the buffered client: one Forward entry per resource, concatenated
        ["level_ups", [[1, EXAMPLES["level_ups"]]]],
        ["actions", [[1, EXAMPLES["actions"]], [2, EXAMPLES["actions"]]]],
        ["level_ups", 1546355045, EXAMPLES["level_ups"]],
    ],
)
def test_common_forms_take_the_fast_path(value: list[Any]) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    got = FastPath().payloads(data, NOW)
    assert got is not None
    assert [json.loads(p) for _, ps in got for p in ps] == [o[2] for o in general(data)[1]]


def test_several_entries_in_one_datagram() -> None:
    data = b"".join(
        encode_forward(name, [(NOW, EXAMPLES[name])] * 3) for name in ("actions", "level_ups")
    ) + encode_event("items", EXAMPLES["items"])
    got = FastPath().payloads(data, NOW)
    assert [(r.name, len(ps)) for r, ps in got] == [("actions", 3), ("level_ups", 3), ("items", 1)]
    assert FastPath().payloads(data + b"\x92", NOW) is None  # a truncated last entry
    assert FastPath().payloads(data * 6, NOW) is None  # more than MAX_ENTRIES


@pytest.mark.parametrize("nanoseconds", [999_999_000, 999_999_500, 999_999_999])
def test_an_eventtime_in_its_last_nanoseconds_keeps_its_second(nanoseconds: int) -> None:
    """seconds + 0.999999999 as a float is the next second: an event sent at 22:13:21.999999999
    was stamped 22:13:22. Each path keeps its second: the general one, the one-Message
    shortcut and a Forward datagram's events."""
    record = {"user_id": "u", "level": 2}
    t = event_time(1700000001, nanoseconds)
    message = msgpack.packb(["level_ups", t, record], use_bin_type=True)
    forward = msgpack.packb(["level_ups", [[t, record], [t, record]]], use_bin_type=True)
    shortcut = FastPath().message(message, NOW)
    assert isinstance(shortcut, tuple)
    several = FastPath().payloads(forward, NOW)
    assert several is not None
    stamps = [
        general(message)[1][0][2]["timestamp"],
        json.loads(shortcut[1])["timestamp"],
        *(json.loads(p)["timestamp"] for p in several[0][1]),
        *(o[2]["timestamp"] for o in general(forward)[1]),
    ]
    assert stamps == ["2023-11-14 22:13:21"] * 6


def test_a_forward_datagram_gets_each_events_own_timestamp() -> None:
    """Events of one Forward datagram in different seconds, in every time form, each get
    the timestamp the general path fills in; one bad time anywhere hands the whole datagram
    over (the records are encoded together, `schema.encode_fast_many`)."""
    record = {"user_id": "u", "level": 2}
    times = [
        event_time(1700000000, 5),
        1700000001,
        1700000002.75,
        None,
        event_time(1700000000, 999_000_000),
        event_time(1700003600, 0),
    ]
    data = msgpack.packb(["level_ups", [[t, record] for t in times]], use_bin_type=True)
    got = FastPath().payloads(data, NOW)
    assert got is not None
    stamps = [json.loads(p)["timestamp"] for p in got[0][1]]
    assert stamps == [o[2]["timestamp"] for o in general(data)[1]]
    assert stamps == [
        "2023-11-14 22:13:20",
        "2023-11-14 22:13:21",
        "2023-11-14 22:13:22",
        "2023-11-14 22:13:20",  # NOW
        "2023-11-14 22:13:20",
        "2023-11-14 23:13:20",
    ]
    bad = msgpack.packb(
        ["level_ups", [[1, record], [event_time(1, 1_000_000_000), record], [2, record]]]
    )
    assert FastPath().payloads(bad, NOW) is None
    stamped = {**record, "timestamp": "2019-02-29 00:00:00"}  # the third of three: refused
    late = msgpack.packb(["level_ups", [[1, record], [2, record], [3, stamped]]])
    assert FastPath().payloads(late, NOW) is None


@pytest.mark.parametrize(
    "data",
    [
        encode_event("playfab", {"a": 1}),
        encode_event("nope", EXAMPLES["level_ups"]),
        encode_event("level_ups", {**EXAMPLES["level_ups"], "extra": 1}),
        encode_event("level_ups", {**EXAMPLES["level_ups"], "user_id": 1001}),
        encode_event("level_ups", EXAMPLES["level_ups"]) + encode_event("playfab", {}),
        encode_event("level_ups", EXAMPLES["level_ups"]) + b"\xc0",
        msgpack.packb(["level_ups", 1, EXAMPLES["level_ups"], {}]),
        msgpack.packb(["level_ups", [[1, EXAMPLES["level_ups"]]], {"chunk": "c"}]),
        msgpack.packb(["level_ups", [[[1, {}], EXAMPLES["level_ups"]]]]),
        msgpack.packb(["level_ups", event_time(1, 1_000_000_000), EXAMPLES["level_ups"]]),
        msgpack.packb(["level_ups", msgpack.Timestamp(1, 0), EXAMPLES["level_ups"]]),
        b"\x00",
        b"\xc0",
        b"",
    ],
)
def test_anything_else_takes_the_general_path(data: bytes) -> None:
    assert FastPath().payloads(data, NOW) is None


class Lane:
    def __init__(self, queue: DiskQueue) -> None:
        self.queue = queue

    def notify(self) -> None:
        pass


def test_ingest_counts_the_same_on_either_path(tmp_path) -> None:
    """The same events as fast datagrams and as datagrams the fast path refuses (a stripped
    field each): the same counters, the same items queued (less the stripped field)."""

    def run(records: list[dict[str, Any]], sub: str) -> tuple[Counters, list[Any]]:
        queues = {n: DiskQueue.open(tmp_path / sub / n) for n in RESOURCES}
        counters = Counters()
        ingest = Ingest({n: Lane(q) for n, q in queues.items()}, counters)
        ingest.handle(
            [encode_event("level_ups", r, NOW) for r in records[:3]]
            + [encode_forward("level_ups", [(NOW, r) for r in records[3:]])]
            + [encode_event("level_ups", {"user_id": ""}), b"\xc1"]
        )
        batch = queues["level_ups"].read_batch(100, 1 << 20)
        items = [json.loads(p) for p in batch.payloads] if batch else []
        for q in queues.values():
            q.close()
        return counters, items

    records = [{"user_id": str(i), "level": i} for i in range(1, 8)]
    fast_counters, fast_items = run(records, "fast")
    slow_counters, slow_items = run([{**r, "junk": 0} for r in records], "slow")
    assert fast_items == slow_items and len(fast_items) == 7
    for c in (fast_counters, slow_counters):
        assert c.get("received_datagrams") == 6
        assert c.get("received_events") == 8
        assert c.get("accepted_events", resource="level_ups") == 7
        # per event; the garbage datagram holds none that could be told apart (issue 11)
        assert c.by_label("rejected_events", "reason") == {"bad_value": 1}
        assert c.by_label("protocol_errors", "reason") == {"not_msgpack": 1}
    assert fast_counters.total("stripped_fields") == 0
    assert slow_counters.get("stripped_fields", resource="level_ups") == 7


def test_a_record_over_the_queue_limit_is_rejected_and_the_others_kept(tmp_path) -> None:
    queues = {n: DiskQueue.open(tmp_path / n) for n in RESOURCES}
    counters = Counters()
    ingest = Ingest({n: Lane(q) for n, q in queues.items()}, counters)
    huge = {"blob": "x" * (MAX_PAYLOAD + 1)}
    entries = [Entry("playfab", NOW, {"n": 1}), Entry("playfab", NOW, huge)]
    entries.append(Entry("playfab", NOW, {"n": 2}))
    assert ingest.store_entries(entries, NOW) == {"playfab"}
    batch = queues["playfab"].read_batch(10, 1 << 20)
    assert batch is None  # buffered until flushed
    ingest.flush({"playfab"})
    batch = queues["playfab"].read_batch(10, 1 << 20)
    assert [json.loads(p) for p in batch.payloads] == [{"n": 1}, {"n": 2}]
    assert counters.by_label("rejected_events", "reason") == {"too_large": 1}
    assert counters.get("accepted_events", resource="playfab") == 2
    assert counters.get("received_events") == 3
    for q in queues.values():
        q.close()
