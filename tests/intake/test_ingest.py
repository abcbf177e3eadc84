"""Ingest counts per event: a message rejected whole counts each of its events, once more as a
protocol error; datagrams take the metadata form like the stream listeners."""

from __future__ import annotations

import msgpack

from tests.intake.test_forward import T0, Rig, event_time, level_up
from traits_agent.cli.status import format_status


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def test_a_datagram_rejected_whole_counts_each_event(tmp_path) -> None:
    rig = Rig(tmp_path)
    try:
        rig.ingest.handle(
            [
                pack(["level_ups", [[{"bad": "time"}, level_up(i)] for i in range(3)]]),
                pack(["level_ups", [[[event_time(T0, 5), {}], level_up(9)]]]),  # metadata form
                b"\xc1",  # not msgpack: no event can be told apart
            ]
        )
        counters = rig.counters
        assert counters.by_label("rejected_events", "reason") == {"bad_time": 3}
        assert counters.by_label("protocol_errors", "reason") == {"bad_time": 1, "not_msgpack": 1}
        assert counters.total("received_events") == 4
        assert counters.total("accepted_events") == 1
        assert counters.total("received_datagrams") == 3
        assert rig.items("level_ups") == [level_up(9)]
    finally:
        rig.close()


def test_status_shows_protocol_errors_apart_from_rejected_events() -> None:
    snapshot = {
        "version": "x",
        "pid": 1,
        "uptime_s": 1.0,
        "endpoint": "e",
        "upstream": "ok",
        "received": {"events": 4, "datagrams": 3, "accepted": 1},
        "rejected": {"bad_time": 3},
        "protocol_errors": {"bad_time": 1, "not_msgpack": 1},
        "resources": {},
    }
    text = format_status(snapshot)
    assert "rejected: bad_time=3" in text
    assert "protocol errors (messages): bad_time=1, not_msgpack=1" in text
